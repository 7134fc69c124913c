"""Commit the accepted path of a token tree: move K/V slots inside the paged cache, all layers at once.

After verification, the accepted node at depth ``d`` sits at slot ``slot(ctx + a_d)`` and must end up at
``slot(ctx + d)``. Because ``a_d >= d``, a destination can be the source of another entry (path ``[0, 2, 5]``
copies ``ctx+2 -> ctx+1`` and ``ctx+5 -> ctx+2``), so a single parallel in-place pass would race. The kernel
below is therefore two launches: gather every source row of every layer into a scratch buffer, then scatter
the scratch rows to their destinations. No re-rotation is needed: the K rows were RoPE'd with the position
``ctx + depth`` they are committed to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .checks import check_cache_pair

_BLOCK = 1024  # elements of one slot row (Hkv * D) handled per program


@triton.jit
def _slot_row(slot_ptr, move, layer, offs, stride_l, stride_b, stride_s, stride_h,
              PAGE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Element offsets of row ``offs`` (flattened ``[Hkv, D]``) of flat slot ``slot_ptr[move]`` in ``layer``."""
    slot = tl.load(slot_ptr + move).to(tl.int64)
    return (layer * stride_l + (slot // PAGE) * stride_b + (slot % PAGE) * stride_s
            + (offs // HEAD_DIM) * stride_h + offs % HEAD_DIM)


@triton.jit
def _commit_gather_kernel(
    k_ptr, v_ptr, k_scratch_ptr, v_scratch_ptr, src_ptr,
    num_moves, stride_l, stride_b, stride_s, stride_h,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    move = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < ROW
    cache_off = _slot_row(src_ptr, move, layer, offs, stride_l, stride_b, stride_s, stride_h, PAGE, HEAD_DIM)
    scratch_off = (layer * num_moves + move) * ROW + offs
    tl.store(k_scratch_ptr + scratch_off, tl.load(k_ptr + cache_off, mask=ok), mask=ok)
    tl.store(v_scratch_ptr + scratch_off, tl.load(v_ptr + cache_off, mask=ok), mask=ok)


@triton.jit
def _commit_scatter_kernel(
    k_ptr, v_ptr, k_scratch_ptr, v_scratch_ptr, dst_ptr,
    num_moves, stride_l, stride_b, stride_s, stride_h,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    move = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < ROW
    cache_off = _slot_row(dst_ptr, move, layer, offs, stride_l, stride_b, stride_s, stride_h, PAGE, HEAD_DIM)
    scratch_off = (layer * num_moves + move) * ROW + offs
    tl.store(k_ptr + cache_off, tl.load(k_scratch_ptr + scratch_off, mask=ok), mask=ok)
    tl.store(v_ptr + cache_off, tl.load(v_scratch_ptr + scratch_off, mask=ok), mask=ok)


def _as_layers(c: torch.Tensor) -> torch.Tensor:
    return c.unsqueeze(0) if isinstance(c, torch.Tensor) and c.dim() == 4 else c


def _validate(k_cache, v_cache, src_slots, dst_slots) -> None:
    """Check shapes, dtypes and devices, then (one device sync) that slots are in range and dst is unique."""
    if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4:
        check_cache_pair(k_cache, v_cache, 4, "[num_blocks, block_size, Hkv, D] (one layer)")
    else:
        check_cache_pair(k_cache, v_cache, 5, "[L, num_blocks, block_size, Hkv, D] or one layer "
                         "[num_blocks, block_size, Hkv, D]")
    dev = k_cache.device
    for name, t in (("src_slots", src_slots), ("dst_slots", dst_slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [M], got shape {tuple(t.shape)}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the cache is on {dev}")
    if src_slots.shape != dst_slots.shape:
        raise ValueError(f"src_slots has {src_slots.numel()} entries but dst_slots has {dst_slots.numel()}")
    m = dst_slots.numel()
    if m == 0:
        return
    num_slots = _as_layers(k_cache).shape[1] * _as_layers(k_cache).shape[2]
    lo = torch.minimum(src_slots.min(), dst_slots.min())
    hi = torch.maximum(src_slots.max(), dst_slots.max())
    distinct = torch.unique(dst_slots).numel()
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_slots:
        raise ValueError(f"slot ids must lie in [0, {num_slots}), got range [{lo}, {hi}]")
    if distinct != m:
        raise ValueError("dst_slots must be unique (two moves to one slot are ambiguous)")


def commit_kv(k_cache, v_cache, src_slots, dst_slots) -> None:
    """Copy K/V slot rows ``src_slots[m] -> dst_slots[m]`` in every layer, in place and alias-safe.

    Every destination receives the value its source held *before* the call, whatever the overlap between
    sources and destinations (gather into scratch, then scatter: two launches for all layers).

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        ``[L, num_blocks, block_size, Hkv, D]`` (all layers) or one layer ``[num_blocks, block_size, Hkv, D]``,
        any float dtype; strided views with unit last-dim stride and equal K/V strides are fine (e.g.
        ``kv[:, 0]`` / ``kv[:, 1]`` of a per-layer ``[NB, 2, BS, H, D]`` tensor). Modified in place.
    src_slots : torch.Tensor
        ``[M]`` int64 flat slot ids (``block_id * block_size + offset``) to read.
    dst_slots : torch.Tensor
        ``[M]`` int64 flat slot ids to write; unique.
    """
    _validate(k_cache, v_cache, src_slots, dst_slots)
    m = dst_slots.numel()
    if m == 0 or k_cache.numel() == 0:
        return
    if k_cache.device.type == "cpu" and not isinstance(_commit_gather_kernel, InterpretedFunction):
        raise RuntimeError("commit_kv got CPU tensors but the Triton kernels were not built for the "
                           "interpreter: set TRITON_INTERPRET=1 before importing specdec.kernels, "
                           "or use commit_kv_reference")
    k5, v5 = _as_layers(k_cache), _as_layers(v_cache)
    layers, _, page, hkv, d = k5.shape
    row = hkv * d
    block = min(_BLOCK, triton.next_power_of_2(row))
    src = src_slots.contiguous()
    dst = dst_slots.contiguous()
    k_scratch = torch.empty((layers, m, row), dtype=k5.dtype, device=k5.device)
    v_scratch = torch.empty_like(k_scratch)
    grid = (m, layers, triton.cdiv(row, block))
    args = (k5, v5, k_scratch, v_scratch)
    strides = (m, k5.stride(0), k5.stride(1), k5.stride(2), k5.stride(3))
    consts = dict(PAGE=page, HEAD_DIM=d, ROW=row, BLOCK=block)
    _commit_gather_kernel[grid](*args, src, *strides, **consts)
    _commit_scatter_kernel[grid](*args, dst, *strides, **consts)


def commit_kv_reference(k_cache, v_cache, src_slots, dst_slots) -> None:
    """Pure PyTorch :func:`commit_kv` (same arguments and checks): index gather, then an indexed write."""
    _validate(k_cache, v_cache, src_slots, dst_slots)
    if dst_slots.numel() == 0:
        return
    page = _as_layers(k_cache).shape[2]
    for cache in (_as_layers(k_cache), _as_layers(v_cache)):
        rows = cache[:, src_slots // page, src_slots % page]  # a copy: the gather finishes before any write
        cache[:, dst_slots // page, dst_slots % page] = rows
