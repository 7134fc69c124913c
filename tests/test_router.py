"""The server's router with drafters that read different target features: EAGLE-3's fused layers and EAGLE's last
hidden state share one forward (the union of their layers), each drafter receiving its own columns; wrappers
(hybrid, auto budget) pass their inner drafter's layers on."""

import pytest
import torch

from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.sampling import SamplingParams
from specdec.server.router import RoutingDrafter
from specdec.target import TargetModel

from .conftest import tiny_llama

PROMPTS = [[5, 9, 3, 17, 5, 9, 3, 11], [7, 2, 7, 2, 8, 1, 30, 4, 12]]
NEW = 16


class Recorder:
    """A hidden-state drafter that proposes the root alone and records what ``accept`` received."""

    vocab_size = None
    needs_hidden = True

    def __init__(self, layers=None):
        if layers is not None:
            self.feature_layers = layers
        self.seen = []

    def propose(self, batch):
        from specdec.interfaces import Draft
        from specdec.tree import TokenTree

        return [Draft(TokenTree.chain(item.history[-1:])) for item in batch]

    def accept(self, seq_id, tokens, hidden=None):
        self.seen.append(hidden)

    def release(self, seq_id):
        pass


def test_each_drafter_gets_its_own_columns_of_the_union_of_layers():
    fused, last = Recorder((2, 5)), Recorder()
    router = RoutingDrafter({"e3": fused, "e1": last, "none": None}, {0: "e3", 1: "e1", 2: "none"}.__getitem__, 64)
    assert router.needs_hidden and router.feature_layers == (2, 5, -1)
    hidden = torch.arange(3)[None, :, None].expand(4, 3, 8).flatten(1).float()  # block j holds the value j
    for seq in (0, 1, 2):
        router.accept(seq, torch.tensor([1]), hidden)
    assert fused.seen[0].shape == (4, 16) and set(fused.seen[0][:, :8].unique().tolist()) == {0.0}
    assert set(fused.seen[0][:, 8:].unique().tolist()) == {1.0}
    assert last.seen[0].shape == (4, 8) and set(last.seen[0].unique().tolist()) == {2.0}
    # one kind of feature: the engine's default (last hidden state) or the drafter's own layers, passed whole
    assert RoutingDrafter({"a": Recorder(), "b": None}, lambda s: "a", 64).feature_layers is None
    only = RoutingDrafter({"a": Recorder((2, 5))}, lambda s: "a", 64)
    assert only.feature_layers == (2, 5)
    only.accept(0, torch.tensor([1]), hidden[:, :16])
    assert torch.equal(only.drafters["a"].seen[0], hidden[:, :16])


@pytest.fixture(scope="module")
def deep_target():
    return TargetModel(tiny_llama(layers=7, seed=5, dtype=torch.float64), split_gemv=False)


def _run(target, drafter, prompts):
    engine = SpeculativeEngine(target, target.new_cache(32, 16), drafter, max_tree_nodes=16)
    results = engine.generate_batch(prompts, NEW)
    assert engine.cache.allocator.num_free == 32
    return [(r.tokens, r.stats.step_tokens, r.stats.steps) for r in results]


def test_eagle3_and_eagle_behind_one_router_draft_as_they_do_alone(deep_target):
    specs = {"e3": "eagle3:tree=dynamic,budget=6,depth=3", "e1": "eagle:tree=dynamic,budget=6,depth=3"}
    built, alone = {}, {}
    for name, spec in specs.items():  # the same (seeded) weights behind the router and alone
        torch.manual_seed(0)
        built[name] = build_drafter(DrafterSpec.parse(spec), deep_target)
        torch.manual_seed(0)
        alone[name] = _run(deep_target, build_drafter(DrafterSpec.parse(spec), deep_target), PROMPTS[:1])[0]
    engine = None

    def resolve(seq):  # as the server's loop does: the running request that holds the sequence
        req = next(r for r in engine.scheduler.running if r.seq_id == seq)
        return names[req.request_id]

    router = RoutingDrafter(built, resolve, deep_target.vocab_size)
    assert router.feature_layers is not None and router.feature_layers[-1] == -1  # EAGLE-3's three, then -1
    engine = SpeculativeEngine(deep_target, deep_target.new_cache(32, 16), router, max_tree_nodes=16)
    names = {engine.add_request(PROMPTS[0], SamplingParams(0.0, max_new_tokens=NEW)): "e3",
             engine.add_request(PROMPTS[0], SamplingParams(0.0, max_new_tokens=NEW)): "e1"}
    tokens, stats = {n: [] for n in specs}, {}
    while engine.has_work():
        for out in engine.step():
            tokens[names[out.request_id]] += out.new_tokens
            if out.finished:
                assert out.error is None, out.error
                stats[names[out.request_id]] = out.stats
    for name, want in alone.items():
        assert (tokens[name], stats[name].step_tokens, stats[name].steps) == want, name
    assert engine.cache.allocator.num_free == 32


@pytest.mark.parametrize("wrapper", ["hybrid", "auto"])
def test_wrappers_pass_eagle3_feature_layers_on_and_stay_lossless(deep_target, wrapper):
    from specdec.drafters.hybrid import HybridDrafter
    from specdec.research.auto_budget import AutoBudgetDrafter
    from specdec.research.cost_model import CostModel

    inner = build_drafter(DrafterSpec.parse("eagle3:tree=dynamic,budget=6,depth=3"), deep_target)
    drafter = (HybridDrafter(inner, budget=6) if wrapper == "hybrid"
               else AutoBudgetDrafter(inner, CostModel((1e-3, 1e-5, 0.0, 0.0)), max_nodes=16))
    assert drafter.feature_layers == inner.feature_layers
    plain = _run(deep_target, None, PROMPTS)
    spec = _run(deep_target, drafter, PROMPTS)
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
