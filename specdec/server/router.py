"""Per-request drafters over ONE engine: a :class:`RoutingDrafter` hands each sequence to the drafter its request
asked for, so requests with different drafters still share one verification forward, one scheduler and one KV
cache (no second engine competing for blocks).

The engine only passes sequence ids to a drafter; the router maps a sequence id to its request through
``resolve(seq_id) -> drafter name`` (the engine loop looks the sequence up among the engine's running requests)
and remembers the answer until the sequence is released (sequence ids are never reused by a cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.tree import TokenTree


class NoDraft:
    """The ``none`` drafter: every tree is the root alone (plain autoregressive decoding, tau = 1)."""

    vocab_size = None
    needs_hidden = False

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        return [Draft(TokenTree.chain(item.history[-1:])) for item in batch]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        return None

    def release(self, seq_id: int) -> None:
        return None


class RoutingDrafter:
    """A :class:`specdec.interfaces.Drafter` that dispatches each sequence to one of ``drafters``.

    Args:
        drafters: name -> drafter (``None`` is :class:`NoDraft`); every model drafter must share the target's
            vocabulary (the engine checks the router's ``vocab_size``, the router checks each drafter's).
        resolve: ``seq_id -> name`` for a sequence the router has not seen yet.
        vocab_size: the target's vocabulary size.
    """

    def __init__(self, drafters: Mapping[str, Drafter | None], resolve: Callable[[int], str],
                 vocab_size: int) -> None:
        if not drafters:
            raise ValueError("the router needs at least one drafter")
        for name, d in drafters.items():
            if d is not None and d.vocab_size is not None and d.vocab_size != vocab_size:
                raise ValueError(f"tokenizer mismatch: drafter {name!r} has {d.vocab_size} tokens, the target "
                                 f"{vocab_size}")
        self.drafters: dict[str, Drafter] = {n: NoDraft() if d is None else d for n, d in drafters.items()}
        self.vocab_size = vocab_size
        self.needs_hidden = any(d.needs_hidden for d in self.drafters.values())
        # target features: each hidden-state drafter's layers (EAGLE-3: fused low/mid/high; others: the last
        # hidden state, -1); the engine asks the forward for their union, each drafter gets its own columns
        wants = {n: tuple(getattr(d, "feature_layers", None) or (-1,)) for n, d in self.drafters.items()
                 if d.needs_hidden}
        union = tuple(dict.fromkeys(layer for w in wants.values() for layer in w))
        self.feature_layers: tuple[int, ...] | None = None if union in ((), (-1,)) else union
        self._columns = {n: [union.index(layer) for layer in w] for n, w in wants.items()}
        self._resolve = resolve
        self._names: dict[int, str] = {}

    def name_of(self, seq_id: int) -> str:
        name = self._names.get(seq_id)
        if name is None:
            name = self._resolve(seq_id)
            if name not in self.drafters:
                raise ValueError(f"unknown drafter {name!r} for sequence {seq_id}; allowed: {sorted(self.drafters)}")
            self._names[seq_id] = name
        return name

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """Each drafter proposes once for its own sequences; the drafts come back in ``batch`` order."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(self.name_of(item.seq_id), []).append(i)
        out: list[Draft | None] = [None] * len(batch)
        for name, idx in groups.items():
            drafts = self.drafters[name].propose([batch[i] for i in idx])
            if len(drafts) != len(idx):
                raise ValueError(f"drafter {name!r} returned {len(drafts)} drafts for {len(idx)} sequences")
            for i, d in zip(idx, drafts, strict=True):
                out[i] = d
        return out  # type: ignore[return-value]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        name = self.name_of(seq_id)
        drafter = self.drafters[name]
        if not drafter.needs_hidden:
            hidden = None
        elif hidden is not None and self.feature_layers is not None:  # [S, len(union) * H] -> this drafter's
            cols = self._columns[name]
            if cols != list(range(len(self.feature_layers))):
                hidden = hidden.reshape(hidden.shape[0], len(self.feature_layers), -1)[:, cols].flatten(1)
        drafter.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        name = self._names.pop(seq_id, None)
        targets = self.drafters.values() if name is None else [self.drafters[name]]
        for drafter in targets:  # a sequence never seen: nobody holds state for it, releasing is harmless
            drafter.release(seq_id)
