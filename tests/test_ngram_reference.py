"""The n-gram drafter against a brute-force reference search, over random histories (hypothesis), and end to end
on text the target really repeats (so its drafts are accepted, not only rejected)."""

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.drafters.ngram import NgramDrafter
from specdec.engine import SpeculativeEngine
from tests.conftest import inputs
from tests.oracles import NgramWithNotes


def reference_continuations(history, max_ngram, min_ngram, max_depth, max_matches):
    """Plain-Python prompt lookup: for n from the longest suffix down, every earlier window ``h[s : s + n]`` that
    ends before the last token (``s + n <= L - 1``) and equals the suffix, most recent first; its continuation
    ``h[s + n : s + n + max_depth]``; a continuation start already taken by a longer n-gram is skipped."""
    h, length = list(history), len(history)
    found, seen = [], set()
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        for end in range(length - 1, n - 1, -1):
            if h[end - n : end] == h[length - n :] and end not in seen:
                seen.add(end)
                found.append(h[end : end + max_depth])
                if len(found) == max_matches:
                    return found
    return found


def _paths(tree):
    """Every node's token path from the root (root excluded), as a set of tuples."""
    return {tuple(tree.tokens[tree.path_to(i)][1:].tolist()) for i in range(tree.num_nodes)}


@settings(max_examples=150, deadline=None)
@given(
    history=st.lists(st.integers(0, 3), min_size=1, max_size=40),  # 4 symbols: many matches of every length
    max_ngram=st.integers(1, 5),
    span=st.integers(0, 4),
    max_depth=st.integers(1, 6),
    max_matches=st.integers(1, 5),
    max_nodes=st.integers(1, 20),
)
def test_proposals_equal_a_brute_force_search(history, max_ngram, span, max_depth, max_matches, max_nodes):
    min_ngram = max(1, max_ngram - span)
    d = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram, max_depth=max_depth, max_nodes=max_nodes,
                     max_matches=max_matches, prior_alpha=1.0)  # alpha 1: always drafts max_depth deep
    want = reference_continuations(history, max_ngram, min_ngram, max_depth, max_matches)
    assert d.continuations(torch.tensor(history), max_matches) == want
    [draft] = d.propose(inputs([0], [torch.tensor(history)]))
    tree = draft.tree
    assert int(tree.tokens[0]) == history[-1] and draft.probs is None
    prefixes = {()} | {tuple(c[:k]) for c in want for k in range(len(c) + 1)}
    assert _paths(tree) <= prefixes and tree.num_nodes == min(max_nodes, len(prefixes))
    # the budget goes to matches in priority order: the first continuation is always drafted in full
    if want:
        assert tuple(want[0][: max_nodes - 1]) in _paths(tree)


def noisy_copy(tokens, rate, seed, vocab=64):
    """``tokens`` with a ``rate`` share of them replaced by other random tokens."""
    rng = random.Random(seed)
    return [(t + rng.randrange(1, vocab)) % vocab if rng.random() < rate else t for t in tokens]


def test_drafts_that_continue_the_real_text_are_accepted_and_output_is_unchanged(tiny_target):
    cache = tiny_target.new_cache(96, 4)
    for seed in range(3):
        prompt = torch.randint(0, 64, (6 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar = SpeculativeEngine(tiny_target, cache).generate(prompt, 30)
        drafter = NgramWithNotes(noisy_copy(prompt + ar.tokens, 0.15, seed), min_ngram=1)
        spec = SpeculativeEngine(tiny_target, cache, drafter).generate(prompt, 30)
        assert spec.tokens == ar.tokens
        assert spec.stats.tau > 1.5 and spec.stats.depth_accepted[1] > 0  # accepted, at depth >= 2 too
        assert 0 < spec.stats.depth_accepted[0] < spec.stats.depth_tried[0]  # and rejected sometimes
        assert cache.allocator.num_free == 96
