"""First-order ESTIMATE of tau and acceptance by depth at temperature > 0 from a greedy :class:`Trace`.

A trace holds the target's distribution (top-K logits) only along its greedy trajectory, so at T > 0 the replay is
an approximation, always labelled ``estimate: true``:

* the drafter runs for real through its protocol on the recorded history (its own sampling stream, the request's
  ``SamplingParams``), and is told recorded tokens and hidden rows as in the exact replay;
* the target's processed distribution at a depth-``d`` node is taken to be the recorded one at history position
  ``L - 1 + d`` (the distribution after the TRAJECTORY's prefix, not after the draft path: the first-order
  approximation), built from the top-K logits (mass outside the top K is dropped, then ``process_logits``);
* every node's acceptance probability is computed exactly for that approximation by the recursive rejection rule
  (:func:`specdec.acceptance.tree_rejection_sample`: child ``i`` is accepted with ``min(1, p(x)/q_i(x))`` under the
  residual ``p`` left by its earlier siblings); the step's statistics are EXPECTED values (tau = mean expected
  tokens per step; depth counts are expected counts);
* the replay advances by an accepted length drawn from those probabilities (seeded), along the trajectory.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.request import Request
from specdec.research.simulate import ReplayResult, StepRecord
from specdec.research.trace import PromptTrace, Trace, drafter_rows
from specdec.sampling import SamplingParams, process_logits
from specdec.stats import RequestStats
from specdec.step_draft import check_draft
from specdec.tree import TokenTree


def target_probs(p: PromptTrace, index: int, vocab: int, params: SamplingParams) -> torch.Tensor:
    """``[V]`` float64: the processed target distribution predicting generated token ``index`` (top-K only)."""
    logits = torch.full((vocab,), float("-inf"), dtype=torch.float64)
    logits[p.topk_ids[index]] = p.topk_values[index].double()
    return process_logits(logits, params)


def node_acceptance(tree: TokenTree, draft_probs: torch.Tensor | None, probs_at_depth: list[torch.Tensor],
                    without_replacement: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per node: ``cond [N]`` = P(accepted | tried), ``reach [N]`` = P(the node is accepted) (root: 1), under the
    recursive rejection rule with the target distribution ``probs_at_depth[depth(parent)]`` at every parent."""
    n = tree.num_nodes
    cond, reach = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    reach[0] = cond[0] = 1.0
    tokens, depth = tree.tokens.tolist(), tree.depth.tolist()
    for u, kids in enumerate(tree.children()):
        if not kids:
            continue
        p = probs_at_depth[depth[u]].clone()
        drawn = torch.zeros_like(p, dtype=torch.bool)
        tried = 1.0
        for c in kids:
            x = tokens[c]
            if draft_probs is None:
                q = torch.zeros_like(p)
                q[x] = 1.0
            else:
                q = draft_probs[c].to(p.dtype)
                if without_replacement and bool(drawn.any()):
                    q = q.masked_fill(drawn, 0.0)
                    q = q / q.sum()
            a = min(1.0, float(p[x] / q[x])) if float(q[x]) > 0 else 0.0
            cond[c] = a
            reach[c] = reach[u] * tried * a
            tried *= 1.0 - a
            r = (p - q).clamp(min=0.0)
            p = r / r.sum() if float(r.sum()) > 0 else p
            drawn[x] = True
    return cond, reach


def record_expected(stats: RequestStats, tree: TokenTree, cond: torch.Tensor, reach: torch.Tensor) -> float:
    """Add one step's EXPECTED counts to ``stats`` (float counters); returns the expected tokens of the step."""
    kids = tree.children()
    depth = tree.depth.tolist()
    stats.steps += 1
    expected = 1.0 + float(reach[1:].sum())
    stats.step_tokens += expected
    stats.tree_nodes += tree.num_nodes
    deepest = tree.max_depth
    for name, size in (("depth_tried", deepest), ("depth_accepted", deepest), ("accepted_hist", deepest + 1)):
        lst = getattr(stats, name)
        lst.extend([0] * (size - len(lst)))
    for u in range(tree.num_nodes):
        none_accepted = 1.0
        for c in kids[u]:
            none_accepted *= 1.0 - float(cond[c])
        if kids[u]:
            stats.depth_tried[depth[u]] += float(reach[u])
            stats.depth_accepted[depth[u]] += float(reach[u]) * (1.0 - none_accepted)
        stats.accepted_hist[depth[u]] += float(reach[u]) * none_accepted
    return expected


