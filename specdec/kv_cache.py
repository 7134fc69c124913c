"""Paged KV cache: fixed-size blocks, a free list, and one block table per sequence.

Layout (one tensor for all layers, so a commit moves every layer in one index operation)::

    k, v: [L, num_blocks, block_size, Hkv, D]

A sequence's logical position ``p`` lives at flat slot ``table[p // block_size] * block_size + p % block_size``.
Committed tokens occupy logical positions ``[0, num_tokens)``. During verification the tree's node ``i`` is written
at logical position ``num_tokens + i`` (see :mod:`specdec.tree`); :meth:`PagedKVCache.commit` then moves the
accepted nodes to consecutive positions and frees the blocks the sequence no longer needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.kernels.commit import commit_kv_reference

MoveKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class OutOfBlocks(RuntimeError):
    """Raised when the KV cache has too few free blocks for a request; nothing was allocated."""


class BlockAllocator:
    """A free list of physical block ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; raise :class:`OutOfBlocks` (allocating nothing) if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(
                f"out of KV blocks: need {n} more, {len(self._free)} free of {self.num_blocks} "
                f"(raise --num-blocks or shorten the request)"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Return blocks to the free list; raise ``ValueError`` on a double free or an unknown id."""
        for b in reversed(blocks):  # pushed in reverse, so they are handed out again in order (runs stay runs)
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            self._free.append(b)


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedKVCache:
    """K/V storage for all layers plus per-sequence block tables.

    Args:
        num_layers, num_kv_heads, head_dim: model geometry.
        num_blocks: physical blocks shared by all sequences.
        block_size: tokens per block.
        dtype, device: storage dtype and device of ``k`` and ``v``.
        move_kv: ``move_kv(k, v, src_slots, dst_slots)`` copies slots for all layers, alias-safe (gather, then
            scatter). Defaults to the pure-torch reference; the attention backend may supply a kernel.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        move_kv: MoveKV = commit_kv_reference,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, NB, BS, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self._move_kv = move_kv
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ sequences
    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def add_sequence(self) -> int:
        """Register a new empty sequence and return its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = _Sequence()
        return seq_id

    def release(self, seq_id: int) -> None:
        """Free every block of ``seq_id`` and forget it (idempotent)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.allocator.free(seq.blocks)

    def num_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_tokens

    def blocks(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id}") from None

    # ------------------------------------------------------------------ reserve / addressing
    def reserve(self, seq_id: int, extra: int) -> None:
        """Make sure blocks exist for positions ``[0, num_tokens + extra)``; raises :class:`OutOfBlocks`."""
        seq = self._seq(seq_id)
        need = -(-(seq.num_tokens + extra) // self.block_size) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self.allocator.allocate(need))

    def first_blocks(self, seq_ids: Sequence[int]) -> tuple[int, ...]:
        """Per sequence, its first block if all its blocks are consecutive and ascending (one run of the cache),
        else -1 (from the host's own lists: no tensor is read)."""
        out = []
        for s in seq_ids:
            blocks = self._seq(s).blocks
            first = blocks[0] if blocks else -1
            out.append(first if blocks == list(range(first, first + len(blocks))) else -1)
        return tuple(out)

    def slots(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids ``[P]`` int64 for logical ``positions [P]`` of ``seq_id`` (must be reserved)."""
        seq = self._seq(seq_id)
        positions = positions.to(torch.long)
        if positions.numel() and int(positions.max()) >= len(seq.blocks) * self.block_size:
            raise IndexError(f"position {int(positions.max())} of sequence {seq_id} is not reserved")
        table = torch.tensor(seq.blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """``[B, max_blocks]`` int32 block table on the host (padding entries are 0 and never read);
        :func:`specdec.attention.tree_batch` packs it into its copies to the device."""
        rows = [self._seq(s).blocks for s in seq_ids]
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)``, each ``[NB, BS, Hkv, D]``: one layer's views."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [T, Hkv, D]`` of ``layer`` at flat slots ``slot_mapping [T]`` int64 (in place)."""
        self.k[layer].view(-1, *self.k.shape[3:]).index_copy_(0, slot_mapping, k.to(self.k.dtype))
        self.v[layer].view(-1, *self.v.shape[3:]).index_copy_(0, slot_mapping, v.to(self.v.dtype))

    # ------------------------------------------------------------------ commit
    def move(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy flat slots ``src_slots [M]`` to ``dst_slots [M]`` (int64, on the cache's device) for every layer in
        one alias-safe call. A slot moved onto itself is a no-op, so callers may pad with such pairs to keep the
        shape fixed; destinations must be unique."""
        if src_slots.numel():
            self._move_kv(self.k, self.v, src_slots, dst_slots)

    def advance(self, seq_id: int, n: int, keep_reserved: int = 0) -> int:
        """Host bookkeeping after the KV of ``n`` new tokens sits at positions ``[num_tokens, num_tokens + n)``:
        grow the committed length and free blocks beyond ``num_tokens + keep_reserved``. Returns the new length."""
        seq = self._seq(seq_id)
        seq.num_tokens += n
        keep = -(-(seq.num_tokens + keep_reserved) // self.block_size)
        if len(seq.blocks) > keep:
            self.allocator.free(seq.blocks[keep:])
            del seq.blocks[keep:]
        return seq.num_tokens

    def blocks_needed(self, seq_id: int, extra: int) -> int:
        """Blocks :meth:`reserve` would allocate for ``extra`` more positions."""
        seq = self._seq(seq_id)
        return max(0, -(-(seq.num_tokens + extra) // self.block_size) - len(seq.blocks))

    def commit(self, seq_id: int, path: Sequence[int], keep_reserved: int = 0) -> int:
        """Keep the tree nodes ``path`` (strictly increasing node indices) at consecutive positions.

        Node ``path[i]`` (written at ``num_tokens + path[i]``) moves to ``num_tokens + i`` for every layer, alias-safe.
        ``num_tokens`` grows by ``len(path)``; blocks beyond ``num_tokens + keep_reserved`` are freed. Nodes are not
        re-rotated: the node at depth ``i`` was RoPE'd at position ``num_tokens + i`` already.

        Returns the new committed length.
        """
        seq = self._seq(seq_id)
        path_t = torch.as_tensor(list(path), dtype=torch.long)
        if path_t.numel() and bool((path_t[1:] <= path_t[:-1]).any()):
            raise ValueError(f"commit path must be strictly increasing node indices, got {list(path)}")
        src = seq.num_tokens + path_t
        dst = seq.num_tokens + torch.arange(path_t.numel())
        moved = src != dst
        if bool(moved.any()):
            dev = self.k.device
            self.move(self.slots(seq_id, src[moved]).to(dev), self.slots(seq_id, dst[moved]).to(dev))
        return self.advance(seq_id, path_t.numel(), keep_reserved)
