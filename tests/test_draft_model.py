"""Draft-model and self-speculative drafters, and the shared tree builders."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.drafters import (
    DrafterSpec,
    DraftModelDrafter,
    MedusaDrafter,
    NgramDrafter,
    SelfSpeculativeDrafter,
    build_drafter,
)
from specdec.drafters.common import GrowingTree
from specdec.drafters.self_spec import truncated_view
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.sampling import SamplingParams
from specdec.target import TargetModel
from specdec.tree_builders import best_first_steps, best_first_tree, choices_tree, default_choices, drive_batch
from tests.conftest import inputs

from .conftest import assert_same_committed_kv, first_two_tokens_pvalue, tiny_llama

SHAPES = {"chain": "chain", "dynamic": "dynamic", "static": default_choices()}


@pytest.fixture(scope="module")
def deep_model():
    return tiny_llama(layers=4, seed=21)


@pytest.fixture(scope="module")
def deep_target(deep_model):
    return TargetModel(deep_model)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["self", "other", "itself"])
def test_greedy_output_equals_autoregressive(deep_model, deep_target, shape, kind):
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(len(shape) + len(kind)))
    cache = deep_target.new_cache(96, 4)
    ar = SpeculativeEngine(deep_target, cache).generate(prompt, 24)
    options = {"tree": SHAPES[shape], "depth": 3, "budget": 8, "topk": 2, "num_blocks": 64, "block_size": 4}
    if kind == "self":
        drafter = SelfSpeculativeDrafter(deep_model, 2, **options)
    else:
        draft = deep_model if kind == "itself" else _noisy_copy(deep_model, 0.1)
        drafter = DraftModelDrafter(draft, **options)
    spec = SpeculativeEngine(deep_target, cache, drafter, max_tree_nodes=16).generate(prompt, 24)
    assert spec.tokens == ar.tokens
    assert cache.allocator.num_free == 96 and drafter.cache.allocator.num_free == 64
    s = spec.stats
    if kind == "itself":  # a perfect drafter: every draft token accepted (chains), or nearly (trees)
        assert s.tau >= (4.0 if shape == "chain" else 2.5)
    else:  # drafters that know part of the answer: accepted, and rejected too
        assert s.tau > 1.1 and 0 < sum(s.depth_accepted) < sum(s.depth_tried)


def _noisy_copy(model, scale, seed=1):
    """Another model with the same tokenizer that agrees with ``model`` only part of the time: its weights
    plus Gaussian noise of ``scale`` times each tensor's standard deviation."""
    copy = tiny_llama(layers=model.config.num_hidden_layers, seed=21)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(copy.parameters(), model.parameters(), strict=True):
            p.copy_(q + scale * q.std() * torch.randn(q.shape, generator=gen, dtype=q.dtype))
    return copy


def test_draft_state_after_a_rejection_equals_a_fresh_drafter(deep_model):
    draft = tiny_llama(layers=2, seed=9)
    history = torch.randint(0, 64, (11,), generator=torch.Generator().manual_seed(1))
    drafter = DraftModelDrafter(draft, tree="chain", depth=4, num_blocks=32, block_size=4)
    [proposal] = drafter.propose(inputs([0], [history]))
    drafted = proposal.tree.tokens[1:].tolist()
    accepted = torch.tensor([drafted[0], (drafted[1] + 1) % 64])  # first draft accepted, second replaced (bonus)
    drafter.accept(0, accepted)
    history = torch.cat([history, accepted])
    [after] = drafter.propose(inputs([0], [history]))
    fresh = DraftModelDrafter(draft, tree="chain", depth=4, num_blocks=32, block_size=4)
    [fresh_proposal] = fresh.propose(inputs([7], [history]))
    assert after.tree.tokens.tolist() == fresh_proposal.tree.tokens.tolist()
    n = drafter.cache.num_tokens(drafter._seqs[0])
    assert n == fresh.cache.num_tokens(fresh._seqs[7]) == history.numel() - 1  # only real history is committed
    assert_same_committed_kv(drafter.cache, drafter._seqs[0], fresh.cache, fresh._seqs[7], n)
    drafter.release(0)
    fresh.release(7)
    assert drafter.cache.allocator.num_free == 32


