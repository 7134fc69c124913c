import torch

from specdec.drafters.ngram import NgramDrafter, merge_continuations
from tests.conftest import inputs


def test_longest_suffix_match_is_proposed():
    d = NgramDrafter(max_ngram=3, min_ngram=1, max_depth=4, max_nodes=16)
    history = torch.tensor([1, 2, 3, 4, 5, 9, 9, 1, 2, 3])
    assert d.continuations(history, max_matches=1) == [[4, 5, 9, 9]]
    [draft] = d.propose(inputs([0], [history]))
    assert draft.tree.tokens.tolist() == [3, 4, 5, 9, 9]
    assert draft.tree.parents.tolist() == [-1, 0, 1, 2, 3]


def test_disagreeing_matches_become_branches_most_recent_first():
    d = NgramDrafter(max_ngram=2, min_ngram=2, max_depth=3, max_nodes=16)
    history = torch.tensor([7, 8, 1, 1, 1, 7, 8, 2, 2, 2, 7, 8])
    conts = d.continuations(history, max_matches=4)
    assert conts == [[2, 2, 2], [1, 1, 1]]
    [draft] = d.propose(inputs([0], [history]))
    tree = draft.tree
    assert tree.tokens.tolist() == [8, 2, 2, 2, 1, 1, 1]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 0, 4, 5]


def test_shared_prefixes_are_merged_and_budget_is_respected():
    tree = merge_continuations(0, [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7, 8]], max_nodes=6)
    assert tree.tokens.tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 2, 1]
    for budget in range(1, 10):
        assert merge_continuations(0, [[1, 2, 3], [4, 5, 6], [1, 7, 8]], budget).num_nodes <= budget


def test_no_match_proposes_the_root_alone():
    d = NgramDrafter()
    [draft] = d.propose(inputs([0], [torch.tensor([1, 2, 3, 4, 5])]))
    assert draft.tree.num_nodes == 1 and draft.tree.tokens.tolist() == [5]


def test_drafting_depth_shrinks_when_drafts_are_rejected_and_recovers():
    d = NgramDrafter(max_ngram=2, min_ngram=1, max_depth=8, node_cost=0.05, prior_alpha=0.7)
    history = torch.tensor(list(range(20)) * 3)
    [first] = d.propose(inputs([0], [history]))
    assert first.tree.max_depth == 8  # 0.7**8 = 0.058 > 0.05
    for _ in range(10):
        d.propose(inputs([0], [history]))
        d.accept(0, torch.tensor([5]))  # nothing accepted
    [shallow] = d.propose(inputs([0], [history]))
    assert shallow.tree.max_depth == 1  # still probes one token
    for _ in range(20):
        d.propose(inputs([0], [history]))
        d.accept(0, torch.tensor([1] * 9))  # everything accepted
    [deep] = d.propose(inputs([0], [history]))
    assert deep.tree.max_depth == 8
    d.release(0)


def test_the_most_recent_window_right_before_the_suffix_is_matched():
    """The window ending just before the last token (it overlaps the suffix) is a match too: in a run of one
    token the longest suffix occurs only there, and its continuation is the last token itself."""
    d = NgramDrafter(max_ngram=3, min_ngram=2, max_depth=4, max_nodes=16)
    history = torch.tensor([1, 2, 7, 7, 7, 7])
    assert d.continuations(history, max_matches=4) == [[7], [7, 7]]  # 3-gram at 2..4, then the 2-gram at 3..4
    assert d.continuations(history, max_matches=1) == [[7]]
    [draft] = d.propose(inputs([0], [history]))
    assert draft.tree.tokens.tolist() == [7, 7, 7] and draft.tree.parents.tolist() == [-1, 0, 1]
    # a period-2 text: the most recent occurrence of the suffix (2 tokens back) wins over older ones
    d2 = NgramDrafter(max_ngram=2, min_ngram=2, max_depth=3, max_nodes=16)
    assert d2.continuations(torch.tensor([5, 1, 2, 3, 2, 3, 2, 3]), 4) == [[2, 3], [2, 3, 2]]
