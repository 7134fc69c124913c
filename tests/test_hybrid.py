"""Hybrid drafter: greedy identity with drafts accepted, exact sampling (chi-square), one node budget, running
per-source rates steering the merge, and both sub-drafters told every accept / release."""

import pytest
import torch

from specdec.drafters.draft_paths import longest_match, path_values, tree_paths
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.hybrid import HybridDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.sampling import SamplingParams
from specdec.target import TargetModel
from specdec.tree import TokenTree

from .conftest import first_two_tokens_pvalue, inputs, tiny_llama

EAGLE = {"depth": 3, "budget": 8, "topk": 2, "num_blocks": 64, "block_size": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(tiny_llama(seed=3), split_gemv=False)


class FixedDrafter:
    """A model-free stand-in that proposes ``paths`` (token tuples below the root) and records what it is told."""

    vocab_size = None
    needs_hidden = False

    def __init__(self, paths):
        self.paths, self.proposed, self.accepted, self.released = paths, [], [], []

    def propose(self, batch):
        self.proposed += [item.seq_id for item in batch]
        return [Draft(_tree(int(item.history[-1]), self.paths)) for item in batch]

    def accept(self, seq_id, tokens, hidden=None):
        self.accepted.append((seq_id, tokens.tolist()))

    def release(self, seq_id):
        self.released.append(seq_id)


def _tree(root, paths):
    nodes = {(): 0}
    tokens, parents = [root], [-1]
    for p in paths:
        nodes[p] = len(tokens)
        tokens.append(p[-1])
        parents.append(nodes[p[:-1]])
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


REPEATING = [3, 9, 4, 1, 5, 9, 2, 6, 3, 9, 4, 1, 5, 9, 2, 6, 3, 9, 4]  # "... 3 9 4" recurs: n-gram continues it
@pytest.fixture(scope="module")
def friendly_prompt(target) -> list[int]:
    """A prefix of the target's own greedy text after which the n-gram's first proposal is the target's next token
    (greedy decoding from the prefix reproduces the rest), so the first step accepts an n-gram draft."""
    cache = target.new_cache(64, 4)
    for seed in range(20):
        start = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        text = start + SpeculativeEngine(target, cache).generate(start, 40).tokens
        for t in range(8, len(text) - 12):
            if any(c[0] == text[t] for c in NgramDrafter().continuations(torch.tensor(text[:t]), 4)):
                return text[:t]
    raise AssertionError("no n-gram-predictable position in 20 greedy texts of the tiny target")


@pytest.mark.parametrize(("model", "skip", "cost"), [("eagle", None, None), ("eagle", 0.0, None),
                                                   ("eagle", None, 0.3), ("medusa", None, None)],
                         ids=["eagle", "eagle-skipped-where-matched", "eagle-cost-rule", "medusa"])
def test_greedy_output_equals_autoregressive_with_drafts_accepted(target, friendly_prompt, model, skip, cost):
    """``skip=0.0``: the model is not asked on matched steps, so EAGLE catches up several steps' pairs at once;
    ``cost``: the model runs only where it pays (here: where the n-gram has no confident match)."""
    cache = target.new_cache(64, 4)
    if model == "eagle":
        sub = EagleDrafter.untrained(target, tree="dynamic", **EAGLE)
    else:
        sub = MedusaDrafter.untrained(target, num_heads=3, budget=8, topk=2)
    hybrid = HybridDrafter(sub, budget=12, skip_model_above=skip, model_cost=cost)
    ar = SpeculativeEngine(target, cache).generate(friendly_prompt, 12)
    spec = SpeculativeEngine(target, cache, hybrid, max_tree_nodes=12).generate(friendly_prompt, 12)
    assert spec.tokens == ar.tokens and spec.stats.tree_nodes <= 12 * spec.stats.steps
    assert spec.stats.tau > 1.0  # at least the first step's n-gram draft was accepted
    assert cache.allocator.num_free == 64 and len(hybrid._state) == 0 and hybrid.model_calls > 0
    always = skip is None and cost is None
    assert (hybrid.model_calls == spec.stats.steps) if always else (hybrid.model_calls < spec.stats.steps)
    if model == "eagle":
        assert sub.cache.allocator.num_free == EAGLE["num_blocks"]  # the sub-drafter's state was released


# After ANY first token x the history ends "5 x", which occurred before: the first draft always has an n-gram branch.
MATCH_ANY = [5, 0, 5, 1, 5, 2, 5, 3, 5, 4, 5, 5, 5, 6, 5, 7, 5]


@pytest.mark.parametrize(("prompt", "budget", "trials", "cost"),
                         [(MATCH_ANY, 4, 300, None), ([1, 5, 2, 7, 3], 3, 200, None), (MATCH_ANY, 4, 300, 0.3)],
                         ids=["ngram-merged", "model-chain-prefix", "cost-rule"])
def test_sampling_preserves_the_target_distribution(prompt, budget, trials, cost):
    """With a match, the EAGLE chain's samples and the n-gram branch are verified as one-hot proposals; without,
    a prefix of the EAGLE chain passes through with its probabilities; with the cost rule the model is asked on
    some steps only (the n-gram's rates move with what the target samples). All leave the first two tokens
    target-distributed."""
    target = TargetModel(tiny_llama(vocab=8, seed=11), split_gemv=False)
    torch.manual_seed(4)
    sub = EagleDrafter.untrained(target, tree="chain", depth=3, num_blocks=1024, block_size=4)
    hybrid = HybridDrafter(sub, budget=budget, model_cost=cost)
    seen = []
    propose = hybrid.propose
    hybrid.propose = lambda batch: seen.extend(propose(batch)) or seen[-len(batch):]
    pvalue, accepted = first_two_tokens_pvalue(target, hybrid, prompt, trials, SamplingParams(1.0), 4)
    assert pvalue > 1e-3 and accepted > trials // 20
    with_probs = [d for d in seen if d.probs is not None]
    if cost is not None:
        assert 0 < hybrid.model_calls < len(seen)
    elif prompt is MATCH_ANY:
        assert len(seen) - len(with_probs) >= trials // 2
    else:
        assert len(with_probs) >= trials and all(d.tree.num_nodes == 3 == d.probs.shape[0] for d in with_probs)
    assert sub.cache.allocator.num_free == 1024 and len(hybrid._state) == 0


@pytest.mark.parametrize("budget", [1, 2, 5, 9])
def test_the_merged_tree_respects_the_node_budget(budget):
    model_paths = [(7,), (8,), (7, 1), (7, 2), (8, 1), (7, 1, 3), (7, 1, 4), (7, 1, 3, 5)]
    hybrid = HybridDrafter(FixedDrafter(model_paths), budget=budget, model_cost=None, min_value=0.0)
    [draft] = hybrid.propose(inputs([0], [REPEATING]))
    assert draft.tree.num_nodes == budget and draft.probs is None
    union = set(model_paths) | {(1,), (1, 5), (1, 5, 9), (1, 5, 9, 2)}  # n-gram: "3 9 4" was followed by "1 5 9 2 ..."
    assert set(tree_paths(draft.tree)) <= union | {(1, 5, 9, 2, 6), (1, 5, 9, 2, 6, 3), (1, 5, 9, 2, 6, 3, 9),
                                                   (1, 5, 9, 2, 6, 3, 9, 4)}


def test_running_rates_send_the_budget_to_the_source_that_was_right():
    model = FixedDrafter([(7,), (7, 7)])
    hybrid = HybridDrafter(model, budget=3, model_cost=None, min_value=0.0)
    history = torch.tensor(REPEATING)
    for _ in range(8):  # the target keeps agreeing with the n-gram continuation (1 5 9 2 ...), never with the model
        [draft] = hybrid.propose(inputs([0], [history]))
        hybrid.accept(0, torch.tensor([1, 5]))
    rates = hybrid._state[0].rates
    assert rates["ngram4"][0][0] > 0.9 and rates["model"][0][0] < 0.2  # "6 3 9 4" recurs: a 4-token match
    [draft] = hybrid.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == [(1,), (1, 5)]  # both kept nodes are the n-gram's
    hybrid.accept(0, torch.tensor([1, 5]))
    hybrid.min_value = 0.5
    [draft] = hybrid.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == [(1,), (1, 5)]  # model nodes are worth < 0.5 now: dropped
    hybrid.accept(0, torch.tensor([7]))  # the target says 7 (the bonus token alone): the dropped model node was right
    for _ in range(7):
        hybrid.propose(inputs([0], [history]))
        hybrid.accept(0, torch.tensor([7]))
    assert rates["model"][0][0] > 0.5 > rates["ngram4"][0][0]
    [draft] = hybrid.propose(inputs([0], [history]))
    assert tree_paths(draft.tree)[0] == (7,) and all(p[0] == 7 for p in tree_paths(draft.tree))  # n-gram dropped


def test_sub_drafters_hear_every_accept_and_release(target):
    model = FixedDrafter([(0,), (0, 0)])
    ngram = NgramDrafter(max_depth=4)
    told = []
    ngram.accept = lambda seq_id, tokens, hidden=None: told.append((seq_id, tokens.tolist()))
    ngram.release = lambda seq_id: told.append(("release", seq_id))
    hybrid = HybridDrafter(model, ngram, budget=6, model_cost=None)
    cache = target.new_cache(64, 4)
    result = SpeculativeEngine(target, cache, hybrid, max_tree_nodes=6).generate(REPEATING, 8)
    steps = [t for t in told if t[0] != "release"]
    assert steps == model.accepted and len(steps) == result.stats.steps + 1  # + the first token after prefill
    assert told[-1] == ("release", model.released[0]) and len(model.released) == 1 and len(hybrid._state) == 0


def test_a_confident_ngram_drafts_alone_and_the_model_runs_only_where_it_has_no_match():
    model = FixedDrafter([(7,)])
    hybrid = HybridDrafter(model, budget=6, prior={"ngram": 0.95, "model": 0.5}, skip_model_above=0.9,
                           model_cost=None)
    matched, unmatched = hybrid.propose(inputs([0, 1], [REPEATING, [8, 2, 6, 1, 3]]))
    assert model.proposed == [1] and hybrid.model_calls == 1
    assert all(p[0] == 1 for p in tree_paths(matched.tree)) and tree_paths(unmatched.tree) == [(7,)]
    hybrid.accept(0, torch.tensor([2]))  # the n-gram was wrong: its rate drops below the threshold
    hybrid.propose(inputs([0], [REPEATING]))
    assert model.proposed == [1, 0]


def test_the_hybrid_is_registered_and_passes_its_options_to_the_model(target):
    from specdec.drafters.registry import DrafterSpec, build_drafter

    hybrid = build_drafter(DrafterSpec.parse("hybrid:model=medusa,budget=6,depth=2,skip=2"), target)
    assert isinstance(hybrid, HybridDrafter) and isinstance(hybrid.model, MedusaDrafter)
    assert (hybrid.budget, hybrid.max_depth, hybrid.skip_model_above) == (6, 2, 2.0)
    assert (hybrid.model.budget, hybrid.model.depth) == (6, 2)  # the model's own dynamic tree gets the same limits
    with pytest.raises(ValueError, match="option 'model' of drafter 'hybrid' must be one of"):
        DrafterSpec.parse("hybrid:model=ngram")


def test_the_model_is_asked_only_where_its_expected_tokens_pay_for_its_cost_and_its_nodes():
    """Rule: ask iff ``(1 + max(V_n, V_m)) / (1 + cost + node_cost * max(N_n, N_m)) > (1 + V_n) / (1 + node_cost *
    N_n)``; the first step asks (no estimate yet), and a model not asked for ``probe`` steps is asked again."""
    unmatched = [8, 2, 6, 1, 3]
    for cost, asked_again in [(0.1, [1]), (0.3, []), (2.0, [])]:
        model = FixedDrafter([(7,)])
        hybrid = HybridDrafter(model, budget=6, prior={"ngram": 0.95, "model": 0.5}, model_cost=cost, probe=4)
        hybrid.propose(inputs([0, 1], [REPEATING, unmatched]))
        assert model.proposed == [0, 1]  # no estimate of the model yet
        hybrid.accept(0, torch.tensor([1, 5, 9]))  # the n-gram was right
        hybrid.accept(1, torch.tensor([7]))  # so was the model here (not for sequence 0)
        # V_m = (1 * 1 token + PRIOR_STEPS * pooled 0.05) / (1 + PRIOR_STEPS) = 0.24: pays for a cost of 0.1
        # ((1 + 0.24) / (1 + 0.1 + 0.05) > 1) but not 0.3
        assert hybrid.pooled_value == pytest.approx(0.05) and hybrid.model_value(hybrid._state[1]) == pytest.approx(
            0.24)
        matched, alone = hybrid.propose(inputs([0, 1], [REPEATING, unmatched]))
        assert model.proposed[2:] == asked_again  # confident match: n-gram alone; no match: the model if it pays
        assert all(p[0] == 1 for p in tree_paths(matched.tree))
        assert tree_paths(alone.tree) == ([(7,)] if asked_again else [])  # no match, no model: the root alone
    for step in range(3):
        hybrid.accept(1, torch.tensor([7]))
        hybrid.propose(inputs([1], [unmatched]))
        assert model.proposed[2:] == ([1] if step == 2 else [])  # 4 steps after the last ask: probed


def test_a_new_sequence_starts_from_the_pooled_model_value_and_probes_space_out():
    """A model that never held the accepted token: once one sequence has seen it, a new sequence does not ask it
    at its first step (it starts from the pooled value, 0 tokens), and the probes of a model that does not pay
    come after 4, 8, 16, 16 ... steps (``probe`` = 4, doubling up to 4x)."""
    unmatched = [8, 2, 6, 1, 3]
    model = FixedDrafter([(7,)])
    hybrid = HybridDrafter(model, budget=6, prior={"ngram": 0.95, "model": 0.5}, model_cost=0.3, probe=4)
    hybrid.propose(inputs([0], [unmatched]))
    hybrid.accept(0, torch.tensor([5]))  # the model's token was wrong
    assert model.proposed == [0] and hybrid.pooled_value == 0.0
    asked_at = []
    for step in range(1, 46):
        hybrid.propose(inputs([1], [unmatched]))
        if model.proposed[-1] == 1 and len(model.proposed) > len(asked_at) + 1:
            asked_at.append(step)
        hybrid.accept(1, torch.tensor([5]))
    assert asked_at == [4, 12, 28, 44]  # never at step 1 (pooled), then after 4, 8, 16, 16 steps


def test_one_unlucky_ask_does_not_switch_off_a_model_that_pays_elsewhere_but_a_run_of_misses_does():
    """A sequence's own model value is shrunk toward the pooled one (``PRIOR_STEPS`` pseudo-asks): after one miss
    it is (0 + 4 * 1) / 5 = 0.8 tokens and the model is still asked; after many misses the sequence's own zero
    outweighs the pooled value and the model is left out (until a probe)."""
    unmatched = [8, 2, 6, 1, 3]
    model = FixedDrafter([(7,)])
    hybrid = HybridDrafter(model, budget=6, prior={"ngram": 0.95, "model": 0.5}, model_cost=0.3, probe=1000)
    hybrid.pooled_value = 1.0  # the model held one token a step for earlier sequences
    asked = []
    for _ in range(12):
        before = len(model.proposed)
        hybrid.propose(inputs([0], [unmatched]))
        asked.append(len(model.proposed) > before)
        hybrid.accept(0, torch.tensor([5]))  # the model's token was wrong
    state = hybrid._state[0]
    assert asked[:2] == [True, True]  # the first miss leaves V_m = 0.8: (1 + 0.8) / (1 + 0.3 + 0.05) > 1
    assert not asked[-1] and hybrid.model_value(state) < 0.35  # a run of misses: (1 + V_m) / 1.35 < 1
    assert state.model_asks == sum(asked)


def test_a_long_match_keeps_its_own_rates():
    """The n-gram rates are kept per matched suffix length: a wrong 2-token match does not lower the 4-token
    matches' rates (a copy of earlier text stays trusted)."""
    assert longest_match(torch.tensor(REPEATING), 4, 2) == 4
    assert longest_match(torch.tensor([1, 2, 9, 1, 2]), 4, 2) == 2
    assert longest_match(torch.tensor([8, 2, 6, 1, 3]), 4, 2) == 2  # no match: the shortest (proposes nothing)
    hybrid = HybridDrafter(FixedDrafter([(7,)]), budget=6, model_cost=None)
    short = torch.tensor([1, 2, 9, 1, 2])  # "1 2" was followed by 9
    for _ in range(6):
        [draft] = hybrid.propose(inputs([0], [short]))
        assert (9,) in tree_paths(draft.tree)
        hybrid.accept(0, torch.tensor([5]))  # wrong
    rates = hybrid._state[0].rates
    assert rates["ngram2"][0][0] < 0.2 and rates["ngram4"][0][0] == 0.6
    [draft] = hybrid.propose(inputs([0], [torch.tensor(REPEATING)]))
    assert (1,) in tree_paths(draft.tree)  # the 4-token match still drafts at the prior rate


def test_siblings_are_valued_by_their_rank_and_the_rank_that_is_right_gains_the_budget():
    """Each sibling rank has its own rate, so four children of the root are not each worth the whole depth-1
    acceptance; when the model's third choice keeps being the target's token, that rank's rate rises and its node
    is kept first."""
    model = FixedDrafter([(7,), (8,), (9,), (10,)])
    hybrid = HybridDrafter(model, budget=2, model_cost=None, min_value=0.0)
    history = torch.tensor([8, 2, 6, 1, 3])  # no n-gram match
    [draft] = hybrid.propose(inputs([0], [history]))
    values = path_values(tree_paths(model.propose(inputs([0], [history]))[0].tree), hybrid._state[0].rates["model"])
    assert values[(7,)] > values[(8,)] > values[(9,)] >= values[(10,)] and tree_paths(draft.tree) == [(7,)]
    for _ in range(10):
        hybrid.accept(0, torch.tensor([9]))
        [draft] = hybrid.propose(inputs([0], [history]))
    rates = hybrid._state[0].rates["model"][0]
    assert rates[2] > 0.8 > 0.2 > rates[0] and tree_paths(draft.tree) == [(9,)]


def test_the_value_floor_rises_with_the_sequences_speed():
    """A node must add ``min_value`` times what a unit of step time already yields: while every step accepts
    several tokens, a node worth 0.1 is dropped; in a sequence that gains nothing from drafting it is kept."""
    model = FixedDrafter([(7,)])
    hybrid = HybridDrafter(model, budget=4, prior={"ngram": 0.6, "model": 0.1}, model_cost=None, min_value=0.05)
    history = torch.tensor([8, 2, 6, 1, 3])  # no n-gram match: the model's one node, worth ~0.1
    [draft] = hybrid.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == [(7,)]
    hybrid._state[0].speed = 3.0  # as after steps that accepted three tokens each
    [draft] = hybrid.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == []


def test_a_measured_step_cost_keeps_the_prefix_that_maximises_tokens_per_unit_of_time():
    """With ``step_cost`` (a lone root cheap, the first draft node dear, more nodes cheap: a CPU's measured
    shape), the merged tree keeps the best prefix by ``(1 + sum of values) / step_cost``: nothing while the model
    chain's values are small, the whole chain when they are large; a per-call budget still caps it."""
    def step_cost(n, ctx):
        assert ctx == 5
        return 1.0 if n == 1 else 1.5 + 0.02 * (n - 2)

    chain = FixedDrafter([(7,), (7, 8), (7, 8, 9)])
    low = HybridDrafter(chain, budget=8, prior={"ngram": 0.6, "model": 0.3}, model_cost=None, step_cost=step_cost)
    history = torch.tensor([8, 2, 6, 1, 3])  # no n-gram match
    [draft] = low.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == []  # 1 + 0.3 + 0.09 + 0.027 < 1.5 + 0.04: the root alone pays best
    high = HybridDrafter(chain, budget=8, prior={"ngram": 0.6, "model": 0.9}, model_cost=None, step_cost=step_cost)
    [draft] = high.propose(inputs([0], [history]))
    assert tree_paths(draft.tree) == [(7,), (7, 8), (7, 8, 9)]  # (1 + 0.9 + 0.81 + 0.729) / 1.54 > 1
    [draft] = high.propose(inputs([0], [history], budget=3))
    assert tree_paths(draft.tree) == [(7,), (7, 8)]


def test_a_hybrid_with_a_measured_step_cost_stays_lossless(target):
    """Greedy identity for the hybrid choosing its tree sizes by a measured (here: steep) step cost."""
    prompt = [5, 9, 14, 3, 5, 9, 14, 3, 5, 9, 14]
    ar = SpeculativeEngine(target, target.new_cache(64, 4)).generate(prompt, 24)
    eagle = EagleDrafter.untrained(target, tree="dynamic", **EAGLE)
    hybrid = HybridDrafter(eagle, budget=8, step_cost=lambda n, ctx: 1.0 if n == 1 else 1.2 + 0.1 * n)
    out = SpeculativeEngine(target, target.new_cache(64, 4), hybrid, max_tree_nodes=16).generate(prompt, 24)
    assert out.tokens == ar.tokens and out.stats.tau > 1.0


def test_the_steps_option_reads_a_cost_model_file(target, tmp_path):
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.cost_model import CostModel

    CostModel((0.05, 0.01, 0.0, 0.0)).save(tmp_path / "cost.json")
    hybrid = build_drafter(DrafterSpec.parse(f"hybrid:budget=6,steps={tmp_path / 'cost.json'}"), target)
    assert hybrid.step_cost(1, 100) == pytest.approx(1.0) and hybrid.step_cost(6, 100) == pytest.approx(0.11 / 0.06)
    with pytest.raises(ValueError, match="cost-model file not found"):
        build_drafter(DrafterSpec.parse(f"hybrid:steps={tmp_path / 'none.json'}"), target)


def test_a_step_without_the_model_proposes_exactly_the_ngram_drafters_tree(target):
    """Where the model is not asked the hybrid drafts as plain n-gram drafting does (same tree, same adaptive
    depth), so those steps cost and yield what n-gram alone would; greedy output stays exact."""
    model = FixedDrafter([(7,), (8,)])
    hybrid = HybridDrafter(model, budget=12, skip_model_above=0.0)  # a match always skips the model
    plain, compared = NgramDrafter(max_depth=8, max_nodes=12), 0
    for end in range(6, len(REPEATING) + 1):
        history = torch.tensor(REPEATING[:end])
        [got] = hybrid.propose(inputs([0], [history]))
        [want] = plain.propose(inputs([0], [history]))
        if want.tree.num_nodes > 1:  # a match: the model was skipped
            assert torch.equal(got.tree.tokens, want.tree.tokens) and torch.equal(got.tree.parents, want.tree.parents)
            compared += 1
        hybrid.accept(0, torch.tensor([int(REPEATING[end % len(REPEATING)])]))
        plain.accept(0, torch.tensor([int(REPEATING[end % len(REPEATING)])]))
    assert compared >= 5
    ar = SpeculativeEngine(target, target.new_cache(64, 4)).generate(REPEATING, 16)
    out = SpeculativeEngine(target, target.new_cache(64, 4), HybridDrafter(FixedDrafter([(7,)]), budget=12),
                            max_tree_nodes=12).generate(REPEATING, 16)
    assert out.tokens == ar.tokens


class SlowDrafter(FixedDrafter):
    """A model that always knows the next token but takes ``seconds`` per propose."""

    def __init__(self, truth, seconds):
        super().__init__([])
        self.truth, self.seconds = truth, seconds

    def propose(self, batch):
        import time

        time.sleep(self.seconds)
        out = []
        for item in batch:
            n = item.history.numel()
            nxt = self.truth[n] if n < len(self.truth) else 0
            out.append(Draft(_tree(int(item.history[-1]), [(nxt,)])))
        return out


def test_a_measured_model_cost_stops_asking_a_model_that_costs_more_than_it_saves(target):
    """``cost=auto``: the model's propose time over the time between proposes replaces the prior; a model that
    is always right but costs ~60 verification steps (more under load) is soon asked only at the probe interval,
    while the prior (0.3) keeps asking it. Both stay lossless."""
    prompt = [8, 2, 6, 1, 3, 11, 40, 7]
    ar = SpeculativeEngine(target, target.new_cache(64, 4)).generate(prompt, 40)
    truth = prompt + ar.tokens
    calls = {}
    for measure in (False, True):
        hybrid = HybridDrafter(SlowDrafter(truth, 0.15), budget=4, measure_cost=measure, probe=16)
        out = SpeculativeEngine(target, target.new_cache(64, 4), hybrid, max_tree_nodes=4).generate(prompt, 40)
        assert out.tokens == ar.tokens
        calls[measure] = hybrid.model_calls
        if measure:
            assert hybrid.current_model_cost > 3.0 and hybrid.step_s > 0
    assert calls[False] >= 10 and calls[True] <= calls[False] // 2, calls


def test_a_first_model_call_that_catches_up_on_a_prompt_moves_the_measured_cost_by_its_weight_only(monkeypatch):
    """``cost=auto``: the model's running propose time starts from the prior share (0.3) of the measured step
    (0.1 s), so a first call of 1 s (the head catching up on a whole prompt) counts as 0.03 + 0.2 * (1 - 0.03) =
    0.224 s, a cost of 2.24 steps, not 10 (calls like it afterwards raise it toward 10)."""
    import specdec.drafters.hybrid as hybrid_module

    clock = [0.0]
    monkeypatch.setattr(hybrid_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))

    class Timed(FixedDrafter):
        def propose(self, batch):
            clock[0] += 1.0
            return super().propose(batch)

    hybrid = HybridDrafter(Timed([(7,)]), budget=4, model_cost=0.3, measure_cost=True)
    unmatched = [8, 2, 6, 1, 3]
    hybrid.propose(inputs([0], [unmatched], budget=1))  # a lone root: the model is not asked
    clock[0] += 0.1  # the verification step
    hybrid.propose(inputs([0], [unmatched]))  # the model's first call
    assert hybrid.step_s == pytest.approx(0.1) and hybrid.model_s == pytest.approx(0.224)
    assert hybrid.current_model_cost == pytest.approx(2.24)


