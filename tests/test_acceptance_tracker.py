"""The acceptance tracker's confidence calibration (``Draft.scores``), its depth prior, and the scores that
best-first drafters report."""

import math

import pytest
import torch

from specdec.drafters.eagle import EagleDrafter
from specdec.interfaces import Draft, DraftInput
from specdec.research.acceptance_tracker import AcceptanceTracker, _conditional
from specdec.research.auto_budget import AutoBudgetDrafter
from specdec.research.cost_model import CostModel
from specdec.target import TargetModel
from specdec.tree import TokenTree
from tests.conftest import inputs, tiny_llama


def test_confidence_is_calibrated_against_observed_acceptance():
    """A drafter whose confidence q is twice its true acceptance rate: the tracker learns to halve it, per bin."""
    tracker = AcceptanceTracker(forget=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        q = float(torch.rand((), generator=gen)) * 0.9 + 0.05
        tracker._conf_count(1, q, bool(torch.rand((), generator=gen) < q / 2))
    for q in (0.15, 0.45, 0.85):
        assert tracker.conf_rate(1, q) == pytest.approx(q / 2, abs=0.05)
    assert tracker.conf_rate(2, 0.45) == pytest.approx(0.45)  # an unseen depth trusts the drafter (prior ratio 1)


def test_node_values_with_scores_are_products_of_calibrated_conditionals():
    tree = TokenTree(torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]))
    scores = torch.tensor([0.0, math.log(0.6), math.log(0.3), math.log(0.6 * 0.5)])
    assert _conditional(tree, scores) == pytest.approx([1.0, 0.6, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"one value per tree node: shape \(4,\), got \(3,\)"):
        _conditional(tree, scores[:3])
    tracker = AcceptanceTracker()
    values = tracker.node_values(tree, scores)
    assert values.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.3])  # uncalibrated: the drafter's own numbers
    by_rank = tracker.node_values(tree)  # without scores: the (depth, rank) priors 0.6, 0.3, then 0.6 * 0.6
    assert by_rank.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.36])


def test_an_unexplored_depth_inherits_the_rate_above_it():
    tracker = AcceptanceTracker(prior_weight=2.0, forget=1.0)
    for _ in range(50):
        tracker.observe(1, 0, False)
    assert tracker.rate(1, 0) < 0.05
    assert tracker.rate(4, 0) < 0.05  # not the flat prior 0.6, which bought deep trees on rates never seen
    assert AcceptanceTracker(depth_prior=False, forget=1.0).rate(4, 0) == pytest.approx(0.6)


def _recursive_rate(tracker: AcceptanceTracker, depth: int, rank: int) -> float:
    """The rate's definition, cell by cell: prior mean from the parent tracker, else the cell one level up (with
    ``depth_prior``), else ``prior_top1 * prior_decay ** rank``; weight ``prior_weight``."""
    if tracker.parent is not None:
        m = _recursive_rate(tracker.parent, depth, rank)
    elif depth > 1 and tracker.depth_prior:
        m = _recursive_rate(tracker, depth - 1, rank)
    else:
        m = tracker.prior_top1 * tracker.prior_decay**rank
    key, w = (depth, rank), tracker.prior_weight
    return (tracker._acc.get(key, 0.0) + w * m) / (tracker._tried.get(key, 0.0) + w)


@pytest.mark.parametrize("depth_prior", [True, False])
def test_the_rate_table_equals_the_recursive_rate_for_pooled_and_per_sequence_trackers(depth_prior):
    """``rates`` (one pass, what the chooser reads every step) gives exactly the recursive definition in every
    cell, for a pooled tracker and a sequence's child tracker after random observations, so planned and pruned
    trees are valued as before; node and chain values are products along paths."""
    gen = torch.Generator().manual_seed(1)
    pooled = AcceptanceTracker(prior_weight=3.0, forget=0.97, depth_prior=depth_prior)
    child = AcceptanceTracker(prior_weight=4.0, forget=0.95, parent=pooled)
    for _ in range(300):
        depth, rank = (int(torch.randint(1, 7, (), generator=gen)), int(torch.randint(0, 4, (), generator=gen)))
        (child if torch.rand((), generator=gen) < 0.5 else pooled).observe(depth, rank, bool(
            torch.rand((), generator=gen) < 0.8 / (depth + rank)))
    for tracker in (pooled, child):
        table = tracker.rates(8, 5)
        assert [[_recursive_rate(tracker, d, k) for k in range(5)] for d in range(1, 9)] == table
        assert [[tracker.rate(d, k) for k in range(5)] for d in range(1, 9)] == table
        assert tracker.chain_values(3) == pytest.approx([table[0][0], table[0][0] * table[1][0],
                                                         table[0][0] * table[1][0] * table[2][0]], rel=1e-15)
        tree = TokenTree(torch.tensor([0, 5, 6, 7, 8]), torch.tensor([-1, 0, 0, 1, 3]))
        assert tracker.node_values(tree).tolist() == pytest.approx(
            [1.0, table[0][0], table[0][1], table[0][0] * table[1][0], table[0][0] * table[1][0] * table[2][0]],
            rel=1e-15)


