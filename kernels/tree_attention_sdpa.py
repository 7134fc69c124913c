"""Paged tree attention by gather + SDPA, per sequence, in the input dtype: the CPU kernel of the custom op.

Same contract as :func:`specdec.kernels.paged_tree_attention` (padding rows past ``cu_q[B]`` come out 0; a
``tree_mask`` tail past ``mask_indptr[B]`` is not read), computed the way the eager ``torch`` attention backend
does it (``index_select`` of each sequence's K/V rows, SDPA with the dense ``[n, ctx + off + n]`` mask, no mask for
a lone root), so a compiled CPU step and the eager engine agree to rounding, and float64 stays float64. The index
tensors are read on the host (free on CPU); out-of-range block ids raise ``IndexError`` from ``index_select``.
Tested against :func:`paged_tree_attention_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_tree_attention_sdpa(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                              sm_scale: float, q_offsets=None) -> torch.Tensor:
    """``q [T, Hq, D]``, one layer's ``k_cache/v_cache [NB, BS, Hkv, D]`` (strided views allowed),
    ``block_table [B, max_blocks]`` int32, ``context_lens [B]`` int32, ``cu_q [B+1]`` int32, ``tree_mask`` flat
    uint8/bool, ``mask_indptr [B+1]`` int64, ``q_offsets [B]`` int32 or ``None`` -> new ``[T, Hq, D]`` in q's
    dtype."""
    t, hq, _ = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    cu, ctxs, mptr = cu_q.tolist(), context_lens.tolist(), mask_indptr.tolist()
    offs = [0] * len(ctxs) if q_offsets is None else q_offsets.tolist()
    if cu[-1] > t:
        raise ValueError(f"cu_q ends at {cu[-1]} but q has only T={t} rows")
    out = torch.zeros_like(q) if cu[-1] < t else None  # padding rows stay 0
    parts = []
    for b, ctx in enumerate(ctxs):
        s, n = cu[b], cu[b + 1] - cu[b]
        if n == 0:
            continue
        width = offs[b] + n
        pos = torch.arange(ctx + width, device=q.device)
        blocks = block_table[b].long().index_select(0, pos // page)
        k = k_cache[blocks, pos % page].transpose(0, 1)  # [Hkv, ctx + width, D]
        v = v_cache[blocks, pos % page].transpose(0, 1)
        mask = None
        if n > 1 or width > 1:  # a lone root sees its whole prefix: no mask (SDPA's fast path)
            mask = torch.ones(n, ctx + width, dtype=torch.bool, device=q.device)
            mask[:, ctx:] = tree_mask[mptr[b]:mptr[b] + n * width].view(n, width).bool()
        o = F.scaled_dot_product_attention(q[s:s + n].transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           attn_mask=mask, scale=sm_scale, enable_gqa=hq != hkv)
        o = o[0].transpose(0, 1)
        if out is None:
            parts.append(o)
        else:
            out[s:s + n] = o
    if out is not None:
        return out
    if not parts:
        return torch.zeros_like(q)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous()
