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


def dense_tree_mask(ctx: int, n: int, width: int, rows: torch.Tensor) -> torch.Tensor | None:
    """The ``[n, ctx + width]`` bool mask of ``n`` queries over a ``ctx``-token prefix (all visible) and ``width``
    tree keys whose flat ancestor rows are ``rows [n * width]``; ``None`` for a lone root, which sees everything
    (SDPA's unmasked fast path)."""
    if n == 1 and width == 1:
        return None
    mask = torch.ones(n, ctx + width, dtype=torch.bool, device=rows.device)
    mask[:, ctx:] = rows.view(n, width).bool()
    return mask


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                sm_scale: float) -> torch.Tensor:
    """SDPA of one sequence's queries ``q [n, Hq, D]`` over its gathered keys/values ``k, v [K, Hkv, D]``
    (GQA by ``enable_gqa``) under ``mask [n, K]`` or none -> ``[n, Hq, D]``."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=sm_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def paged_tree_attention_sdpa(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                              sm_scale: float, q_offsets=None) -> torch.Tensor:
    """``q [T, Hq, D]``, one layer's ``k_cache/v_cache [NB, BS, Hkv, D]`` (strided views allowed),
    ``block_table [B, max_blocks]`` int32, ``context_lens [B]`` int32, ``cu_q [B+1]`` int32, ``tree_mask`` flat
    uint8/bool, ``mask_indptr [B+1]`` int64, ``q_offsets [B]`` int32 or ``None`` -> new ``[T, Hq, D]`` in q's
    dtype."""
    t = q.shape[0]
    page = k_cache.shape[1]
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
        mask = dense_tree_mask(ctx, n, width, tree_mask[mptr[b]:mptr[b] + n * width])
        o = attend_rows(q[s:s + n], k_cache[blocks, pos % page], v_cache[blocks, pos % page], mask, sm_scale)
        if out is None:
            parts.append(o)
        else:
            out[s:s + n] = o
    if out is not None:
        return out
    if not parts:
        return torch.zeros_like(q)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous()
