"""Write one layer's fresh K/V rows into the paged cache at their flat slots (vLLM's ``reshape_and_cache``).

Token ``t`` goes to block ``slot_mapping[t] // block_size``, offset ``slot_mapping[t] % block_size``. Negative slots
are skipped, so padded tokens of a static-shape step can carry ``-1`` instead of a scratch slot. The cache may be
a strided per-layer view (unit last-dim stride, equal K/V strides; see :mod:`specdec.kernels.checks`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_cache_pair, require_interpreter

_BLOCK = 1024  # elements of one token row (Hkv * D) per program


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < ROW
    h, d = offs // HEAD_DIM, offs % HEAD_DIM
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def _validate(k_cache, v_cache, slot_mapping, k, v) -> None:
    check_cache_pair(k_cache, v_cache, 4, "[num_blocks, block_size, Hkv, D] (one layer)")
    dev = k_cache.device
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1:] != k_cache.shape[2:]:
            raise ValueError(f"{name} must be [T, Hkv, D] = [T, {k_cache.shape[2]}, {k_cache.shape[3]}], "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the cache is on {dev}")
        if x.numel() > 0 and x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last (head_dim) dimension")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1:
        raise TypeError(f"slot_mapping must be a 1-D int64 tensor [T], got {getattr(slot_mapping, 'dtype', None)} "
                        f"{tuple(getattr(slot_mapping, 'shape', ()))}")
    if slot_mapping.device != dev:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but the cache is on {dev}")
    if not (slot_mapping.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} and v "
                         f"{v.shape[0]} rows")


def write_kv(k_cache, v_cache, slot_mapping, k, v) -> None:
    """Store ``k, v [T, Hkv, D]`` at flat slots ``slot_mapping [T]`` (int64; negative = skip) of one layer's
    ``k_cache, v_cache [NB, BS, Hkv, D]``, in place, converting to the cache dtype. One launch, no host sync;
    slots are not range-checked here (the reference checks them)."""
    _validate(k_cache, v_cache, slot_mapping, k, v)
    if k.shape[0] == 0 or k_cache.numel() == 0:
        return
    if k_cache.device.type == "cpu":
        require_interpreter(_write_kv_kernel, "write_kv", "write_kv_reference")
    _, page, hkv, d = k_cache.shape
    row = hkv * d
    block = min(_BLOCK, triton.next_power_of_2(row))
    _write_kv_kernel[(k.shape[0], triton.cdiv(row, block))](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        PAGE=page, HEAD_DIM=d, ROW=row, BLOCK=block,
    )


def write_kv_reference(k_cache, v_cache, slot_mapping, k, v) -> None:
    """Pure PyTorch :func:`write_kv` (same arguments); also checks that every slot is in range (syncs)."""
    _validate(k_cache, v_cache, slot_mapping, k, v)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"slot ids must be < {num_slots} (negative = skip), got {int(slot_mapping.max())}")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    page = k_cache.shape[1]
    k_cache[slots // page, slots % page] = k[keep].to(k_cache.dtype)
    v_cache[slots // page, slots % page] = v[keep].to(v_cache.dtype)
