"""End to end on a tiny random Llama: speculative sampling reproduces the target's distribution."""

import pytest
import torch
from scipy.stats import chisquare

from specdec.drafters import NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.sampling import SamplingParams, process_logits, sample
from specdec.target import TargetModel
from specdec.tree import TokenTree

from .conftest import tiny_llama

V = 8
PROMPT = [1, 5, 2, 7, 3]
TRIALS = 4000


class RandomTreeDrafter:
    """Samples a tree from a fixed random distribution ``q`` (2 siblings without replacement, then 1 child
    each) and reports ``q`` as the draft probabilities, processed with the request's sampling parameters."""

    vocab_size = V
    needs_hidden = False

    def __init__(self, seed: int) -> None:
        self.logits = torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.rng = torch.Generator().manual_seed(seed + 1)

    def propose(self, batch):
        drafts = []
        for item in batch:
            q, history = process_logits(self.logits, item.sampling), item.history
            gumbel = -torch.empty(V, dtype=torch.float64).exponential_(generator=self.rng).log()
            first = (q.log() + gumbel).topk(2).indices.tolist()
            second = [int(sample(q, self.rng)) for _ in first]
            tokens = [int(history[-1]), *first, *second]
            tree = TokenTree(torch.tensor(tokens), torch.tensor([-1, 0, 0, 1, 2]))
            drafts.append(Draft(tree, q.expand(5, V).clone(), without_replacement=True))
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_llama(vocab=V, seed=11))


def _exact_joint(target, params):
    """P(x1, x2 | PROMPT) under the processed target distribution, by enumerating x1."""
    with torch.inference_mode():
        p1 = process_logits(target.model(torch.tensor([PROMPT])).logits[0, -1], params)
        rows = torch.tensor([PROMPT + [a] for a in range(V)])
        p2 = process_logits(target.model(rows).logits[:, -1], params)
    return p1[:, None] * p2


def _first_two(target, drafter, params, trials):
    cache = target.new_cache(16, 4)
    counts = torch.zeros(V, V, dtype=torch.float64)
    steps_with_accepts = 0
    for i in range(trials):
        engine = SpeculativeEngine(target, cache, drafter, max_tree_nodes=8)
        result = engine.generate(PROMPT, 3, sampling=SamplingParams(params.temperature, params.top_k, params.top_p,
                                                                     seed=i))
        counts[result.tokens[0], result.tokens[1]] += 1
        steps_with_accepts += int(result.stats.step_tokens > result.stats.steps)
    assert cache.allocator.num_free == 16
    return counts, steps_with_accepts


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=5, top_p=0.95)])
@pytest.mark.parametrize("drafter_name", ["random_tree", "none"])
def test_first_two_tokens_follow_the_target(target, params, drafter_name):
    drafter = RandomTreeDrafter(seed=3) if drafter_name == "random_tree" else None
    counts, accepted_steps = _first_two(target, drafter, params, TRIALS)
    expected = _exact_joint(target, params).flatten() * TRIALS
    observed = counts.flatten()
    assert observed[expected == 0].sum() == 0
    keep = expected > 0
    assert chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue > 1e-3
    if drafter is not None:
        assert accepted_steps > TRIALS // 10  # speculation really happened


def test_sampling_reproduces_with_a_seed_and_ngram_is_exact_at_temperature(target):
    cache = target.new_cache(32, 4)
    params = SamplingParams(0.9, seed=123)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    a = SpeculativeEngine(target, cache, NgramDrafter()).generate(prompt, 12, sampling=params)
    b = SpeculativeEngine(target, cache, NgramDrafter()).generate(prompt, 12, sampling=params)
    assert a.tokens == b.tokens and a.stats.steps > 0
    assert cache.allocator.num_free == 32


def test_lossy_acceptance_must_be_named(target):
    with pytest.raises(ValueError, match="unknown acceptance rule 'typical'"):
        SpeculativeEngine(target, target.new_cache(4, 4), acceptance="typical")
    engine = SpeculativeEngine(target, target.new_cache(32, 4), RandomTreeDrafter(0), acceptance="typical_lossy")
    assert len(engine.generate(PROMPT, 6, sampling=SamplingParams(1.0, seed=0)).tokens) == 6
