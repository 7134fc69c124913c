"""Paged tree attention: one verify (or prefill) forward over a token tree per sequence.

Every sequence ``b`` has ``ctx_b`` committed tokens and a token tree in topological order (node 0 is the root,
``parent(i) < i``). Its first ``off_b`` nodes (the tree offset, ``q_offsets[b]``, default 0) were written by
earlier forwards; this forward's ``n_b`` queries are tree nodes ``off_b .. off_b + n_b - 1``. All tree K/V up to
the last query has already been written to the paged cache at logical positions ``ctx_b + j``. Query ``i`` (tree
node ``off_b + i``) attends to

* every committed key at logical positions ``[0, ctx_b)`` (no mask), and
* tree key ``ctx_b + j``, ``j < off_b + n_b``, iff ``tree_mask_b[i, j]`` (the ``[n_b, off_b + n_b]`` row-major
  block: ``j == off_b + i`` or ``j`` is an ancestor of node ``off_b + i``).

Prefill is the same call with a chain "tree" (a lower-triangular mask) and usually ``ctx_b == 0``. A drafter
that grows its tree level by level forwards only each level's new nodes with ``off_b`` = the nodes before it.

Kernel layout: one program per (sequence, kv head, block of ``BLOCK_Q`` tree nodes, prefix split). The
``G = Hq // Hkv`` query heads that share a kv head are packed into the M dimension of the tile, so each K/V tile is
loaded once per group; the tile grows with the tree (:func:`specdec.kernels.tiles.tile_config`). Phase 1 streams
the program's chunk of the committed prefix without a mask; phase 2 (last split only) streams the tree keys
(earlier levels' included) with the mask, stopping at the q-block's last node (a topologically ordered query only
sees ``j <= off_b + i``). Accumulation is fp32 with an online softmax whose ``-inf`` guard keeps fully masked
(padded) rows finite.

Split-KV (flash-decoding): with ``num_splits = S > 1`` the prefix ``[0, ctx_b)`` is cut into ``S`` chunks of
``ceil(ctx_b / S)`` keys rounded up to ``BLOCK_N`` (trailing chunks may be empty); each program stores its
normalised partial output and log-sum-exp, and :func:`specdec.kernels.split_kv.merge_splits` combines them. ``S``
is a launch constant chosen from static shapes (:func:`specdec.kernels.tiles.choose_num_splits`), so the launch
is graph-safe; the chunk bounds are computed on the device from ``ctx_b``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import require_interpreter, validate_tree_attention
from .split_kv import merge_splits
from .tiles import choose_num_splits, sm_count, tile_config
from .tree_attention_reference import paged_tree_attention_reference

__all__ = ["paged_tree_attention", "paged_tree_attention_reference"]


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
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    block_table_ptr, context_lens_ptr, q_offsets_ptr, cu_q_ptr, mask_ptr, mask_indptr_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_ls, stride_lt,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_OFFSETS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(cu_q_ptr + seq)
    n = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= n:
        return
    ctx = tl.load(context_lens_ptr + seq)
    if HAS_OFFSETS:  # noqa: SIM108 (a constexpr branch: no offsets tensor is read without one)
        off = tl.load(q_offsets_ptr + seq)
    else:
        off = 0
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

    # Phase 1: this split's chunk [lo, hi) of the committed prefix [0, ctx), visible to every node.
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + offs_n
        k_ok = kpos < hi
        blk = tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (kpos % PAGE) * stride_cs + head_off
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(s, v, acc, m_i, l_i, DOT_PRECISION)

    # Phase 2 (last split): tree keys ctx + j under the ancestor mask [n, off + n], j < off + (last node of this
    # q-block) + 1, earlier levels' keys (j < off) included.
    if split == NUM_SPLITS - 1:
        tree_end = off + tl.minimum(n, (q_block + 1) * BLOCK_Q)
        mask_row = mask_base + node.to(tl.int64) * (off + n)
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

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows with no visible key (padding, empty split) store 0, not NaN
    out = acc / l_safe[:, None]
    o_row = (q_start + node).to(tl.int64)
    o_off = split.to(tl.int64) * stride_os + o_row * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + o_row * stride_lt + head, lse,
                 mask=row_ok)


def _auto_splits(q, k_cache, block_table, context_lens, max_q) -> int:
    if q.device.type != "cuda":
        return 1
    max_context = block_table.shape[1] * k_cache.shape[1]
    return choose_num_splits(context_lens.shape[0], k_cache.shape[2], q.shape[1], max_q, max_context,
                             sm_count(q.device.index or 0), q.shape[2])


def paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                         sm_scale: float, max_q: int, out=None, num_splits: int | None = None,
                         q_offsets=None) -> torch.Tensor:
    """Tree-masked attention of every query node over its paged prefix and its tree ancestors.

    Parameters
    ----------
    q : torch.Tensor
        Queries ``[T, Hq, D]``, float32/float16/bfloat16, already RoPE'd; ``T = sum_b n_b``. The last dim
        must be contiguous (the other strides are free, e.g. a view of a fused QKV projection).
    k_cache, v_cache : torch.Tensor
        One layer of the paged cache, ``[num_blocks, block_size, Hkv, D]``, dtype of ``q``. Strided views are
        fine if the last dim has unit stride and K and V have equal strides: ``cache[layer]`` of ``[L, ...]``,
        ``kv[:, 0]``/``kv[:, 1]`` of ``[NB, 2, BS, H, D]``, ``kv[0]``/``kv[1]`` of ``[2, NB, BS, H, D]``. Tree K/V
        must already be written at logical positions ``ctx_b + j`` for ``j < off_b + n_b``.
    block_table : torch.Tensor
        ``[B, max_blocks]`` int32: logical block -> physical block. Entries past the sequence are not read.
    context_lens : torch.Tensor
        ``[B]`` int32, committed tokens ``ctx_b`` (the unmasked prefix).
    cu_q : torch.Tensor
        ``[B + 1]`` int32, cumulative query counts ``n_b`` (``cu_q[0] == 0``, ``cu_q[B] <= T``). Rows past
        ``cu_q[B]`` are padding (a compiled step's static shapes): nothing is read for them and they come out 0.
    tree_mask : torch.Tensor
        Flat ``[sum_b n_b * (off_b + n_b)]`` uint8 or bool: row-major ``n_b x (off_b + n_b)`` ancestor rows per
        sequence, ``mask[i, j] = 1`` iff ``j == off_b + i`` or tree node ``j`` is an ancestor of node
        ``off_b + i``. Must be lower triangular in that sense (the kernel never reads ``j > off_b + i`` tiles
        past the q-block).
    mask_indptr : torch.Tensor
        ``[B + 1]`` int64, ``cumsum(n_b * (off_b + n_b))`` with a leading 0 (``cumsum(n_b^2)`` without offsets).
        ``tree_mask`` may be longer than ``mask_indptr[B]`` (padding); the tail is not read.
    sm_scale : float
        Softmax scale, usually ``D ** -0.5``.
    max_q : int
        Upper bound on ``n_b`` (sizes the grid and the tile without a device sync). Nodes past it are not computed.
    out : torch.Tensor, optional
        ``[T, Hq, D]`` in the dtype of ``q``; written in place and returned.
    num_splits : int, optional
        Split-KV factor in ``[1, 64]``. ``None``: on CUDA :func:`choose_num_splits` from static shapes (batch,
        heads, ``max_q``, ``block_table.shape[1] * block_size`` and the SM count); 1 on CPU. Any value gives the
        same result up to rounding; values > 1 use ``S x T x Hq x (D + 1)`` float32 scratch and a merge launch.
        Tree keys (earlier levels included) are all read by the last split.
    q_offsets : torch.Tensor, optional
        ``[B]`` int32 tree offsets ``off_b >= 0``: the queries extend a partial tree whose first ``off_b`` nodes
        are already in the cache at ``ctx_b + j``. ``None``: all zero (the queries are the whole tree).

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]`` in the dtype of ``q``.
    """
    mask_u8 = validate_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
                                      mask_indptr, max_q, out, num_splits, q_offsets)
    if q.device.type == "cpu":
        require_interpreter(_paged_tree_attention_kernel, "paged_tree_attention", "paged_tree_attention_reference")
    if out is None:
        out = torch.zeros_like(q)  # padding rows past cu_q[B] stay 0
    t, hq, d = q.shape
    b = context_lens.shape[0]
    hkv = k_cache.shape[2]
    if t == 0 or b == 0 or max_q == 0:
        return out
    splits = num_splits if num_splits is not None else _auto_splits(q, k_cache, block_table, context_lens, max_q)
    cfg = tile_config(max_q, hq // hkv, d)
    if splits == 1:
        o_buf, lse, stride_os, stride_ls, stride_lt = out, out, 0, 0, 0  # lse is never touched with one split
        stride_ot, stride_oh = out.stride(0), out.stride(1)
    else:
        # initialised so that padding rows (never visited) merge to 0
        o_buf = torch.zeros((splits, t, hq, d), dtype=torch.float32, device=q.device)
        lse = torch.full((splits, t, hq), float("-inf"), dtype=torch.float32, device=q.device)
        stride_os, stride_ls, stride_lt, stride_ot, stride_oh = o_buf.stride(0), lse.stride(0), hq, hq * d, d
    grid = (b, hkv, triton.cdiv(max_q, cfg.block_q) * splits)
    _paged_tree_attention_kernel[grid](
        q, k_cache, v_cache, o_buf, lse,
        block_table, context_lens, context_lens if q_offsets is None else q_offsets, cu_q, mask_u8, mask_indptr,
        float(sm_scale) * math.log2(math.e),
        q.stride(0), q.stride(1), stride_ot, stride_oh, stride_os, stride_ls, stride_lt,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PAGE=k_cache.shape[1], NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_OFFSETS=q_offsets is not None,
        num_warps=cfg.num_warps,
    )
    if splits > 1:
        merge_splits(o_buf, lse, out)
    return out
