"""Trace-replay acceptance simulator: score any drafter x tree shape x budget with NO target forward.

The real drafter objects run through their protocol (:class:`specdec.interfaces.Drafter`) on a recorded
:class:`specdec.research.trace.Trace`, step by step exactly as :class:`specdec.engine.SpeculativeEngine` drives them:

1. after the prefill: ``accept(seq, [first token], hidden rows of the prompt)``;
2. each step: ``propose`` on the recorded history; the engine's tree checks (root token, ``max_tree_nodes``,
   vocabulary range); the draft path is accepted exactly as far as it matches the recorded greedy trajectory
   (:func:`specdec.acceptance.greedy_accept`: the first child carrying the target's token), the bonus token is the
   next recorded token; ``accept(seq, accepted + bonus, recorded hidden rows of root + accepted)``; statistics
   with :meth:`specdec.stats.RequestStats.record_step`; the output is clipped at EOS / ``max_new_tokens`` by
   :meth:`specdec.request.Request.append` (the engine's own bookkeeping);
3. ``release(seq)`` at the end.

At temperature 0 tau, acceptance by depth and per-category figures therefore equal the engine's up to numerical
differences between a verification pass and the teacher-forced recording (none on the float64 test model; float16
hidden states may flip a model drafter's near-tie). At temperature > 0 see :mod:`specdec.research.sim_estimate` (an
ESTIMATE). The JSON has the bench's fields minus timing, plus a predicted speedup from a measured cost model
(:mod:`specdec.research.cost_model`) and the replay's own wall time.

Usage::

    python -m specdec.research.simulate record --prompts P.jsonl --max-new-tokens 128 --out trace.pt
    python -m specdec.research.simulate replay trace.pt --drafter ngram "eagle:path=shipped,tree=dynamic,budget=8" \\
        --cost cost.json --out sim.json
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdec.acceptance import greedy_accept
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.request import Request
from specdec.research.trace import PromptTrace, Trace, drafter_rows
from specdec.sampling import SamplingParams
from specdec.stats import RequestStats, mean_ci
from specdec.step_draft import check_draft
from specdec.tree import TokenTree


@dataclass
class StepRecord:
    """One replayed step: context length (history incl. root), tree size (nodes incl. root), depth, accepted
    draft tokens and the drafter's wall time for this ``propose``."""

    context: int
    nodes: int
    depth: int
    accepted: int
    draft_s: float


@dataclass
class ReplayResult:
    """One prompt replayed: the engine's ``RequestStats`` (timings zero), the emitted tokens and every step."""

    stats: RequestStats
    tokens: list[int]
    stop_reason: str
    category: str
    steps: list[StepRecord] = field(default_factory=list)


class TraceTooShort(ValueError):
    """A step needed the target's token beyond the recorded lookahead."""


