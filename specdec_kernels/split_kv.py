"""Second stage of split-KV tree attention: merge the per-split partial results by log-sum-exp.

Stage one (:func:`specdec.kernels.tree_attention.paged_tree_attention` with ``num_splits > 1``) writes, for every
split ``s``, token ``t`` and query head ``h``, the output normalised by the split's own softmax sum,
``o_part[s, t, h] [D]``, and ``lse[s, t, h] = m + log2(l)`` (log2 domain; ``-inf`` when the split saw no key). The
merged row is ``sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)`` with ``M = max_s lse_s``; rows no split saw are 0.
One program per token handles all of its heads. The pure-torch version is
:func:`specdec.kernels.tree_attention_reference.merge_splits_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_splits_kernel(
    o_part_ptr, lse_ptr, out_ptr,
    stride_ps, stride_ls, stride_ot, stride_oh,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < HQ
    tile_ok = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_row = t * HQ + offs_h  # lse is [S, T, Hq] contiguous; o_part is [S, T, Hq, D] contiguous
    part_off = lse_row[:, None] * HEAD_DIM + offs_d[None, :]
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    lse_p = lse_ptr + lse_row
    for _ in tl.static_range(NUM_SPLITS):  # pointers advance split by split (64-bit, no int32 overflow)
        m = tl.maximum(m, tl.load(lse_p, mask=h_ok, other=float("-inf")))
        lse_p += stride_ls
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    lse_p = lse_ptr + lse_row
    o_p = o_part_ptr + part_off
    for _ in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(lse_p, mask=h_ok, other=float("-inf")) - m_safe)
        acc += w[:, None] * tl.load(o_p, mask=tile_ok, other=0.0)
        den += w
        lse_p += stride_ls
        o_p += stride_ps
    out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    out_off = t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def merge_splits(o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge ``o_part [S, T, Hq, D]`` and ``lse [S, T, Hq]`` (float32, contiguous) into ``out [T, Hq, D]``.

    ``out`` needs unit stride in its last dimension; it is written in place and returned.
    """
    s, t, hq, d = o_part.shape
    if lse.shape != (s, t, hq) or not (o_part.is_contiguous() and lse.is_contiguous()):
        raise ValueError(f"o_part {tuple(o_part.shape)} and lse {tuple(lse.shape)} must be contiguous "
                         "[S, T, Hq, D] and [S, T, Hq]")
    if o_part.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"o_part and lse must be float32, got {o_part.dtype} and {lse.dtype}")
    if out.shape != (t, hq, d) or out.stride(-1) != 1:
        raise ValueError(f"out must be [T, Hq, D] = {(t, hq, d)} with unit last stride, got {tuple(out.shape)}")
    if t == 0:
        return out
    _merge_splits_kernel[(t,)](
        o_part, lse, out, o_part.stride(0), lse.stride(0), out.stride(0), out.stride(1),
        HQ=hq, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(hq), BLOCK_D=max(16, triton.next_power_of_2(d)),
        NUM_SPLITS=s, num_warps=4,
    )
    return out
