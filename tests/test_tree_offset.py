"""Tree offsets: a forward whose queries extend a partial tree already written to the cache.

A drafter that grows its tree level by level forwards only each level's new nodes (``q_offsets`` = the nodes
before them). Checked here: the kernel (every split count, GQA) equals its reference for random offsets (0,
partial, all-but-one, the whole tree); :func:`specdec.attention.tree_batch` lays out the offset metadata; and the
property drafters rely on: forwarding a tree level by level through :meth:`TargetModel.run` gives the same
per-node logits as one forward of the whole tree, for both attention backends. CPU: Triton under
``TRITON_INTERPRET=1``.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.kernels as K  # noqa: E402
from specdec.attention import build_tree_batch, select_backend, tree_batch  # noqa: E402
from specdec.target import TargetModel  # noqa: E402
from specdec.tree import TokenTree  # noqa: E402

from .conftest import tiny_llama  # noqa: E402
from .kernel_cases import DEVICE, HAS_CUDA, INTERPRET, build_case, oracle, rand_tree  # noqa: E402

pytestmark = [pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("one_thread")]
SPLITS = (1, 2, 3, 4, 8)




def level_tree(level_sizes, seed, vocab=64):
    """A random tree in level order (every node of depth d before any node of depth d + 1), as drafters build
    it; returns the tree and the offset at which each level starts."""
    rng = random.Random(seed)
    parents, starts, prev = [], [], []
    for size in level_sizes:
        starts.append(len(parents))
        level = [len(parents) + i for i in range(size)]
        parents += [rng.choice(prev) if prev else -1 for _ in level]
        prev = level
    tokens = torch.tensor([rng.randrange(vocab) for _ in parents])
    return TokenTree(tokens, torch.tensor(parents)), starts


# ------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("splits", SPLITS)
def test_kernel_with_random_tree_offsets_matches_reference_and_oracle_for_every_split_count(splits):
    """One batch holds offset 0, a partial offset, all-but-one and the whole tree (no query); GQA 3."""
    rng = random.Random(splits)
    trees = [rand_tree(rng.randint(2, 9), splits + b) for b in range(4)]
    offsets = [0, rng.randint(1, len(trees[1]) - 1), len(trees[2]) - 1, len(trees[3])]
    ctxs = [rng.choice([0, 5, 37, 70]) for _ in trees]
    args, kv, trees = build_case(ctxs, trees, hq=6, hkv=2, d=16, page=4, seed=splits, offsets=offsets)
    out = K.paged_tree_attention(**args, num_splits=splits)
    ref = K.paged_tree_attention_reference(**args)
    assert not torch.isnan(out).any(), f"num_splits={splits}: NaN in the output"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref.double().cpu(), oracle(args, kv, trees), atol=1e-5, rtol=1e-5)


def test_kernel_offset_past_a_key_tile_with_several_query_blocks():
    """Offset > BLOCK_N (earlier levels span two key tiles) and more queries than one q-block (GQA 4)."""
    n_keys = K.tile_config(64, 4, 16).block_n
    args, kv, trees = build_case([9], [rand_tree(n_keys + 45, 4)], hq=8, hkv=2, d=16, page=16, seed=4,
                                 offsets=[n_keys + 5])
    out = K.paged_tree_attention(**args)
    torch.testing.assert_close(out.double().cpu(), oracle(args, kv, trees), atol=1e-4, rtol=1e-4)


def test_zero_offsets_equal_no_offsets():
    args, _, _ = build_case([5, 0], [rand_tree(6, 1), rand_tree(3, 2)], hq=4, hkv=2, d=16, seed=1)
    zeros = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for fn in (K.paged_tree_attention, K.paged_tree_attention_reference):
        assert torch.equal(fn(**args), fn(**args, q_offsets=zeros))


def test_reference_rejects_offsets_that_disagree_with_the_mask_layout():
    args, _, _ = build_case([5, 0], [rand_tree(6, 1), rand_tree(3, 2)], hq=4, hkv=2, d=16, offsets=[1, 2])
    with pytest.raises(ValueError, match=r"mask_indptr must be cumsum\(n_b \* \(off_b \+ n_b\)\)"):
        K.paged_tree_attention_reference(**{**args, "q_offsets": args["q_offsets"] + 1})
    with pytest.raises(ValueError, match="q_offsets must be >= 0"):
        K.paged_tree_attention_reference(**{**args, "q_offsets": args["q_offsets"] - 2})


# ------------------------------------------------------------------------------------------ metadata
def test_tree_batch_with_offsets_queries_only_the_new_nodes():
    tree = TokenTree(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([-1, 0, 0, 1, 2, 2]))
    table = torch.tensor([[3, 0, 2], [1, 4, 5]], dtype=torch.int32)
    batch = tree_batch(table, [5, 2], [tree, TokenTree.chain([7, 8])], block_size=4, offsets=[3, 1])
    assert batch.input_ids.tolist() == [4, 5, 6, 8]
    assert batch.positions.tolist() == [5 + 2, 5 + 2, 5 + 2, 2 + 1]  # ctx + depth
    logical = [5 + 3, 5 + 4, 5 + 5, 2 + 1]  # ctx + off + i
    want = [int(table[b, p // 4]) * 4 + p % 4 for b, p in zip([0, 0, 0, 1], logical, strict=True)]
    assert batch.slot_mapping.tolist() == want
    assert batch.cu_q_host == (0, 3, 4) and batch.cu_q.tolist() == [0, 3, 4] and batch.max_q == 3
    assert batch.q_offsets.tolist() == [3, 1] and batch.q_offsets.dtype == torch.int32
    assert batch.q_offsets_host == (3, 1)
    assert batch.mask_indptr.tolist() == [0, 3 * 6, 3 * 6 + 1 * 2]
    want_mask = torch.cat([tree.ancestor_mask[3:].flatten(), torch.tensor([True, True])])
    assert torch.equal(batch.tree_mask.bool(), want_mask)
    plain = tree_batch(table, [5, 2], [tree, TokenTree.chain([7, 8])], block_size=4)
    assert plain.q_offsets.tolist() == [0, 0] and plain.q_offsets_host == (0, 0)


def test_tree_batch_rejects_an_offset_larger_than_the_tree():
    table = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"offset 4 of sequence 0 is outside \[0, 3\]"):
        tree_batch(table, [0], [TokenTree.chain([1, 2, 3])], 4, offsets=[4])
    with pytest.raises(ValueError, match="offset -1 of sequence 0"):
        tree_batch(table, [0], [TokenTree.chain([1, 2, 3])], 4, offsets=[-1])
    with pytest.raises(ValueError, match="need one offset per tree"):
        tree_batch(table, [0], [TokenTree.chain([1, 2, 3])], 4, offsets=[0, 0])


# ------------------------------------------------------------------------------------------ end to end
def _prefilled(target, prompts, block_size=4):
    cache = target.new_cache(64, block_size)
    seqs = []
    for prompt in prompts:
        seq = cache.add_sequence()
        cache.reserve(seq, len(prompt))
        target.forward(cache, [seq], [TokenTree.chain(prompt)])
        cache.commit(seq, range(len(prompt)))
        seqs.append(seq)
    return cache, seqs


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-6)])
def test_level_by_level_forward_with_offsets_equals_one_forward_of_the_whole_tree(backend, dtype, tol):
    """Two sequences with random level-ordered trees of different depths (the shallower one has no query in the
    last levels: offset = its whole tree). Per-node logits of the level-by-level forwards (each level attends to
    the earlier levels' K/V written by the previous forwards) equal those of one forward of the whole trees. The
    Triton kernel has no float64, so its case runs in float32."""
    target = TargetModel(tiny_llama(dtype=dtype, seed=2), select_backend(backend))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (7, 13)]
    (deep, deep_starts), (shallow, shallow_starts) = level_tree([1, 3, 4, 2, 3], 6), level_tree([1, 2, 2], 7)
    trees, starts = [deep, shallow], [deep_starts, shallow_starts]

    cache, seqs = _prefilled(target, prompts)
    for seq, tree in zip(seqs, trees, strict=True):
        cache.reserve(seq, tree.num_nodes)
    whole = target.run(cache, build_tree_batch(cache, seqs, trees)).logits
    want = [whole[: deep.num_nodes], whole[deep.num_nodes:]]

    cache, seqs = _prefilled(target, prompts)  # a fresh cache: nothing of the whole-tree forward is reused
    for seq, tree in zip(seqs, trees, strict=True):
        cache.reserve(seq, tree.num_nodes)
    got = [[], []]
    for level in range(len(deep_starts)):
        partial, offsets = [], []
        for tree, st in zip(trees, starts, strict=True):
            end = st[level + 1] if level + 1 < len(st) else tree.num_nodes
            partial.append(TokenTree(tree.tokens[:end], tree.parents[:end]))
            offsets.append(st[level] if level < len(st) else end)
        batch = build_tree_batch(cache, seqs, partial, offsets)
        logits = target.run(cache, batch).logits
        for b in range(2):
            got[b].append(logits[batch.cu_q_host[b]: batch.cu_q_host[b + 1]])
    for b in range(2):
        torch.testing.assert_close(torch.cat(got[b]), want[b], atol=tol, rtol=tol,
                                   msg=lambda m, bb=b: f"sequence {bb}: {m}")
