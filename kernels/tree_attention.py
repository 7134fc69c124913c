"""Paged tree attention: one verify (or prefill) forward over a token tree per sequence.

Every sequence ``b`` has ``ctx_b`` committed tokens and a token tree of ``n_b`` nodes in topological order
(node 0 is the root, ``parent(i) < i``). The tree K/V has already been written to the paged cache at logical
positions ``ctx_b + i``. Node ``i`` attends to

* every committed key at logical positions ``[0, ctx_b)`` (no mask), and
* tree key ``ctx_b + j`` iff ``tree_mask_b[i, j]`` (``j == i`` or ``j`` is an ancestor of ``i``).

Prefill is the same call with a chain "tree" (a lower-triangular mask) and usually ``ctx_b == 0``.

Kernel layout: one program per (sequence, kv head, block of ``BLOCK_Q`` tree nodes). The ``G = Hq // Hkv``
query heads that share a kv head are packed into the M dimension of the tile, so each K/V tile is loaded once
per group. Phase 1 streams the committed prefix without a mask; phase 2 streams the tree keys with the mask,
stopping at the q-block's last node (a topologically ordered node only sees ``j <= i``). Accumulation is fp32
with an online softmax whose ``-inf`` guard keeps fully masked (padded) rows finite.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TILE_ROWS = 64  # rows (tree nodes x packed query heads) of one program's tile
_BLOCK_N = 32  # keys per inner-loop step


@triton.jit
def _online_softmax_step(s, v, acc, m_i, l_i, DOT_PRECISION: tl.constexpr):
    """Fold one tile of log2-domain scores ``s`` [M, N] (masked entries = -inf) and values ``v`` [N, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Guard: a row whose keys so far are all masked keeps m = -inf; use 0 so exp2 gives 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    block_table_ptr, context_lens_ptr, cu_q_ptr, mask_ptr, mask_indptr_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)

    q_start = tl.load(cu_q_ptr + seq)
    n = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= n:
        return
    ctx = tl.load(context_lens_ptr + seq)
    mask_base = tl.load(mask_indptr_ptr + seq).to(tl.int64)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt

    # Row r of the tile is tree node q_block*BLOCK_Q + r // GROUP, query head kv_head*GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    node = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (node < n)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_off = (q_start + node).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    head_off = kv_head * stride_ch

    # Phase 1: committed prefix [0, ctx), visible to every node.
    for start in range(0, ctx, BLOCK_N):
        kpos = start + offs_n
        k_ok = kpos < ctx
        blk = tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (kpos % PAGE) * stride_cs + head_off
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(s, v, acc, m_i, l_i, DOT_PRECISION)

    # Phase 2: tree keys ctx + j under the ancestor mask, j < min(n, last node of this q-block + 1).
    tree_end = tl.minimum(n, (q_block + 1) * BLOCK_Q)
    mask_row = mask_base + node.to(tl.int64) * n
    for start in range(0, tree_end, BLOCK_N):
        j = start + offs_n
        j_ok = j < tree_end
        kpos = ctx + j
        blk = tl.load(bt_row + kpos // PAGE, mask=j_ok, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (kpos % PAGE) * stride_cs + head_off
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = tl.load(mask_ptr + mask_row[:, None] + j[None, :],
                          mask=row_ok[:, None] & j_ok[None, :], other=0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(allowed != 0, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(s, v, acc, m_i, l_i, DOT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows with no visible key (padding) store 0, not NaN
    out = acc / l_safe[:, None]
    o_off = (q_start + node).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _check_index(name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension")


def _validate(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr, max_q, out):
    """Metadata-only checks (no device sync). Returns the mask as a uint8 tensor."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q must have unit stride in its last (head_dim) dimension")
    dev = q.device
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D], got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise TypeError(f"{name} dtype {c.dtype} differs from q dtype {q.dtype}")
        if c.device != dev:
            raise ValueError(f"{name} is on {c.device} but q is on {dev}")
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has D={d}, k_cache has D={k_cache.shape[3]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    _check_index("block_table", block_table, torch.int32, 2, dev)
    _check_index("context_lens", context_lens, torch.int32, 1, dev)
    _check_index("cu_q", cu_q, torch.int32, 1, dev)
    _check_index("mask_indptr", mask_indptr, torch.int64, 1, dev)
    b = context_lens.shape[0]
    if block_table.shape[0] != b:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but context_lens has {b} entries")
    if cu_q.shape[0] != b + 1 or mask_indptr.shape[0] != b + 1:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and mask_indptr {tuple(mask_indptr.shape)} "
                         f"must be [B+1]={b + 1}")
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(f"tree_mask must be a torch.Tensor, got {type(tree_mask).__name__}")
    if tree_mask.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"tree_mask must be uint8 or bool, got {tree_mask.dtype}")
    if tree_mask.dim() != 1 or not tree_mask.is_contiguous():
        raise ValueError(f"tree_mask must be flat and contiguous [sum n_b^2], got {tuple(tree_mask.shape)}")
    if tree_mask.device != dev:
        raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {dev}")
    if isinstance(max_q, bool) or not isinstance(max_q, int) or max_q < 0:
        raise ValueError(f"max_q must be a non-negative int (>= every tree size), got {max_q!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != dev:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {dev}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must have unit stride in its last dimension")
    return tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask


def paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                         sm_scale: float, max_q: int, out=None) -> torch.Tensor:
    """Tree-masked attention of every tree node over its paged prefix and its tree ancestors.

    Parameters
    ----------
    q : torch.Tensor
        Queries ``[T, Hq, D]``, float32/float16/bfloat16, already RoPE'd; ``T = sum_b n_b``. The last dim
        must be contiguous (the other strides are free, e.g. a view of a fused QKV projection).
    k_cache, v_cache : torch.Tensor
        One layer of the paged cache, ``[num_blocks, block_size, Hkv, D]``, dtype of ``q``, contiguous
        (``cache[layer]`` of a contiguous ``[L, ...]`` tensor is fine). Tree K/V must already be written at
        logical positions ``ctx_b + i``.
    block_table : torch.Tensor
        ``[B, max_blocks]`` int32: logical block -> physical block. Entries past the sequence are not read.
    context_lens : torch.Tensor
        ``[B]`` int32, committed tokens ``ctx_b`` (the unmasked prefix).
    cu_q : torch.Tensor
        ``[B + 1]`` int32, cumulative tree sizes (``cu_q[0] == 0``, ``cu_q[B] == T``).
    tree_mask : torch.Tensor
        Flat ``[sum_b n_b^2]`` uint8 or bool: row-major ``n_b x n_b`` ancestor mask per sequence,
        ``mask[i, j] = 1`` iff ``j == i`` or ``j`` is an ancestor of ``i``. Must be lower triangular (the
        kernel never reads ``j > i`` tiles past the q-block).
    mask_indptr : torch.Tensor
        ``[B + 1]`` int64, ``cumsum(n_b^2)`` with a leading 0.
    sm_scale : float
        Softmax scale, usually ``D ** -0.5``.
    max_q : int
        Upper bound on ``n_b`` (sizes the grid without a device sync). Nodes past it are not computed.
    out : torch.Tensor, optional
        ``[T, Hq, D]`` in the dtype of ``q``; written in place and returned.

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]`` in the dtype of ``q``.
    """
    mask_u8 = _validate(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                        max_q, out)
    if q.device.type == "cpu" and (not isinstance(_paged_tree_attention_kernel, InterpretedFunction)
                                   or isinstance(tl.max, JITFunction)):
        # tl.max / tl.sum are @jit helpers of triton.language: they too must be built for the interpreter.
        raise RuntimeError("paged_tree_attention got CPU tensors but Triton was not imported in interpreter "
                           "mode: export TRITON_INTERPRET=1 before triton is first imported, or use "
                           "paged_tree_attention_reference")
    if out is None:
        out = torch.empty_like(q)
    t, hq, d = q.shape
    b = context_lens.shape[0]
    hkv = k_cache.shape[2]
    if t == 0 or b == 0 or max_q == 0:
        return out
    group = hq // hkv
    block_q = max(1, min(max_q, _MAX_TILE_ROWS // group))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    block_d = max(16, triton.next_power_of_2(d))
    grid = (b, hkv, triton.cdiv(max_q, block_q))
    _paged_tree_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_table, context_lens, cu_q, mask_u8, mask_indptr,
        float(sm_scale) * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
        PAGE=k_cache.shape[1], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
    )
    return out


def paged_tree_attention_reference(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
                                   mask_indptr, sm_scale: float, max_q: int, out=None) -> torch.Tensor:
    """Pure PyTorch version of :func:`paged_tree_attention` (same arguments, fp32 math, output in q dtype).

    Runs on any device. Also checks the values of the index tensors (this syncs). Rows with no visible key
    (impossible under the tree invariants) return 0, matching the kernel. ``max_q`` is only range-checked.
    """
    mask_u8 = _validate(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                        max_q, out)
    t, hq, d = q.shape
    num_blocks, page, hkv, _ = k_cache.shape
    group = hq // hkv
    cu = cu_q.tolist()
    ctxs = context_lens.tolist()
    mptr = mask_indptr.tolist()
    if cu[0] != 0 or cu[-1] != t or any(e < s for s, e in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"cu_q must start at 0, be non-decreasing and end at T={t}, got {cu}")
    sizes = [e - s for s, e in zip(cu[:-1], cu[1:], strict=True)]
    if mptr[0] != 0 or any(mptr[i + 1] - mptr[i] != n * n for i, n in enumerate(sizes)):
        raise ValueError("mask_indptr must be cumsum(n_b^2) with a leading 0")
    if mptr[-1] != mask_u8.numel():
        raise ValueError(f"tree_mask has {mask_u8.numel()} entries but mask_indptr ends at {mptr[-1]}")
    if sizes and max(sizes) > max_q:
        raise ValueError(f"max_q={max_q} is smaller than the largest tree ({max(sizes)} nodes)")
    kf = k_cache.reshape(num_blocks * page, hkv, d)
    vf = v_cache.reshape(num_blocks * page, hkv, d)
    res = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(sizes):
        if n == 0:
            continue
        ctx, s = ctxs[b], cu[b]
        if ctx < 0 or triton.cdiv(ctx + n, page) > block_table.shape[1]:
            raise ValueError(f"sequence {b}: ctx={ctx} plus {n} tree nodes does not fit block_table")
        pos = torch.arange(ctx + n, device=q.device)
        blocks = block_table[b, pos // page].long()
        if blocks.numel() and (blocks.min() < 0 or blocks.max() >= num_blocks):
            raise ValueError(f"sequence {b}: block_table holds a block id outside [0, {num_blocks})")
        slots = blocks * page + pos % page
        k = kf[slots].float().repeat_interleave(group, dim=1)  # [ctx+n, Hq, D]
        v = vf[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:s + n].float(), k) * sm_scale
        allow = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device)
        allow[:, ctx:] = mask_u8[mptr[b]:mptr[b] + n * n].view(n, n).bool()
        scores = scores.masked_fill(~allow, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # fully masked rows -> 0
        res[s:s + n] = torch.einsum("hqk,khd->qhd", probs, v)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
