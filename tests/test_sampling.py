"""Lossless sampling: hand-built accept/reject cases and statistical checks of the output distribution."""

import pytest
import torch
from scipy.stats import chisquare

from specdec.acceptance import tree_rejection_sample, typical_accept_lossy
from specdec.sampling import SamplingParams, process_logits, sample
from specdec.tree import TokenTree

P_MIN = 1e-3  # a correct sampler fails this chi-square test with probability 1e-3


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
    ],
)
def test_bad_sampling_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_process_logits_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
    torch.testing.assert_close(process_logits(logits, SamplingParams(1.0)), logits.exp())
    top2 = process_logits(logits, SamplingParams(1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([5 / 7, 2 / 7, 0, 0, 0], dtype=torch.float64))
    nucleus = process_logits(logits, SamplingParams(1.0, top_p=0.8))  # 0.5 + 0.2 < 0.8 <= 0.85
    torch.testing.assert_close(nucleus, torch.tensor([0.5, 0.2, 0.15, 0, 0], dtype=torch.float64) / 0.85)
    assert process_logits(logits, SamplingParams(0.0)).tolist() == [1, 0, 0, 0, 0]
    sharp = process_logits(logits, SamplingParams(0.5))
    torch.testing.assert_close(sharp, logits.mul(2).softmax(-1))


def test_sample_follows_the_distribution_and_reproduces_with_a_seed():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    draws = sample(probs.expand(40000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[1] == 0
    assert chisquare(counts[[0, 2, 3]], 40000 * probs[[0, 2, 3]]).pvalue > P_MIN
    a = sample(probs.expand(10, 4), SamplingParams(1.0, seed=7).generator())
    b = sample(probs.expand(10, 4), SamplingParams(1.0, seed=7).generator())
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- hand-built cases


def _onehot(v, x):
    e = torch.zeros(v, dtype=torch.float64)
    e[x] = 1.0
    return e


def test_all_accepted_then_bonus_from_the_leaf():
    tree = TokenTree(torch.tensor([9, 1, 2]), torch.tensor([-1, 0, 1]))
    target = torch.stack([_onehot(4, 1), _onehot(4, 2), _onehot(4, 3)])
    verdict = tree_rejection_sample(tree, target, None, torch.Generator().manual_seed(0))
    assert verdict.path == [0, 1, 2] and verdict.tokens.tolist() == [1, 2, 3]


def test_first_child_rejected_second_accepted():
    tree = TokenTree(torch.tensor([9, 0, 1, 3]), torch.tensor([-1, 0, 0, 2]))
    target = torch.stack([_onehot(4, 1), _onehot(4, 2), _onehot(4, 3), _onehot(4, 2)])
    verdict = tree_rejection_sample(tree, target, None, torch.Generator().manual_seed(0))
    assert verdict.path == [0, 2, 3] and verdict.tokens.tolist() == [1, 3, 2]


def test_all_children_rejected_samples_the_residual():
    # one-hot proposals 0 and 1 where the target puts all its mass on token 3: both rejected, residual = token 3
    tree = TokenTree(torch.tensor([9, 0, 1]), torch.tensor([-1, 0, 0]))
    target = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3, dtype=torch.float64)
    verdict = tree_rejection_sample(tree, target, None, torch.Generator().manual_seed(0))
    assert verdict.path == [0] and verdict.tokens.tolist() == [3]
    # with probabilities: q puts all mass on token 2, the target none -> rejected; residual = p
    draft = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.float64)
    tree2 = TokenTree(torch.tensor([9, 2]), torch.tensor([-1, 0]))
    target2 = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    verdict2 = tree_rejection_sample(tree2, target2, draft[:2], torch.Generator().manual_seed(0))
    assert verdict2.path == [0] and verdict2.tokens.tolist() == [1]


@pytest.mark.parametrize(
    ("target", "proposal", "accept_rate", "residual"),
    [
        # one-hot proposal on token 0 where the target has mass 0.3 there: accepted 30 % of the time; after a
        # rejection the bonus comes from max(p - e0, 0) = token 1 only (p itself would give token 0 30 % of the time)
        ([0.3, 0.7, 0.0, 0.0], None, 0.3, [0.0, 1.0, 0.0, 0.0]),
        # a spread residual: max(p - e0, 0) / 0.7 = [0, 5/7, 2/7, 0]
        ([0.3, 0.5, 0.2, 0.0], None, 0.3, [0.0, 5 / 7, 2 / 7, 0.0]),
        # with draft probabilities q = [0.6, 0.4, 0, 0]: accept 0.3 / 0.6; residual max(p - q, 0) = [0, .1, .2, 0]
        ([0.3, 0.5, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0], 0.5, [0.0, 1 / 3, 2 / 3, 0.0]),
    ],
)
def test_a_rejected_child_leaves_the_residual_not_the_target(target, proposal, accept_rate, residual):
    """Over 4,000 seeds, the bonus token after a rejection follows ``normalize(max(p - q, 0))``, and the child is
    accepted with probability ``min(1, p(x) / q(x))``. Power: a missing residual correction (bonus drawn from
    ``p``) emits token 0 after 30 % (resp. 60 %) of rejections, caught with certainty by the zero-count check; a
    residual off by 5 points between tokens 1 and 2 is caught at p < 1e-3 with power 0.995 in the second case
    (~2,800 rejections, noncentrality 34) and 0.93 in the third (~2,000 rejections, noncentrality 22.5). The
    acceptance rate's binomial check has power > 0.999 against a 5-point error (6.9 standard deviations)."""
    from scipy.stats import binomtest

    trials = 4000
    tree = TokenTree(torch.tensor([9, 0]), torch.tensor([-1, 0]))
    p = torch.tensor([target, target], dtype=torch.float64)
    q = None if proposal is None else torch.tensor([[0.0] * 4, proposal], dtype=torch.float64)
    accepted, bonus = 0, torch.zeros(4, dtype=torch.float64)
    for seed in range(trials):
        verdict = tree_rejection_sample(tree, p, q, torch.Generator().manual_seed(seed))
        if verdict.path == [0, 1]:
            accepted += 1
        else:
            assert verdict.path == [0]
            bonus[int(verdict.tokens[0])] += 1
    assert binomtest(accepted, trials, accept_rate).pvalue > P_MIN
    residual = torch.tensor(residual, dtype=torch.float64)
    assert bonus[residual == 0].sum() == 0, "a token outside the residual's support was emitted after a rejection"
    if (residual > 0).sum() > 1:
        assert _chisquare(bonus, residual) > P_MIN


def test_lossy_typical_acceptance_is_opt_in_and_thresholded():
    tree = TokenTree(torch.tensor([9, 1, 2]), torch.tensor([-1, 0, 0]))
    target = torch.tensor([[0.05, 0.05, 0.9, 0.0]] * 3, dtype=torch.float64)
    verdict = typical_accept_lossy(tree, target, torch.Generator().manual_seed(0))
    assert verdict.path == [0, 2]  # token 1 (p = 0.05) is below the cutoff, token 2 passes


# ---------------------------------------------------------------------------------------------- statistics


# Hand-built cases use probabilities 0 or 1 only, so their outcome does not depend on the generator.


def _random_dist(gen, *shape, v=8, sharp=2.0):
    return torch.softmax(sharp * torch.randn(*shape, v, generator=gen, dtype=torch.float64), -1)


class SyntheticWorld:
    """A target and a drafter over a small vocabulary whose next-token distributions depend on the context.

    ``target(ctx)`` and ``draft(ctx)`` are fixed random distributions per context tuple (memoised), processed
    with ``params``. Trees: ``shape[d]`` children per node at depth ``d``, drawn i.i.d. from the draft
    (``with``), without replacement (Gumbel-top-k, ``without``), or deterministically as the draft's top
    tokens (``onehot``, no probabilities).
    """

    def __init__(self, seed, params, shape, mode, v=8):
        self.gen = torch.Generator().manual_seed(seed)
        self.params, self.shape, self.mode, self.v = params, shape, mode, v
        self._t: dict = {}
        self._q: dict = {}

    def target(self, ctx):
        if ctx not in self._t:
            self._t[ctx] = process_logits(torch.log(_random_dist(self.gen, v=self.v)), self.params)
        return self._t[ctx]

    def draft(self, ctx):
        if ctx not in self._q:
            self._q[ctx] = process_logits(torch.log(_random_dist(self.gen, v=self.v, sharp=1.0)), self.params)
        return self._q[ctx]

    def draw_children(self, q, k, rng):
        if self.mode == "with":
            return sample(q.expand(k, -1), rng).tolist()
        if self.mode == "without":
            keys = q.log() + -torch.empty_like(q).exponential_(generator=rng).log()  # Gumbel-top-k
            return keys.topk(min(k, int((q > 0).sum()))).indices.tolist()
        return q.topk(k).indices.tolist()  # deterministic

    def build(self, ctx, rng):
        tokens, parents, paths = [ctx[-1] if ctx else 0], [-1], [()]
        frontier = [0]
        for k in self.shape:
            nxt = []
            for node in frontier:
                q = self.draft(ctx + paths[node])
                for x in self.draw_children(q, k, rng):
                    tokens.append(x)
                    parents.append(node)
                    paths.append(paths[node] + (x,))
                    nxt.append(len(tokens) - 1)
            frontier = nxt
        tree = TokenTree(torch.tensor(tokens), torch.tensor(parents))
        target = torch.stack([self.target(ctx + p) for p in paths])
        probs = None
        if self.mode != "onehot":
            probs = torch.stack([torch.zeros(self.v, dtype=torch.float64)]
                                + [self.draft(ctx + p[:-1]) for p in paths[1:]])
        return tree, target, probs

    def two_tokens(self, rng, rule=tree_rejection_sample):
        out: tuple = ()
        while len(out) < 2:
            tree, target, probs = self.build(out, rng)
            if rule is tree_rejection_sample:
                verdict = rule(tree, target, probs, rng, without_replacement=self.mode == "without")
            else:
                verdict = rule(tree, target, probs, rng)
            out += tuple(verdict.tokens.tolist())
        return out[:2]

    def expected(self):
        return torch.tensor([[float(self.target(())[a] * self.target((a,))[b]) for b in range(self.v)]
                             for a in range(self.v)], dtype=torch.float64)


TRIALS = 40000  # enough for a 1-point probability error between two likely tokens (see the power test)


def _chisquare(observed, expected):
    assert observed[expected == 0].sum() == 0, "a token with zero target probability was emitted"
    keep = expected > 0
    return chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue


def _pvalues(world, trials, seed, rule=tree_rejection_sample):
    """p-values of the first token's marginal and of the first two tokens' joint against the target."""
    rng = torch.Generator().manual_seed(seed)
    counts = torch.zeros(world.v, world.v, dtype=torch.float64)
    for _ in range(trials):
        a, b = world.two_tokens(rng, rule)
        counts[a, b] += 1
    joint = world.expected()
    return _chisquare(counts.sum(1), joint.sum(1)), _chisquare(counts.flatten(), joint.flatten())


CASES = {
    "chain": ((1, 1, 1), "with", SamplingParams(1.0)),
    "tree_with_replacement": ((3, 2), "with", SamplingParams(1.0)),
    "tree_without_replacement": ((3, 2), "without", SamplingParams(1.0)),
    "tree_four_siblings_without": ((4, 1), "without", SamplingParams(1.0)),
    "onehot_tree": ((2, 2), "onehot", SamplingParams(1.0)),
    "top_k_top_p_temperature": ((3, 1), "without", SamplingParams(1.5, top_k=5, top_p=0.9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tree_rejection_sampling_preserves_the_target_distribution(case):
    shape, mode, params = CASES[case]
    world = SyntheticWorld(seed=list(CASES).index(case), params=params, shape=shape, mode=mode)
    first, joint = _pvalues(world, TRIALS, seed=1)
    assert first > P_MIN and joint > P_MIN


def _naive_without_correction(tree, target, probs, rng):
    """A wrong rule for the negative control: without-replacement drafts verified as if drawn with replacement."""
    return tree_rejection_sample(tree, target, probs, rng, without_replacement=False)


def test_the_statistical_check_catches_a_wrong_rule():
    world = SyntheticWorld(seed=3, params=SamplingParams(1.0), shape=(4, 1), mode="without")
    assert min(_pvalues(world, TRIALS // 4, seed=2, rule=_naive_without_correction)) < P_MIN


def test_the_trial_count_detects_a_one_point_error():
    """Power: moving 1% of probability between the two likeliest first tokens of a case is caught at p < 0.001
    by the marginal test with TRIALS draws (the chi-square statistic of the expected counts exceeds the cut)."""
    for case in CASES:
        shape, mode, params = CASES[case]
        world = SyntheticWorld(seed=list(CASES).index(case), params=params, shape=shape, mode=mode)
        first = world.expected().sum(1)
        a, b = first.topk(2).indices.tolist()
        wrong = first.clone()
        wrong[a] -= 0.01
        wrong[b] += 0.01
        assert _chisquare(wrong * TRIALS, first) < P_MIN, case