class _PromptReplay:
    """One prompt's replay state: the request, its recorded trajectory and hidden rows, the result so far."""

    def __init__(self, trace: Trace, p: PromptTrace, drafter: Drafter | None, seq_id: int, cap: int,
                 max_tree_nodes: int, hidden_dtype: torch.dtype | None, device: torch.device | str):
        self.seq, self.plen, self.total = p.tokens, p.prompt_len, p.tokens.numel()
        self.eos = frozenset(trace.eos_token_ids)
        self.req = Request(0, self.seq[: self.plen].clone(), SamplingParams(max_new_tokens=cap), None, None,
                           arrival=0)
        self.hidden = drafter_rows(trace, p, drafter, hidden_dtype, device)
        self.vocab, self.max_tree_nodes = int(trace.meta["vocab_size"]), max_tree_nodes
        self.drafter, self.seq_id = drafter, seq_id
        self.need_hidden = self.hidden is not None
        self.result = ReplayResult(self.req.stats, [], "length", p.category)

    def start(self) -> None:
        first = int(self.seq[self.plen])
        if self.drafter is not None:
            self.drafter.accept(self.seq_id, torch.tensor([first]), self.hidden[: self.plen] if self.need_hidden
                                else None)
        self.req.append([first], self.eos)

    @property
    def done(self) -> bool:
        return self.req.stop_reason is not None

    def draft_input(self) -> DraftInput:
        return DraftInput(self.seq_id, self.req.history[: self.req.length], self.req.params, None)

    def finish_step(self, draft: Draft, draft_s: float) -> None:
        """Accept ``draft`` as far as it follows the recorded trajectory, as the engine's greedy verify would."""
        length, seq = self.req.length, self.seq
        check_draft(draft, int(seq[length - 1]), self.max_tree_nodes, self.vocab)
        tree = draft.tree
        want = torch.full((tree.num_nodes,), -1, dtype=torch.long)  # target argmax after each node
        known = tree.depth + length < self.total
        want[known] = seq[(tree.depth + length)[known]]
        verdict = greedy_accept(tree, want)
        accepted = verdict.num_accepted
        if length + accepted >= self.total:
            raise TraceTooShort(
                f"prompt of {self.plen} tokens: a step at history length {length} accepted {accepted} draft tokens "
                f"and needs the target's token at position {length + accepted}, past the {self.total} recorded; "
                f"record with a lookahead >= the deepest tree ({tree.max_depth})")
        tokens = verdict.tokens
        if self.drafter is not None:
            rows = self.hidden[length - 1 : length + accepted] if self.need_hidden else None
            self.drafter.accept(self.seq_id, tokens, rows)
        has_children = bool((tree.parents == verdict.path[-1]).any())
        self.req.stats.record_step(accepted, has_children, tree.num_nodes)
        self.result.steps.append(StepRecord(length, tree.num_nodes, tree.max_depth, accepted, draft_s))
        self.req.append(tokens.tolist(), self.eos)

    def close(self) -> ReplayResult:
        if self.drafter is not None:
            self.drafter.release(self.seq_id)
        self.req.stats.new_tokens = len(self.req.output)
        self.result.tokens, self.result.stop_reason = list(self.req.output), self.req.stop_reason
        return self.result


def _cap(trace: Trace, max_new_tokens: int | None) -> int:
    cap = trace.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not 1 <= cap <= trace.max_new_tokens:
        raise ValueError(f"max_new_tokens {cap} outside [1, {trace.max_new_tokens}] (the trace's recording)")
    return cap


