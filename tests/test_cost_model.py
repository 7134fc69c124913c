"""Cost model, tree-size chooser, online acceptance tracker and the auto-budget drafter adapter."""

from __future__ import annotations

import time

import pytest
import torch

from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft, DraftInput
from specdec.research.auto_budget import SEQUENCE_TRACKER, AcceptanceTracker, AutoBudgetDrafter, prune
from specdec.research.cost_measure import (
    fit_accept,
    measure_accept,
    measure_draft,
    measure_prefill,
    measure_step,
    measure_verify,
)
from specdec.research.cost_model import (
    CostModel,
    choose_size,
    draft_levels,
    fit_draft,
    fit_prefill,
    fit_verify,
)
from specdec.research.simulate import replay
from specdec.research.trace import record_trace
from specdec.target import TargetModel
from specdec.tree import TokenTree
from tests.test_simulate import OracleDrafter

PROMPT = [5, 9, 14, 3, 5, 9, 14, 3, 5, 9]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.7, 0.9, 0.97])
@pytest.mark.parametrize("b", [0.02, 0.1, 0.4])
def test_the_chooser_picks_the_analytic_optimum_of_a_geometric_chain_with_linear_cost(alpha, b):
    """Node ``k`` (depth k) is accepted with ``alpha ** k``; a step costs ``1 + b (N - 1)``. Adding node ``N``
    raises E/c iff ``alpha ** N * c(N) > b * E(N)`` (E, c of the N-node tree), a condition that holds up to N* and
    fails after, so N* = the first N where it fails."""
    values = [alpha**k for k in range(1, 200)]

    def cost(n):
        return 1.0 + b * (n - 1)

    expected, gained = 1, 1.0
    while alpha**expected * cost(expected) > b * gained:
        gained += alpha**expected
        expected += 1
    assert choose_size(values, cost) == expected


def test_the_chooser_takes_all_nodes_or_none_for_constant_values_as_the_closed_form_says():
    """Equal values ``p`` and cost ``a + b N``: E/c grows with N iff ``p (a + b) > b``."""
    assert choose_size([0.5] * 9, lambda n: 1.0 + 0.2 * n) == 10  # 0.5 * 1.2 > 0.2
    assert choose_size([0.1] * 9, lambda n: 1.0 + 0.2 * n) == 1  # 0.1 * 1.2 < 0.2
    assert choose_size([0.5] * 9, lambda n: 1.0 + 0.2 * n, max_nodes=4) == 4
    # the hand-worked example: rates 1/1, 1.5/1.1, 1.75/1.2, 1.875/1.3 -> N = 3
    assert choose_size([0.5, 0.25, 0.125], lambda n: 1.0 + 0.1 * (n - 1)) == 3


def test_fits_recover_the_generating_coefficients_and_the_model_round_trips(tmp_path):
    coef = (2e-3, 1e-4, 3e-6, 1e-8)
    grid = [(n, c, coef[0] + coef[1] * n + coef[2] * c + coef[3] * n * c) for n in (1, 4, 16) for c in (64, 512)]
    assert fit_verify(grid) == pytest.approx(coef, rel=1e-6, abs=1e-12)
    assert fit_draft([(1, 0.011), (2, 0.021), (4, 0.041)]) == pytest.approx((0.001, 0.01))
    cost = CostModel(fit_verify(grid), {"eagle": (0.001, 0.01)}, grid)
    cost.save(tmp_path / "c.json")
    again = CostModel.load(tmp_path / "c.json")
    assert again.verify_time(8, 100) == pytest.approx(cost.verify_time(8, 100))
    assert again.draft_time(3, drafter="eagle") == pytest.approx(0.031) and again.draft_time(3, measured=0.5) == 0.5
    with pytest.raises(ValueError, match="needs >= 2 tree sizes"):
        fit_verify(grid[:1])
    assert fit_prefill([(32, 0.012), (128, 0.036), (512, 0.132)]) == pytest.approx((0.004, 2.5e-4))
    with pytest.raises(ValueError, match="needs >= 2 prompt lengths"):
        fit_prefill([(32, 0.01), (32, 0.02)])
    cost.prefill_coef = (0.004, 2.5e-4)
    cost.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json").prefill_time(100) == pytest.approx(0.029)
    assert again.prefill_time(100) == 0.0  # calibrated without prefill timings
    with pytest.raises(ValueError, match="cost-model file not found"):
        CostModel.load(tmp_path / "missing.json")