def test_the_cost_option_takes_a_number_or_auto(target):
    from specdec.drafters import DrafterSpec, build_drafter

    auto = build_drafter(DrafterSpec.parse("hybrid:cost=auto"), target)
    assert auto.measure_cost and auto.current_model_cost == auto.model_cost == 0.3
    assert build_drafter(DrafterSpec.parse("hybrid:cost=-1"), target).model_cost is None
    assert build_drafter(DrafterSpec.parse("hybrid:cost=0.5"), target).model_cost == 0.5
    with pytest.raises(ValueError, match="option 'cost' of drafter 'hybrid' expects a number or 'auto', got 'x'"):
        build_drafter(DrafterSpec.parse("hybrid:cost=x"), target)


def test_with_a_store_a_history_with_no_match_drafts_the_stores_continuation_as_its_own_source(target):
    """No match in the history: a step without the model proposes exactly the n-gram+store drafter's tree, and a
    step with the model merges the store's continuation (source ``store``, its own rates) with the model's."""
    from specdec.drafters.store import TokenStore

    store = TokenStore([[8, 2, 6, 1, 4, 4]] * 3, 64)
    history = torch.tensor([7, 3, 8, 2, 6])  # no repeat of its own; "8 2 6" continues "1 4" in the store
    skip = HybridDrafter(FixedDrafter([(9,)]), ngram=NgramDrafter(store=store), budget=8, model_cost=1e9)
    skip.pooled_value = 0.0  # a model that never paid: not asked (until a probe)
    [alone] = skip.propose(inputs([0], [history]))
    [want] = NgramDrafter(store=store).propose(inputs([0], [history]))
    assert tree_paths(alone.tree) == tree_paths(want.tree) == [(1,), (1, 4)] and skip.model_calls == 0
    model = FixedDrafter([(9,)])
    hybrid = HybridDrafter(model, ngram=NgramDrafter(store=store), budget=8, model_cost=None)
    assert "store" in hybrid.sources
    [merged] = hybrid.propose(inputs([0], [history]))
    assert set(tree_paths(merged.tree)) == {(1,), (1, 4), (9,)} and model.proposed == [0]
    before = hybrid._state[0].rates["store"][0][0]
    hybrid.accept(0, torch.tensor([1, 4, 5]))  # the store was right twice
    assert hybrid._state[0].rates["store"][0][0] > before


