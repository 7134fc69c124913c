"""Triton kernels (paged tree attention, KV write) against their PyTorch references and an oracle.

Without CUDA these run under the Triton interpreter; the cases and the interpreter set-up live in
``tests/kernel_cases.py`` (imported first: it sets ``TRITON_INTERPRET`` before triton loads).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_cases import (  # noqa: F401 - fixtures and pytestmark are used by pytest
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    LAYOUTS,
    NOT_ON_INTERPRETER,
    _interpreter_was_enabled_in_time,
    _layout_views,
    _single_torch_thread,
    ancestor_mask,
    as_fp32,
    binary,
    build_case,
    chain,
    check_kernel,
    oracle,
    pytestmark,
    rand_tree,
    root_path,
    star,
)

# isort: split
import specdec.kernels  # noqa: E402 - after kernel_cases, which sets TRITON_INTERPRET before triton loads

# ------------------------------------------------------------------ kernel == reference, one factor at a time
BASE = dict(ctx=37, tree=rand_tree(7, 1), hq=4, hkv=2, d=64, page=4)
VARIANTS = (
    [dict(page=p) for p in (1, 16)]
    + [dict(d=d) for d in (16, 80)]
    + [dict(hq=hq, hkv=hkv) for hq, hkv in ((2, 2), (6, 2), (8, 2), (5, 1))]
    + [dict(page=16, ctx=c) for c in (0, 1, 15, 16, 17)]
    + [dict(ctx=c) for c in (3, 4, 5)]
    + [dict(tree=t) for t in (chain(1), chain(2), chain(16), star(16), binary(16), rand_tree(16, 2))]
)


@pytest.mark.parametrize("var", [{}, *VARIANTS], ids=lambda v: "-".join(f"{k}{v[k]}" for k in v) or "base")
def test_kernel_matches_reference(var):
    cfg = {**BASE, **var}
    args, _, _ = build_case([cfg["ctx"]], [cfg["tree"]], cfg["hq"], cfg["hkv"], cfg["d"], cfg["page"])
    check_kernel(args)


@pytest.mark.parametrize("seed", range(12))
def test_kernel_random_combos(seed):
    rng = random.Random(100 + seed)
    page = rng.choice([1, 4, 16])
    hkv, group, d = rng.choice([1, 2]), rng.choice([1, 2, 3, 4]), rng.choice([16, 64, 80])
    batch = rng.randint(1, 3)
    ctxs = [rng.choice([0, 1, page - 1, page, page + 1, 37]) for _ in range(batch)]
    trees = [rng.choice([chain, star, binary, lambda n: rand_tree(n, seed)])(rng.choice([1, 2, 7, 16]))
             for _ in range(batch)]
    args, _, _ = build_case(ctxs, trees, hkv * group, hkv, d, page, seed=seed)
    check_kernel(args)


SWEEP_TREES = {"n1": chain(1), "n2": chain(2), "rand7": rand_tree(7, 21), "wide16": star(16),
               "rand16": rand_tree(16, 22)}


@pytest.mark.parametrize("ctx_kind", ["0", "1", "page-1", "page", "page+1", "37"])
@pytest.mark.parametrize("tree_name", list(SWEEP_TREES))
def test_kernel_matches_oracle_sweep(ctx_kind, tree_name):
    """ctx x tree grid; group, head dim and block size rotate with the case index (pairwise-style cover)."""
    i = list(SWEEP_TREES).index(tree_name) * 6 + ["0", "1", "page-1", "page", "page+1", "37"].index(ctx_kind)
    group, d, page = (1, 2, 3, 4)[i % 4], (16, 64, 80)[i % 3], (1, 4, 16)[(i // 3) % 3]
    ctx = {"0": 0, "1": 1, "page-1": page - 1, "page": page, "page+1": page + 1, "37": 37}[ctx_kind]
    args, kv, trees = build_case([ctx], [SWEEP_TREES[tree_name]], 2 * group, 2, d, page, seed=i)
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


def test_kernel_mixed_batch_matches_oracle():
    trees = [chain(1), rand_tree(7, 3), star(16), chain(2), binary(7)]
    args, kv, trees = build_case([0, 5, 37, 16, 17], trees, hq=6, hkv=2, d=80, page=4, seed=3)
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


def test_kernel_empty_tree_in_batch_and_empty_batch():
    args, kv, trees = build_case([9, 4, 0], [rand_tree(5, 1), [], chain(3)], hq=4, hkv=2, d=16, seed=2)
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)
    args, _, _ = build_case([3], [[]], hq=4, hkv=2, d=16)
    assert specdec.kernels.paged_tree_attention(**args).shape == (0, 4, 16)


@pytest.mark.parametrize("hq,hkv,ctx,n,page", [(2, 2, 0, 70, 16), (8, 2, 0, 45, 4), (3, 1, 10, 40, 16)])
def test_kernel_prefill_chain_equals_causal_sdpa(hq, hkv, ctx, n, page):
    """A chain "tree" is prefill: must equal causal attention over prefix + chunk (several q-blocks)."""
    args, kv, _ = build_case([ctx], [chain(n)], hq, hkv, 32, page, seed=4)
    out, _ = check_kernel(args)
    k, v = (x.repeat_interleave(hq // hkv, 1).transpose(0, 1) for x in kv[0])  # [Hq, ctx+n, D]
    allow = torch.ones(n, ctx + n, dtype=torch.bool).tril(ctx)
    ref = F.scaled_dot_product_attention(args["q"].cpu().transpose(0, 1), k, v, attn_mask=allow,
                                         scale=args["sm_scale"]).transpose(0, 1)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_kernel_large_random_tree_several_q_blocks():
    args, kv, trees = build_case([20, 3], [rand_tree(40, 5), rand_tree(23, 6)], hq=8, hkv=2, d=16, seed=5)
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [64, 80])
def test_kernel_fp16(d):
    trees = [rand_tree(16, 7), star(7)]
    args, _, _ = build_case([37, 0], trees, hq=6, hkv=2, d=d, dtype=torch.float16, seed=6)
    check_kernel(args, atol=1e-2, rtol=1e-2)


def test_kernel_fp16_with_tree_offsets_matches_oracle():
    """Queries extending partial trees (offset 0, partial, all-but-one) in fp16 over a multi-page prefix."""
    trees = [rand_tree(9, 31), rand_tree(12, 32), star(6)]
    args, kv, trees = build_case([37, 3, 0], trees, hq=6, hkv=2, d=64, dtype=torch.float16, seed=12,
                                 offsets=[0, 7, 5])
    out, _ = check_kernel(args, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.double().cpu(), oracle(as_fp32(args), kv, trees), atol=1e-2, rtol=1e-2)


@NOT_ON_INTERPRETER
def test_kernel_bf16():
    args, _, _ = build_case([37, 0], [rand_tree(16, 7), star(7)], hq=6, hkv=2, d=128, dtype=torch.bfloat16)
    check_kernel(args, atol=1.5e-2, rtol=1e-2)


def test_kernel_strided_q_layer_view_out_and_bool_mask():
    """q as a view of a fused QKV tensor, the cache as cache[layer] of a 5-D tensor, an `out` buffer."""
    args, _, _ = build_case([9], [rand_tree(7, 8)], hq=4, hkv=2, d=16, page=4, seed=8)
    t, hq, d = args["q"].shape
    qkv = torch.randn(t, (hq + 4) * d, device=DEVICE)
    qkv[:, : hq * d] = args["q"].reshape(t, -1)
    stacked = [torch.randn(3, *args["k_cache"].shape, device=DEVICE) for _ in range(2)]
    stacked[0][1], stacked[1][1] = args["k_cache"], args["v_cache"]
    ref = specdec.kernels.paged_tree_attention_reference(**args)
    out = torch.full_like(args["q"], float("nan"))
    args.update(q=qkv[:, : hq * d].view(t, hq, d), k_cache=stacked[0][1], v_cache=stacked[1][1],
                tree_mask=args["tree_mask"].bool(), out=out)
    assert specdec.kernels.paged_tree_attention(**args) is out
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ NaN guards
def test_nan_guard_padded_rows_ctx0():
    """ctx = 0 and a q-block with padded rows (n=3, group 3 -> 9 of 16 rows used): no NaN anywhere."""
    args, kv, trees = build_case([0, 0], [star(3), chain(1)], hq=3, hkv=1, d=16, page=4, seed=9)
    args["out"] = torch.full_like(args["q"], float("nan"))
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


def test_nan_guard_leading_fully_masked_tile():
    """Identity mask (every node is its own root), ctx = 0, n = BLOCK_N + 8: the last nodes see nothing in the
    first key tile. Each node must return exactly its own V row."""
    n = specdec.kernels.tile_config(64, 1, 16).block_n + 8
    args, kv, _ = build_case([0], [chain(n)], hq=2, hkv=2, d=16, page=4, seed=10,
                             masks=[torch.eye(n, dtype=torch.uint8)])
    out, _ = check_kernel(args)
    torch.testing.assert_close(out.cpu(), kv[0][1], atol=1e-5, rtol=1e-5)


def test_nan_guard_empty_mask_row_gives_zero():
    """A row with no visible key at all (outside the tree invariants) returns 0 in kernel and reference."""
    mask = ancestor_mask(chain(5))
    mask[3] = 0
    args, _, _ = build_case([0], [chain(5)], hq=2, hkv=1, d=16, masks=[mask], seed=11)
    out, _ = check_kernel(args)
    assert torch.count_nonzero(out[3]) == 0


# ---------------------------------------------------------------------------- reference == branch oracle
@pytest.mark.parametrize("ctx", [0, 1, 15, 16, 17, 37])
@pytest.mark.parametrize("tree", [chain(1), chain(2), rand_tree(7, 12), star(16), rand_tree(16, 13)],
                         ids=["n1", "n2", "rand7", "star16", "rand16"])
def test_reference_matches_oracle(ctx, tree):
    for group in (1, 2, 3, 4):
        for d in (16, 64, 80):
            trees = [tree, rand_tree(4, ctx)]
            args, kv, trees = build_case([ctx, 5], trees, 2 * group, 2, d, 16, seed=ctx + d)
            ref = specdec.kernels.paged_tree_attention_reference(**args)
            torch.testing.assert_close(ref.double().cpu(), oracle(args, kv, trees), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, g=group, dd=d: f"group={g} d={dd}: {m}")


# ------------------------------------------------------------------------------------ input validation
def _args():
    args, _, _ = build_case([5], [star(3)], hq=4, hkv=2, d=16, seed=0)
    return args


def _set(key, fn):
    return lambda a: {**a, key: fn(a[key])}


BAD_INPUTS = [
    ("q_int", _set("q", lambda t: t.int()), TypeError, "q must be float32"),
    ("q_2d", _set("q", lambda t: t.flatten(1)), ValueError, r"q must be \[T, Hq, D\]"),
    ("k_dtype", _set("k_cache", lambda t: t.double()), TypeError, "k_cache dtype"),
    ("k_last_stride", _set("k_cache", lambda t: torch.cat([t, t], -1)[..., ::2]), ValueError,
     r"k_cache must have unit stride in its last \(head_dim\)"),
    ("kv_strides", _set("v_cache", lambda t: torch.stack([t, t], 1)[:, 0]), ValueError,
     "k_cache strides .* and v_cache strides .* differ"),
    ("num_splits", lambda a: {**a, "num_splits": 0}, ValueError, r"num_splits must be None .* \[1, 64\]"),
    ("v_shape", _set("v_cache", lambda t: t[:-1]), ValueError, "differ in shape"),
    ("head_dim", _set("q", lambda t: t[..., :8]), ValueError, "head_dim mismatch"),
    ("gqa", _set("q", lambda t: t[:, :3]), ValueError, "multiple of Hkv"),
    ("bt_int64", _set("block_table", lambda t: t.long()), TypeError, "block_table must be torch.int32"),
    ("ctx_int64", _set("context_lens", lambda t: t.long()), TypeError, "context_lens must be torch.int32"),
    ("cuq_int64", _set("cu_q", lambda t: t.long()), TypeError, "cu_q must be torch.int32"),
    ("indptr_int32", _set("mask_indptr", lambda t: t.int()), TypeError, "mask_indptr must be torch.int64"),
    ("mask_float", _set("tree_mask", lambda t: t.float()), TypeError, "tree_mask must be uint8 or bool"),
    ("mask_2d", _set("tree_mask", lambda t: t.view(3, 3)), ValueError, "tree_mask must be flat"),
    ("cuq_len", _set("cu_q", lambda t: t[:1]), ValueError, r"must be \[B\+1\]"),
    ("bt_rows", _set("block_table", lambda t: t.repeat(2, 1)), ValueError, "block_table has 2 rows"),
    ("device", _set("block_table", lambda t: t.to("meta")), ValueError, "block_table is on meta"),
    ("max_q", _set("max_q", lambda m: -1), ValueError, "max_q must be"),
    ("out_dtype", lambda a: {**a, "out": a["q"].half()}, ValueError, "out must be"),
    ("out_shape", lambda a: {**a, "out": a["q"][:-1]}, ValueError, "out must be"),
    ("offsets_int64", lambda a: {**a, "q_offsets": torch.zeros(1, dtype=torch.int64, device=DEVICE)}, TypeError,
     "q_offsets must be torch.int32"),
    ("offsets_len", lambda a: {**a, "q_offsets": torch.zeros(2, dtype=torch.int32, device=DEVICE)}, ValueError,
     "q_offsets has 2 entries but context_lens has 1"),
]


@pytest.mark.parametrize("name,change,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_wrapper_rejects_bad_inputs(name, change, exc, match):
    args = change(_args())
    for fn in (specdec.kernels.paged_tree_attention, specdec.kernels.paged_tree_attention_reference):
        with pytest.raises(exc, match=match):
            fn(**args)


def test_reference_checks_index_values():
    with pytest.raises(ValueError, match="max_q=2 is smaller"):
        specdec.kernels.paged_tree_attention_reference(**_set("max_q", lambda m: 2)(_args()))
    with pytest.raises(ValueError, match="cu_q must start at 0"):
        specdec.kernels.paged_tree_attention_reference(**_set("cu_q", lambda t: t + 1)(_args()))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_reads_strided_cache_views_of_server_layouts(layout, splits):
    args, kv, trees = build_case([37, 5], [rand_tree(7, 8), star(4)], hq=4, hkv=2, d=16, page=4, seed=12)
    k_view, v_view = _layout_views(args["k_cache"], args["v_cache"], layout)
    assert layout == "vllm_2nb" or not k_view.is_contiguous()
    strided = {**args, "k_cache": k_view, "v_cache": v_view}
    out = specdec.kernels.paged_tree_attention(**strided, num_splits=splits)
    torch.testing.assert_close(out, specdec.kernels.paged_tree_attention_reference(**strided), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", [None, "flashinfer_nb2", "hnd"])
def test_write_kv_stores_rows_at_slots_and_skips_negative_slots(layout):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(6, 4, 2, 16, generator=gen), torch.randn(6, 4, 2, 16, generator=gen)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    qkv = torch.randn(5, 3, 2, 16, generator=gen).to(DEVICE)  # k, v as strided views of a fused projection
    k_new, v_new = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([9, -1, 0, 23, 14], device=DEVICE)
    results = []
    for fn in (specdec.kernels.write_kv, specdec.kernels.write_kv_reference):
        kc, vc = k_cache.clone(), v_cache.clone()
        if layout is not None:
            kc, vc = _layout_views(kc, vc, layout)
        fn(kc, vc, slots, k_new, v_new)
        results.append((kc, vc))
    (kk, vk), (kr, vr) = results
    assert torch.equal(kk, kr) and torch.equal(vk, vr)
    flat_k, flat_v = kk.reshape(24, 2, 16), vk.reshape(24, 2, 16)
    for t, s in enumerate([9, -1, 0, 23, 14]):
        if s >= 0:
            assert torch.equal(flat_k[s], k_new[t]) and torch.equal(flat_v[s], v_new[t])
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[[9, 0, 23, 14]] = False
    assert torch.equal(flat_k[untouched], k_cache.reshape(24, 2, 16)[untouched])


def test_write_kv_rejects_bad_inputs():
    kc, vc = torch.zeros(4, 4, 2, 16, device=DEVICE), torch.zeros(4, 4, 2, 16, device=DEVICE)
    rows, slots = torch.zeros(3, 2, 16, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE)
    for fn in (specdec.kernels.write_kv, specdec.kernels.write_kv_reference):
        with pytest.raises(TypeError, match="slot_mapping must be a 1-D int64"):
            fn(kc, vc, slots.int(), rows, rows)
        with pytest.raises(ValueError, match=r"k must be \[T, Hkv, D\] = \[T, 2, 16\]"):
            fn(kc, vc, slots, rows[:, :1], rows)
        with pytest.raises(ValueError, match="slot_mapping has 2 entries but k has 3"):
            fn(kc, vc, slots[:2], rows, rows)
        with pytest.raises(ValueError, match="k_cache strides .* differ"):
            fn(kc, torch.stack([vc, vc], 1)[:, 0], slots, rows, rows)
    with pytest.raises(ValueError, match="slot ids must be < 16"):
        specdec.kernels.write_kv_reference(kc, vc, torch.tensor([0, 1, 16], device=DEVICE), rows, rows)