def test_the_tracker_learns_per_depth_rates_and_is_calibrated_on_stationary_data():
    gen = torch.Generator().manual_seed(0)
    truth = {1: 0.8, 2: 0.5, 3: 0.2}
    tracker = AcceptanceTracker(forget=1.0)
    for _ in range(3000):
        for d, r in truth.items():
            tracker.observe(d, 0, bool(torch.rand((), generator=gen) < r))
    for d, r in truth.items():  # 3000 Bernoulli draws: standard error <= 0.0092, so 0.03 is > 3 sigma
        assert tracker.rate(d, 0) == pytest.approx(r, abs=0.03)
    for cells in tracker.reliability().values():  # predictions settle near the truth, outcomes match them
        big = max(cells, key=lambda c: c[2])
        assert big[0] == pytest.approx(big[1], abs=0.04)


def test_the_reliability_plot_is_written_as_a_png(tmp_path):
    tracker = AcceptanceTracker()
    for i in range(50):
        tracker.observe(1 + i % 3, 0, i % 2 == 0)
    tracker.plot(str(tmp_path / "rel.png"))
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracker_update_counts_the_tried_children_up_to_the_accepted_one():
    tree = TokenTree(torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 0, 2]))
    tracker = AcceptanceTracker()
    tracker.update(tree, [2, 9])  # child rank 0 rejected, rank 1 accepted, then its child rejected
    assert [(d, a) for d, _, a in tracker.log] == [(1, False), (1, True), (2, False)]


def test_prune_keeps_an_ancestor_closed_subtree_in_node_order():
    tree = TokenTree(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([-1, 0, 0, 1, 3]))
    probs = torch.eye(5)
    small = prune(Draft(tree, probs), torch.tensor([0, 1, 3]))
    assert small.tree.tokens.tolist() == [0, 1, 3] and small.tree.parents.tolist() == [-1, 0, 1]
    assert torch.equal(small.probs, probs[[0, 1, 3]])


@pytest.fixture(scope="module")
def tiny_target(tiny_model):
    return TargetModel(tiny_model, split_gemv=False)


def test_calibration_measures_a_grid_and_draft_timings_on_the_tiny_model(tiny_target):
    grid = measure_verify(tiny_target, sizes=(1, 4), contexts=(8, 24), repeats=1)
    assert [(n, c) for n, c, _ in grid] == [(1, 8), (4, 8), (1, 24), (4, 24)] and all(s > 0 for _, _, s in grid)
    ngram = build_drafter(DrafterSpec.parse("ngram:depth=3"), tiny_target)
    samples = measure_draft(tiny_target, ngram, [torch.tensor(PROMPT)], 12)
    assert len(samples) >= 6 and all(s >= 0 for _, s in samples)
    assert {lv for lv, _ in samples} == {1, 2, 3}  # budgets 2, 3, 4 in turn: every level count of depth 3 timed


