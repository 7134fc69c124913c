"""Pure PyTorch paged tree attention: the reference every Triton path (unsplit and split-KV) is tested against.

Also the CPU implementation of the ``specdec::paged_tree_attention`` custom op (:mod:`specdec.ops`).
"""

from __future__ import annotations

import torch

from .checks import validate_tree_attention


def paged_tree_attention_reference(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
                                   mask_indptr, sm_scale: float, max_q: int, out=None,
                                   num_splits: int | None = None, q_offsets=None) -> torch.Tensor:
    """Pure PyTorch version of :func:`paged_tree_attention` (same arguments, fp32 math, output in q dtype).

    ``q [T, Hq, D]``, ``k_cache/v_cache [NB, BS, Hkv, D]`` (strided views allowed), ``block_table [B, max_blocks]``
    int32, ``context_lens [B]`` int32, ``cu_q [B+1]`` int32, ``tree_mask [sum n_b * (off_b + n_b)]``,
    ``mask_indptr [B+1]`` int64, ``q_offsets [B]`` int32 or ``None`` (zeros) -> ``[T, Hq, D]``. Query ``i`` of
    sequence ``b`` sees keys ``[0, ctx_b)`` and tree keys ``ctx_b + j`` (``j < off_b + n_b``) where its mask row
    allows. Runs on any device. Also checks the values of the index tensors (this syncs). Rows with no visible key
    (impossible under the tree invariants) and padding rows past ``cu_q[B]`` return 0, matching the kernel.
    ``max_q`` is only range-checked; ``num_splits`` (a kernel tuning knob) is only validated.
    """
    mask_u8 = validate_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
                                      mask_indptr, max_q, out, num_splits, q_offsets)
    t, hq, d = q.shape
    num_blocks, page, hkv, _ = k_cache.shape
    group = hq // hkv
    cu = cu_q.tolist()
    ctxs = context_lens.tolist()
    mptr = mask_indptr.tolist()
    offs = [0] * len(ctxs) if q_offsets is None else q_offsets.tolist()
    if cu[0] != 0 or cu[-1] > t or any(e < s for s, e in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"cu_q must start at 0, be non-decreasing and end at most at T={t}, got {cu}")
    sizes = [e - s for s, e in zip(cu[:-1], cu[1:], strict=True)]
    if any(o < 0 for o in offs):
        raise ValueError(f"q_offsets must be >= 0 (tree nodes already written), got {offs}")
    if mptr[0] != 0 or any(mptr[i + 1] - mptr[i] != n * (offs[i] + n) for i, n in enumerate(sizes)):
        raise ValueError("mask_indptr must be cumsum(n_b * (off_b + n_b)) with a leading 0 (cumsum(n_b^2) "
                         "without offsets)")
    if mptr[-1] > mask_u8.numel():
        raise ValueError(f"tree_mask has {mask_u8.numel()} entries but mask_indptr ends at {mptr[-1]}")
    if sizes and max(sizes) > max_q:
        raise ValueError(f"max_q={max_q} is smaller than the largest tree ({max(sizes)} nodes)")
    res = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # padding rows past cu_q[B] stay 0
    for b, n in enumerate(sizes):
        if n == 0:
            continue
        ctx, s, width = ctxs[b], cu[b], offs[b] + n
        if ctx < 0 or -(-(ctx + width) // page) > block_table.shape[1]:
            raise ValueError(f"sequence {b}: ctx={ctx} plus {width} tree nodes (offset {offs[b]} + {n} queries) "
                             f"does not fit block_table ({block_table.shape[1]} blocks of {page})")
        pos = torch.arange(ctx + width, device=q.device)
        blocks = block_table[b, pos // page].long()
        if blocks.numel() and (blocks.min() < 0 or blocks.max() >= num_blocks):
            raise ValueError(f"sequence {b}: block_table holds a block id outside [0, {num_blocks})")
        k = k_cache[blocks, pos % page].float().repeat_interleave(group, dim=1)  # [ctx+off+n, Hq, D]
        v = v_cache[blocks, pos % page].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:s + n].float(), k) * sm_scale
        allow = torch.ones(n, ctx + width, dtype=torch.bool, device=q.device)
        allow[:, ctx:] = mask_u8[mptr[b]:mptr[b] + n * width].view(n, width).bool()
        scores = scores.masked_fill(~allow, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # fully masked rows -> 0
        res[s:s + n] = torch.einsum("hqk,khd->qhd", probs, v)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def merge_splits_reference(o_part: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Log-sum-exp merge of split-KV partial results (what :func:`merge_splits` computes).

    ``o_part [S, T, Hq, D]`` float32: each split's output normalised by its own softmax sum (0 where the split saw
    no key); ``lse [S, T, Hq]`` float32: log2 of that sum plus the split's running max, ``-inf`` where the split saw
    no key. Returns ``[T, Hq, D]`` in ``out_dtype``; rows that no split saw are 0.
    """
    m = lse.max(0).values
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w = torch.exp2(lse - m)  # [S, T, Hq]; exactly 0 for empty splits
    den = w.sum(0)
    num = (w[..., None] * o_part).sum(0)
    return (num / torch.where(den > 0, den, torch.ones_like(den))[..., None]).to(out_dtype)
