"""Measurements behind the cost model (:mod:`specdec.research.cost_model`): what a verification costs by tree size and
context, and what a drafter's ``propose`` costs by expanded levels.

Two ways to time verification, both on a grid of tree sizes ``n`` (root included) and cached contexts ``ctx``, the
grid points taking turns so that the machine's drift hits every point alike:

* :func:`measure_verify` (``--timing forward``): ONE ``target.forward`` over a bushy ``n``-node tree;
* :func:`measure_step` (``--timing step``, the default): one whole engine step (drafting a fixed tree, the forward,
  acceptance, KV commit, statistics) whose ``n - 1`` draft nodes are never accepted, i.e. what a drafter pays per
  node. Measured on SmolLM2-135M on 2 CPU cores (session 9, ``experiments/node_cost.py``): a step with 3 draft
  nodes cost 31-36 % more than plain decoding where the forward alone cost 24 % more, so a forward-only grid makes
  trees look cheaper than they are.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import torch

from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.research.cost_model import draft_levels
from specdec.target import TargetModel
from specdec.tree import TokenTree


def bushy_tree(tokens: torch.Tensor) -> TokenTree:
    """A tree over ``tokens`` (the first is the root) where every node is a child of the root or of node 1, like a
    wide dynamic tree: the shape both grids time."""
    n = tokens.numel()
    return TokenTree(tokens, torch.tensor([-1] + [0 if i % 2 else min(1, i - 1) for i in range(1, n)]))


@torch.inference_mode()
def measure_verify(target: TargetModel, sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                   contexts: Sequence[int] = (64, 256, 768), repeats: int = 5, seed: int = 0,
                   statistic: str = "median") -> list[tuple[int, int, float]]:
    """Median (or ``statistic="min"``: minimum, the robust choice on a machine other jobs load) seconds of ONE
    verification forward (``target.forward`` on a bushy tree of ``n`` nodes: every node a child of the root or of
    node 1, like a wide dynamic tree) over ``ctx`` cached random tokens. The points take turns (every repeat times
    each point once), so the machine's drift over the measurement hits every point alike instead of tilting the
    grid; the first round is a warm-up."""
    reduce = {"median": statistics.median, "min": min}[statistic]
    gen = torch.Generator().manual_seed(seed)
    need = sum(contexts) + len(contexts) * max(sizes)
    cache = target.new_cache(-(-need // 16) + 2 * len(contexts), 16)
    seqs, trees = {}, {}
    for ctx in contexts:
        seq = seqs[ctx] = cache.add_sequence()
        cache.reserve(seq, ctx + max(sizes))
        prompt = torch.randint(0, target.vocab_size, (ctx,), generator=gen)
        target.forward(cache, [seq], [TokenTree.chain(prompt)], last_only=True)
        cache.advance(seq, ctx, keep_reserved=max(sizes))
    for n in sizes:
        trees[n] = bushy_tree(torch.randint(0, target.vocab_size, (n,), generator=gen))
    times: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in sizes}
    for _ in range(repeats + 1):
        for ctx in contexts:
            for n in sizes:
                t0 = time.perf_counter()
                target.forward(cache, [seqs[ctx]], [trees[n]])
                times[(n, ctx)].append(time.perf_counter() - t0)
    for seq in seqs.values():
        cache.release(seq)
    return [(n, ctx, reduce(times[(n, ctx)][1:])) for ctx in contexts for n in sizes]


@torch.inference_mode()
def measure_prefill(target: TargetModel, lengths: Sequence[int] = (32, 128, 512), repeats: int = 5, seed: int = 0,
                    statistic: str = "median") -> list[tuple[int, float]]:
    """``(P, seconds)`` of prefilling a random ``P``-token prompt (one forward over its chain into a fresh sequence,
    the last row's logits kept, as the engine's prefill), the lengths taking turns; the first round is a warm-up."""
    reduce = {"median": statistics.median, "min": min}[statistic]
    gen = torch.Generator().manual_seed(seed)
    cache = target.new_cache(-(-max(lengths) // 16) + 2, 16)
    prompts = {p: TokenTree.chain(torch.randint(0, target.vocab_size, (p,), generator=gen)) for p in lengths}
    times: dict[int, list[float]] = {p: [] for p in lengths}
    for _ in range(repeats + 1):
        for p, chain in prompts.items():
            seq = cache.add_sequence()
            cache.reserve(seq, p)
            t0 = time.perf_counter()
            target.forward(cache, [seq], [chain], last_only=True)
            times[p].append(time.perf_counter() - t0)
            cache.release(seq)
    return [(p, reduce(times[p][1:])) for p in lengths]


class _TimingDrafter:
    """What the timing drafters below share: no vocabulary of their own, no hidden states, no per-sequence state."""

    vocab_size = None
    needs_hidden = False

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass


class RejectedTrees(_TimingDrafter):
    """Drafts a tree of ``nodes`` nodes (settable between steps; :func:`bushy_tree`, or a chain with ``chain``) whose
    draft tokens are random (accepted with probability about 1/vocabulary), so that every step verifies that many
    nodes and advances by about one token: what a drafter pays for ``nodes`` nodes."""

    def __init__(self, vocab_size: int, seed: int = 0, nodes: int = 1, chain: bool = False) -> None:
        self.nodes, self.vocab, self.chain = nodes, vocab_size, chain
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        drafts = []
        for item in batch:
            tokens = torch.cat([item.history[-1:], torch.randint(0, self.vocab, (self.nodes - 1,), generator=self.gen)])
            drafts.append(Draft(TokenTree.chain(tokens) if self.chain else bushy_tree(tokens)))
        return drafts


@torch.inference_mode()
def measure_step(target: TargetModel, sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 contexts: Sequence[int] = (64, 256, 768), repeats: int = 5, seed: int = 0,
                 statistic: str = "median") -> list[tuple[int, int, float]]:
    """Like :func:`measure_verify`, but each point times one whole ``engine.step()`` of a request at ``ctx`` tokens
    whose tree has ``n`` nodes, none of which is accepted (see the module docstring). One engine per context, each
    running one greedy request from ``ctx`` random prompt tokens; a point's context grows by one token per timed
    step (``repeats + 1`` per point; more where a random draft token happens to be the target's choice, about
    ``n / vocabulary`` of the steps), which the grid ignores. The request and its cache are sized for the worst
    case, every node accepted, so no step ever finds the request finished or the cache full."""
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams

    reduce = {"median": statistics.median, "min": min}[statistic]
    gen = torch.Generator().manual_seed(seed)
    steps = (repeats + 1) * len(sizes) + 1
    drafter = RejectedTrees(target.vocab_size, seed)
    engines = {}
    for ctx in contexts:
        most = steps * max(sizes) + 1  # tokens the request could generate if every draft node were accepted
        cache = target.new_cache(-(-(ctx + most + max(sizes)) // 16) + 2, 16)
        engine = SpeculativeEngine(target, cache, drafter, (), max_tree_nodes=max(sizes), max_batch=1,
                                   max_step_tokens=max(ctx, max(sizes)))
        rid = engine.add_request(torch.randint(0, target.vocab_size, (ctx,), generator=gen),
                                 SamplingParams(max_new_tokens=most))
        engine.step()  # the prefill (its first token comes from it)
        engines[ctx] = engine, rid
    times: dict[tuple[int, int], list[float]] = {(n, c): [] for c in contexts for n in sizes}
    for _ in range(repeats + 1):
        for ctx, (engine, _) in engines.items():
            for n in sizes:
                drafter.nodes = n
                t0 = time.perf_counter()
                engine.step()
                times[(n, ctx)].append(time.perf_counter() - t0)
    for engine, rid in engines.values():  # free every block: nothing outlives the measurement
        engine.cancel(rid)
        engine.step()
    return [(n, ctx, reduce(times[(n, ctx)][1:])) for ctx in contexts for n in sizes]


class OracleChains(_TimingDrafter):
    """Drafts a chain of ``nodes`` nodes whose first ``accepted`` draft tokens are the target's own greedy tokens (from
    ``trajectories``: full greedy sequences, prompt included, the one a request's history begins) and whose
    next one differs from the target's, so that every step verifies the same tree and accepts ``accepted`` tokens
    (settable between steps): what an accepted draft token costs the engine on top of a rejected tree."""

    def __init__(self, trajectories: Sequence[torch.Tensor], vocab_size: int, nodes: int, accepted: int = 0) -> None:
        self.trajectories = list(trajectories)
        self.vocab, self.nodes, self.accepted = vocab_size, nodes, accepted

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        drafts = []
        for item in batch:
            at = item.history.numel()
            full = next((t for t in self.trajectories if torch.equal(t[:at], item.history)), None)
            if full is None:
                raise ValueError("OracleChains: no trajectory continues this history")
            good = full[at : at + min(self.accepted, self.nodes - 1)]
            if at + good.numel() >= full.numel():
                raise ValueError(f"OracleChains: trajectory of {full.numel()} tokens exhausted at {at}")
            bad = (full[at + good.numel()] + 1) % self.vocab  # the first wrong token; the rest repeat it
            tokens = torch.cat([item.history[-1:], good, bad.repeat(self.nodes - 1 - good.numel())])
            drafts.append(Draft(TokenTree.chain(tokens)))
        return drafts


@torch.inference_mode()
def measure_accept(target: TargetModel, contexts: Sequence[int] = (64, 256, 768), accepted: Sequence[int] = (0, 2, 4),
                   repeats: int = 6, seed: int = 0) -> list[tuple[int, int, float]]:
    """``(accepted, ctx, seconds)`` of engine steps over one fixed chain of ``max(accepted) + 2`` nodes of which the
    target accepts ``accepted`` draft tokens (:class:`OracleChains`), at ``ctx`` cached tokens (from a random
    prompt whose greedy continuation is decoded first), the counts taking turns; the first round is a warm-up.
    ``accepted`` is the count the engine reported for the step (a near-tie can cut a chain short). The slope over
    ``accepted`` is the engine's cost per accepted token (:func:`fit_accept`), which a rejected-tree grid lacks."""
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    nodes = max(accepted) + 2
    need = (repeats + 1) * sum(a + 1 for a in accepted) + nodes + 2
    results = []
    for ctx in contexts:
        cache = target.new_cache(-(-(ctx + need + 2 * nodes) // 16) + 2, 16)
        prompt = torch.randint(0, target.vocab_size, (ctx,), generator=gen)
        plain = SpeculativeEngine(target, cache, None, (), max_tree_nodes=nodes, max_step_tokens=max(ctx, nodes))
        full = torch.cat([prompt, torch.tensor(plain.generate(prompt, need + nodes).tokens)])
        drafter = OracleChains([full], target.vocab_size, nodes)
        engine = SpeculativeEngine(target, cache, drafter, (), max_tree_nodes=nodes, max_batch=1,
                                   max_step_tokens=max(ctx, nodes))
        rid = engine.add_request(prompt, SamplingParams(max_new_tokens=need))
        engine.step()  # the prefill
        for r in range(repeats + 1):
            for a in accepted:
                drafter.accepted = a
                t0 = time.perf_counter()
                [out] = engine.step()
                if r:
                    results.append((int(out.accepted or 0), ctx, time.perf_counter() - t0))
        engine.cancel(rid)
        engine.step()
    return results


def fit_accept(samples: Sequence[tuple[int, int, float]]) -> float:
    """Seconds per accepted draft token: the median over contexts of the least-squares slope of each context's
    per-count median step time against the accepted count (0 where a context saw one count only; never
    negative)."""
    slopes = []
    for ctx in sorted({c for _, c, _ in samples}):
        by_a: dict[int, list[float]] = {}
        for a, c, s in samples:
            if c == ctx:
                by_a.setdefault(a, []).append(s)
        if len(by_a) < 2:
            continue
        xs = list(by_a)
        slopes.append(statistics.linear_regression(xs, [statistics.median(by_a[a]) for a in xs]).slope)
    return max(statistics.median(slopes), 0.0) if slopes else 0.0


class TimedDrafter:
    """Protocol wrapper that records ``(levels, seconds)`` of every proposed tree (batch time split evenly).

    ``budgets``: every step asks the drafter for the next of these tree budgets in turn (``DraftInput.budget``)
    and records the levels that budget makes it expand (:func:`draft_levels`), the quantity ``--tree-budget auto``
    plans with; the output stays exact, any budget is. ``None``: the drafter's own budget, recording each tree's
    depth."""

    def __init__(self, inner: Drafter, budgets: Sequence[int] | None = None) -> None:
        self.inner, self.vocab_size, self.needs_hidden = inner, inner.vocab_size, inner.needs_hidden
        self.feature_layers = getattr(inner, "feature_layers", None)
        self.budgets, self._calls = list(budgets or []), 0
        self.samples: list[tuple[int, float]] = []

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        budget = self.budgets[self._calls % len(self.budgets)] if self.budgets else None
        self._calls += 1
        if budget is not None:
            batch = [dataclasses.replace(item, budget=budget if item.budget is None else min(budget, item.budget))
                     for item in batch]
        t0 = time.perf_counter()
        drafts = self.inner.propose(batch)
        each = (time.perf_counter() - t0) / max(len(drafts), 1)
        self.samples += [(d.tree.max_depth if budget is None else draft_levels(self.inner, item.budget), each)
                         for item, d in zip(batch, drafts, strict=True)]
        return drafts

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)


def measure_draft(target: TargetModel, drafter: Drafter, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                  eos_token_ids: Sequence[int] = (), sweep: bool = True) -> list[tuple[int, float]]:
    """``(levels, seconds)`` of every ``propose`` while the real engine generates greedily from ``prompts``;
    ``sweep``: the steps take budgets 2 .. depth + 1 in turn, so every level count is timed (:class:`TimedDrafter`);
    else the drafter's own budget, keyed by tree depth."""
    from specdec.engine import SpeculativeEngine

    budgets = list(range(2, draft_levels(drafter, 1 << 30) + 2)) if sweep else None
    timed = TimedDrafter(drafter, budgets)
    longest = max(p.numel() for p in prompts) + max_new_tokens + 64
    engine = SpeculativeEngine(target, target.new_cache(-(-longest // 16) + 1, 16), timed, eos_token_ids)
    for p in prompts:
        engine.generate(p, max_new_tokens)
    return timed.samples