def test_the_step_grid_times_whole_engine_steps_that_each_verify_exactly_the_points_tree_size(tiny_target,
                                                                                               monkeypatch):
    forwards = []  # (query nodes, committed context) of every target forward
    run = tiny_target.run

    def spy(cache, batch, *args, **kwargs):
        forwards.append((batch.cu_q_host[-1], batch.context_lens_host[0]))
        return run(cache, batch, *args, **kwargs)

    monkeypatch.setattr(tiny_target, "run", spy)
    grid = measure_step(tiny_target, sizes=(1, 3, 5), contexts=(8, 24), repeats=2)
    assert [(n, c) for n, c, _ in grid] == [(n, c) for c in (8, 24) for n in (1, 3, 5)]
    assert all(s > 0 for _, _, s in grid)
    prefills, steps = forwards[:2], forwards[2:]
    assert prefills == [(8, 0), (24, 0)]
    # 3 rounds (a warm-up, then 2 timed) x 2 contexts x 3 sizes, in turns; each step at least one token further
    assert [n for n, _ in steps] == [1, 3, 5] * 6
    for k, ctx in enumerate((8, 24)):
        contexts = [c for r in range(3) for _, c in steps[(2 * r + k) * 3: (2 * r + k + 1) * 3]]
        assert contexts[0] == ctx and all(b > a for a, b in zip(contexts, contexts[1:], strict=False))
        assert contexts[-1] <= ctx + 8 + 4  # 8 steps; a random draft token is rarely the target's choice


def test_accepted_token_steps_verify_one_fixed_chain_and_accept_exactly_the_asked_count(tiny_target, monkeypatch):
    forwards = []
    run = tiny_target.run

    def spy(cache, batch, *args, **kwargs):
        forwards.append(batch.cu_q_host[-1])
        return run(cache, batch, *args, **kwargs)

    monkeypatch.setattr(tiny_target, "run", spy)
    samples = measure_accept(tiny_target, contexts=(8, 20), accepted=(0, 1, 3), repeats=2)
    # 2 timed rounds x 3 counts per context, each accepting exactly its count (float64: no near-ties)
    assert [(a, c) for a, c, _ in samples] == [(a, c) for c in (8, 20) for _ in range(2) for a in (0, 1, 3)]
    assert all(s > 0 for _, _, s in samples)
    assert set(forwards) >= {5}  # every timed step verified the same 5-node chain (root + 3 right + 1 wrong)


def test_prefill_timings_cover_each_length_and_free_every_block(tiny_target):
    samples = measure_prefill(tiny_target, lengths=(4, 12, 30), repeats=2)
    assert [p for p, _ in samples] == [4, 12, 30] and all(s > 0 for _, s in samples)


def test_a_predicted_speedup_charges_the_prompts_prefill_to_both_sides():
    from specdec.research.simulate import ReplayResult, StepRecord, predicted_speedup
    from specdec.stats import RequestStats

    cost = CostModel((0.01, 0.001, 0.0, 0.0))  # verify(n) = 10 ms + 1 ms per node; drafting free
    steps = [StepRecord(context=20 + 3 * i, nodes=4, depth=3, accepted=2, draft_s=0.0) for i in range(10)]
    result = ReplayResult(RequestStats(prompt_tokens=20), [], "length", "c", steps)
    spec, ar = 10 * 0.014, 30 * 0.011
    assert predicted_speedup(result, cost) == pytest.approx(ar / spec)
    cost.prefill_coef = (0.05, 0.0)
    assert predicted_speedup(result, cost) == pytest.approx((0.05 + ar) / (0.05 + spec))


def test_the_accepted_token_cost_is_the_median_slope_over_contexts_and_never_negative():
    rows = [(a, c, 0.05 + 0.002 * a + 0.001 * c / 64) for c in (64, 256) for a in (0, 2, 4) for _ in range(3)]
    assert fit_accept(rows) == pytest.approx(0.002)
    assert fit_accept([(a, 64, 0.05 - 0.001 * a) for a in (0, 2)]) == 0.0
    assert fit_accept([(0, 64, 0.05)]) == 0.0


def test_draft_levels_follow_the_budget_up_to_the_drafters_depth_and_own_budget():
    eagle = type("Eagle", (), {"depth": 5, "budget": 4})()
    assert [draft_levels(eagle, b) for b in (1, 2, 3, 4, 16)] == [0, 1, 2, 3, 3]
    assert draft_levels(type("Ngram", (), {"max_depth": 8, "max_nodes": 16})(), 32) == 8


