"""Tree attention over the paged KV cache, and its hook into Hugging Face models.

:class:`TreeBatch` is the per-forward metadata (built once, shared by all layers). An :class:`AttentionBackend`
turns it into a backend-specific plan once per forward (``plan``) and runs one layer (``attend``). The function
registered with transformers' ``AttentionInterface`` writes the layer's fresh K/V into the cache and calls the
backend; the HF modeling code is used unmodified.

Backends: ``torch`` (dense per-sequence mask + SDPA; the reference and the CPU default) and ``triton``
(:func:`specdec.kernels.paged_tree_attention`; the CUDA default). ``SPECDEC_ATTENTION=triton|torch`` overrides the
choice, so CI can drive the whole engine through the Triton kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AttentionInterface

from specdec import ops
from specdec.kernels.commit import commit_kv
from specdec.kernels.tree_attention import paged_tree_attention
from specdec.kernels.tree_attention_sdpa import attend_rows, dense_tree_mask
from specdec.kv_cache import PagedKVCache
from specdec.tree import TokenTree

ATTENTION_NAME = "specdec_paged"


@dataclass(frozen=True)
class TreeBatch:
    """One verification forward over a batch of trees, flattened to ``T = sum(n_b)`` query tokens.

    A tree offset ``off_b`` (default 0) means the queries extend a partial tree: its first ``off_b`` nodes were
    written by earlier forwards (uncommitted, at ``ctx_b + j``) and this forward's ``n_b`` queries are nodes
    ``off_b .. off_b + n_b - 1``, attending to those earlier nodes through their mask rows.

    Attributes:
        input_ids: ``[T]`` int64, query tokens of all sequences, concatenated.
        positions: ``[T]`` int64, RoPE positions ``ctx_b + depth``.
        slot_mapping: ``[T]`` int64, flat cache slot of each token (logical position ``ctx_b + node``).
        context_lens: ``[B]`` int32, committed tokens per sequence.
        cu_q: ``[B + 1]`` int32, cumulative query counts ``n_b``.
        tree_mask: ``[sum n_b * (off_b + n_b)]`` uint8, row-major ancestor rows of the query nodes.
        mask_indptr: ``[B + 1]`` int64, ``cumsum(n_b * (off_b + n_b))``.
        block_table: ``[B, max_blocks]`` int32.
        max_q: largest ``n_b`` in the batch.
        cu_q_host, context_lens_host: the same values as host tuples (known to the scheduler without reading the
            device), so no backend needs a device sync to plan.
        q_offsets: ``[B]`` int32, tree offsets ``off_b`` (``None`` at construction: zeros).
        q_offsets_host: the same as a host tuple (``()`` at construction: zeros).
        first_blocks_host: per sequence, its first block when all its blocks are consecutive and ascending (its
            K/V is then one run of the cache, read in place by the torch backend), else -1; ``()``: unknown.

    All device tensors sit on the cache's device.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    context_lens: torch.Tensor
    cu_q: torch.Tensor
    tree_mask: torch.Tensor
    mask_indptr: torch.Tensor
    block_table: torch.Tensor
    max_q: int
    cu_q_host: tuple[int, ...] = ()
    context_lens_host: tuple[int, ...] = ()
    q_offsets: torch.Tensor | None = None
    q_offsets_host: tuple[int, ...] = ()
    first_blocks_host: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.q_offsets is None:
            object.__setattr__(self, "q_offsets", torch.zeros_like(self.context_lens, dtype=torch.int32))
        if not self.q_offsets_host:
            object.__setattr__(self, "q_offsets_host", (0,) * self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def build_tree_batch(cache: PagedKVCache, seq_ids: Sequence[int], trees: Sequence[TokenTree],
                     offsets: Sequence[int] | None = None) -> TreeBatch:
    """Metadata for verifying ``trees[b]`` on top of sequence ``seq_ids[b]`` (blocks for ``ctx + len(tree)`` must be
    reserved). ``offsets[b]``: leading nodes of ``trees[b]`` already written; only the rest are queries (see
    :func:`tree_batch`)."""
    if len(seq_ids) != len(trees) or not trees:
        raise ValueError(f"need one tree per sequence, got {len(trees)} trees for {len(seq_ids)} sequences")
    ctx = [cache.num_tokens(s) for s in seq_ids]
    reserved = [len(cache.blocks(s)) * cache.block_size for s in seq_ids]
    for s, c, t, r in zip(seq_ids, ctx, trees, reserved, strict=True):
        if c + t.num_nodes > r:
            raise IndexError(f"position {c + t.num_nodes - 1} of sequence {s} is not reserved")
    return tree_batch(cache.block_table(seq_ids), ctx, trees, cache.block_size, offsets, cache.device,
                      cache.first_blocks(seq_ids))


def tree_batch(block_table: torch.Tensor, context_lens: Sequence[int], trees: Sequence[TokenTree],
               block_size: int, offsets: Sequence[int] | None = None,
               device: torch.device | str | None = None, first_blocks: Sequence[int] = ()) -> TreeBatch:
    """:class:`TreeBatch` from a block table ``[B, max_blocks]`` int32, host context lengths and trees, with
    whole-batch tensor ops (no per-token Python, no device sync).

    ``trees[b]`` is the whole (partial) tree; ``offsets[b]`` (default 0) of its leading nodes are already written
    at ``ctx_b + j`` by earlier forwards. The queries are nodes ``offsets[b]:`` (``0 <= offsets[b] <= len(tree)``;
    equal means no query for that sequence): tokens ``tokens[off:]``, positions ``ctx + depth[off:]``, slots of
    ``ctx + off + i``, mask rows ``ancestor_mask[off:, :]``.

    ``device`` (default: the block table's): where the batch lives. Everything is computed on the host and moves
    in three copies (int64, int32 and mask bytes; on CUDA each blocking copy is a round trip), so a decode loop
    passes its host block table (:meth:`PagedKVCache.block_table`) and the device. ``first_blocks``: see
    :attr:`TreeBatch.first_blocks_host` (:meth:`PagedKVCache.first_blocks`; default unknown)."""
    dev = torch.device(device) if device is not None else block_table.device
    nodes = [t.num_nodes for t in trees]
    offs = [0] * len(trees) if offsets is None else [int(o) for o in offsets]
    if len(offs) != len(trees):
        raise ValueError(f"need one offset per tree, got {len(offs)} offsets for {len(trees)} trees")
    for b, (o, m) in enumerate(zip(offs, nodes, strict=True)):
        if not 0 <= o <= m:
            raise ValueError(f"offset {o} of sequence {b} is outside [0, {m}]: it counts the already written "
                             f"leading nodes of a {m}-node tree")
    sizes_host = [m - o for m, o in zip(nodes, offs, strict=True)]
    cu_host = tuple(itertools.accumulate(sizes_host, initial=0))
    b, t = len(trees), cu_host[-1]
    sizes = torch.tensor(sizes_host)
    cu = torch.tensor(cu_host)
    ctx = torch.tensor(list(context_lens), dtype=torch.long)
    off = torch.tensor(offs, dtype=torch.long)
    seq_of = torch.repeat_interleave(torch.arange(b), sizes)  # [T]
    node = torch.arange(t) - cu[seq_of] + off[seq_of]  # tree node index of each query
    depth = torch.cat([tr.depth[o:] for tr, o in zip(trees, offs, strict=True)])
    logical = ctx[seq_of] + node
    ids = torch.cat([tr.tokens[o:] for tr, o in zip(trees, offs, strict=True)])
    indptr = torch.nn.functional.pad((sizes * torch.tensor(nodes)).cumsum(0), (1, 0))
    mask = torch.cat([tr.ancestor_mask[o:].flatten() for tr, o in zip(trees, offs, strict=True)]).to(torch.uint8)
    table_host = block_table.cpu()  # a device table (a server's own) costs one read back; the engine's is host
    slots = table_host[seq_of, logical // block_size].long() * block_size + logical % block_size
    longs = torch.cat([ids, ctx[seq_of] + depth, slots, indptr]).to(dev)  # int64 fields, one copy
    ints = torch.cat([ctx, cu, off, table_host.flatten().long()]).to(torch.int32).to(dev)  # int32 fields, one copy
    return TreeBatch(
        input_ids=longs[:t],
        positions=longs[t:2 * t],
        slot_mapping=longs[2 * t:3 * t],
        context_lens=ints[:b],
        cu_q=ints[b:2 * b + 1],
        tree_mask=mask.to(dev),
        mask_indptr=longs[3 * t:],
        block_table=ints[3 * b + 1:].view(block_table.shape),
        max_q=max(sizes_host),
        cu_q_host=cu_host,
        context_lens_host=tuple(int(c) for c in context_lens),
        q_offsets=ints[2 * b + 1:3 * b + 1],
        q_offsets_host=tuple(offs),
        first_blocks_host=tuple(first_blocks),
    )


class AttentionBackend(Protocol):
    """Computes tree attention for one layer; ``plan`` runs once per forward, ``attend`` once per layer."""

    name: str

    def plan(self, batch: TreeBatch, block_size: int) -> Any: ...

    def attend(
        self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sm_scale: float
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k_cache/v_cache [NB, BS, Hkv, D]`` (one layer) -> ``[T, Hq, D]``."""
        ...

    def move_kv(self, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class _TorchPlan:
    kv: list[slice | torch.Tensor]  # per sequence: its K/V rows, a slice of the cache (one run) or slots to gather
    masks: list[torch.Tensor]  # per sequence [n_b, ctx_b + off_b + n_b] bool
    cu_q: list[int]


class TorchBackend:
    """Reference backend: gathers each sequence's K/V (or reads it in place when its blocks are one run of the
    cache: :attr:`TreeBatch.first_blocks_host`) and runs SDPA with a dense ``[n, ctx + off + n]`` mask."""

    name = "torch"

    def plan(self, batch: TreeBatch, block_size: int) -> _TorchPlan:
        cu, ctx, offs = list(batch.cu_q_host), batch.context_lens_host, batch.q_offsets_host
        table = batch.block_table.long()
        kv, masks, start = [], [], 0
        firsts = batch.first_blocks_host or (-1,) * len(ctx)
        for b, c in enumerate(ctx):
            n, width = cu[b + 1] - cu[b], offs[b] + cu[b + 1] - cu[b]
            if firsts[b] >= 0:  # one run of the cache: read in place, no gather
                kv.append(slice(firsts[b] * block_size, firsts[b] * block_size + c + width))
            else:
                pos = torch.arange(c + width, device=table.device)
                kv.append(table[b, pos // block_size] * block_size + pos % block_size)
            masks.append(dense_tree_mask(c, n, width, batch.tree_mask[start : start + n * width]))
            start += n * width
        return _TorchPlan(kv, masks, cu)

    def attend(
        self, plan: _TorchPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sm_scale: float
    ) -> torch.Tensor:
        k_flat = k_cache.flatten(0, 1)  # [NB * BS, Hkv, D]
        v_flat = v_cache.flatten(0, 1)
        outs = []
        for b, rows in enumerate(plan.kv):
            if plan.cu_q[b + 1] == plan.cu_q[b]:
                continue  # no query for this sequence (its offset covers its whole tree)
            if isinstance(rows, slice):
                k, v = k_flat[rows], v_flat[rows]
            else:
                k, v = k_flat.index_select(0, rows), v_flat.index_select(0, rows)
            outs.append(attend_rows(q[plan.cu_q[b] : plan.cu_q[b + 1]], k, v, plan.masks[b], sm_scale))
        return torch.cat(outs) if len(outs) != 1 else outs[0]

    def move_kv(self, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        move_rows(k, v, src, dst)


def move_rows(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """:func:`specdec.kernels.commit_kv_reference` without its argument checks (no device sync): gather every
    source row first, then ``index_copy_``, so overlapping moves are alias-safe. ``k, v [L, NB, BS, Hkv, D]``
    contiguous; ``src, dst [M]`` int64 flat slots, ``dst`` unique."""
    for cache in (k, v):
        flat = cache.view(cache.shape[0], -1, *cache.shape[3:])
        flat.index_copy_(1, dst, flat.index_select(1, src))


class TritonBackend:
    """Paged tree attention and commit as Triton kernels (compiled on CUDA, interpreted on CPU)."""

    name = "triton"

    def plan(self, batch: TreeBatch, block_size: int) -> TreeBatch:
        return batch

    def attend(
        self, plan: TreeBatch, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sm_scale: float
    ) -> torch.Tensor:
        args = (q, k_cache, v_cache, plan.block_table, plan.context_lens, plan.cu_q, plan.tree_mask,
                plan.mask_indptr, sm_scale, plan.max_q)
        if q.is_cuda or torch.compiler.is_compiling():
            # the custom op: traceable by torch.compile, graph-safe
            return ops.paged_tree_attention(*args, q_offsets=plan.q_offsets)
        return paged_tree_attention(*args, q_offsets=plan.q_offsets)  # CPU: the kernel, under TRITON_INTERPRET=1

    def move_kv(self, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        commit_kv(k, v, src, dst)


BACKENDS = {"torch": TorchBackend, "triton": TritonBackend}


def select_backend(name: str | None = None, device: torch.device | str = "cpu") -> AttentionBackend:
    """``name`` or ``$SPECDEC_ATTENTION`` if set, else Triton on CUDA and torch elsewhere."""
    name = name or os.environ.get("SPECDEC_ATTENTION") or ("triton" if torch.device(device).type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


@dataclass(frozen=True)
class ForwardContext:
    """What the registered attention function needs; passed as the ``specdec`` forward kwarg."""

    cache: PagedKVCache
    batch: TreeBatch
    backend: AttentionBackend
    plan: Any


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``AttentionInterface["specdec_paged"]``.

    ``query [1, Hq, T, D]`` and ``key/value [1, Hkv, T, D]`` (already RoPE'd by the model with our positions).
    Writes K/V for ``module.layer_idx`` at ``batch.slot_mapping`` and returns ``[1, T, Hq, D]``.
    """
    ctx: ForwardContext | None = kwargs.get("specdec")
    if ctx is None:
        raise RuntimeError(
            f"attention '{ATTENTION_NAME}' was called without a specdec ForwardContext; "
            "run the model through specdec.TargetModel"
        )
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    ctx.cache.write(layer, ctx.batch.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_cache, v_cache = ctx.cache.layer_kv(layer)
    out = ctx.backend.attend(ctx.plan, q, k_cache, v_cache, scale)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
