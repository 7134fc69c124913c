"""Best-first trees built by tensor ops for a whole batch (:class:`BestFirstBatch`) equal the per-node builder's
(:func:`best_first_steps`) on random log-probabilities: same tokens, parents, node order and scores, including
ties (the batch builder breaks them in pool order, as the per-node builder's stable sorts do)."""

import pytest
import torch

from specdec.tree_builders import BestFirstBatch, best_first_steps, drive_batch, level_topk


def _random_expand(seed: int, vocab: int, quantize: bool):
    """``expand(paths)``: a fixed pseudo-random log-distribution per path (coarse values when ``quantize``, so
    equal scores occur and tie-breaking is exercised)."""
    def logprobs(path):
        g = torch.Generator().manual_seed(hash((seed, path)) % (2**31))
        x = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
        if quantize:
            x = x.round()
        return x.log_softmax(-1)

    return lambda paths: torch.stack([logprobs(p) for p in paths])


def _batch_trees(roots, expands, budget, depth, topk, vocab_ids=None):
    builder = BestFirstBatch(torch.tensor(roots), budget, depth, topk)
    paths = [[()] for _ in roots]  # each frontier node's token path, to ask the reference expand
    while builder.more:
        lp = torch.stack([e(p) for e, p in zip(expands, paths, strict=True)])  # [B, F, V]
        if vocab_ids is not None:
            lp = lp[..., vocab_ids]
        values, tokens = level_topk(lp, topk, vocab_ids)
        builder.step(values, tokens)
        paths = [[p[j] + (t,) for j, t in zip(par.tolist(), tok.tolist(), strict=True)]
                 for p, par, tok in zip(paths, builder.frontier_parent, builder.frontier_tokens, strict=True)]
    return builder.result()


@pytest.mark.parametrize("quantize", [False, True], ids=["distinct-scores", "tied-scores"])
@pytest.mark.parametrize(("budget", "depth", "topk"), [(1, 4, 3), (2, 1, 1), (8, 3, 2), (16, 4, 4), (40, 5, 3),
                                                       (6, 0, 2), (100, 3, 4)])
def test_tensor_best_first_trees_equal_the_per_node_builder(budget, depth, topk, quantize):
    vocab, roots = 12, [3, 7, 0]
    expands = [_random_expand(seed, vocab, quantize) for seed in range(len(roots))]
    reference = drive_batch([best_first_steps(r, budget, depth, topk) for r in roots],
                            lambda reqs: [None if r is None else e(r) for e, r in zip(expands, reqs, strict=True)])
    trees, scores = _batch_trees(roots, expands, budget, depth, topk)
    for (ref_tree, ref_scores), tree, score in zip(reference, trees, scores, strict=True):
        assert torch.equal(tree.tokens, ref_tree.tokens) and torch.equal(tree.parents, ref_tree.parents)
        torch.testing.assert_close(score, ref_scores, rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [False, True], ids=["distinct-scores", "tied-scores"])
@pytest.mark.parametrize("budgets", [[1, 3, 9, 2], [5, 5, 2, 17], [1, 1, 1, 1], [2, 40, 1, 6]])
def test_per_sequence_budgets_give_each_sequence_the_tree_of_its_own_budget(budgets, quantize):
    """A batch with a budget per sequence (the per-call budget of ``DraftInput.budget``) equals the per-node
    builder run with each sequence's own budget; the builder expands no more levels and no wider a frontier than
    the largest budget needs."""
    vocab, roots, depth, topk = 12, [3, 7, 0, 5], 4, 3
    expands = [_random_expand(seed + 10, vocab, quantize) for seed in range(len(roots))]
    reference = drive_batch([best_first_steps(r, b, depth, topk) for r, b in zip(roots, budgets, strict=True)],
                            lambda reqs: [None if r is None else e(r) for e, r in zip(expands, reqs, strict=True)])
    trees, scores = _batch_trees(roots, expands, budgets, depth, topk)
    for (ref_tree, ref_scores), tree, score in zip(reference, trees, scores, strict=True):
        assert torch.equal(tree.tokens, ref_tree.tokens) and torch.equal(tree.parents, ref_tree.parents)
        torch.testing.assert_close(score, ref_scores, rtol=0, atol=0)
    small = BestFirstBatch(torch.tensor(roots), [min(b, 3) for b in budgets], depth, topk)
    assert small.levels == min(depth, max(min(b, 3) for b in budgets) - 1) and small.width <= 2
    with pytest.raises(ValueError, match="budget >= 1"):
        BestFirstBatch(torch.tensor(roots), [2, 0, 1, 1], depth, topk)


def test_a_draft_vocabulary_maps_ranks_to_target_ids_and_keeps_the_tree_invariants():
    """Scoring only a draft vocabulary equals the full vocabulary with ``-inf`` outside it."""
    vocab, vocab_ids = 20, torch.tensor([1, 4, 5, 9, 13, 17, 19])
    expand = _random_expand(5, vocab, False)
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[vocab_ids] = False

    def restricted(paths):
        return expand(paths).masked_fill(outside, float("-inf")).log_softmax(-1)

    [(ref, ref_scores)] = drive_batch([best_first_steps(2, 10, 3, 3)], lambda reqs: [restricted(reqs[0])])
    trees, scores = _batch_trees([2], [restricted], 10, 3, 3, vocab_ids)
    assert torch.equal(trees[0].tokens, ref.tokens) and torch.equal(trees[0].parents, ref.parents)
    torch.testing.assert_close(scores[0], ref_scores)
    assert set(trees[0].tokens[1:].tolist()) <= set(vocab_ids.tolist())
    assert bool((trees[0].parents[1:] < torch.arange(1, trees[0].num_nodes)).all())
    assert bool((trees[0].depth[1:] >= trees[0].depth[trees[0].parents[1:]] + 1).all())


def test_step_after_the_last_level_is_refused():
    builder = BestFirstBatch(torch.tensor([1]), 4, 1, 2)
    builder.step(torch.tensor([[[-0.1, -2.0]]]), torch.tensor([[[5, 6]]]))
    assert not builder.more
    with pytest.raises(RuntimeError, match="complete"):
        builder.step(torch.tensor([[[-0.1, -2.0]]]), torch.tensor([[[5, 6]]]))
