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
