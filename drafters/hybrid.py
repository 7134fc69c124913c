"""Hybrid drafter: n-gram continuations where the history repeats itself, a model drafter's tree elsewhere, merged
into one tree under one node budget.

Every candidate node gets an estimated probability of being accepted: the product, along its path, of its
SOURCE's running per-depth acceptance rates (``rate[s][d]``: how often, when the accepted path reached depth
``d - 1`` inside source ``s``'s proposal, the token at depth ``d`` was among ``s``'s children there), kept per
sequence and updated after every step. A node both sources propose takes the larger estimate. The ``budget - 1``
best nodes are kept (ties: shallower first, then the source's own order), and nodes worth less than ``min_value``
expected tokens are dropped (a verification node costs about that much of a forward). Rates learn from every
candidate, kept or not (the bonus token tells whether a dropped depth-``d`` candidate was right), so a source whose
nodes were all dropped still recovers.

Lossless by construction: the merged tree is verified as deterministic one-hot proposals (``probs=None``; exact
for any proposal drawn independently of the verification stream). Only when the kept tree is exactly the model's
own tree (or a prefix of its chain) with no n-gram node does the model's ``Draft.probs`` pass through unchanged.

When the n-gram source is confident (depth-1 rate ``>= skip_model_above`` and a match exists), the model is not
asked for that sequence this step: drafting costs a third of a CPU step. Model drafters catch up on the history
at their next ``propose``, so skipping is safe. Both sub-drafters are told every ``accept`` and ``release``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdec.drafters.common import PerSequence
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.registry import DrafterSpec, Option, build_drafter, register
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.tree import TokenTree
from specdec.tree_builders import union_tree

Path = tuple[int, ...]
SOURCES = ("ngram", "model")


@dataclass
class _SeqState:
    rates: dict[str, list[float]]  # source -> per-depth conditional acceptance rate (index d - 1)
    proposed: dict[str, list[Path]] = field(default_factory=dict)  # last step's candidate paths per source


def tree_paths(tree: TokenTree) -> list[Path]:
    """Token path below the root of every non-root node, in node order: ``[N - 1]`` tuples."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    paths: list[Path] = [()]
    for i in range(1, len(tokens)):
        paths.append(paths[parents[i]] + (tokens[i],))
    return paths[1:]


