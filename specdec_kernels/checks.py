"""Argument checks shared by the kernels and their references (metadata only: no device sync).

Paged caches may be strided views: one layer ``[num_blocks, block_size, Hkv, D]`` needs unit stride in its last
(head_dim) dimension, and K and V must have the same strides (the kernels address both with one set). This admits
``cache[layer]`` of a contiguous ``[L, ...]`` tensor, ``kv[:, 0]`` / ``kv[:, 1]`` of FlashInfer's
``[NB, 2, BS, H, D]``, ``kv[0]`` / ``kv[1]`` of vLLM's ``[2, NB, BS, H, D]``, and a transposed HND view.
"""

from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLITS = 64


def check_index(name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
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


def check_cache_pair(k_cache, v_cache, ndim: int, layout: str, dtype=None, device=None) -> None:
    """``ndim``-D K/V views with unit last-dim stride and equal shapes and strides."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(c.shape)}")
        if dtype is not None and c.dtype != dtype:
            raise TypeError(f"{name} dtype {c.dtype} differs from q dtype {dtype}")
        if device is not None and c.device != device:
            raise ValueError(f"{name} is on {c.device} but q is on {device}")
        if c.numel() > 0 and c.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last (head_dim) dimension, got strides "
                             f"{c.stride()}: pass a view whose head_dim elements are adjacent")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} differs from v_cache dtype {v_cache.dtype}")
    if k_cache.device != v_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device} but k_cache is on {k_cache.device}")
    if k_cache.numel() > 0 and k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} differ: "
                         "K and V must be views with one layout (e.g. kv[:, 0] and kv[:, 1])")


def validate_tree_attention(q, k_cache, v_cache, block_table, context_lens, cu_q, tree_mask, mask_indptr, max_q,
                            out=None, num_splits=None, q_offsets=None) -> torch.Tensor:
    """Checks of :func:`paged_tree_attention`'s arguments. Returns the mask as a uint8 tensor."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q must have unit stride in its last (head_dim) dimension")
    dev = q.device
    check_cache_pair(k_cache, v_cache, 4, "[num_blocks, block_size, Hkv, D]", q.dtype, dev)
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has D={d}, k_cache has D={k_cache.shape[3]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    check_index("block_table", block_table, torch.int32, 2, dev)
    check_index("context_lens", context_lens, torch.int32, 1, dev)
    check_index("cu_q", cu_q, torch.int32, 1, dev)
    check_index("mask_indptr", mask_indptr, torch.int64, 1, dev)
    b = context_lens.shape[0]
    if q_offsets is not None:
        check_index("q_offsets", q_offsets, torch.int32, 1, dev)
        if q_offsets.shape[0] != b:
            raise ValueError(f"q_offsets has {q_offsets.shape[0]} entries but context_lens has {b}: need one tree "
                             "offset per sequence")
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
        raise ValueError(f"tree_mask must be flat and contiguous [sum n_b * (off_b + n_b)], got "
                         f"{tuple(tree_mask.shape)}")
    if tree_mask.device != dev:
        raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {dev}")
    if isinstance(max_q, bool) or not isinstance(max_q, int) or max_q < 0:
        raise ValueError(f"max_q must be a non-negative int (>= every tree size), got {max_q!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None (automatic) or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != dev:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {dev}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must have unit stride in its last dimension")
    return tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask


def require_interpreter(kernel, what: str, reference: str) -> None:
    """Raise if CPU tensors reach a Triton kernel that was not built for the interpreter."""
    # tl.max / tl.sum are @jit helpers of triton.language: they too must be built for the interpreter.
    if not isinstance(kernel, InterpretedFunction) or isinstance(tl.max, JITFunction):
        raise RuntimeError(f"{what} got CPU tensors but Triton was not imported in interpreter mode: export "
                           f"TRITON_INTERPRET=1 before triton is first imported, or use {reference}")
