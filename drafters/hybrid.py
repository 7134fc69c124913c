"""Hybrid drafter: n-gram continuations where the history repeats itself, a model drafter's tree elsewhere, merged
into one tree under one node budget.

Every candidate node gets an estimated probability of being accepted: the product, along its path, of its
SOURCE's running rates ``rate[s][d][r]``: how often, when the accepted path reached a node of source ``s``'s
proposal at depth ``d - 1``, its rank-``r`` child (siblings in the source's own order: score for a model tree,
recency for n-gram matches; ranks past ``RANKS - 1`` share the last) was the accepted token. Kept per sequence and
updated after every step, so siblings split their parent's probability instead of each claiming all of it, and the
sum of a tree's values is its expected accepted length. The n-gram source is split by the length of the matched
suffix (``ngram2``, ``ngram3``, ``ngram4``, ...): a long match is usually a copy of earlier text and earns its own,
higher rates, so it gets the budget when it has been right. With a retrieval store (``store=``), a history with no
match of its own takes the store's continuations instead (source ``store``, its own rates), and steps without the
model draft exactly as ``ngram:store=...`` does. A node both sources propose takes the larger estimate.
The ``budget - 1`` best nodes are kept (ties: shallower first, then the source's own order), and nodes worth less
than ``min_value`` times the sequence's running speed (tokens per step over step cost) are dropped: a node costs
about ``node_cost`` of a forward, so it pays only if it adds that share of what a step already yields. Rates
learn from every candidate, kept or not (the bonus token tells whether a dropped candidate was right), so a source
whose nodes were all dropped still recovers.

When to ask the model (it costs ``model_cost`` of a verification step; the n-gram is free): the n-gram tree alone
is worth ``(1 + V_n) / (1 + node_cost * N_n)`` tokens per unit of step time (``V_n``: sum of its kept values,
``N_n``: its kept nodes); with the model, ``(1 + max(V_n, V_m)) / (1 + model_cost + node_cost * max(N_n, N_m))``,
``V_m`` being the running average of the accepted tokens the model's earlier trees for this sequence held (what it
delivered, not what its rates promise: rarely seen depths and ranks keep optimistic priors), shrunk toward a slow
average over all sequences as if that were ``PRIOR_STEPS`` more observations (a sequence the model has not drafted
yet starts from it; one unlucky probe does not switch a good model off), and ``N_m`` of its nodes kept in the
merged tree.
The model runs only when the second is larger (and at least every ``probe`` steps, so its estimate stays current;
each probe that was needed doubles the interval, up to 4x, until the model pays again): with no match any model
worth its cost is asked; a long, confident match drafts alone; a model that does not pay for its cost and
its nodes is not asked. ``skip_model_above`` (a depth-1 n-gram rate) is an older, simpler override. Model drafters
catch up on the history at their next ``propose``, so skipping is safe. Both sub-drafters are told every
``accept`` and ``release``.

Lossless by construction: the merged tree is verified as deterministic one-hot proposals (``probs=None``; exact
for any proposal drawn independently of the verification stream). Only when the kept tree is exactly the model's
own tree (or a prefix of its chain) with no n-gram node does the model's ``Draft.probs`` pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.drafters.common import PerSequence, row_budgets
from specdec.drafters.draft_paths import (
    RANKS,
    Path,
    held,
    longest_match,
    observe_rates,
    pass_through,
    path_values,
    tree_paths,
)
from specdec.drafters.hybrid_cost import PRIOR_STEPS, CostRule, running
from specdec.drafters.ngram import NgramDrafter, load_store
from specdec.drafters.registry import DrafterSpec, Option, build_drafter, register
from specdec.drafters.store import TokenStore
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.research.machine_cost import step_cost_option
from specdec.tree_builders import union_tree

SOURCES = ("ngram", "model")
MODEL_COST = 0.3  # EAGLE dynamic draft / SmolLM2 verification step on a 2-core CPU (out/notes/issue15_drafting.md)


@dataclass
class _SeqState:
    rates: dict[str, list[list[float]]]  # source -> [depth - 1][rank] conditional acceptance rate
    proposed: dict[str, list[Path]] = field(default_factory=dict)  # last step's candidate paths per source
    model_value: float | None = None  # running accepted tokens the model's trees held (None: never asked)
    model_asks: int = 0  # steps the model drafted for this sequence
    model_nodes: float = 0.0  # running count of the model's nodes kept in the merged tree
    since_model: int = 0  # steps since the model was last asked
    probe_gap: int = 0  # steps between probes now (0: ``probe``; doubles after each probe, back when the model pays)
    speed: float = 1.0  # running tokens per step / (1 + node_cost * draft nodes): what one unit of step time yields
    nodes: int = 0  # draft nodes of the last proposed tree
    context: int = 0  # history length at this step (the measured step cost depends on it)


class HybridDrafter(CostRule):
    """N-gram + model drafting under one node budget (see the module docstring).

    Args:
        model: any drafter (EAGLE, Medusa, draft model ...); its ``vocab_size`` and ``needs_hidden`` are the hybrid's.
        ngram: the n-gram matcher (its ``continuations`` and ``max_matches`` / ``max_depth`` are used); default
            :class:`NgramDrafter` ``(max_depth=max_depth, store=store, step_cost=step_cost)``. Where it has a
            retrieval store, a history with no match of its own takes the store's continuations as its n-gram
            candidates (source ``store``, own rates).
        budget: tree nodes, root included (``>= 1``).
        max_depth: deepest draft node kept.
        prior: initial per-depth rate of each source, ``{"ngram": ..., "model": ...}`` or one float for both.
        weight: weight of the newest observation in the running rates (exponential moving average).
        min_value: nodes with a smaller acceptance estimate, relative to the sequence's running speed (module
            docstring), are dropped (default: the n-gram's ``node_cost``).
        skip_model_above: depth-1 n-gram rate above which a matched sequence is drafted by n-gram alone (``None``:
            no such override).
        model_cost: a model draft's cost as a fraction of a verification step; the model is asked only where its
            expected extra tokens pay for it (module docstring). ``None``: always ask (unless ``skip_model_above``).
        probe: under the cost rule, the model is asked at least every ``probe`` steps.
        measure_cost: ``model_cost`` is only the prior: once measured, the running ratio of the model's ``propose``
            time to the time from one ``propose`` to the next (the engine's verification and bookkeeping; a gap
            over 5x the running value, an idle engine, is ignored) replaces it, so the rule follows the machine.
            The propose time's running average starts from the prior share of the first measured step, so a
            first call that catches up on a whole prompt does not count as the model's cost in full.
        store: the default n-gram matcher's retrieval store (:class:`~specdec.drafters.store.TokenStore`).
        ngram_alone: a step that does not ask the model proposes the n-gram drafter's own tree (as plain n-gram
            drafting would) instead of the rate-pruned n-gram candidates.
        step_cost: measured verification cost ``step_cost(n, context)`` of an ``n``-node tree relative to one node
            (e.g. :meth:`specdec.research.cost_model.CostModel.relative_step`). Given, it replaces the linear
            ``1 + node_cost * (n - 1)`` everywhere above, and the merged tree keeps the prefix of its best nodes
            that maximises ``(1 + sum of values) / step_cost`` instead of the ``min_value`` floor (a CPU's lone-root
            fast path makes the first draft node dear, which a linear cost misses).
    """

    def __init__(self, model: Drafter, ngram: NgramDrafter | None = None, budget: int = 16, max_depth: int = 8,
                 prior: float | dict[str, float] = 0.6, weight: float = 0.2, min_value: float | None = None,
                 skip_model_above: float | None = None, model_cost: float | None = MODEL_COST,
                 probe: int = 32, step_cost: Callable[[int, int], float] | None = None,
                 ngram_alone: bool = True, measure_cost: bool = False, store: TokenStore | None = None) -> None:
        if budget < 1 or max_depth < 1:
            raise ValueError(f"budget and max_depth must be >= 1, got {budget}, {max_depth}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        priors = prior if isinstance(prior, dict) else dict.fromkeys(SOURCES, prior)
        if sorted(priors) != sorted(SOURCES) or not all(0 <= p <= 1 for p in priors.values()):
            raise ValueError(f"prior needs rates in [0, 1] for {list(SOURCES)}, got {prior}")
        if model_cost is not None and model_cost < 0:
            raise ValueError(f"model_cost must be >= 0, got {model_cost}")
        self.model = model
        self.ngram = ngram or NgramDrafter(max_depth=max_depth, store=store, step_cost=step_cost)
        self.vocab_size: int | None = model.vocab_size
        self.needs_hidden: bool = bool(model.needs_hidden)
        self.feature_layers = getattr(model, "feature_layers", None)  # EAGLE-3 inside: the engine fuses them
        self.budget, self.max_depth, self.weight = budget, max_depth, weight
        self.min_value = self.ngram.node_cost if min_value is None else min_value
        self.skip_model_above, self.model_cost = skip_model_above, model_cost
        self.sources = ("model", *(f"ngram{n}" for n in range(self.ngram.min_ngram, self.ngram.max_ngram + 1)),
                        *(("store",) if self.ngram.store is not None else ()))
        self.probe, self.step_cost, self.ngram_alone = probe, step_cost, ngram_alone
        self.measure_cost = measure_cost
        self._last_end: float | None = None  # when the last propose returned
        self.step_s: float | None = None  # running time from a propose's end to the next one's start
        self.model_s: float | None = None  # running time of the model's propose
        # prior of a rank-r child: the source's prior times 0.3 ** r (siblings' priors sum to < 1)
        self._state: PerSequence[_SeqState] = PerSequence(lambda: _SeqState(
            {s: [[priors["model" if s == "model" else "ngram"] * 0.3**r for r in range(RANKS)]
                 for _ in range(max_depth)] for s in self.sources}))
        self.model_calls = 0  # sequences the model drafted (for reports and tests)
        self.pooled_value: float | None = None  # slow running model_value over all sequences (the shrinkage target)

    # ------------------------------------------------------------------ protocol
    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One merged draft per input; the model runs once for the sequences that need it."""
        start = time.perf_counter()
        if self.measure_cost and self._last_end is not None:
            self.step_s = running(self.step_s, start - self._last_end, self.weight, clip=5.0)
        ngram = [self._ngram_paths(item.history) for item in batch]
        budgets = row_budgets(batch, self.budget)
        for item in batch:
            self._state[item.seq_id].context = item.history.numel()
        ask = [i for i, item in enumerate(batch) if self._model_pays(item.seq_id, *ngram[i][:2], budgets[i])]
        t0 = time.perf_counter()
        model_drafts = dict(zip(ask, self.model.propose([batch[i] for i in ask]), strict=True)) if ask else {}
        if ask and self.measure_cost:  # from the prior share of a step: a first call that catches up on a whole
            prior = None if self.step_s is None or self.model_cost is None else self.model_cost * self.step_s
            self.model_s = running(self.model_s if self.model_s is not None else prior, time.perf_counter() - t0,
                                   self.weight)  # prompt moves the estimate by ``weight`` of its excess, not all
        self.model_calls += len(ask)
        alone = [i for i in range(len(batch)) if i not in model_drafts] if self.ngram_alone else []
        plain = {i: self._ngram_alone(batch[i], ngram[i][2], budgets[i]) for i in alone}
        out = [self._alone(item, *ngram[i][:2], plain[i]) if i in plain else
               self._merge(item, *ngram[i][:2], model_drafts.get(i), budgets[i]) for i, item in enumerate(batch)]
        self._last_end = time.perf_counter()
        return out

    def _ngram_alone(self, item: DraftInput, continuations: list[list[int]], budget: int) -> Draft:
        """The n-gram drafter's own tree: from the history's matches, else from its store (if it has one)."""
        root = int(item.history[-1])
        if continuations or self.ngram.store is None:
            return self.ngram.draft_from(item.seq_id, root, continuations, budget)
        return self.ngram.draft_from_store(item.seq_id, root, item.history, budget)

    def _alone(self, item: DraftInput, ngram_paths: list[Path], ngram_source: str, draft: Draft) -> Draft:
        """A step without the model: the n-gram drafter's own tree (so such steps equal plain n-gram drafting);
        the rates still learn from every candidate."""
        state = self._state[item.seq_id]
        state.proposed = {ngram_source: ngram_paths, "model": []}
        state.nodes = draft.tree.num_nodes - 1
        return draft

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Update the per-rank rates and the running estimates from the accepted tokens ``[A + 1]`` (A drafts,
        then the bonus), then tell both sub-drafters."""
        state = self._state.get(seq_id)
        if state is not None and state.proposed:
            accepted = tokens.tolist()
            for source, paths in state.proposed.items():
                observe_rates(state.rates[source], paths, accepted, self.weight)
            speed = len(accepted) / (1 + self.ngram.node_cost * state.nodes)
            state.speed += self.weight * (speed - state.speed)
            if state.since_model == 0:  # the model proposed: how many accepted tokens did its tree hold?
                got = float(held(state.proposed["model"], accepted))
                state.model_value = running(state.model_value, got, self.weight)
                state.model_asks += 1
                self.pooled_value = running(self.pooled_value, got, self.weight / PRIOR_STEPS)
            state.proposed = {}
        self.ngram.accept(seq_id, tokens, hidden)  # its running acceptance follows only the trees it proposed
        self.model.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self._state.release(seq_id)
        self.ngram.release(seq_id)
        self.model.release(seq_id)

    # ------------------------------------------------------------------ internals
    def _ngram_paths(self, history: torch.Tensor) -> tuple[list[Path], str, list[list[int]]]:
        """Every node of the n-gram continuations (prefixes included), most recent match first, the source
        name of this step's n-gram proposal (``ngram{n}``, ``n`` = the longest matched suffix), and the
        continuations themselves (the n-gram drafter's own tree is built from them on steps without the model)."""
        paths: dict[Path, None] = {}
        conts = self.ngram.continuations(history, self.ngram.max_matches)
        store = self.ngram.store
        if not conts and store is not None:  # no match of its own: the store's continuations (source "store")
            ng = self.ngram
            return store.tree_paths(history, ng.store_nodes, ng.store_min_p, ng.min_ngram, self.max_depth), "store", []
        for cont in conts:
            cont = tuple(cont[: self.max_depth])
            paths.update((cont[:d], None) for d in range(1, len(cont) + 1))
        return list(paths), f"ngram{longest_match(history, self.ngram.max_ngram, self.ngram.min_ngram)}", conts

    def _model_pays(self, seq_id: int, ngram_paths: list[Path], source: str, budget: int) -> bool:
        """Whether to ask the model for this sequence this step (the module docstring's rule)."""
        state = self._state[seq_id]
        asked = budget > 1 and self._decide(state, ngram_paths, source, budget)
        state.since_model = 0 if asked else state.since_model + 1
        return asked

    def _merge(self, item: DraftInput, ngram_paths: list[Path], ngram_source: str, model_draft: Draft | None,
               budget: int) -> Draft:
        state = self._state[item.seq_id]
        model_paths = [] if model_draft is None else tree_paths(model_draft.tree)
        model_paths = [p for p in model_paths if len(p) <= self.max_depth]
        state.proposed = {ngram_source: ngram_paths, "model": model_paths}
        value: dict[Path, float] = {}
        order: dict[Path, int] = {}
        for source, paths in state.proposed.items():
            values = path_values(paths, state.rates[source])
            for path in paths:
                if values[path] > value.get(path, -1.0):
                    value[path] = values[path]
                order.setdefault(path, len(order))
        ranked: list[Path] = []  # value order: every prefix is ancestor-closed
        floor = self._floor(state) if self.step_cost is None else 0.0
        for path in sorted(value, key=lambda p: (-value[p], len(p), order[p])):
            if len(ranked) >= budget - 1 or value[path] < floor:
                break
            if len(path) == 1 or path[:-1] in ranked:
                ranked.append(path)
        if self.step_cost is not None:
            ranked = ranked[: self._best_prefix([value[p] for p in ranked], state.context)]
        kept = set(ranked)
        if model_draft is not None:  # running count of the model nodes that make it into the tree
            n_m = float(len(kept & set(model_paths)))
            state.model_nodes = n_m if state.model_value is None else state.model_nodes + self.weight * (
                n_m - state.model_nodes)
        state.nodes = len(kept)
        root = int(item.history[-1])
        if model_draft is not None and kept and kept <= set(model_paths):
            passed = pass_through(model_draft, model_paths, kept)
            if passed is not None:
                return passed
        return Draft(union_tree(root, list(kept))[0])


MODEL_DRAFTERS = ("eagle", "eagle3", "medusa", "draft-model", "self")


@register("hybrid", help="n-gram where the text repeats, a model drafter's tree elsewhere, under one node budget",
          options=(
    Option("model", str, "eagle", "the model sub-drafter", MODEL_DRAFTERS),
    Option("path", str, None, "the model's weights, as its own path option ('shipped' for the embedded SmolLM2)"),
    Option("tree", str, "dynamic", "the model's tree shape (as its own tree option)"),
    Option("budget", int, None, "merged tree nodes, root included (default 16; also the model's budget)"),
    Option("depth", int, None, "deepest draft node (default 8; also the model's depth)"),
    Option("topk", int, None, "children per expanded node of the model's dynamic tree"),
    Option("model_budget", int, None, "the model's own tree nodes, root included (default: budget)"),
    Option("model_depth", int, None, "the model's own draft depth (default: depth)"),
    Option("store", str, None, "retrieval store for histories with no match (as ngram's store option; 'shipped' for "
                               "the embedded SmolLM2); default none"),
    Option("skip", float, None, "depth-1 n-gram rate above which a matched sequence skips the model (default: no "
                                "such override)"),
    Option("cost", str, None, f"a model draft's cost as a fraction of a verification step: the model runs only "
                              f"where its expected extra tokens pay for it (default {MODEL_COST}; -1 = always ask; "
                              f"'auto' = measured while running, from the prior {MODEL_COST})"),
    Option("steps", str, None, "a cost-model JSON (specdec calibrate), or 'auto' (this machine's step cost, measured "
                               "once and cached): tree sizes by the measured verification cost instead of a linear "
                               "per-node cost"),
))
def _build(target, model="eagle", path=None, tree="dynamic", budget=None, depth=None, topk=None, model_budget=None,
           model_depth=None, store=None, skip=None, cost=None, steps=None) -> HybridDrafter:
    given = {"path": path, "tree": tree, "budget": budget if model_budget is None else model_budget,
             "depth": depth if model_depth is None else model_depth, "topk": topk}
    sub = DrafterSpec.parse(model)
    sub = sub.with_options(**{k: v for k, v in given.items() if v is not None and k in sub.options})
    kwargs = {k: v for k, v in {"budget": budget, "max_depth": depth}.items() if v is not None}
    step_cost = step_cost_option(steps, target)
    measure = cost == "auto"
    if cost is None or measure:
        model_cost = MODEL_COST
    else:
        try:
            value = float(cost)
        except ValueError:
            raise ValueError(f"option 'cost' of drafter 'hybrid' expects a number or 'auto', got {cost!r}") from None
        model_cost = None if value < 0 else value
    return HybridDrafter(build_drafter(sub, target), store=None if store is None else load_store(store, target),
                         skip_model_above=skip, step_cost=step_cost,
                         model_cost=model_cost, measure_cost=measure, **kwargs)