class HybridDrafter:
    """N-gram + model drafting under one node budget (see the module docstring).

    Args:
        model: any drafter (EAGLE, Medusa, draft model ...); its ``vocab_size`` and ``needs_hidden`` are the hybrid's.
        ngram: the n-gram matcher (its ``continuations`` and ``max_matches`` / ``max_depth`` are used); default
            :class:`NgramDrafter` ``(max_depth=max_depth)``.
        budget: tree nodes, root included (``>= 1``).
        max_depth: deepest draft node kept.
        prior: initial per-depth rate of each source, ``{"ngram": ..., "model": ...}`` or one float for both.
        weight: weight of the newest observation in the running rates (exponential moving average).
        min_value: nodes with a smaller acceptance estimate are dropped (default: the n-gram's ``node_cost``).
        skip_model_above: depth-1 n-gram rate above which a matched sequence is drafted by n-gram alone (``None``:
            always ask the model).
    """

    def __init__(self, model: Drafter, ngram: NgramDrafter | None = None, budget: int = 16, max_depth: int = 8,
                 prior: float | dict[str, float] = 0.6, weight: float = 0.2, min_value: float | None = None,
                 skip_model_above: float | None = 0.9) -> None:
        if budget < 1 or max_depth < 1:
            raise ValueError(f"budget and max_depth must be >= 1, got {budget}, {max_depth}")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        priors = prior if isinstance(prior, dict) else dict.fromkeys(SOURCES, prior)
        if sorted(priors) != sorted(SOURCES) or not all(0 <= p <= 1 for p in priors.values()):
            raise ValueError(f"prior needs rates in [0, 1] for {list(SOURCES)}, got {prior}")
        self.model, self.ngram = model, ngram or NgramDrafter(max_depth=max_depth)
        self.vocab_size: int | None = model.vocab_size
        self.needs_hidden: bool = bool(model.needs_hidden)
        self.budget, self.max_depth, self.weight = budget, max_depth, weight
        self.min_value = self.ngram.node_cost if min_value is None else min_value
        self.skip_model_above = skip_model_above
        self._state: PerSequence[_SeqState] = PerSequence(
            lambda: _SeqState({s: [priors[s]] * max_depth for s in SOURCES}))
        self.model_calls = 0  # sequences the model drafted (for reports and tests)

    # ------------------------------------------------------------------ protocol
    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One merged draft per input; the model runs once for the sequences that need it."""
        ngram_paths = [self._ngram_paths(item.history) for item in batch]
        ask = [i for i, item in enumerate(batch) if not self._ngram_suffices(item.seq_id, ngram_paths[i])]
        model_drafts = dict(zip(ask, self.model.propose([batch[i] for i in ask]), strict=True)) if ask else {}
        self.model_calls += len(ask)
        return [self._merge(item, ngram_paths[i], model_drafts.get(i)) for i, item in enumerate(batch)]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Update the per-depth rates from the accepted tokens ``[A + 1]`` (A drafts, then the bonus), then tell
        both sub-drafters."""
        state = self._state.get(seq_id)
        if state is not None and state.proposed:
            accepted = tokens.tolist()
            for source, paths in state.proposed.items():
                self._observe(state.rates[source], paths, accepted)
            state.proposed = {}
        self.ngram.accept(seq_id, tokens, hidden)
        self.model.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self._state.release(seq_id)
        self.ngram.release(seq_id)
        self.model.release(seq_id)

    # ------------------------------------------------------------------ internals
    def _ngram_paths(self, history: torch.Tensor) -> list[Path]:
        """Every node of the n-gram continuations (prefixes included), most recent match first."""
        paths: dict[Path, None] = {}
        for cont in self.ngram.continuations(history, self.ngram.max_matches):
            cont = tuple(cont[: self.max_depth])
            paths.update((cont[:d], None) for d in range(1, len(cont) + 1))
        return list(paths)

    def _ngram_suffices(self, seq_id: int, ngram_paths: list[Path]) -> bool:
        threshold = self.skip_model_above
        return threshold is not None and bool(ngram_paths) and self._state[seq_id].rates["ngram"][0] >= threshold

    def _merge(self, item: DraftInput, ngram_paths: list[Path], model_draft: Draft | None) -> Draft:
        state = self._state[item.seq_id]
        model_paths = [] if model_draft is None else tree_paths(model_draft.tree)
        model_paths = [p for p in model_paths if len(p) <= self.max_depth]
        state.proposed = {"ngram": ngram_paths, "model": model_paths}
        value: dict[Path, float] = {}
        order: dict[Path, int] = {}
        for source in SOURCES:
            rates = state.rates[source]
            for path in state.proposed[source]:
                v = math.prod(rates[: len(path)])
                if v > value.get(path, -1.0):
                    value[path] = v
                order.setdefault(path, len(order))
        kept: set[Path] = set()
        for path in sorted(value, key=lambda p: (-value[p], len(p), order[p])):
            if len(kept) >= self.budget - 1 or value[path] < self.min_value:
                break
            if len(path) == 1 or path[:-1] in kept:
                kept.add(path)
        root = int(item.history[-1])
        if model_draft is not None and kept and kept <= set(model_paths):
            passed = self._pass_through(model_draft, model_paths, kept)
            if passed is not None:
                return passed
        return Draft(union_tree(root, list(kept))[0])

    @staticmethod
    def _pass_through(draft: Draft, paths: list[Path], kept: set[Path]) -> Draft | None:
        """The model's own draft (probabilities included) when ``kept`` is all of it or a prefix of its chain."""
        if kept == set(paths) and len(paths) == draft.tree.num_nodes - 1:
            return draft
        n = len(kept) + 1
        if draft.tree.max_depth == draft.tree.num_nodes - 1 and kept == set(paths[: n - 1]):  # chain prefix
            probs = None if draft.probs is None else draft.probs[:n]
            return Draft(TokenTree.chain(draft.tree.tokens[:n]), probs, draft.without_replacement)
        return None

    def _observe(self, rates: list[float], paths: list[Path], accepted: list[int]) -> None:
        """One step's evidence for one source: at each depth ``d`` whose accepted prefix lies in the source's
        proposal, was the accepted token (the bonus at the last depth) one of its children there?"""
        children: dict[Path, set[int]] = {}
        for path in paths:
            children.setdefault(path[:-1], set()).add(path[-1])
        for d in range(1, min(len(accepted), len(rates)) + 1):
            options = children.get(tuple(accepted[: d - 1]))
            if not options:
                return
            hit = accepted[d - 1] in options
            rates[d - 1] += self.weight * (float(hit) - rates[d - 1])
            if not hit:
                return


MODEL_DRAFTERS = ("eagle", "medusa", "draft-model", "self")


@register("hybrid", help="n-gram where the text repeats, a model drafter's tree elsewhere, under one node budget",
          options=(
    Option("model", str, "eagle", "the model sub-drafter", MODEL_DRAFTERS),
    Option("path", str, None, "the model's weights, as its own path option ('shipped' for the embedded SmolLM2)"),
    Option("tree", str, "dynamic", "the model's tree shape (as its own tree option)"),
    Option("budget", int, None, "merged tree nodes, root included (default 16; also the model's budget)"),
    Option("depth", int, None, "deepest draft node (default 8; also the model's depth)"),
    Option("topk", int, None, "children per expanded node of the model's dynamic tree"),
    Option("skip", float, None, "depth-1 n-gram rate above which a matched sequence skips the model (default 0.9; "
                                "2 = never skip)"),
))
def _build(target, model="eagle", path=None, tree="dynamic", budget=None, depth=None, topk=None,
           skip=None) -> HybridDrafter:
    given = {"path": path, "tree": tree, "budget": budget, "depth": depth, "topk": topk}
    sub = DrafterSpec.parse(model)
    sub = sub.with_options(**{k: v for k, v in given.items() if v is not None and k in sub.options})
    kwargs = {"budget": budget, "max_depth": depth, "skip_model_above": 0.9 if skip is None else skip}
    return HybridDrafter(build_drafter(sub, target), **{k: v for k, v in kwargs.items() if v is not None})