def test_the_draft_fit_goes_through_each_level_counts_median_so_one_slow_call_does_not_tilt_it():
    samples = [(lv, 0.002 + 0.001 * lv) for lv in (1, 2, 3) for _ in range(5)] + [(3, 0.5)]
    d0, d1 = fit_draft(samples)
    assert d0 == pytest.approx(0.002) and d1 == pytest.approx(0.001)
    assert fit_draft([(2, 0.004), (2, 0.006), (2, 0.9)]) == (0.006, 0.0)


@pytest.mark.parametrize(("per_node", "expect"), [(0.0, "full"), (10.0, "root")])
def test_auto_budget_keeps_greedy_output_exact_and_sizes_trees_by_cost(tiny_target, per_node, expect):
    """A random oracle tree (the true continuation to a random depth, then noise). Free nodes: every drafted node
    is kept; a node costing 10 one-token forwards: the root alone. Either way the greedy output equals
    autoregressive decoding, and the simulator predicts the adapter's statistics exactly."""
    cost = CostModel((1.0, per_node, 0.0, 0.0))
    trace = record_trace(tiny_target, [PROMPT], 16, (), lookahead=12, hidden_dtype=tiny_target.dtype)
    truth = [trace.prompts[0].tokens.tolist()]
    auto = AutoBudgetDrafter(OracleDrafter(truth), cost, drafter_name="none")
    got = SpeculativeEngine(tiny_target, tiny_target.new_cache(16, 16), auto).generate(PROMPT, 16)
    assert got.tokens == truth[0][len(PROMPT) : len(PROMPT) + 16]
    if expect == "root":
        assert set(auto.chosen) == {1} and got.stats.tau == 1.0
    else:
        assert set(auto.chosen) == {12} and got.stats.tau > 1.0
    sim = AutoBudgetDrafter(OracleDrafter(truth), cost, drafter_name="none")
    [res] = replay(trace, sim)
    assert sim.chosen == auto.chosen and res.stats.step_tokens == got.stats.step_tokens


class BudgetLog:
    """A chain drafter (best-first with one child per node) that records the budget it was asked for."""

    vocab_size, needs_hidden, topk, depth, budget = None, False, 1, 10, 16

    def __init__(self):
        self.asked = []

    def propose(self, batch):
        self.asked += [item.budget for item in batch]
        return [Draft(TokenTree.chain([int(item.history[-1])] * min(self.depth + 1, item.budget or self.budget)))
                for item in batch]

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


@pytest.mark.parametrize(("alpha", "d1", "c1"),
                         [(0.8, 0.05, 0.1), (0.9, 0.0, 0.3), (0.5, 0.5, 0.05), (0.95, 0.02, 0.02)])
def test_the_budget_is_planned_before_drafting_at_the_analytic_optimum(alpha, d1, c1):
    """With tracked rates ``alpha`` per depth (a chain: acceptance ``alpha ** d`` at depth d), draft cost
    ``d0 + d1 * levels`` and verify cost ``1 + c1 * n``, the drafter is asked for the ``N`` maximising
    ``(1 + sum_{d < N} alpha ** d) / (d0 + d1 (N - 1) + 1 + c1 N)``, computed here by brute force."""
    d0 = 0.2
    cost = CostModel((1.0, c1, 0.0, 0.0), draft_coef={"chain": (d0, d1)})
    tracker = AcceptanceTracker(prior_top1=alpha, prior_weight=1e9)  # rates pinned at the prior
    inner = BudgetLog()
    auto = AutoBudgetDrafter(inner, cost, tracker, drafter_name="chain")
    auto.propose([DraftInput(0, torch.tensor(PROMPT))])

    def rate(n):
        return (1 + sum(alpha**d for d in range(1, n))) / (d0 + d1 * (n - 1) + 1 + c1 * n)

    best = max(range(1, 12), key=rate)
    assert inner.asked == [best] and auto.planned == [best] and auto.chosen == [best]
    unplanned = BudgetLog()  # prune only: the inner drafter drafts its own budget
    AutoBudgetDrafter(unplanned, cost, tracker, drafter_name="chain", plan=False).propose(
        [DraftInput(0, torch.tensor(PROMPT))])
    assert unplanned.asked == [None]


