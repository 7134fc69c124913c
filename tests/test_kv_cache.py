import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.kv_cache import BlockAllocator, OutOfBlocks, PagedKVCache


def _cache(num_blocks=16, block_size=4, layers=3):
    return PagedKVCache(layers, num_kv_heads=2, head_dim=4, num_blocks=num_blocks, block_size=block_size,
                        dtype=torch.float64)


def _values(cache, seq, n):
    """K and V of all layers at logical positions [0, n): [L, n, Hkv, D] each."""
    slots = cache.slots(seq, torch.arange(n))
    k = cache.k.flatten(1, 2)[:, slots]
    v = cache.v.flatten(1, 2)[:, slots]
    return k, v


def _write_tokens(cache, seq, start, kv_per_token):
    """Write per-token values kv_per_token [n, L, Hkv, D] at logical positions start.. for every layer."""
    n = kv_per_token.shape[0]
    slots = cache.slots(seq, start + torch.arange(n))
    for layer in range(cache.k.shape[0]):
        cache.write(layer, slots, kv_per_token[:, layer], -kv_per_token[:, layer])


def test_allocator_hands_out_and_takes_back():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1
    with pytest.raises(OutOfBlocks, match="need 2 more, 1 free of 4"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        alloc.free([a[0]])


@pytest.mark.parametrize("path", [[0, 2, 5], [0, 1, 2, 3], [0], [0, 5], [0, 3, 4, 6]])
def test_commit_equals_writing_only_the_accepted_tokens(path):
    torch.manual_seed(0)
    ctx, n_tree = 6, 7
    prefix = torch.randn(ctx, 3, 2, 4, dtype=torch.float64)
    tree_kv = torch.randn(n_tree, 3, 2, 4, dtype=torch.float64)

    cache = _cache()
    seq = cache.add_sequence()
    cache.reserve(seq, ctx)
    _write_tokens(cache, seq, 0, prefix)
    cache.commit(seq, range(ctx))
    cache.reserve(seq, n_tree)
    _write_tokens(cache, seq, ctx, tree_kv)
    assert cache.commit(seq, path) == ctx + len(path)

    expected = _cache()
    seq2 = expected.add_sequence()
    expected.reserve(seq2, ctx + len(path))
    _write_tokens(expected, seq2, 0, torch.cat([prefix, tree_kv[path]]))
    for got, want in zip(_values(cache, seq, ctx + len(path)), _values(expected, seq2, ctx + len(path)),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_commit_frees_blocks_and_release_returns_everything():
    cache = _cache(num_blocks=8, block_size=4)
    seq = cache.add_sequence()
    cache.reserve(seq, 13)  # 4 blocks
    assert cache.allocator.num_free == 4
    cache.commit(seq, [0, 1, 2])  # 3 tokens -> 1 block
    assert len(cache.blocks(seq)) == 1 and cache.allocator.num_free == 7
    other = cache.add_sequence()
    cache.reserve(other, 28)  # the 7 freed blocks are reusable
    with pytest.raises(OutOfBlocks):
        cache.reserve(seq, 8)
    cache.release(seq)
    cache.release(other)
    assert cache.allocator.num_free == 8


def test_commit_rejects_unsorted_paths():
    cache = _cache()
    seq = cache.add_sequence()
    cache.reserve(seq, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.commit(seq, [0, 2, 1])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_random_reserve_commit_release_keeps_invariants(seed):
    rng = random.Random(seed)
    cache = _cache(num_blocks=24, block_size=rng.choice([1, 2, 4]), layers=2)
    shadow: dict[int, list[float]] = {}  # committed value per position, per live sequence
    counter = 0.0
    for _ in range(40):
        op = rng.random()
        if op < 0.2 or not shadow:
            shadow[cache.add_sequence()] = []
            continue
        seq = rng.choice(list(shadow))
        if op < 0.3:
            cache.release(seq)
            del shadow[seq]
            continue
        n = rng.randint(1, 6)
        held, free = list(cache.blocks(seq)), cache.allocator.num_free
        try:
            cache.reserve(seq, n)
        except OutOfBlocks:
            # justified only if the request needs more blocks than are free; a failed reserve takes nothing
            need = -(-(len(shadow[seq]) + n) // cache.block_size) - len(held)
            assert need > free, f"OutOfBlocks for {need} blocks with {free} free"
            assert cache.blocks(seq) == held and cache.allocator.num_free == free
            continue
        assert len(cache.blocks(seq)) == max(len(held), -(-(len(shadow[seq]) + n) // cache.block_size))
        vals = [counter + i for i in range(n)]
        counter += n
        ctx = len(shadow[seq])
        kv = torch.tensor(vals, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 2, 2, 4).contiguous()
        _write_tokens(cache, seq, ctx, kv)
        path = [0] + sorted(rng.sample(range(1, n), rng.randint(0, n - 1)))
        cache.commit(seq, path, keep_reserved=rng.randint(0, 3))
        shadow[seq] += [vals[i] for i in path]
        # invariants: contents, block accounting, no block shared
        k, v = _values(cache, seq, len(shadow[seq]))
        assert k[:, :, 0, 0].tolist() == [shadow[seq]] * 2
        assert v[:, :, 0, 0].tolist() == [[-x for x in shadow[seq]]] * 2
        owned = [b for s in shadow for b in cache.blocks(s)]
        assert len(owned) == len(set(owned))
        assert cache.allocator.num_free + len(owned) == 24
    for seq in list(shadow):
        cache.release(seq)
    assert cache.allocator.num_free == 24


def test_freed_blocks_come_back_in_order_so_a_sequence_stays_one_run():
    cache = PagedKVCache(1, 1, 2, num_blocks=8, block_size=2)
    a = cache.add_sequence()
    cache.reserve(a, 5)  # blocks 0, 1, 2
    b = cache.add_sequence()
    cache.reserve(b, 2)  # block 3
    assert cache.first_blocks([a, b]) == (0, 3)
    cache.release(a)
    c = cache.add_sequence()
    cache.reserve(c, 6)  # reuses 0, 1, 2 in order
    assert cache.blocks(c) == [0, 1, 2] and cache.first_blocks([c]) == (0,)
    cache.reserve(b, 4)  # b grows into block 4: 3, 4 is still a run
    cache.reserve(c, 7)  # c's next block is 5: 0, 1, 2, 5 is not
    assert cache.first_blocks([b, c]) == (3, -1)


def test_reading_a_run_of_blocks_in_place_gives_the_gathered_attention_exactly():
    """The torch backend's in-place read of a sequence whose blocks are one run equals its gather, bit for bit,
    on a tree over a prompt (prefill and tree step both)."""
    from specdec.attention import TreeBatch, build_tree_batch
    from specdec.target import TargetModel
    from specdec.tree import TokenTree
    from tests.conftest import tiny_llama

    target = TargetModel(tiny_llama(seed=4))
    gen = torch.Generator().manual_seed(0)
    prompt = TokenTree.chain(torch.randint(0, 64, (21,), generator=gen))
    tree = TokenTree(torch.randint(0, 64, (6,), generator=gen), torch.tensor([-1, 0, 0, 1, 1, 3]))
    logits = {}
    for in_place in (True, False):
        cache = target.new_cache(num_blocks=16, block_size=4)
        seq = cache.add_sequence()
        outs = []
        for t in (prompt, tree):
            cache.reserve(seq, t.num_nodes)
            batch = build_tree_batch(cache, [seq], [t])
            assert batch.first_blocks_host == (0,)
            if not in_place:
                batch = TreeBatch(**{**batch.__dict__, "first_blocks_host": ()})
            outs.append(target.run(cache, batch).logits)
            if t is prompt:
                cache.advance(seq, t.num_nodes)
        logits[in_place] = outs
    for a, b in zip(logits[True], logits[False], strict=True):
        assert torch.equal(a, b)
