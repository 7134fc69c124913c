"""Plumbing every drafter needs: per-sequence state keyed by the engine's sequence id, created on first use and
dropped (with a cleanup hook, e.g. freeing the drafter's own KV blocks) on ``release``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from specdec.interfaces import DraftInput

T = TypeVar("T")


class PerSequence(Generic[T]):
    """``state[seq_id]`` creates the state with ``factory()`` on first use; :meth:`release` drops it and calls
    ``on_release(state)``; releasing an unknown id does nothing (the engine may release after a failure)."""

    def __init__(self, factory: Callable[[], T], on_release: Callable[[T], None] | None = None) -> None:
        self._factory, self._on_release = factory, on_release
        self._states: dict[int, T] = {}

    def __getitem__(self, seq_id: int) -> T:
        state = self._states.get(seq_id)
        if state is None:
            state = self._states[seq_id] = self._factory()
        return state

    def get(self, seq_id: int) -> T | None:
        """The state if it exists (never creates one)."""
        return self._states.get(seq_id)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def release(self, seq_id: int) -> None:
        state = self._states.pop(seq_id, None)
        if state is not None and self._on_release is not None:
            self._on_release(state)


def row_budgets(batch: Sequence[DraftInput], own: int) -> list[int]:
    """Each sequence's node budget this step: the drafter's ``own``, capped by the caller's ``DraftInput.budget``."""
    return [own if item.budget is None else max(1, min(own, item.budget)) for item in batch]


class GrowingTree:
    """A draft tree built level by level, each level forwarding only its new nodes (the tree offset).

    Node 0 is the root (already written to the drafter's cache by the catch-up forward); nodes are numbered in
    the order they were added, so parents come first and a level's new nodes are the tree's last ones.
    """

    def __init__(self, root: int) -> None:
        self.index: dict[tuple[int, ...], int] = {(): 0}
        self.tokens, self.parents = [root], [-1]
        self.written = 1  # nodes whose K/V are in the cache

    def add(self, paths: list[tuple[int, ...]]) -> None:
        """Append ``paths`` (token tuples below the root) not yet in the tree; their parents must be in it."""
        for p in paths:
            if p not in self.index:
                self.index[p] = len(self.tokens)
                self.tokens.append(p[-1])
                self.parents.append(self.index[p[:-1]])

    def pending(self) -> int:
        """Nodes added since the last forward."""
        return len(self.tokens) - self.written

    def tree(self):
        from specdec.tree import TokenTree  # local: keeps this module light

        return TokenTree(torch.tensor(self.tokens), torch.tensor(self.parents))


@dataclass(frozen=True)
class LevelTree:
    """One sequence's partial tree as :func:`specdec.attention.tree_batch` reads it (``tokens``, ``depth``,
    ``ancestor_mask``, ``num_nodes``), views into a :class:`LevelTrees` batch."""

    tokens: torch.Tensor
    depth: torch.Tensor
    ancestor_mask: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()


class LevelTrees:
    """Draft trees grown a whole level at a time for a batch, every sequence adding the same number of nodes per
    level: tokens ``[B, M]``, depth ``[M]`` and ancestor masks ``[B, M, M]`` as tensors (no Python per node). Node
    0 is the root; a level's nodes follow the previous level's, so parents come first and the last level is the
    one to forward (the tree offset is the node count before :meth:`add`)."""

    def __init__(self, roots: torch.Tensor) -> None:
        b = roots.numel()
        self.tokens = roots.reshape(b, 1).long().cpu()
        self.depth = torch.zeros(1, dtype=torch.long)
        self.mask = torch.ones(b, 1, 1, dtype=torch.bool)
        self._level_start = 0  # first node of the last level

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def add(self, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        """Append a level: ``tokens [B, F]`` whose parents are ``parents [B, F]`` (index within the last level)."""
        b, f = tokens.shape
        m = self.num_nodes
        parent_nodes = self._level_start + parents.long().cpu()
        rows = self.mask.gather(1, parent_nodes[..., None].expand(b, f, m))  # each new node: its parent's ancestors
        own = torch.eye(f, dtype=torch.bool).expand(b, f, f)
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (0, f)), torch.cat([rows, own], dim=2)], dim=1)
        self.tokens = torch.cat([self.tokens, tokens.long().cpu()], dim=1)
        self.depth = torch.cat([self.depth, torch.full((f,), int(self.depth[-1]) + 1)])
        self._level_start = m

    def trees(self) -> list[LevelTree]:
        return [LevelTree(self.tokens[i], self.depth, self.mask[i]) for i in range(self.tokens.shape[0])]


def level_batch(cache, dseqs: list[int], grown: LevelTrees, tokens: torch.Tensor, parents: torch.Tensor):
    """Append a level (``tokens [B, F]``, ``parents [B, F]`` = index in the previous level) to ``grown``, reserve
    its positions in every draft sequence of ``cache``, and return the :class:`~specdec.attention.TreeBatch` that
    forwards only the new level (tree offsets: it attends to the earlier levels' K/V)."""
    from specdec.attention import build_tree_batch

    written = grown.num_nodes
    grown.add(tokens, parents)
    for dseq in dseqs:
        cache.reserve(dseq, grown.num_nodes)
    return build_tree_batch(cache, dseqs, grown.trees(), offsets=[written] * len(dseqs))


def best_first_drafts(roots: list[int], budgets: list[int], depth: int, topk: int, log_probs: torch.Tensor,
                      forward_level: Callable, vocab_ids: torch.Tensor | None = None) -> list:
    """EAGLE-2 best-first trees for a whole batch by tensor ops (:class:`~specdec.tree_builders.BestFirstBatch`;
    no Python per node), the loop every model-based drafter shares: per level one top-k of every frontier node's
    draft distribution (``log_probs [B, F, V]``, ``F = 1`` after the roots), then
    ``forward_level(grown, builder) -> log_probs`` forwards the batch's new frontier (``builder.frontier_tokens``
    and ``frontier_parent``; :func:`level_batch` grows ``grown: LevelTrees`` and builds its batch). ``vocab_ids``:
    draft-vocabulary ids of the distribution's columns. Returns one ``Draft`` per sequence."""
    from specdec.interfaces import Draft
    from specdec.tree_builders import BestFirstBatch, level_topk

    builder = BestFirstBatch(torch.tensor(roots), budgets, depth, topk)
    grown = LevelTrees(builder.roots)
    while builder.more:
        builder.step(*level_topk(log_probs, topk, vocab_ids))
        if builder.more:  # the new frontier's children are wanted: forward it
            log_probs = forward_level(grown, builder)
    return [Draft(tree, scores=scores) for tree, scores in zip(*builder.result(), strict=True)]