def test_without_a_calibrated_draft_cost_the_planner_fits_the_measured_propose_times():
    auto = AutoBudgetDrafter(BudgetLog(), CostModel((1.0, 0.1, 0.0, 0.0)))
    assert auto.draft_estimate(3) == 0.0  # nothing measured yet
    auto._observe_draft(2, 0.5, forget=1.0)
    assert auto.draft_estimate(4) == pytest.approx(1.0)  # one level count seen: proportional to the levels
    for levels, seconds in [(2, 0.5), (2, 0.5), (4, 0.9), (4, 0.9), (4, 0.9)]:  # 0.1 + 0.2 * levels
        auto._observe_draft(levels, seconds, forget=1.0)
    assert auto.draft_estimate(6) == pytest.approx(1.3) and auto.draft_estimate(0) == pytest.approx(0.1)
    auto._observe_draft(5, 9.0, forget=1.0)  # one slow call at a new level count sets no slope
    assert auto.draft_estimate(5) == pytest.approx(1.1) and auto.draft_estimate(8) == pytest.approx(1.7)
    auto._observe_draft(2, 50.0, forget=1.0)  # a trusted level count: the slow call counts as twice its mean
    assert auto.draft_estimate(2) == pytest.approx((3 * 0.5 + 2 * 0.5) / 4)


def test_a_sequences_first_propose_which_includes_the_prompt_catch_up_is_not_a_draft_time_sample():
    class CatchUp(BudgetLog):
        """Slow on a sequence's first call (the drafter catches up on the whole prompt), fast after."""

        def propose(self, batch):
            time.sleep(0.05 if any(item.seq_id not in seen for item in batch) else 0.0)
            seen.update(item.seq_id for item in batch)
            return super().propose(batch)

    seen: set[int] = set()
    auto = AutoBudgetDrafter(CatchUp(), CostModel((1.0, 0.1, 0.0, 0.0)))
    for seq_id in (0, 0, 0, 1):  # two first calls (sequences 0 and 1), two timed ones
        auto.propose([DraftInput(seq_id, torch.tensor(PROMPT))])
    assert sum(n for n, _ in auto._draft.values()) == pytest.approx(1.98)  # 0.98 + 1: the two later calls
    assert all(total / n < 0.02 for n, total in auto._draft.values())
    auto.release(0)
    assert 0 not in auto._started


@pytest.mark.parametrize("per_sequence", [True, False])
def test_each_sequence_gets_the_tree_its_own_acceptance_pays_for(per_sequence):
    """Two sequences at once, one whose drafts are always right and one whose drafts are always wrong: with
    per-sequence trackers the first is planned a deep tree and the second a bare root; one pooled tracker plans
    both the same. Releasing a sequence drops its tracker."""
    cost = CostModel((1.0, 0.2, 0.0, 0.0), draft_coef={"chain": (0.05, 0.02)})
    auto = AutoBudgetDrafter(BudgetLog(), cost, drafter_name="chain",
                             per_sequence=SEQUENCE_TRACKER if per_sequence else None)
    history = torch.tensor(PROMPT)
    for _ in range(40):
        good, bad = auto.propose([DraftInput(0, history), DraftInput(1, history)])
        auto.accept(0, torch.cat([good.tree.tokens[1:], torch.tensor([7])]))
        auto.accept(1, torch.tensor([int(history[-1]) + 1]))  # the first draft token is wrong
    good_budget, bad_budget = auto.planned[-2:]
    if per_sequence:
        assert good_budget >= 4 and bad_budget == 1
        auto.release(0)
        assert 0 not in auto._seq and 1 in auto._seq
    else:
        assert good_budget == bad_budget