def test_a_hybrid_with_a_store_stays_lossless(target):
    from specdec.drafters.store import TokenStore

    cache = target.new_cache(64, 4)
    start = [3, 1, 4, 1, 5, 9]
    text = start + SpeculativeEngine(target, cache).generate(start, 30).tokens
    store = TokenStore([text[4:20], text[10:30]], 64)  # the target's own continuations: the store is often right
    sub = EagleDrafter.untrained(target, tree="dynamic", **EAGLE)
    hybrid = HybridDrafter(sub, ngram=NgramDrafter(store=store), budget=10, model_cost=None)
    ar = SpeculativeEngine(target, cache).generate(start, 24)
    spec = SpeculativeEngine(target, cache, hybrid, max_tree_nodes=10).generate(start, 24)
    assert spec.tokens == ar.tokens and spec.stats.tau > 1.5
    assert cache.allocator.num_free == 64 and sub.cache.allocator.num_free == EAGLE["num_blocks"]


def test_the_model_can_draft_a_smaller_tree_than_the_merged_budget(target):
    from specdec.drafters.registry import DrafterSpec, build_drafter

    hybrid = build_drafter(DrafterSpec.parse("hybrid:model=medusa,budget=12,depth=3,model_budget=4,model_depth=2"),
                           target)
    assert (hybrid.budget, hybrid.max_depth, hybrid.model.budget, hybrid.model.depth) == (12, 3, 4, 2)
    assert hybrid.ngram.store is None
