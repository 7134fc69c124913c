"""The tensor drafting paths propose exactly what the previous per-node paths proposed (kept as the baseline in
experiments/draft_cost.py): EAGLE best-first trees and greedy chains, Medusa best-first and static trees, with and
without a draft vocabulary, for a batch of three sequences through the engine (so the states, caches and tree
offsets are the real ones). Same trees at every step, same outputs, equal to autoregressive decoding."""

import importlib.util
from pathlib import Path

import pytest
import torch

from specdec.draft_vocab import frequent_tokens
from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.engine import SpeculativeEngine
from specdec.target import TargetModel

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location(
    "draft_cost", Path(__file__).resolve().parents[1] / "experiments" / "draft_cost.py")
draft_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draft_cost)


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=7), split_gemv=False)


@pytest.fixture(scope="module")
def prompts():
    return [torch.randint(0, 64, (5 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]


def _drafter(target, kind, vocab_ids, seed):
    torch.manual_seed(seed)  # the same random weights for both paths
    if kind.startswith("eagle"):
        base = EagleConfig.from_target(target)
        size = 0 if vocab_ids is None else vocab_ids.numel()
        head = EagleHead(EagleConfig(base.hidden_size, base.vocab_size, base.layer_config, size), target, vocab_ids)
        for p in head.parameters():  # an untrained head's outputs are near-uniform: make them decisive
            p.data.normal_(0, 0.1)
        head.fc.weight.data[:, base.hidden_size:] *= 10  # ... and dependent on the input feature, not only the token
        shape = {"tree": "dynamic", "budget": 16, "topk": 3} if kind == "eagle-dynamic" else {"tree": "chain"}
        return EagleDrafter(head, depth=4, num_blocks=96, block_size=4, **shape)
    lm_head = target.model.get_output_embeddings()
    config = MedusaConfig(32, 64, num_heads=3, share_lm_head=True,
                          draft_vocab_size=0 if vocab_ids is None else vocab_ids.numel())
    heads = MedusaHeads(config, lm_head, vocab_ids).to(target.dtype)
    for p in heads.parameters():
        p.data.normal_(0, 0.3)
    return MedusaDrafter(heads, budget=9, topk=3) if kind == "medusa-dynamic" else MedusaDrafter(heads)


@pytest.mark.parametrize("vocab", ["full", "draft-vocab"])
@pytest.mark.parametrize("kind", ["eagle-dynamic", "eagle-chain", "medusa-dynamic", "medusa-static"])
def test_tensor_paths_propose_the_same_trees_as_the_per_node_paths(target, prompts, kind, vocab):
    ar = SpeculativeEngine(target, target.new_cache(96, 4)).generate_batch(prompts, 10)
    vocab_ids = None if vocab == "full" else frequent_tokens([r.tokens for r in ar], 12, 64)
    runs = []
    for variant in ("new", "per-node"):
        drafter = _drafter(target, kind, vocab_ids, seed=1)
        if variant == "per-node":
            drafter = draft_cost.per_node(drafter)
        timed = draft_cost.Timed(drafter)
        results = SpeculativeEngine(target, target.new_cache(96, 4), drafter, max_tree_nodes=32).generate_batch(
            prompts, 10)
        runs.append((timed.trees, [r.tokens for r in results], sum(r.stats.steps for r in results)))
    (new_trees, new_out, _), (old_trees, old_out, _) = runs
    assert len(new_trees) >= 3 * 3 and any(len(tokens) > 1 for tokens, _ in new_trees)
    assert new_trees == old_trees
    assert new_out == old_out == [r.tokens for r in ar]
