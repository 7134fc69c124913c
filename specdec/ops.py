"""PyTorch custom ops for the verify step's kernels, so ``torch.compile(fullgraph=True)`` can trace through them.

* ``torch.ops.specdec.paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
  mask_indptr, sm_scale, max_q, num_splits=0, q_offsets=None) -> out [T, Hq, D]``
* ``torch.ops.specdec.write_kv(k_cache, v_cache, slot_mapping, k, v) -> ()`` (mutates ``k_cache`` and ``v_cache``)

Shapes as in :mod:`specdec.kernels`: ``q [T, Hq, D]``, one layer's ``k_cache/v_cache [NB, BS, Hkv, D]`` (strided
views with unit last-dim stride and equal K/V strides allowed), ``block_table [B, max_blocks]`` int32,
``context_lens [B]`` int32, ``cu_q [B+1]`` int32, ``tree_mask [sum n_b * (off_b + n_b)]`` uint8/bool,
``mask_indptr [B+1]`` int64, ``q_offsets [B]`` int32 tree offsets or ``None`` (zeros), ``slot_mapping [T]`` int64
(negative = skip), ``k/v [T, Hkv, D]``. ``num_splits = 0`` lets the CUDA kernel pick the split-KV factor from static
shapes.

Implementations: CUDA = the Triton kernels (no host sync; safe inside a captured CUDA graph); CPU = gather + SDPA
per sequence in the input dtype (:mod:`specdec.kernels.tree_attention_sdpa`, what the eager torch backend computes)
and the reference cache write; any other device = the pure-PyTorch references (which also check index values, with
host syncs); fake (meta) = shape propagation only. Rows of ``q`` past ``cu_q[B]`` are padding (static shapes of a
compiled step): they come out 0, and a negative slot skips its write.
The Python wrappers :func:`paged_tree_attention` and :func:`write_kv` call the ops.
"""

import torch

from specdec.kernels.tree_attention import paged_tree_attention as _attention_kernel
from specdec.kernels.tree_attention_reference import paged_tree_attention_reference as _attention_reference
from specdec.kernels.tree_attention_sdpa import paged_tree_attention_sdpa as _attention_sdpa
from specdec.kernels.write_kv import write_kv as _write_kv_kernel
from specdec.kernels.write_kv import write_kv_reference as _write_kv_reference

__all__ = ["paged_tree_attention", "write_kv"]


@torch.library.custom_op("specdec::paged_tree_attention", mutates_args=())
def _paged_tree_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    context_lens: torch.Tensor, cu_q: torch.Tensor, tree_mask: torch.Tensor, mask_indptr: torch.Tensor,
    sm_scale: float, max_q: int, num_splits: int = 0, q_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation (CPU and any non-CUDA device)."""
    return _attention_reference(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                                sm_scale, max_q, num_splits=num_splits or None, q_offsets=q_offsets).contiguous()


@_paged_tree_attention_op.register_kernel("cpu")
def _paged_tree_attention_cpu(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                              sm_scale, max_q, num_splits=0, q_offsets=None):
    return _attention_sdpa(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr, sm_scale,
                           q_offsets=q_offsets)


@_paged_tree_attention_op.register_kernel("cuda")
def _paged_tree_attention_cuda(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                               sm_scale, max_q, num_splits=0, q_offsets=None):
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # padding rows past cu_q[B] stay 0
    return _attention_kernel(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                             sm_scale, max_q, out=out, num_splits=num_splits or None, q_offsets=q_offsets)


@_paged_tree_attention_op.register_fake
def _paged_tree_attention_fake(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                               sm_scale, max_q, num_splits=0, q_offsets=None):
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q must be [T, Hq, D] and k_cache [NB, BS, Hkv, D] with one D, got {tuple(q.shape)} "
                         f"and {tuple(k_cache.shape)}")
    return q.new_empty(q.shape)


@torch.library.custom_op("specdec::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Reference implementation (CPU and any non-CUDA device)."""
    _write_kv_reference(k_cache, v_cache, slot_mapping, k, v)


@_write_kv_op.register_kernel("cuda")
def _write_kv_cuda(k_cache, v_cache, slot_mapping, k, v):
    _write_kv_kernel(k_cache, v_cache, slot_mapping, k, v)


@_write_kv_op.register_fake
def _write_kv_fake(k_cache, v_cache, slot_mapping, k, v):
    return None


def paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr,
                         sm_scale: float, max_q: int, num_splits: int | None = None,
                         q_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.specdec.paged_tree_attention``; arguments as :func:`specdec.kernels.paged_tree_attention`
    (``num_splits=None``: automatic; ``q_offsets [B]`` int32 tree offsets, ``None``: zeros). Returns a new
    contiguous ``[T, Hq, D]`` tensor in ``q``'s dtype."""
    return torch.ops.specdec.paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask,
                                                  mask_indptr, float(sm_scale), int(max_q), num_splits or 0,
                                                  q_offsets)


def write_kv(k_cache, v_cache, slot_mapping, k, v) -> None:
    """``torch.ops.specdec.write_kv``: store ``k, v [T, Hkv, D]`` at ``slot_mapping [T]`` of one layer's cache."""
    torch.ops.specdec.write_kv(k_cache, v_cache, slot_mapping, k, v)