def test_a_rate_is_the_chance_of_acceptance_given_the_parent_not_given_the_elder_siblings_rejected():
    """The target's next token is A, B or C with probability 0.6 / 0.3 / 0.1 and the tree drafts all three as
    ranks 0-2: the rates learn 0.6 / 0.3 / 0.1 and the three values sum to 1 (counting only the children tried up
    to the accepted one learnt 0.6 / 0.75 / 1.0, and the chooser bought wide trees on them)."""
    tracker = AcceptanceTracker(forget=1.0, prior_weight=1.0)
    tree = TokenTree(torch.tensor([9, 1, 2, 3]), torch.tensor([-1, 0, 0, 0]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        u = float(torch.rand((), generator=gen))
        tracker.update(tree, [1, 7] if u < 0.6 else [2, 7] if u < 0.9 else [3, 7])  # accepted token, then bonus
    assert [tracker.rate(1, k) for k in range(3)] == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    assert float(tracker.node_values(tree)[1:].sum()) == pytest.approx(1.0, abs=0.03)
    chain = AcceptanceTracker(forget=1.0, prior_weight=1.0)
    for _ in range(50):  # under the last accepted node every child was rejected (the bonus is the target's token)
        chain.update(TokenTree(torch.tensor([9, 1, 4]), torch.tensor([-1, 0, 1])), [1, 5])
    assert chain.rate(1, 0) > 0.95 and chain.rate(2, 0) < 0.05


def test_with_confidence_the_pruner_keeps_the_confident_node_over_the_higher_ranked_one():
    """Rank-1 child far more confident than rank 0: by (depth, rank) the pruner keeps rank 0, by calibrated
    confidence it keeps rank 1."""
    tree = TokenTree(torch.tensor([9, 1, 2]), torch.tensor([-1, 0, 0]))
    draft = Draft(tree, scores=torch.tensor([0.0, math.log(0.05), math.log(0.9)]))

    class Fixed:
        vocab_size, needs_hidden, budget = None, False, 3

        def propose(self, batch):
            return [draft for _ in batch]

        def accept(self, seq_id, tokens, hidden=None):
            pass

        def release(self, seq_id):
            pass

    cost = CostModel((1.0, 0.5, 0.0, 0.0))  # a node costs half a step: only a likely node pays
    kept = {}
    for confidence in (False, True):
        auto = AutoBudgetDrafter(Fixed(), cost, plan=False, confidence=confidence)
        [out] = auto.propose([DraftInput(0, torch.tensor([4, 9]))])
        kept[confidence] = out.tree.tokens.tolist()
    assert kept == {False: [9, 1], True: [9, 2]}


@pytest.mark.parametrize("budget", [3, 8])
def test_best_first_eagle_trees_report_their_path_log_probabilities(budget):
    target = TargetModel(tiny_llama(seed=3))
    drafter = EagleDrafter.untrained(target, tree="dynamic", depth=3, budget=budget, topk=2, num_blocks=64,
                                     block_size=4)
    history = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        hidden = target.model(history[None], output_hidden_states=True).hidden_states[-1][0][:-1]
    drafter.accept(0, history[-1:], hidden)
    [draft] = drafter.propose(inputs([0], [history]))
    scores, parents = draft.scores, draft.tree.parents
    assert scores is not None and scores.shape == (draft.tree.num_nodes,) and float(scores[0]) == 0.0
    assert all(float(scores[i]) <= float(scores[parents[i]]) + 1e-6 for i in range(1, len(scores)))
    assert float(torch.logsumexp(scores[draft.tree.depth == 1], 0)) <= 1e-6  # siblings' probabilities sum to <= 1
