"""Split-KV (flash-decoding) path of the tree-attention kernel, its log-sum-exp merge, and the split heuristic.

The split path must equal the pure-torch reference (and the per-node oracle) for every split count, including
splits that receive no prefix key, contexts shorter than one chunk, trees of 1..64 nodes and GQA. float32 under
``TRITON_INTERPRET=1`` on CPU (shapes kept small: the interpreter is slow).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.kernels as K  # noqa: E402
from tests.kernel_cases import (  # noqa: E402
    DEVICE,
    HAS_CUDA,
    INTERPRET,
    binary,
    build_case,
    chain,
    oracle,
    rand_tree,
    star,
)

pytestmark = [pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("one_thread")]
SPLITS = (1, 2, 3, 4, 8)




def run_split(args, splits, atol=1e-4):
    out = K.paged_tree_attention(**args, num_splits=splits)
    ref = K.paged_tree_attention_reference(**args)
    assert not torch.isnan(out).any(), f"num_splits={splits}: NaN in the output"
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol, msg=lambda m: f"num_splits={splits}: {m}")
    return out


@pytest.mark.parametrize("splits", SPLITS)
def test_split_kv_matches_reference_for_every_split_count(splits):
    """A mixed batch: empty prefix, prefix shorter than a tile, page-crossing and multi-tile prefixes."""
    trees = [chain(1), rand_tree(7, 1), star(5), binary(16), chain(3)]
    args, kv, trees = build_case([0, 5, 37, 200, 130], trees, hq=6, hkv=2, d=32, page=4, seed=splits)
    out = run_split(args, splits)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ctx", [1, 63, 64, 65])
@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_kv_context_shorter_than_one_chunk_leaves_empty_splits(ctx, splits):
    """With ctx <= BLOCK_N (64 keys) every split but the first gets no prefix key; the tree goes to the last."""
    args, _, _ = build_case([ctx], [rand_tree(6, ctx)], hq=4, hkv=2, d=16, page=16, seed=ctx)
    run_split(args, splits)


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_split_kv_all_splits_empty_when_context_is_zero(splits):
    """ctx = 0: every prefix chunk is empty, only the last split's tree phase sees keys."""
    args, kv, trees = build_case([0, 0], [rand_tree(9, 3), chain(1)], hq=4, hkv=1, d=16, page=4, seed=7)
    out = run_split(args, splits)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33, 64])
def test_split_kv_trees_of_1_to_64_nodes(n):
    """Several q-blocks for the big trees (64 nodes x group 2 = two 128-row tiles), against the branch oracle."""
    args, kv, trees = build_case([150], [rand_tree(n, n)], hq=4, hkv=2, d=16, page=16, seed=n)
    out = run_split(args, 4)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (5, 1), (12, 4)])
def test_split_kv_with_gqa_groups(hq, hkv):
    args, _, _ = build_case([70, 140], [rand_tree(7, 2), star(4)], hq=hq, hkv=hkv, d=16, page=8, seed=hq)
    run_split(args, 3)


@pytest.mark.parametrize("splits", [3, 8])
def test_split_kv_with_tree_offsets_reads_earlier_levels_in_the_last_split(splits):
    """Queries extending partial trees: the prefix is split, the earlier levels' keys stay with the last split."""
    trees = [rand_tree(10, 41), chain(6), binary(9)]
    args, kv, trees = build_case([200, 65, 0], trees, hq=4, hkv=1, d=32, page=4, seed=splits, offsets=[6, 5, 2])
    out = run_split(args, splits)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


def test_split_kv_fp16_and_out_buffer():
    args, _, _ = build_case([100, 20], [rand_tree(9, 4), chain(2)], hq=4, hkv=2, d=64, dtype=torch.float16)
    out = torch.full_like(args["q"], float("nan"))
    got = K.paged_tree_attention(**args, out=out, num_splits=4)
    assert got is out
    ref = K.paged_tree_attention_reference(**{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                               else v for k, v in args.items()})
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_split_kv_every_split_count_agrees_on_one_case():
    """All split counts give the same output (up to float rounding) on a long-ish prefix."""
    args, _, _ = build_case([300], [rand_tree(12, 9)], hq=4, hkv=2, d=16, page=16, seed=9)
    outs = [K.paged_tree_attention(**args, num_splits=s) for s in SPLITS]
    for s, o in zip(SPLITS[1:], outs[1:], strict=True):
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5, msg=lambda m, s=s: f"splits={s}: {m}")


def test_merge_kernel_matches_merge_reference_with_empty_splits():
    gen = torch.Generator().manual_seed(0)
    s, t, hq, d = 5, 7, 3, 16
    o_part = torch.randn(s, t, hq, d, generator=gen)
    lse = torch.randn(s, t, hq, generator=gen) * 4
    lse[1] = float("-inf")  # split 1 saw nothing anywhere
    lse[:, 2, 0] = float("-inf")  # token 2 head 0 seen by no split: must come out as 0
    o_part[lse == float("-inf")] = 0.0
    o_part, lse = o_part.to(DEVICE), lse.to(DEVICE)
    out = K.merge_splits(o_part, lse, torch.empty(t, hq, d, device=DEVICE))
    torch.testing.assert_close(out, K.merge_splits_reference(o_part, lse, torch.float32), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(out[2, 0]) == 0
    # The merge reference itself: two halves of one softmax merge back to the full softmax.
    scores, vals = torch.randn(10, generator=gen), torch.randn(10, d, generator=gen)
    parts = [(torch.log2(torch.exp(scores[a:b]).sum()), torch.softmax(scores[a:b], 0) @ vals[a:b])
             for a, b in ((0, 4), (4, 10))]
    merged = K.merge_splits_reference(torch.stack([p[1] for p in parts])[:, None, None],
                                      torch.stack([p[0] for p in parts])[:, None, None], torch.float32)
    torch.testing.assert_close(merged[0, 0], torch.softmax(scores, 0) @ vals, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b,hkv,hq,max_q,max_ctx,want", [
    (1, 8, 32, 1, 8192, 16),     # 8 programs on 132 SMs: split as far as the cap allows
    (4, 8, 32, 1, 8192, 4),      # 32 programs: 132 // 32 = 4
    (32, 8, 32, 1, 8192, 1),     # 256 programs fill the GPU: no split
    (1, 8, 32, 64, 8192, 8),     # 64 nodes x group 4 = two 128-row q-blocks: 16 programs, 132 // 16 = 8
    (1, 8, 32, 1, 600, 2),       # short context bound: each split keeps >= 256 keys
    (1, 8, 32, 1, 300, 1),
])
def test_choose_num_splits_from_static_shapes(b, hkv, hq, max_q, max_ctx, want):
    assert K.choose_num_splits(b, hkv, hq, max_q, max_ctx, num_sms=132) == want


def test_choose_num_splits_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_sms must be >= 1"):
        K.choose_num_splits(1, 8, 32, 1, 8192, num_sms=0)
    with pytest.raises(ValueError, match="max_q and max_context must be >= 0"):
        K.choose_num_splits(1, 8, 32, -1, 8192, num_sms=132)


def test_tile_grows_with_the_tree_and_warps_follow_the_tile():
    small, big = K.tile_config(1, 4, 128), K.tile_config(64, 4, 128)
    assert (small.block_m, small.block_q, small.num_warps) == (16, 1, 4)
    assert (big.block_m, big.block_q, big.num_warps) == (128, 32, 8)
    assert K.tile_config(1, 16, 64).block_m == 16 and K.tile_config(4, 32, 64).block_m == 128
