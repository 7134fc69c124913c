"""Shared kernel-test cases: trees, paged-cache cases, the fp64 oracle and the kernel check, server cache layouts.

Triton decides between interpreter and compiler when a @triton.jit function is *decorated*; that includes helpers
of triton.language itself (tl.max, tl.sum, tl.zeros), decorated when triton is first imported. So
``TRITON_INTERPRET=1`` must be in the environment before anything in the process imports triton. This module sets
it (``setdefault``) before its own imports, which suffices when it is the first to import triton; otherwise export
it for the whole run (the Makefile does) or set it in a conftest.py. If it was set too late, every test of a
module that imports these fixtures fails with that explanation. bf16 is wrong under the interpreter (Triton issues
#4972, #11584), so bf16 cases only run on a GPU. Modules import from here before they import triton or
``specdec.kernels``.
"""

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import specdec.kernels  # noqa: E402
from specdec.kernels import tree_attention as attn_mod  # noqa: E402

INTERPRET_TOO_LATE = INTERPRET and not (isinstance(tl.max, InterpretedFunction) and isinstance(
    attn_mod._paged_tree_attention_kernel, InterpretedFunction))
pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """The tensors here are tiny; on a busy 2-core machine torch's intra-op threads made this module
    5-10x slower (measured 41 s vs 5 s). Restored afterwards so other modules keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _interpreter_was_enabled_in_time():
    """Fail every test of this module (not the whole session) with the fix, if the env var came too late."""
    if INTERPRET_TOO_LATE:
        pytest.fail("TRITON_INTERPRET=1 was set after triton had been imported (e.g. by conftest.py), so the "
                    "kernels cannot run under the interpreter. Export TRITON_INTERPRET=1 before starting "
                    "pytest, or set it at the very top of tests/conftest.py.", pytrace=False)
DEVICE = "cuda" if HAS_CUDA else "cpu"
NOT_ON_INTERPRETER = pytest.mark.skipif(INTERPRET, reason="bf16 is broken under the Triton interpreter")


# ----------------------------------------------------------------------------------------------- helpers
def chain(n):
    return [-1] + list(range(n - 1))


def star(n):
    return [-1] + [0] * (n - 1)


def binary(n):
    return [-1] + [(i - 1) // 2 for i in range(1, n)]


def rand_tree(n, seed):
    rng = random.Random(seed)
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def ancestor_mask(parents):
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.uint8)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = 1
    return mask


def root_path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def build_case(ctxs, trees, hq=4, hkv=2, d=64, page=4, dtype=torch.float32, seed=0, masks=None, offsets=None):
    """Random batch written into a NaN-poisoned paged cache through a permuted block table.

    Unused slots, spare blocks and block-table padding all point at NaN, so any read outside a sequence's
    ``[0, ctx + n)`` shows up as NaN in the output. With ``offsets`` (one per tree, adds ``q_offsets`` to the
    arguments) the queries are tree nodes ``offsets[b]:`` and the mask rows ``ancestor_mask[off:]``.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(t) for t in trees]
    q_offs = [0] * len(trees) if offsets is None else list(offsets)
    need = [-(-(c + n) // page) for c, n in zip(ctxs, sizes, strict=True)]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    poison = int(perm[-1])
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    block_table = torch.full((len(ctxs), max(need, default=0) + 2), poison, dtype=torch.int32)
    kv_seqs, used = [], 0
    for b, (ctx, n) in enumerate(zip(ctxs, sizes, strict=True)):
        block_table[b, :need[b]] = perm[used:used + need[b]].int()
        used += need[b]
        k = torch.randn(ctx + n, hkv, d, generator=gen)
        v = torch.randn(ctx + n, hkv, d, generator=gen)
        pos = torch.arange(ctx + n)
        blocks, offs = block_table[b, pos // page].long(), pos % page
        k_cache[blocks, offs], v_cache[blocks, offs] = k, v
        kv_seqs.append((k, v))
    if masks is None:
        masks = [ancestor_mask(t)[o:] for t, o in zip(trees, q_offs, strict=True)]
    cu = [0]
    for n, o in zip(sizes, q_offs, strict=True):
        cu.append(cu[-1] + n - o)
    mptr = [0]
    for n, o in zip(sizes, q_offs, strict=True):
        mptr.append(mptr[-1] + (n - o) * n)
    q = torch.randn(cu[-1], hq, d, generator=gen)
    args = dict(
        q=q.to(dtype), k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype), block_table=block_table,
        context_lens=torch.tensor(ctxs, dtype=torch.int32), cu_q=torch.tensor(cu, dtype=torch.int32),
        tree_mask=torch.cat([m.flatten() for m in masks]) if masks else torch.zeros(0, dtype=torch.uint8),
        mask_indptr=torch.tensor(mptr, dtype=torch.int64), sm_scale=d ** -0.5,
        max_q=max((n - o for n, o in zip(sizes, q_offs, strict=True)), default=0),
    )
    if offsets is not None:
        args["q_offsets"] = torch.tensor(q_offs, dtype=torch.int32, device=DEVICE)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return args, kv_seqs, trees


def as_fp32(args):
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in args.items()}


def oracle(args, kv_seqs, trees):
    """Per query node: plain softmax attention (fp64) over the prefix plus the root-to-node path, from the
    contiguous K/V that were written into the cache. Uses neither the paged cache nor the tree mask."""
    q = args["q"].double().cpu()
    hq, hkv = q.shape[1], kv_seqs[0][0].shape[1] if kv_seqs else 1
    group = hq // hkv
    ctxs, cu = args["context_lens"].tolist(), args["cu_q"].tolist()
    offs = args["q_offsets"].tolist() if args.get("q_offsets") is not None else [0] * len(trees)
    out = torch.zeros_like(q)
    for b, parents in enumerate(trees):
        k, v = (x.double() for x in kv_seqs[b])
        for i in range(len(parents) - offs[b]):
            idx = list(range(ctxs[b])) + [ctxs[b] + j for j in root_path(parents, offs[b] + i)]
            kk = k[idx].repeat_interleave(group, 1)  # [L, Hq, D]
            vv = v[idx].repeat_interleave(group, 1)
            scores = torch.einsum("hd,lhd->hl", q[cu[b] + i], kk) * args["sm_scale"]
            out[cu[b] + i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), vv)
    return out