def test_grid_verify_times_interpolate_the_non_decreasing_grid_and_follow_a_new_grid():
    """``from_grid``: made non-decreasing in n per context by lowering a point to any larger size's, linear in n
    then in ctx (numpy's ``interp`` as the reference), the fit's slopes beyond the largest size; the cached tables
    follow a replaced grid."""
    import numpy as np

    grid = [(1, 64, 0.040), (4, 64, 0.055), (8, 64, 0.050), (16, 64, 0.070),
            (1, 512, 0.060), (4, 512, 0.066), (8, 512, 0.080), (16, 512, 0.090)]
    cost = CostModel(fit_verify(grid), grid=grid, from_grid=True)
    for n, ctx in [(1, 64), (6, 64), (8, 64), (3, 300), (12, 200), (16, 512), (2, 40), (5, 900)]:
        rows = [np.minimum.accumulate([t for g_n, c, t in grid if c == ctx_][::-1])[::-1] for ctx_ in (64, 512)]
        per_ctx = [np.interp(n, [1, 4, 8, 16], r) for r in rows]
        want = float(np.interp(ctx, [64, 512], per_ctx))
        if ctx > 512:
            want += cost._fit_time(n, ctx) - cost._fit_time(n, 512)
        assert cost.verify_time(n, ctx) == pytest.approx(want, rel=1e-12), (n, ctx)
    assert cost.verify_time(4, 64) == pytest.approx(0.050)  # 4 nodes above 8's: lowered (timings are minima)
    assert cost.verify_time(8, 64) == pytest.approx(0.050)
    assert cost.verify_time(32, 64) == pytest.approx(0.070 + cost._fit_time(32, 64) - cost._fit_time(16, 64))
    cost.grid = [(n, c, 2 * t) for n, c, t in grid]
    assert cost.verify_time(1, 64) == pytest.approx(0.080)


def test_a_grid_point_above_a_longer_contexts_is_lowered_to_it():
    """Noise once made 64 cached tokens cost more than 256 and 4..16 nodes cost alike at 64 (so the planner bought
    16-node trees at short contexts): a point above the same size at a longer context is lowered to it."""
    grid = [(1, 64, 0.055), (4, 64, 0.069), (16, 64, 0.069), (1, 256, 0.040), (4, 256, 0.052), (16, 256, 0.071)]
    cost = CostModel(fit_verify(grid), grid=grid, from_grid=True)
    assert [cost.verify_time(n, 64) for n in (1, 4, 16)] == pytest.approx([0.040, 0.052, 0.069])
    assert [cost.verify_time(n, 256) for n in (1, 4, 16)] == pytest.approx([0.040, 0.052, 0.071])
    assert cost.verify_time(16, 64) - cost.verify_time(4, 64) > 0.01  # a 16-node tree costs more again


def test_tree_budget_auto_tracks_copying_drafters_per_sequence_and_model_heads_pooled(tmp_path, tiny_target):
    """``wrap_auto_budget`` (what ``--tree-budget auto`` builds) gives a drafter that declares
    ``acceptance_by_sequence`` (n-gram) a tracker per sequence, and a drafter that does not one pooled tracker."""
    from specdec.research.auto_budget import wrap_auto_budget

    path = tmp_path / "cost.json"
    CostModel((1.0, 0.2, 0.0, 0.0)).save(path)
    ngram = wrap_auto_budget(build_drafter(DrafterSpec.parse("ngram"), tiny_target), str(path), "ngram")
    heads = wrap_auto_budget(BudgetLog(), str(path), "chain")
    assert ngram.per_sequence == SEQUENCE_TRACKER and heads.per_sequence is None
    assert wrap_auto_budget(None, str(path)) is None
    with pytest.raises(ValueError, match="cost='auto' measures the step cost of a target; pass target="):
        wrap_auto_budget(BudgetLog(), "auto")