def replay_prompt(trace: Trace, p: PromptTrace, drafter: Drafter | None, seq_id: int = 0,
                  max_new_tokens: int | None = None, max_tree_nodes: int = 64,
                  hidden_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> ReplayResult:
    """Replay one prompt of ``trace`` at temperature 0 (see the module docstring).

    ``max_new_tokens`` (default: the recording's, at most it) caps the output; ``hidden_dtype`` is the dtype the
    drafter receives hidden rows in (the target's dtype, as the engine passes them; default: the recorded one).
    Raises :class:`TraceTooShort` when a step would read past the recorded lookahead.
    """
    state = _PromptReplay(trace, p, drafter, seq_id, _cap(trace, max_new_tokens), max_tree_nodes, hidden_dtype,
                          device)
    return _run_lockstep([state])[0]


def _run_lockstep(states: list[_PromptReplay]) -> list[ReplayResult]:
    """Step every state until it stops, one batched ``propose`` per step over those still running (as the batched
    engine drafts); each sequence's ``draft_s`` is the call's wall time over the sequences in it. Every drafter
    is released, also when a step raises."""
    try:
        for s in states:
            s.start()
        while live := [s for s in states if not s.done]:
            t0 = time.perf_counter()
            if live[0].drafter is None:
                drafts = [Draft(TokenTree.chain([int(s.seq[s.req.length - 1])])) for s in live]
            else:
                drafts = live[0].drafter.propose([s.draft_input() for s in live])
            draft_s = (time.perf_counter() - t0) / len(live)
            for s, draft in zip(live, drafts, strict=True):
                s.finish_step(draft, draft_s)
    finally:
        results = [s.close() for s in states]
    return results


def replay(trace: Trace, drafter: Drafter | None, max_new_tokens: int | None = None, max_tree_nodes: int = 64,
           hidden_dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
           batch: int = 1) -> list[ReplayResult]:
    """Every prompt of ``trace`` in order, sequence ids 0, 1, ...; ``batch`` prompts at a time in lockstep (one
    batched ``propose`` per step: a model drafter reads its weights once for them all). ``batch=1`` runs them one
    at a time as ``specdec bench`` does. At temperature 0 each prompt's result does not depend on ``batch`` up to
    the drafter's numerical differences between batch sizes (none for n-gram; a float32 model head may flip a
    near-tie)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1 (got {batch})")
    cap, out = _cap(trace, max_new_tokens), []
    for lo in range(0, len(trace.prompts), batch):
        out += _run_lockstep([_PromptReplay(trace, p, drafter, lo + i, cap, max_tree_nodes, hidden_dtype, device)
                              for i, p in enumerate(trace.prompts[lo : lo + batch])])
    return out


def summarize_replay(name: str, results: Sequence[ReplayResult], cost=None, estimate: bool = False) -> dict:
    """The bench's per-run JSON fields minus timing (``tau``, ``tau_mean_ci``, ``acceptance_by_depth``,
    ``accepted_length_hist``, ``n_prompts``, ``per_category``), plus ``predicted_speedup`` (median over prompts of
    the cost model's specdec-AR step time per token over the predicted speculative time per token; ``None``
    without a cost model) and ``estimate`` (True: first-order T > 0 estimate, not an exact replay)."""
    from specdec.app.report import short_label

    total = RequestStats.combine([r.stats for r in results])
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_cat[r.category].append(i)
    speedups = [predicted_speedup(r, cost) for r in results] if cost is not None else None
    per_cat = {}
    for c, idx in by_cat.items():
        per_cat[c] = {"tau": RequestStats.combine([results[i].stats for i in idx]).tau, "n": len(idx)}
        if speedups is not None:
            per_cat[c]["predicted_speedup"] = statistics.median(speedups[i] for i in idx)
    return {
        "name": name, "label": short_label(name), "estimate": estimate, "tau": total.tau,
        "tau_mean_ci": mean_ci([r.stats.tau for r in results]),
        "acceptance_by_depth": total.acceptance_by_depth, "accepted_length_hist": total.accepted_hist,
        "steps": total.steps, "new_tokens": total.new_tokens,
        "mean_tree_nodes": total.tree_nodes / total.steps if total.steps else 0.0,
        "n_prompts": len(results), "per_category": per_cat,
        "predicted_speedup": statistics.median(speedups) if speedups else None,
        "replay_draft_s": sum(s.draft_s for r in results for s in r.steps),
    }


def predicted_speedup(result: ReplayResult, cost) -> float:
    """Cost-model speedup of one replayed request over specdec's autoregressive decoding of the same tokens:
    ``(prefill + sum_steps verify(1, ctx) * tokens) / (prefill + sum_steps (draft + verify(nodes, ctx)))``, the draft
    time being the drafter's measured ``propose`` time in this replay (it runs the real drafter) and ``prefill`` the
    model's time for the request's prompt (both sides pay it, as in the bench's per-request tokens per second; 0
    for a model calibrated without it)."""
    prefill = cost.prefill_time(result.stats.prompt_tokens)
    spec = prefill + sum(cost.draft_time(s.depth, measured=s.draft_s) + cost.verify_time(s.nodes, s.context)
                         for s in result.steps)
    ar = prefill + sum(cost.verify_time(1, s.context + k) for s in result.steps for k in range(s.accepted + 1))
    return ar / spec if spec > 0 else 0.0


if __name__ == "__main__":
    from specdec.research.simulate_cli import main

    raise SystemExit(main())