def check_kernel(args, atol=1e-4, rtol=1e-4):
    out = specdec.kernels.paged_tree_attention(**args)
    assert out.dtype == args["q"].dtype and out.shape == args["q"].shape
    ref = specdec.kernels.paged_tree_attention_reference(**as_fp32(args))
    assert not torch.isnan(out).any(), "kernel output has NaN"
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    return out, ref


# ------------------------------------------------------------------ strided per-layer cache views (server layouts)
def _layout_views(k_cache, v_cache, layout):
    """K/V views of one layer inside a server-style combined tensor holding the same values."""
    if layout == "flashinfer_nb2":  # [NB, 2, BS, H, D]: k = kv[:, 0], v = kv[:, 1]
        kv = torch.stack([k_cache, v_cache], 1)
        return kv[:, 0], kv[:, 1]
    if layout == "vllm_2nb":  # [2, NB, BS, H, D]: k = kv[0], v = kv[1]
        kv = torch.stack([k_cache, v_cache], 0)
        return kv[0], kv[1]
    if layout == "layers_nb2":  # [L, NB, 2, BS, H, D], layer 1
        kv = torch.randn(3, k_cache.shape[0], 2, *k_cache.shape[1:], device=k_cache.device, dtype=k_cache.dtype)
        kv[1, :, 0], kv[1, :, 1] = k_cache, v_cache
        return kv[1, :, 0], kv[1, :, 1]
    assert layout == "hnd"  # FlashInfer HND [NB, H, BS, D] seen as [NB, BS, H, D]
    return (k_cache.transpose(1, 2).contiguous().transpose(1, 2),
            v_cache.transpose(1, 2).contiguous().transpose(1, 2))


LAYOUTS = ["flashinfer_nb2", "vllm_2nb", "layers_nb2", "hnd"]
