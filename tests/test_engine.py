"""End-to-end greedy decoding: speculative output is token-identical to autoregressive decoding."""

import random

import pytest
import torch

from specdec.drafters import DrafterSpec, NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.kv_cache import OutOfBlocks
from specdec.tree import TokenTree


class NoisyOracleDrafter:
    """Test drafter: random trees whose first branch follows a known-correct continuation for a random number of
    tokens, then random tokens; other branches are random. Exercises every acceptance length and aliasing."""

    vocab_size = 64
    needs_hidden = False

    def __init__(self, reference: list[int], seed: int, max_nodes: int = 12) -> None:
        self.reference, self.rng, self.max_nodes = reference, random.Random(seed), max_nodes
        self.accepted: list[torch.Tensor] = []

    def propose(self, batch):
        drafts = []
        for history in (item.history for item in batch):
            n = self.rng.randint(1, self.max_nodes)
            parents = [-1] + [self.rng.randrange(i) for i in range(1, n)]
            tokens = [int(history[-1])] + [self.rng.randrange(64) for _ in range(1, n)]
            # plant the true continuation along the path to a random node
            truth = self.reference[len(history):]
            node = self.rng.randrange(n)
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            good = self.rng.randint(0, len(path) - 1)
            for depth, j in enumerate(reversed(path[:-1]), start=1):
                if depth <= good and depth - 1 < len(truth):
                    tokens[j] = truth[depth - 1]
            drafts.append(Draft(TokenTree(torch.tensor(tokens), torch.tensor(parents))))
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        self.accepted.append(tokens)

    def release(self, seq_id):
        pass


@pytest.mark.parametrize("seed", range(12))
def test_speculative_equals_autoregressive_on_random_trees(tiny_target, seed):
    rng = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 64, (int(torch.randint(1, 30, (1,), generator=rng)),), generator=rng)
    cache = tiny_target.new_cache(160, [1, 4, 16][seed % 3])
    ar = SpeculativeEngine(tiny_target, cache).generate(prompt, 40)
    drafter = NoisyOracleDrafter(prompt.tolist() + ar.tokens, seed)
    spec = SpeculativeEngine(tiny_target, cache, drafter).generate(prompt, 40)
    assert spec.tokens == ar.tokens
    assert spec.stats.tau > 1.0  # the planted continuations were accepted at least sometimes
    assert spec.stats.steps < ar.stats.steps
    assert cache.allocator.num_free == 160


def test_autoregressive_equals_hf_generate(tiny_target, tiny_model):
    prompt = torch.randint(0, 64, (13,), generator=torch.Generator().manual_seed(5))
    ours = SpeculativeEngine(tiny_target, tiny_target.new_cache(32, 4)).generate(prompt, 30)
    with torch.inference_mode():
        ref = tiny_model.generate(prompt[None], max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert ours.tokens == ref[0, 13:].tolist()
    assert ours.stats.tau == 1.0


def test_ngram_drafter_is_lossless_on_repetitive_text(tiny_target):
    prompt = torch.tensor([3, 4, 5, 6, 7] * 6)
    cache = tiny_target.new_cache(64, 4)
    ar = SpeculativeEngine(tiny_target, cache).generate(prompt, 40)
    spec = SpeculativeEngine(tiny_target, cache, NgramDrafter()).generate(prompt, 40)
    assert spec.tokens == ar.tokens
    assert cache.allocator.num_free == 64


def test_eos_stops_and_is_included(tiny_target):
    prompt = torch.tensor([1, 2, 3])
    cache = tiny_target.new_cache(32, 4)
    free_run = SpeculativeEngine(tiny_target, cache).generate(prompt, 20)
    eos = free_run.tokens[5]
    stopped = SpeculativeEngine(tiny_target, cache, eos_token_ids=[eos]).generate(prompt, 20)
    first = free_run.tokens.index(eos)
    assert stopped.tokens == free_run.tokens[: first + 1] and stopped.stop_reason == "eos"


def test_stats_count_steps_and_depths(tiny_target):
    prompt = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(3))
    cache = tiny_target.new_cache(32, 4)
    ar = SpeculativeEngine(tiny_target, cache).generate(prompt, 25)
    drafter = NoisyOracleDrafter(prompt.tolist() + ar.tokens, 7)
    spec = SpeculativeEngine(tiny_target, cache, drafter).generate(prompt, 25)
    s = spec.stats
    assert s.new_tokens == 25
    assert len(drafter.accepted) == s.steps + 1  # told about the prefill token, then once per step
    assert drafter.accepted[0].numel() == 1
    # the first token comes from prefill, later ones from steps (the last step may be clipped at max_new_tokens)
    assert s.step_tokens >= 24 and s.step_tokens == sum(t.numel() for t in drafter.accepted[1:])
    assert sum(s.accepted_hist) == s.steps
    assert all(0.0 <= a <= 1.0 for a in s.acceptance_by_depth)
    assert s.depth_tried[0] >= s.depth_accepted[0]


