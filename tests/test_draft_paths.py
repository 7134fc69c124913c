"""The tensor drafting paths propose exactly what the previous per-node paths proposed (kept as the baseline in
experiments/draft_cost.py): EAGLE best-first trees and greedy chains, Medusa best-first and static trees, with and
without a draft vocabulary, for a batch of three sequences through the engine (so the states, caches and tree
offsets are the real ones). Same trees at every step, same outputs, equal to autoregressive decoding."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from specdec.draft_vocab import frequent_tokens
from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from specdec.drafters.ngram import NgramDrafter
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


class CallBudget:
    """Proposes through ``inner`` twice per step, with the drafter's own budget and with a per-sequence cap
    (``DraftInput.budget``) that changes every step, and hands the capped trees to the engine."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.needs_hidden = inner, inner.vocab_size, inner.needs_hidden
        self.pairs, self.calls = [], 0

    def propose(self, batch):
        full = self.inner.propose(batch)
        caps = [1 + (self.calls + item.seq_id) % 6 for item in batch]  # 1..6 nodes
        self.calls += 1
        capped = self.inner.propose([dataclasses.replace(item, budget=c) for item, c in zip(batch, caps, strict=True)])
        self.pairs += list(zip(full, capped, caps, strict=True))
        return capped

    def accept(self, seq_id, tokens, hidden=None):
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id):
        self.inner.release(seq_id)


def _paths(tree):
    tokens, parents, out = tree.tokens.tolist(), tree.parents.tolist(), [()]
    for i in range(1, len(tokens)):
        out.append(out[parents[i]] + (tokens[i],))
    return set(out[1:])


@pytest.mark.parametrize("kind", ["eagle-dynamic", "medusa-dynamic", "ngram"])
def test_a_per_call_budget_caps_the_tree_to_the_best_nodes_of_the_full_one_and_stays_lossless(target, prompts, kind):
    """``DraftInput.budget`` (chosen by ``--tree-budget auto`` before drafting): a best-first drafter's capped tree
    is exactly the full tree's ``budget - 1`` best nodes (as the builder's ranking keeps them), n-gram's a subset
    of its full tree within the cap; greedy output stays equal to autoregressive decoding."""
    ar = SpeculativeEngine(target, target.new_cache(96, 4)).generate_batch(prompts, 12)
    repeated = [p + p[:4] + p for p in prompts]  # so n-gram finds matches
    inner = NgramDrafter(max_depth=4, max_nodes=12) if kind == "ngram" else _drafter(target, kind, None, seed=1)
    drafter = CallBudget(inner)
    engine = SpeculativeEngine(target, target.new_cache(96, 4), drafter, max_tree_nodes=32)
    want = ar if kind != "ngram" else SpeculativeEngine(target, target.new_cache(96, 4)).generate_batch(repeated, 12)
    results = engine.generate_batch(repeated if kind == "ngram" else prompts, 12)
    assert [r.tokens for r in results] == [r.tokens for r in want]
    assert any(f.tree.num_nodes > cap for f, _, cap in drafter.pairs)  # the caps did bind
    for full, capped, cap in drafter.pairs:
        assert capped.tree.num_nodes <= cap and _paths(capped.tree) <= _paths(full.tree)
        if kind != "ngram":
            assert capped.tree.num_nodes == min(cap, full.tree.num_nodes)


def test_the_unpacked_baseline_restores_plain_linears_on_the_same_parameters():
    """``experiments/draft_cost.py --baseline unpacked``: the pre-session-12 head (plain ``nn.Linear``s, EAGLE-3's
    LM head still packed) on the very same Parameters, drafting under exact kernels."""
    from specdec.drafters.eagle3 import Eagle3Drafter, Eagle3Head
    from specdec.packed_linear import PackedLinear, packing_works

    float32 = TargetModel(tiny_llama(seed=7, dtype=torch.float32, layers=8))
    drafter = Eagle3Drafter(Eagle3Head.untrained(float32).eval(), budget=4, backend=float32.backend)
    params = {id(p) for p in drafter.head.parameters()}
    packed = [m for m in drafter.head.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 9 or not packing_works()  # fc, q, k, v, o, gate, up, down, lm_head
    old = draft_cost.unpacked(drafter)
    kinds = {name: type(m) for name, m in old.head.named_modules() if name.endswith(("proj", "fc", "lm_head"))}
    assert kinds.pop("lm_head") is PackedLinear and set(kinds.values()) == {torch.nn.Linear}
    assert {id(p) for p in old.head.parameters()} == params
    with draft_cost.draft_precision("float32"):
        assert draft_cost.os.environ["SPECDEC_DRAFT_PRECISION"] == "float32"
