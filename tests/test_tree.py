import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import TokenTree, choices_to_parents


def test_mask_depth_and_paths_of_a_small_tree():
    #      0
    #    1   2
    #   3 4   5
    tree = TokenTree(torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([-1, 0, 0, 1, 1, 2]))
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.ancestor_mask, expected)
    assert tree.leaf_paths() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    assert tree.path_to(5) == [0, 2, 5]
    assert tree.children() == [[1, 2], [3, 4], [5], [], [], []]
    assert tree.max_depth == 2


def test_chain_is_lower_triangular():
    tree = TokenTree.chain([5, 6, 7, 8])
    assert torch.equal(tree.ancestor_mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.depth.tolist() == [0, 1, 2, 3]
    assert tree.leaf_paths() == [[0, 1, 2, 3]]


def test_from_choices_matches_parent_array():
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    candidates = torch.tensor([[100, 101], [200, 201], [300, 301]])
    tree = TokenTree.from_choices(7, choices, candidates)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.tokens.tolist() == [7, 100, 101, 200, 201, 200, 300]
    assert choices_to_parents(choices)[2] == [0, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [
        ([], [], "at least the root"),
        ([1, 2], [-1, 1], "node 1 has parent 1"),
        ([1, 2, 3], [-1, 2, 0], "node 1 has parent 2"),
        ([1, 2], [0, 0], "node 0 must be the root"),
        ([1, 2], [-1], "2 tokens but 1 parents"),
    ],
)
def test_invalid_trees_raise_naming_the_problem(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def test_choices_need_their_prefixes():
    with pytest.raises(ValueError, match="no parent choice"):
        TokenTree.from_choices(0, [(0,), (1, 0)], torch.zeros(2, 2, dtype=torch.long))


def test_check_fits_names_the_limit():
    tree = TokenTree.chain(list(range(10)))
    with pytest.raises(ValueError, match="10 nodes exceed the per-step limit of 8"):
        tree.check_fits(8)
    with pytest.raises(ValueError, match="depth 9 exceeds the limit of 4"):
        tree.check_fits(16, max_depth=4)


@st.composite
def parent_arrays(draw):
    n = draw(st.integers(1, 24))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@settings(max_examples=60, deadline=None)
@given(parent_arrays())
def test_random_trees_mask_equals_ancestor_closure(parents):
    n = len(parents)
    tree = TokenTree(torch.arange(n), torch.tensor(parents))
    for i in range(n):
        ancestors, j = {i}, i
        while parents[j] >= 0:
            j = parents[j]
            ancestors.add(j)
        assert set(torch.nonzero(tree.ancestor_mask[i]).flatten().tolist()) == ancestors
        assert int(tree.depth[i]) == len(ancestors) - 1
    leaves = [i for i in range(n) if i not in parents]
    assert [p[-1] for p in tree.leaf_paths()] == leaves
