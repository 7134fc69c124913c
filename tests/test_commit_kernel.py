"""The KV commit kernel (``specdec.kernels.commit_kv``) against its PyTorch reference: aliasing moves, every layer,
no-ops, bad slots and types, and attention over a committed cache (split out of test_kernels.py)."""

import pytest
import torch

import specdec.kernels
from tests.kernel_cases import (  # noqa: F401 - importing kernel_cases sets TRITON_INTERPRET before triton loads
    DEVICE,
    _interpreter_was_enabled_in_time,
    _layout_views,
    ancestor_mask,
    pytestmark,
    rand_tree,
)


def paged_kv(layers=3, num_blocks=12, page=4, hkv=2, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (layers, num_blocks, page, hkv, d)
    k, v = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)
    return k.to(DEVICE), v.to(DEVICE), table


def slots_of(table, pos, page):
    pos = torch.as_tensor(pos, dtype=torch.int64)
    return (table[pos // page] * page + pos % page).to(DEVICE)


def run_both(k, v, src, dst):
    kk, vk, kr, vr = k.clone(), v.clone(), k.clone(), v.clone()
    specdec.kernels.commit_kv(kk, vk, src, dst)
    specdec.kernels.commit_kv_reference(kr, vr, src, dst)
    assert torch.equal(kk, kr) and torch.equal(vk, vr), "kernel differs from reference"
    return kk, vk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_commit_accepted_path_aliasing(dtype):
    """Path [0, 2, 5] of a 7-node tree at ctx = 6 (slots cross blocks, dst ctx+2 is the src of depth 1)."""
    page, ctx, path = 4, 6, [0, 2, 5]
    k, v, table = paged_kv(page=page, dtype=dtype)
    src = slots_of(table, [ctx + a for a in path], page)
    dst = slots_of(table, [ctx + i for i in range(len(path))], page)
    kk, vk = run_both(k, v, src, dst)
    # Logical positions [0, ctx + 3) now hold the prefix followed by the accepted tokens, in order.
    keep = slots_of(table, range(ctx + len(path)), page)
    prefix = slots_of(table, range(ctx), page)
    for new, old in ((kk, k), (vk, v)):
        clean = torch.cat([old.flatten(1, 2)[:, prefix], old.flatten(1, 2)[:, src]], dim=1)
        assert torch.equal(new.flatten(1, 2)[:, keep], clean)


def test_commit_then_attention_equals_clean_cache():
    """Next-step attention over the compacted cache equals attention over a cache holding only the
    accepted tokens (written in order)."""
    page, ctx, path, n = 4, 6, [0, 2, 5], 7
    k, v, table = paged_kv(layers=2, page=page, seed=1)
    src = slots_of(table, [ctx + a for a in path], page)
    dst = slots_of(table, range(ctx, ctx + len(path)), page)
    clean_k, clean_v = k.clone(), v.clone()
    clean_k.flatten(1, 2)[:, dst] = k.flatten(1, 2)[:, src]
    clean_v.flatten(1, 2)[:, dst] = v.flatten(1, 2)[:, src]
    specdec.kernels.commit_kv(k, v, src, dst)
    new_ctx, tree = ctx + len(path), rand_tree(n - len(path) - 1, 2)  # next tree fits the same 3 blocks
    q = torch.randn(len(tree), 4, 16, device=DEVICE)
    common = dict(q=q, block_table=table[None].int().to(DEVICE), context_lens=torch.tensor([new_ctx]).int(),
                  cu_q=torch.tensor([0, len(tree)]).int(), tree_mask=ancestor_mask(tree).flatten(),
                  mask_indptr=torch.tensor([0, len(tree) ** 2]), sm_scale=0.25, max_q=len(tree))
    common = {key: val.to(DEVICE) if isinstance(val, torch.Tensor) else val for key, val in common.items()}
    got = specdec.kernels.paged_tree_attention(k_cache=k[1], v_cache=v[1], **common)
    want = specdec.kernels.paged_tree_attention_reference(k_cache=clean_k[1], v_cache=clean_v[1], **common)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_commit_noop_chain():
    k, v, table = paged_kv()
    slots = slots_of(table, range(5, 9), 4)
    kk, vk = run_both(k, v, slots, slots)
    assert torch.equal(kk, k) and torch.equal(vk, v)


def test_commit_moves_every_layer():
    k, v, _ = paged_kv(layers=4)
    src, dst = torch.tensor([9, 30], device=DEVICE), torch.tensor([2, 3], device=DEVICE)
    kk, vk = run_both(k, v, src, dst)
    for layer in range(4):
        for s, t in ((9, 2), (30, 3)):
            assert torch.equal(kk[layer].flatten(0, 1)[t], k[layer].flatten(0, 1)[s])
            assert torch.equal(vk[layer].flatten(0, 1)[t], v[layer].flatten(0, 1)[s])
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[[2, 3]] = False
    assert torch.equal(kk.flatten(1, 2)[:, untouched], k.flatten(1, 2)[:, untouched])


@pytest.mark.parametrize("src,dst", [([5, 7], [4, 5]), ([4, 5], [5, 6]), ([3, 1], [1, 3])],
                         ids=["dst-is-later-src", "shift-right", "swap"])
def test_commit_alias_reads_old_values(src, dst):
    k, v, _ = paged_kv()
    s, t = torch.tensor(src, device=DEVICE), torch.tensor(dst, device=DEVICE)
    kk, vk = run_both(k, v, s, t)
    assert torch.equal(kk.flatten(1, 2)[:, t], k.flatten(1, 2)[:, s])
    assert torch.equal(vk.flatten(1, 2)[:, t], v.flatten(1, 2)[:, s])


def test_commit_empty_is_noop():
    k, v, _ = paged_kv()
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    kk, vk = run_both(k, v, empty, empty)
    assert torch.equal(kk, k) and torch.equal(vk, v)


@pytest.mark.parametrize("src,dst,exc,match", [
    ([1, 2], [3, 3], ValueError, "unique"),
    ([1, 48], [3, 4], ValueError, "must lie in"),
    ([-1], [3], ValueError, "must lie in"),
    ([1, 2], [3], ValueError, "entries but dst_slots"),
])
def test_commit_rejects_bad_slots(src, dst, exc, match):
    k, v, _ = paged_kv()
    for fn in (specdec.kernels.commit_kv, specdec.kernels.commit_kv_reference):
        with pytest.raises(exc, match=match):
            fn(k, v, torch.tensor(src, device=DEVICE), torch.tensor(dst, device=DEVICE))


def test_commit_rejects_bad_types():
    k, v, _ = paged_kv()
    ok = torch.tensor([1], device=DEVICE)
    with pytest.raises(TypeError, match="src_slots must be int64"):
        specdec.kernels.commit_kv(k, v, ok.int(), ok)
    with pytest.raises(ValueError, match="dst_slots is on meta"):
        specdec.kernels.commit_kv(k, v, ok, ok.to("meta"))
    with pytest.raises(ValueError, match=r"k_cache must be \[L, num_blocks"):
        specdec.kernels.commit_kv(k[0, 0], v[0, 0], ok, ok)
    with pytest.raises(ValueError, match="v_cache must have unit stride in its last"):
        specdec.kernels.commit_kv(k, torch.cat([v, v], -1)[..., ::2], ok, ok)
    with pytest.raises(ValueError, match="k_cache strides .* differ"):
        specdec.kernels.commit_kv(k, torch.stack([v, v], 2)[:, :, 0], ok, ok)
    with pytest.raises(TypeError, match="differs from v_cache dtype"):
        specdec.kernels.commit_kv(k, v.half(), ok, ok)


# ------------------------------------------------------------------ strided per-layer cache views (server layouts)
@pytest.mark.parametrize("layout", ["flashinfer_nb2", "hnd"])
def test_commit_on_strided_per_layer_views_matches_contiguous(layout):
    k, v, table = paged_kv(layers=1, seed=3)
    src, dst = slots_of(table, [8, 11, 13], 4), slots_of(table, [7, 8, 9], 4)
    want_k, want_v = run_both(k, v, src, dst)
    for fn in (specdec.kernels.commit_kv, specdec.kernels.commit_kv_reference):
        k_view, v_view = _layout_views(k[0].clone(), v[0].clone(), layout)
        fn(k_view, v_view, src, dst)
        assert torch.equal(k_view, want_k[0]) and torch.equal(v_view, want_v[0]), fn.__name__


def test_commit_moves_every_layer_of_a_strided_all_layer_view():
    """``[L, NB, 2, BS, H, D]`` (K and V interleaved per block): k = kv[:, :, 0], v = kv[:, :, 1]."""
    k, v, table = paged_kv(layers=3, seed=5)
    src, dst = slots_of(table, [9, 10, 14], 4), slots_of(table, [8, 9, 10], 4)
    want_k, want_v = run_both(k, v, src, dst)
    for fn in (specdec.kernels.commit_kv, specdec.kernels.commit_kv_reference):
        kv = torch.stack([k, v], 2)
        fn(kv[:, :, 0], kv[:, :, 1], src, dst)
        assert torch.equal(kv[:, :, 0], want_k) and torch.equal(kv[:, :, 1], want_v), fn.__name__
