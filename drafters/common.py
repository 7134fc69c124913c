"""Plumbing every drafter needs: per-sequence state keyed by the engine's sequence id, created on first use and
dropped (with a cleanup hook, e.g. freeing the drafter's own KV blocks) on ``release``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

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
        import torch

        from specdec.tree import TokenTree  # local: keeps this module light

        return TokenTree(torch.tensor(self.tokens), torch.tensor(self.parents))