def _draw_length(tree: TokenTree, cond: torch.Tensor, gen: torch.Generator) -> int:
    kids, node = tree.children(), 0
    while True:
        nxt = None
        for c in kids[node]:
            if float(torch.rand((), generator=gen, dtype=torch.float64)) < float(cond[c]):
                nxt = c
                break
        if nxt is None:
            return int(tree.depth[node])
        node = nxt


def estimate_prompt(trace: Trace, p: PromptTrace, drafter: Drafter, sampling: SamplingParams, seq_id: int = 0,
                    max_new_tokens: int | None = None, max_tree_nodes: int = 64,
                    hidden_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> ReplayResult:
    """One prompt's T > 0 estimate (see the module docstring); ``sampling.seed`` seeds the drafter's stream
    (``draft_generator``, as the engine does) and the accepted-length draws."""
    if sampling.greedy:
        raise ValueError("the first-order estimate is for temperature > 0; use simulate.replay at temperature 0")
    cap = trace.max_new_tokens if max_new_tokens is None else max_new_tokens
    seq, plen, total = p.tokens, p.prompt_len, p.tokens.numel()
    params = replace(sampling, max_new_tokens=cap)
    req = Request(0, seq[:plen].clone(), params, None, params.draft_generator(device), arrival=0)
    walk = torch.Generator().manual_seed((sampling.seed or 0) * 7919 + seq_id)
    hidden = drafter_rows(trace, p, drafter, hidden_dtype, device)
    need_hidden, vocab = hidden is not None, int(trace.meta["vocab_size"])
    eos = frozenset(trace.eos_token_ids)
    result = ReplayResult(req.stats, [], "length", p.category)
    try:
        drafter.accept(seq_id, seq[plen : plen + 1].clone(), hidden[:plen] if need_hidden else None)
        req.append([int(seq[plen])], eos)
        while req.stop_reason is None:
            length = req.length
            [draft] = drafter.propose([DraftInput(seq_id, req.history[:length], params, req.draft_generator)])
            check_draft(draft, int(seq[length - 1]), max_tree_nodes, vocab)
            tree = draft.tree
            avail = total - length  # recorded target distributions from this root on
            depths = min(tree.max_depth, avail - 1) + 1
            probs = [target_probs(p, length - plen + d, vocab, params) for d in range(depths)]
            tree = _clip(draft, depths - 1)
            cond, reach = node_acceptance(tree.tree, tree.probs, probs, tree.without_replacement)
            record_expected(req.stats, tree.tree, cond, reach)
            a = min(_draw_length(tree.tree, cond, walk), avail - 1)
            tokens = seq[length : length + a + 1].clone()
            drafter.accept(seq_id, tokens, hidden[length - 1 : length + a] if need_hidden else None)
            result.steps.append(StepRecord(length, tree.tree.num_nodes, tree.tree.max_depth, a, 0.0))
            req.append(tokens.tolist(), eos)
    finally:
        drafter.release(seq_id)
    req.stats.new_tokens = len(req.output)
    result.tokens, result.stop_reason = list(req.output), req.stop_reason
    return result


def _clip(draft: Draft, max_depth: int) -> Draft:
    """The draft without nodes deeper than ``max_depth`` (past the trace's recorded distributions)."""
    tree = draft.tree
    if tree.max_depth <= max_depth:
        return draft
    keep = (tree.depth <= max_depth).nonzero().flatten()
    remap = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    parents = torch.where(tree.parents[keep] >= 0, remap[tree.parents[keep].clamp(min=0)], -1)
    probs = None if draft.probs is None else draft.probs[keep]
    return Draft(TokenTree(tree.tokens[keep], parents), probs, draft.without_replacement)


def estimate_replay(trace: Trace, drafter: Drafter, sampling: SamplingParams, max_new_tokens: int | None = None,
                    max_tree_nodes: int = 64, hidden_dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> list[ReplayResult]:
    """:func:`estimate_prompt` for every prompt, one at a time, sequence ids 0, 1, ..."""
    return [estimate_prompt(trace, p, drafter, sampling, i, max_new_tokens, max_tree_nodes, hidden_dtype, device)
            for i, p in enumerate(trace.prompts)]