def test_truncated_view_shares_weights_and_leaves_the_target_alone(deep_model):
    view = truncated_view(deep_model, 2)
    assert len(view.model.layers) == 2 and len(deep_model.model.layers) == 4
    assert view.model.layers[1] is deep_model.model.layers[1] and view.lm_head is deep_model.lm_head
    params = {p.data_ptr() for p in deep_model.parameters()}
    assert all(p.data_ptr() in params for p in view.parameters())
    with pytest.raises(ValueError, match=r"draft layers must be in \[1, 4\], got 5"):
        truncated_view(deep_model, 5)


def test_vocabulary_mismatch_is_refused(deep_target):
    drafter = DraftModelDrafter(tiny_llama(vocab=80, layers=1), num_blocks=8)
    with pytest.raises(ValueError, match="tokenizer mismatch: the drafter's vocabulary has 80 tokens"):
        SpeculativeEngine(deep_target, deep_target.new_cache(8, 4), drafter)


def test_specs_build_drafters(deep_target):
    assert isinstance(build_drafter(DrafterSpec.parse("self:layers=2,tree=dynamic,budget=6"), deep_target),
                      SelfSpeculativeDrafter)
    assert build_drafter(DrafterSpec.parse("medusa:heads=2,tree=chain"), deep_target).vocab_size == 64
    assert build_drafter(DrafterSpec.parse("eagle:tree=dynamic,budget=6"), deep_target).needs_hidden
    with pytest.raises(ValueError, match=r"option 'tree' of drafter 'eagle' must be one of \['chain', 'dynamic'\]"):
        DrafterSpec.parse("eagle:tree=static")
    with pytest.raises(ValueError, match="needs a model"):
        build_drafter(DrafterSpec.parse("draft-model"), deep_target)
    with pytest.raises(ValueError, match="option 'tree' of drafter 'self' must be one of .* got 'bush'"):
        DrafterSpec.parse("self:tree=bush")


def _small_vocab_drafters(target):
    return {
        "draft-model-chain": lambda: DraftModelDrafter(tiny_llama(vocab=8, layers=1, seed=12), tree="chain", depth=2,
                                                       num_blocks=1024),
        "self-chain": lambda: SelfSpeculativeDrafter(target.model, 1, tree="chain", depth=2, num_blocks=1024),
        "medusa-static": lambda: MedusaDrafter.untrained(target, num_heads=2, choices=[(0,), (1,), (0, 0)]),
        "ngram": lambda: NgramDrafter(min_ngram=1, max_nodes=8, prior_alpha=0.9),
    }


@pytest.mark.parametrize("name", ["draft-model-chain", "self-chain", "medusa-static", "ngram"])
def test_sampling_with_each_drafter_preserves_the_target_distribution(name):
    """First two tokens' joint vs the exact target: drafts with reported probabilities (sampled chains) or
    deterministic one-hot proposals (Medusa top-k, n-gram)."""
    target = TargetModel(tiny_llama(vocab=8, seed=11))
    drafter = _small_vocab_drafters(target)[name]()
    pvalue, accepted = first_two_tokens_pvalue(target, drafter, [1, 5, 2, 1, 5, 3], 2000, SamplingParams(1.0))
    assert pvalue > 1e-3
    assert accepted > 2000 // 20  # drafts were really accepted, so the rule was exercised


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.integers(0, 5), st.integers(1, 4), st.integers(0, 2**31))
def test_best_first_tree_respects_budget_and_depth(budget, depth, topk, seed):
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def expand(paths):
        calls.append(len(paths))
        return torch.randn(len(paths), 16, generator=gen).log_softmax(-1)

    tree, scores = best_first_tree(3, expand, budget, depth, topk)
    assert tree.num_nodes <= budget and (tree.max_depth <= depth)
    assert int(tree.tokens[0]) == 3 and scores.numel() == tree.num_nodes
    assert all(int(tree.parents[i]) < i for i in range(1, tree.num_nodes))
    assert all(c <= topk for c in calls)  # frontier width
    for i in range(1, tree.num_nodes):  # a child is never more likely than its parent
        assert scores[i] <= scores[int(tree.parents[i])] + 1e-12


