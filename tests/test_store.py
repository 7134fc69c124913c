"""Retrieval store: packed-suffix lookup equals a brute-force count, save/load, errors, and the n-gram drafter's use
of it (only where the history has no match; lossless at T=0 and T=1)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.drafters.ngram import NgramDrafter, load_store
from specdec.drafters.registry import DrafterSpec, build_drafter
from specdec.drafters.store import TokenStore
from specdec.engine import SpeculativeEngine
from specdec.sampling import SamplingParams
from specdec.target import TargetModel

from .conftest import first_two_tokens_pvalue, inputs, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(sequences, history, width, min_ngram, depth):
    """Every continuation prefix's share of ALL matches of the longest suffix (<= width, >= min_ngram) that occurs
    inside one sequence."""
    for n in range(min(width, len(history)), min_ngram - 1, -1):
        query = list(history[len(history) - n:])
        starts = [(s, i + n) for s in sequences for i in range(len(s) - n + 1) if list(s[i: i + n]) == query]
        if not starts:
            continue
        counts = Counter(tuple(s[j: j + d]) for s, j in starts for d in range(1, depth + 1) if j + d <= len(s))
        return {path: c / len(starts) for path, c in counts.items()}
    return {}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=6),
       st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(1, 3), st.integers(1, 4),
       st.sampled_from([4, 70_000]))
def test_continuations_equal_a_brute_force_count_over_every_match(sequences, history, min_ngram, depth, vocab):
    """Small vocabularies pack many tokens per key (width 21 for 4 tokens), a large one 3; sequence ends are never
    crossed, by a match or by a continuation."""
    offset = vocab - 4  # the large vocabulary uses its top ids (the packed digits' high bits)
    sequences = [[t + offset for t in s] for s in sequences]
    history = [t + offset for t in history]
    store = TokenStore(sequences, vocab)
    assert store.width == (21 if vocab == 4 else 3)
    got = store.continuations(torch.tensor(history), min_ngram, depth, max_matches=1000)
    want = brute_force(sequences, history, store.width, min_ngram, depth)
    assert dict(got) == pytest.approx(want)
    shares = [p for _, p in got]
    assert shares == sorted(shares, reverse=True)
    seen = set()
    for path, _ in got:  # a prefix always comes before its extensions
        assert len(path) == 1 or path[:-1] in seen
        seen.add(path)


def test_at_most_max_matches_spread_over_the_range_are_counted():
    store = TokenStore([[1, 2, t] for t in range(3, 13)], 16)
    got = dict(store.continuations([9, 1, 2], min_ngram=2, depth=1, max_matches=5))
    assert len(got) == 5 and all(p == pytest.approx(0.2) for p in got.values())
    assert (3,) in got and (12,) in got  # both ends of the sorted range


def test_tree_paths_keep_frequent_continuations_within_the_node_limit():
    store = TokenStore([[1, 2, 3, 4]] * 3 + [[1, 2, 5]], 8)
    assert store.tree_paths(torch.tensor([1, 2]), nodes=3, min_p=0.0) == [(3,), (3, 4), (5,)]
    assert store.tree_paths(torch.tensor([1, 2]), nodes=1, min_p=0.0) == [(3,)]
    assert store.tree_paths(torch.tensor([1, 2]), nodes=3, min_p=0.5) == [(3,), (3, 4)]
    assert store.tree_paths(torch.tensor([6, 7]), nodes=3, min_p=0.0) == []
    assert store.tree_paths(torch.tensor([1, 2]), nodes=0, min_p=0.0) == []


def test_a_saved_store_loads_with_the_same_answers(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (30,), generator=g).tolist()
    sequences = [torch.randint(0, 50, (n,), generator=g).tolist() for n in lengths]
    store = TokenStore(sequences, 50, sources=["somewhere"])
    loaded = TokenStore.load(store.save(tmp_path / "s"))
    assert loaded.num_tokens == store.num_tokens == sum(map(len, sequences)) and loaded.sources == ("somewhere",)
    for s in sequences:
        for cut in range(1, len(s)):
            assert loaded.continuations(s[:cut]) == store.continuations(s[:cut])


def test_bad_stores_are_refused_with_the_limit(tmp_path):
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        TokenStore([[1, 8]], 8)
    with pytest.raises(ValueError, match="too large to pack 2 tokens"):
        TokenStore([[1]], 2**40)
    with pytest.raises(ValueError, match="is not a token store"):
        TokenStore.load(tmp_path)
    TokenStore([[1, 2, 3]], 8).save(tmp_path / "other")
    config = tmp_path / "other" / "config.json"
    config.write_text(config.read_text().replace('"store"', '"eagle"'))
    with pytest.raises(ValueError, match="holds 'eagle' weights, not a token store"):
        TokenStore.load(tmp_path / "other")
    TokenStore([[1, 2, 3]], 8).save(tmp_path / "s")
    with pytest.raises(ValueError, match="vocabulary of 8 tokens, the target has 64"):
        load_store(str(tmp_path / "s"), TargetModel(tiny_llama(), split_gemv=False))
    with pytest.raises(ValueError, match="does not exist"):
        load_store(str(tmp_path / "nowhere"), None)


def test_ngram_asks_the_store_only_where_the_history_has_no_match():
    store = TokenStore([[4, 5, 6, 7]] * 3 + [[4, 5, 9]], 16)
    d = NgramDrafter(store=store, store_nodes=2, store_min_p=0.3, max_nodes=8)
    [no_match, matched, rare] = d.propose(inputs([0, 1, 2], [[1, 2, 4, 5], [4, 5, 1, 1, 4, 5], [3, 9, 9]]))
    assert no_match.tree.tokens.tolist() == [5, 6, 7] and no_match.tree.parents.tolist() == [-1, 0, 1]
    assert matched.tree.tokens.tolist() == [5, 1, 1, 4, 5]  # the history's own continuation, no store
    assert rare.tree.num_nodes == 1  # no match anywhere: plain decoding
    [capped] = d.propose(inputs([0], [[1, 2, 4, 5]], budget=2))
    assert capped.tree.tokens.tolist() == [5, 6]
    d.accept(1, torch.tensor([1, 2]))  # the history's draft: 1 of 4 accepted, alpha moves
    alpha = d._state[1].alpha
    assert alpha < d.prior_alpha
    d.propose(inputs([1], [[4, 5, 1, 1, 4, 5, 7, 4, 5]]))  # "4 5" matched; then a store step
    d.accept(1, torch.tensor([1, 1, 4, 5, 3]))
    alpha = d._state[1].alpha
    d.propose(inputs([1], [[1, 2, 4, 5]]))
    d.accept(1, torch.tensor([6, 7, 1]))
    assert d._state[1].alpha == alpha  # a store step says nothing about the history's matches
    with pytest.raises(ValueError, match="store_nodes >= 0"):
        NgramDrafter(store_nodes=-1)


def test_with_a_step_cost_the_stores_tree_keeps_the_continuations_that_pay_by_calibrated_frequency():
    """Store continuations of "4 5": 6 (5/7 of the matches), 6 7 (5/7), 9 (2/7), 9 3 (1/7). Free nodes: all four
    (each adds value at no cost). A node costing 0.2 of a step: with calibration 0.5 the values are 0.357, 0.357,
    0.143, 0.071, and (1 + sum of the best k) / (1 + 0.2 k) is largest at k = 2. A store whose proposals are
    never accepted calibrates down until its best continuation (5/7 of the matches) no longer pays for a node
    (calibration < 0.28) and then proposes nothing where nodes cost."""
    store = TokenStore([[4, 5, 6, 7]] * 5 + [[4, 5, 9, 3]] + [[4, 5, 9]], 16)
    free = NgramDrafter(store=store, step_cost=lambda n, ctx: 1.0, max_nodes=8)
    assert (free.store_nodes, free.store_min_p) == (4, 0.05)
    history = torch.tensor([1, 2, 4, 5])
    assert free.store_calibration == 0.5
    paths, value = free.store_paths(history, 7)
    assert paths == [(6,), (6, 7), (9,), (9, 3)] and value == pytest.approx(5 / 7 * 2 + 2 / 7 + 1 / 7)
    dear = NgramDrafter(store=store, step_cost=lambda n, ctx: 1.0 + 0.2 * (n - 1), max_nodes=8)
    assert dear.store_paths(history, 7)[0] == [(6,), (6, 7)]
    for _ in range(60):  # the store's tree is never accepted: its calibration falls
        [draft] = dear.propose(inputs([0], [history]))
        dear.accept(0, torch.tensor([11]))
    assert dear.store_calibration < 0.28 and dear.store_paths(history, 7)[0] == []
    assert dear._state[0].store_value == 0.0  # consumed by accept
    untuned = NgramDrafter(store=store)  # no step cost: the fixed cap and floor
    assert untuned.store_paths(history, 7)[0] == [(6,), (6, 7)]
    with pytest.raises(ValueError, match="option 'steps' of drafter 'ngram' sizes the store's tree: give a store"):
        build_drafter(DrafterSpec.parse("ngram:steps=auto"), None)


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=3), split_gemv=False)


def test_greedy_output_equals_autoregressive_with_store_drafts_accepted(target, tmp_path):
    """A store holding the target's earlier answers (one of them to this very prompt, truncated, next to answers to
    others): store drafts are accepted where the history has no match, and the output is the target's greedy
    output, with every block returned."""
    cache = target.new_cache(64, 4)
    prompt = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(99)).tolist()
    ar = SpeculativeEngine(target, cache).generate(prompt, 24)
    texts = [prompt + ar.tokens[:16]]
    for seed in range(4):
        start = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
        texts.append(start + SpeculativeEngine(target, cache).generate(start, 30).tokens)
    store = TokenStore(texts, target.vocab_size).save(tmp_path / "store")
    drafter = build_drafter(DrafterSpec.parse(f"ngram:budget=8,store={store},store_nodes=3,store_min_p=0.2"), target)
    assert isinstance(drafter.store, TokenStore)
    store_steps = []
    from_store = drafter.draft_from_store
    drafter.draft_from_store = lambda *a: store_steps.append(from_store(*a)) or store_steps[-1]
    spec = SpeculativeEngine(target, cache, drafter, max_tree_nodes=8).generate(prompt, 24)
    assert spec.tokens == ar.tokens and spec.stats.tau > 1.0
    assert sum(d.tree.num_nodes > 1 for d in store_steps) >= 2
    assert cache.allocator.num_free == 64


@pytest.mark.parametrize("sized", [False, True], ids=["fixed", "sized-by-step-cost"])
def test_sampling_with_store_drafts_preserves_the_target_distribution(sized):
    """Chi-square on the first two sampled tokens; ``sized``: the store's tree chosen per step by a step cost (free
    nodes) and the running calibration, which moves with every accepted draft."""
    target = TargetModel(tiny_llama(vocab=8, seed=11), split_gemv=False)
    g = torch.Generator().manual_seed(5)
    store = TokenStore([torch.randint(0, 8, (40,), generator=g).tolist() for _ in range(20)], 8)
    drafter = NgramDrafter(store=store, store_nodes=3, store_min_p=0.0, min_ngram=1, max_nodes=4,
                           step_cost=(lambda n, ctx: 1.0) if sized else None)
    torch.manual_seed(4)
    pvalue, accepted = first_two_tokens_pvalue(target, drafter, [1, 5, 2, 7, 3], 300, SamplingParams(1.0), 4)
    assert pvalue > 1e-3 and accepted > 15