@pytest.mark.parametrize("seed", range(3))
def test_acceptance_counters_equal_a_drafter_with_known_acceptance_depths(tiny_target, seed):
    """Every step's accepted depth is fixed by the drafter in advance (true prefix, then a wrong token): the
    engine's depth_tried / depth_accepted / accepted_hist / tau must equal the counts computed from that plan."""
    from tests.oracles import KnownDepthDrafter

    prompt = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(seed))
    cache = tiny_target.new_cache(64, 4)
    ar = SpeculativeEngine(tiny_target, cache).generate(prompt, 40)
    drafter = KnownDepthDrafter(prompt.tolist() + ar.tokens, seed)
    spec = SpeculativeEngine(tiny_target, cache, drafter).generate(prompt, 30)
    s = spec.stats
    assert spec.tokens == ar.tokens[:30]
    want = drafter.expected_counters()
    assert s.steps == len(drafter.log) and s.step_tokens == sum(g + 1 for _, g in drafter.log)
    assert (s.depth_tried, s.depth_accepted, s.accepted_hist) == (
        want["depth_tried"], want["depth_accepted"], want["accepted_hist"])
    assert len(s.depth_tried) >= 3 and s.depth_accepted[1] > 0  # deep acceptances and rejections both happened
    assert s.acceptance_by_depth == [a / t for a, t in zip(want["depth_accepted"], want["depth_tried"], strict=True)]
    assert cache.allocator.num_free == 64


# ---------------------------------------------------------------------- bad input, and no leaked blocks


class _BadDrafter:
    vocab_size = None
    needs_hidden = False

    def __init__(self, draft):
        self.draft = draft

    def propose(self, batch):
        return [self.draft(item.history) for item in batch]

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


def test_bad_input_raises_clear_errors_and_frees_every_block(tiny_target):
    cache = tiny_target.new_cache(16, 4)
    engine = SpeculativeEngine(tiny_target, cache, max_tree_nodes=8)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([], 5)
    with pytest.raises(ValueError, match="exceed the model's context of 1024"):
        engine.generate(torch.zeros(1020, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="the cache holds 64"):
        engine.generate(torch.zeros(60, dtype=torch.long), 5)
    wrong_root = _BadDrafter(lambda h: Draft(TokenTree.chain([int(h[-1]) + 1, 2])))
    with pytest.raises(ValueError, match="root token"):
        SpeculativeEngine(tiny_target, cache, wrong_root, max_tree_nodes=8).generate([1, 2, 3], 5)
    too_big = _BadDrafter(lambda h: Draft(TokenTree.chain([int(h[-1])] + [1] * 20)))
    with pytest.raises(ValueError, match="21 nodes exceed the per-step limit of 8"):
        SpeculativeEngine(tiny_target, cache, too_big, max_tree_nodes=8).generate([1, 2, 3], 5)
    assert cache.allocator.num_free == 16


def test_out_of_blocks_mid_request_frees_everything(tiny_target):
    cache = tiny_target.new_cache(16, 4)
    hog = cache.add_sequence()
    cache.reserve(hog, 40)  # 10 of 16 blocks taken by another sequence
    with pytest.raises(OutOfBlocks, match="out of KV blocks"):
        SpeculativeEngine(tiny_target, cache, max_tree_nodes=4).generate(torch.arange(10), 30)
    cache.release(hog)
    assert cache.allocator.num_free == 16


def test_vocabulary_mismatch_and_unknown_drafter(tiny_target):
    class Other(_BadDrafter):
        vocab_size = 65

    with pytest.raises(ValueError, match="tokenizer mismatch: the drafter's vocabulary has 65 tokens, the target's 64"):
        SpeculativeEngine(tiny_target, tiny_target.new_cache(4, 4), Other(None))
    with pytest.raises(ValueError, match="unknown drafter 'medusa2'"):
        DrafterSpec.parse("medusa2")