def test_choices_tree_takes_each_nodes_ranked_children():
    table = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]]).log()

    def expand(paths):
        return torch.stack([table[len(p) % 2] for p in paths])

    tree = choices_tree(9, [(0,), (1,), (0, 0), (0, 1)], expand)
    assert tree.tokens.tolist() == [9, 1, 2, 0, 1] and tree.parents.tolist() == [-1, 0, 0, 1, 1]


def test_missing_checkpoint_is_a_clear_error(tmp_path, deep_target):
    with pytest.raises(ValueError, match="not a drafter checkpoint"):
        build_drafter(DrafterSpec.parse(f"medusa:path={tmp_path}"), deep_target)


class PerNodeDraftModel(DraftModelDrafter):
    """The previous dynamic path, kept as this test's oracle: the per-node builder (:func:`best_first_steps`)
    driven through ``drive_batch``, expanding requested paths with ``_forward_new``."""

    def _dynamic(self, dseqs, roots, root_logits, budgets):
        grown = [GrowingTree(r) for r in roots]
        scores = [{(): row.log_softmax(-1)} for row in root_logits]

        def expand_batch(requests):
            need = [i for i, r in enumerate(requests) if r is not None and any(p not in scores[i] for p in r)]
            for i in need:
                grown[i].add(requests[i])
            if need:
                for i, rows in zip(need, self._forward_new([dseqs[i] for i in need], [grown[i] for i in need]),
                                   strict=True):
                    paths = sorted(grown[i].index, key=grown[i].index.__getitem__)[-rows.shape[0]:]
                    scores[i].update(zip(paths, rows.log_softmax(-1), strict=True))
            return [None if r is None else torch.stack([scores[i][p] for p in r]) for i, r in enumerate(requests)]

        builders = [best_first_steps(r, b, self.depth, self.topk) for r, b in zip(roots, budgets, strict=True)]
        return [Draft(tree) for tree, _ in drive_batch(builders, expand_batch)]


class Trees:
    def __init__(self, inner):
        self.inner, self.vocab_size, self.needs_hidden, self.log = inner, inner.vocab_size, False, []

    def propose(self, batch):
        drafts = self.inner.propose(batch)
        self.log += [(d.tree.tokens.tolist(), d.tree.parents.tolist()) for d in drafts]
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id):
        self.inner.release(seq_id)


@pytest.mark.parametrize(("budget", "depth", "topk"), [(8, 3, 2), (12, 4, 3), (3, 4, 4)])
def test_batched_dynamic_trees_equal_the_per_node_builders(deep_model, deep_target, budget, depth, topk):
    """The tensor best-first path (one forward per level for the whole batch) proposes exactly the per-node
    builder's trees, step by step for a batch of three sequences through the engine."""
    prompts = [torch.randint(0, 64, (6 + i,), generator=torch.Generator().manual_seed(30 + i)) for i in range(3)]
    runs = []
    for cls in (DraftModelDrafter, PerNodeDraftModel):
        drafter = Trees(cls(_noisy_copy(deep_model, 0.2), tree="dynamic", depth=depth, budget=budget, topk=topk,
                            num_blocks=96, block_size=4))
        out = SpeculativeEngine(deep_target, deep_target.new_cache(96, 4), drafter, max_tree_nodes=16) \
            .generate_batch(prompts, 12)
        runs.append((drafter.log, [r.tokens for r in out]))
    assert runs[0] == runs[1] and len(runs[0][0]) >= 9 and any(len(t) > 2 for t, _ in runs[0][0])
