"""Trace-replay simulator: at temperature 0 it reproduces the real engine's statistics exactly (tiny float64 Llama)."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.research.sim_estimate import estimate_replay, node_acceptance
from specdec.research.simulate import TraceTooShort, replay, summarize_replay
from specdec.research.trace import Trace, record_trace
from specdec.sampling import SamplingParams
from specdec.target import TargetModel
from specdec.tree import TokenTree

MAX_NEW = 20
PROMPTS = [[5, 9, 14, 3, 5, 9, 14, 3, 5, 9], [40, 2, 33, 40, 2, 33, 17, 40, 2]]


pytestmark = pytest.mark.usefixtures("one_thread")


class OracleDrafter:
    """Knows the recorded trajectories; proposes random trees that hold the true continuation up to a random depth,
    a wrong token below it, and random siblings. Deterministic in the history (seeded by its length)."""

    vocab_size = None
    needs_hidden = False

    def __init__(self, trajectories: list[list[int]], max_nodes: int = 12, seed: int = 0) -> None:
        self.trajectories, self.max_nodes, self.seed = trajectories, max_nodes, seed

    def propose(self, batch):
        return [Draft(self._tree(item.history.tolist())) for item in batch]

    def _tree(self, history: list[int]) -> TokenTree:
        gen = torch.Generator().manual_seed(self.seed * 1000 + len(history))
        [truth] = [t[len(history) :] for t in self.trajectories if t[: len(history)] == history]
        right = int(torch.randint(0, 6, (), generator=gen))
        spine = truth[:right] + [int(torch.randint(0, 64, (), generator=gen))]
        tokens, parents = [history[-1]], [-1]
        for tok in spine:  # the spine: true tokens, then one random one
            tokens.append(tok)
            parents.append(len(tokens) - 2)
        while len(tokens) < self.max_nodes:  # random siblings anywhere (a true token first among them at random)
            parent = int(torch.randint(0, len(tokens), (), generator=gen))
            tokens.append(int(torch.randint(0, 64, (), generator=gen)))
            parents.append(parent)
        order = sorted(range(len(tokens)), key=lambda i: (i != 0, _depth(parents, i), i))
        where = {old: new for new, old in enumerate(order)}
        return TokenTree(torch.tensor([tokens[i] for i in order]),
                         torch.tensor([-1 if parents[i] < 0 else where[parents[i]] for i in order]))

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


def _depth(parents: list[int], i: int) -> int:
    d = 0
    while parents[i] >= 0:
        i, d = parents[i], d + 1
    return d


@pytest.fixture(scope="module")
def setup(tiny_model):
    target = TargetModel(tiny_model, split_gemv=False)
    probe = SpeculativeEngine(target, target.new_cache(16, 16), None, max_tree_nodes=1).generate(PROMPTS[0], MAX_NEW)
    eos = [probe.tokens[MAX_NEW // 2]]  # a token the first prompt emits mid-way: its run stops at EOS
    trace = record_trace(target, PROMPTS, MAX_NEW, eos, ["a", "b"], lookahead=8, hidden_dtype=target.dtype)
    return target, trace, eos


def _drafter(name: str, target: TargetModel, trace: Trace):
    torch.manual_seed(3)
    if name == "oracle":
        return OracleDrafter([p.tokens.tolist() for p in trace.prompts])
    drafter = build_drafter(DrafterSpec.parse(name), target)
    if name.startswith("medusa"):  # untrained heads copy the LM head; random residual blocks make them disagree
        with torch.no_grad():
            for prm in drafter.heads.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
    return drafter


class TreeLog:
    """Protocol wrapper logging every proposed tree (tokens, parents): equal logs mean the drafter saw the same
    histories and hidden states in both runs."""

    def __init__(self, inner) -> None:
        self.inner, self.vocab_size, self.needs_hidden = inner, inner.vocab_size, inner.needs_hidden
        self.trees: list[tuple[list[int], list[int]]] = []

    def propose(self, batch):
        drafts = self.inner.propose(batch)
        self.trees += [(d.tree.tokens.tolist(), d.tree.parents.tolist()) for d in drafts]
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id):
        self.inner.release(seq_id)


@pytest.mark.parametrize("name", ["ngram", "ngram:depth=3,budget=6", "medusa:tree=dynamic,budget=6",
                                  "medusa:tree=static", "eagle:tree=dynamic,budget=7,depth=3",
                                  "eagle:tree=chain,depth=3", "oracle"])
def test_replay_statistics_and_proposed_trees_equal_the_engines_exactly(setup, name):
    target, trace, eos = setup
    drafter = _drafter(name, target, trace)
    real_log, sim_log = TreeLog(drafter), TreeLog(drafter)
    engine = SpeculativeEngine(target, target.new_cache(16, 16), real_log, eos, max_tree_nodes=32)
    real = [engine.generate(p, MAX_NEW) for p in PROMPTS]
    sim = replay(trace, sim_log, max_tree_nodes=32, hidden_dtype=target.dtype)
    assert sim_log.trees == real_log.trees and len(real_log.trees) == sum(r.stats.steps for r in real)
    for r, s in zip(real, sim, strict=True):
        assert s.tokens == r.tokens and s.stop_reason == r.stop_reason
        for key in ("steps", "step_tokens", "tree_nodes", "depth_tried", "depth_accepted", "accepted_hist"):
            assert getattr(s.stats, key) == getattr(r.stats, key), key
    if name == "oracle":  # random model drafters may accept nothing on a random target; the oracle always does
        assert sum(r.stats.step_tokens - r.stats.steps for r in real) > 10


@pytest.mark.parametrize("name", ["ngram", "eagle:tree=dynamic,budget=7,depth=3", "medusa:tree=dynamic,budget=6",
                                  "oracle"])
def test_lockstep_batched_replay_gives_each_prompt_the_same_result_as_one_at_a_time(setup, name):
    target, trace, _ = setup
    one = replay(trace, _drafter(name, target, trace), max_tree_nodes=32, hidden_dtype=target.dtype)
    drafter = TreeLog(_drafter(name, target, trace))
    many = replay(trace, drafter, max_tree_nodes=32, hidden_dtype=target.dtype, batch=len(PROMPTS))
    assert len(drafter.trees) == sum(r.stats.steps for r in one)
    for a, b in zip(one, many, strict=True):
        assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
        assert [(s.context, s.nodes, s.depth, s.accepted) for s in a.steps] == \
            [(s.context, s.nodes, s.depth, s.accepted) for s in b.steps]
    with pytest.raises(ValueError, match="batch must be >= 1"):
        replay(trace, None, batch=0)


def test_trace_records_the_eos_stop_and_round_trips_through_a_file(setup, tmp_path):
    _, trace, eos = setup
    assert trace.prompts[0].stop == MAX_NEW // 2 + 1 and int(trace.prompts[0].tokens[-MAX_NEW - 8 :][MAX_NEW // 2]) \
        == eos[0]
    assert all(p.argmax_mismatches == 0 for p in trace.prompts)
    trace.save(tmp_path / "t.pt")
    again = Trace.load(tmp_path / "t.pt")
    assert again.meta == trace.meta and torch.equal(again.prompts[1].hidden, trace.prompts[1].hidden)


class ChainOracle(OracleDrafter):
    """Proposes the next five recorded tokens as a chain (all of them right)."""

    def _tree(self, history):
        [truth] = [t[len(history) :] for t in self.trajectories if t[: len(history)] == history]
        return TokenTree.chain([history[-1], *truth[:5]])


def test_a_tree_deeper_than_the_recorded_lookahead_is_an_error_naming_the_limit(setup):
    target = setup[0]
    short = record_trace(target, PROMPTS[:1], 4, (), lookahead=1, hidden_dtype=target.dtype)
    with pytest.raises(TraceTooShort, match="lookahead >= the deepest tree"):
        replay(short, ChainOracle([short.prompts[0].tokens.tolist()]))


def test_summary_has_the_bench_fields_and_per_category_tau(setup):
    target, trace, _ = setup
    results = replay(trace, _drafter("ngram", target, trace))
    run = summarize_replay("ngram", results)
    json.dumps(run)
    assert {"tau", "acceptance_by_depth", "accepted_length_hist", "n_prompts", "per_category"} <= set(run)
    assert set(run["per_category"]) == {"a", "b"} and run["estimate"] is False and run["predicted_speedup"] is None


def test_node_acceptance_matches_the_rejection_rule_on_a_two_sibling_tree():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    tree = TokenTree(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0]))
    cond, reach = node_acceptance(tree, None, [p])
    # one-hot proposals: child x is accepted with p(x) overall (0.3, then 0.2), whatever the sibling order
    torch.testing.assert_close(reach, torch.tensor([1.0, 0.3, 0.2], dtype=torch.float64))
    torch.testing.assert_close(cond[2], torch.tensor(0.2 / 0.7, dtype=torch.float64))
    q = torch.tensor([[0, 0, 0], [0.2, 0.6, 0.2], [0.2, 0.6, 0.2]], dtype=torch.float64)
    _, reach_q = node_acceptance(tree, q, [p])
    assert float(reach_q[1]) == pytest.approx(0.5)  # min(1, 0.3 / 0.6)


def test_the_temperature_estimate_is_labelled_and_tends_to_the_exact_replay_as_temperature_goes_to_zero(setup):
    target, trace, _ = setup
    exact = summarize_replay("oracle", replay(trace, _drafter("oracle", target, trace)))
    cold, warm = (summarize_replay("oracle", estimate_replay(trace, _drafter("oracle", target, trace),
                                                             SamplingParams(t, seed=0)), estimate=True)
                  for t in (1e-6, 1.0))
    assert cold["estimate"] is True and exact["tau"] > 1.5
    assert cold["tau"] == pytest.approx(exact["tau"], abs=1e-3)
    assert cold["acceptance_by_depth"] == pytest.approx(exact["acceptance_by_depth"], abs=1e-3)
    assert warm["tau"] < exact["tau"] - 0.3  # the flat random target rarely samples the recorded argmax at T = 1


def test_the_command_module_parses_record_and_replay_like_the_cli_would():
    import argparse

    from specdec.app.cmd_simulate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rec = parser.parse_args(["record", "--out", "t.pt", "--max-new-tokens", "48", "--limit", "4"])
    assert (rec.action, rec.max_new_tokens, rec.lookahead, rec.limit) == ("record", 48, 16, 4)
    rep = parser.parse_args(["replay", "t.pt", "--drafter", "ngram", "eagle:tree=dynamic", "--budget", "4", "8"])
    assert rep.drafter == ["ngram", "eagle:tree=dynamic"] and rep.budget == [4, 8] and rep.temperature == 0.0


@pytest.fixture(scope="module")
def deep_setup():
    """A 7-layer float64 target (EAGLE-3 fuses layers 2, L//2, L-3) and a trace with those layers recorded."""
    from specdec.drafters.eagle3 import fused_layers

    from .conftest import tiny_llama

    target = TargetModel(tiny_llama(layers=7, seed=5, dtype=torch.float64), split_gemv=False)
    trace = record_trace(target, PROMPTS, MAX_NEW, (), lookahead=8, hidden_dtype=target.dtype,
                         feature_layers=fused_layers(target.num_layers))
    return target, trace


def test_eagle3_replays_from_the_recorded_fused_layers_exactly_as_the_engine_runs(deep_setup, tmp_path):
    target, trace = deep_setup
    torch.manual_seed(4)
    drafter = TreeLog(build_drafter(DrafterSpec.parse("eagle3:tree=dynamic,budget=7,depth=3"), target))
    drafter.feature_layers = drafter.inner.feature_layers
    engine = SpeculativeEngine(target, target.new_cache(16, 16), drafter, max_tree_nodes=32)
    real = [engine.generate(p, MAX_NEW) for p in PROMPTS]
    engine_trees, drafter.trees = drafter.trees, []
    trace.save(tmp_path / "t.pt")
    sim = replay(Trace.load(tmp_path / "t.pt"), drafter, max_tree_nodes=32, hidden_dtype=target.dtype, batch=2)
    assert sorted(drafter.trees) == sorted(engine_trees) and len(engine_trees) > 10
    for r, s in zip(real, sim, strict=True):
        assert s.tokens == r.tokens and s.stats.step_tokens == r.stats.step_tokens
    plain = Trace(trace.prompts, {**trace.meta, "feature_layers": None})
    with pytest.raises(ValueError, match="record with --feature-layers 2,3,4"):
        replay(plain, drafter)


def test_replays_auto_budget_is_set_up_as_tree_budget_auto_sets_it(setup, tmp_path, monkeypatch):
    """``replay --auto-budget`` must score what ``--tree-budget auto`` runs: n-gram (a copying drafter) with a
    tracker per sequence (it once wrapped every drafter with the pooled tracker alone)."""
    import argparse

    from specdec.app.cmd_simulate import add_arguments
    from specdec.research import auto_budget as auto_module
    from specdec.research import simulate_cli
    from specdec.research.cost_model import CostModel

    target, trace, eos = setup
    trace.save(tmp_path / "t.pt")
    CostModel((1.0, 0.2, 0.0, 0.0)).save(tmp_path / "cost.json")
    monkeypatch.setattr(simulate_cli, "_load_target", lambda model: (target, None, eos))
    built = []
    real_init = auto_module.AutoBudgetDrafter.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self.per_sequence)

    monkeypatch.setattr(auto_module.AutoBudgetDrafter, "__init__", spy)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["replay", str(tmp_path / "t.pt"), "--drafter", "ngram", "--cost",
                              str(tmp_path / "cost.json"), "--auto-budget", "--out", str(tmp_path / "r.json")])
    assert simulate_cli.run_command(args) == 0
    assert built == [auto_module.SEQUENCE_TRACKER]
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["ngram", "ngram+auto"]


def test_auto_against_the_best_fixed_budget_is_compared_category_by_category():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "auto_vs_fixed_by_category.py"
    spec = importlib.util.spec_from_file_location("auto_vs_fixed_by_category", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(a, b, overall):
        return {"predicted_speedup": overall, "per_category": {"a": {"predicted_speedup": a},
                                                               "b": {"predicted_speedup": b}}}

    runs = {"ngram": run(1.0, 2.0, 1.5), "ngram:budget=3": run(1.2, 1.8, 1.4), "ngram+auto": run(1.19, 1.9, 1.45)}
    got = module.compare(runs, "ngram")
    assert got["fixed"] == ["ngram", "ngram:budget=3"] and got["within"] == 1 and got["categories"] == 2
    assert got["worst"]["category"] == "b" and got["worst"]["relative"] == pytest.approx(-0.05)
    assert got["best_fixed_overall"] == 1.5 and got["default"] == 1.5 and got["auto"] == 1.45
    with pytest.raises(ValueError, match=r"ngram:store=x: need 'ngram:store=x\+auto'"):
        module.compare(runs, "ngram:store=x")
