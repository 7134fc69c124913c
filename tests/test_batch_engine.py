"""The batched step engine: a request's output does not depend on what else runs with it, under preemption,
cancellation, faults and mixed sampling settings; no KV block ever leaks."""

import random

import pytest
import torch

from specdec.drafters import NgramDrafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.sampling import SamplingParams
from specdec.tree import TokenTree
from tests.conftest import tiny_llama


class OracleDrafter:
    """Random trees whose first branch plants the known greedy continuation of the request (looked up by its
    prompt) for a random number of tokens; other nodes are random. Deterministic per (history length, seed), so a
    request drafts the same trees alone and in a batch."""

    vocab_size = 64
    needs_hidden = False

    def __init__(self, references: dict[tuple[int, ...], list[int]], seed: int = 0, max_nodes: int = 10,
                 fail_on: int | None = None) -> None:
        self.references, self.seed, self.max_nodes, self.fail_on = references, seed, max_nodes, fail_on
        self.live: set[int] = set()

    def _reference(self, history: list[int]) -> list[int]:
        for prompt, cont in self.references.items():
            if tuple(history[: len(prompt)]) == prompt:
                return list(prompt) + cont
        return history

    def propose(self, batch):
        drafts = []
        for item in batch:
            history = item.history.tolist()
            if self.fail_on is not None and history[0] == self.fail_on:
                raise RuntimeError(f"drafter failure for prompt starting with {self.fail_on}")
            self.live.add(item.seq_id)
            rng = random.Random(hash((self.seed, len(history), tuple(history[:3]))))
            n = rng.randint(1, self.max_nodes)
            parents = [-1] + [rng.randrange(i) for i in range(1, n)]
            tokens = [history[-1]] + [rng.randrange(64) for _ in range(1, n)]
            truth = self._reference(history)[len(history):]
            node, path = rng.randrange(n), []
            while node > 0:
                path.append(node)
                node = parents[node]
            good = rng.randint(0, len(path))
            for depth, j in enumerate(reversed(path), start=1):
                if depth <= good and depth - 1 < len(truth):
                    tokens[j] = truth[depth - 1]
            drafts.append(Draft(TokenTree(torch.tensor(tokens), torch.tensor(parents))))
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        self.live.add(seq_id)

    def release(self, seq_id):
        self.live.discard(seq_id)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(64) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def _solo(target, prompts, new_tokens, **engine_kw):
    engine = SpeculativeEngine(target, target.new_cache(256, 4), **engine_kw)
    return [engine.generate(p, new_tokens).tokens for p in prompts]


@pytest.mark.parametrize("seed", range(4))
def test_each_request_in_a_batch_equals_its_solo_greedy_run(tiny_target, seed):
    prompts = _prompts(seed, 5)
    solo = _solo(tiny_target, prompts, 20)
    drafter = OracleDrafter({tuple(p): s for p, s in zip(prompts, solo, strict=True)}, seed)
    cache = tiny_target.new_cache(256, [1, 4, 16][seed % 3])
    engine = SpeculativeEngine(tiny_target, cache, drafter, max_batch=[2, 3, 6, 8][seed], max_step_tokens=64)
    results = engine.generate_batch(prompts, 20)
    assert [r.tokens for r in results] == solo
    assert all(r.stats.tau > 1.0 for r in results)  # planted drafts were accepted in every request
    assert max(len(r.stats.depth_accepted) for r in results) >= 2
    assert cache.allocator.num_free == 256 and not drafter.live


def test_preemption_when_the_cache_runs_out_keeps_outputs_exact(tiny_target):
    prompts = _prompts(7, 5)
    solo = _solo(tiny_target, prompts, 30)
    drafter = OracleDrafter({tuple(p): s for p, s in zip(prompts, solo, strict=True)}, 3)
    cache = tiny_target.new_cache(24, 4)  # 96 slots; each request alone needs up to 40 + 30 + 10
    engine = SpeculativeEngine(tiny_target, cache, drafter, max_tree_nodes=10, max_batch=5)
    results = engine.generate_batch(prompts, 30)
    assert [r.tokens for r in results] == solo
    assert engine.preemptions > 0
    assert cache.allocator.num_free == 24 and not drafter.live


def test_random_workload_with_arrivals_cancellations_and_eos(tiny_target):
    rng = random.Random(11)
    prompts = _prompts(11, 12)
    eos = [5, 17]
    solo_engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(256, 4), eos_token_ids=eos)
    solo = [solo_engine.generate(p, 20).tokens for p in prompts]
    drafter = OracleDrafter({tuple(p): s for p, s in zip(prompts, solo, strict=True)}, 5)
    cache = tiny_target.new_cache(32, 4)
    engine = SpeculativeEngine(tiny_target, cache, drafter, eos_token_ids=eos, max_tree_nodes=10, max_batch=4,
                               max_step_tokens=32)
    ids, done, cancelled, queue, streamed = {}, {}, set(), list(range(len(prompts))), {}
    for _ in range(500):
        if queue and rng.random() < 0.5:
            i = queue.pop(0)
            ids[engine.add_request(prompts[i], SamplingParams(max_new_tokens=20))] = i
        live = [r for r in ids if r not in done and r not in cancelled]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            engine.cancel(victim)
            cancelled.add(victim)
        for out in engine.step():
            streamed.setdefault(out.request_id, []).extend(out.new_tokens)
            if out.finished and out.request_id not in cancelled:
                done[out.request_id] = out
        if not queue and not engine.has_work():
            break
    assert not engine.has_work() and cache.allocator.num_free == 32 and not drafter.live
    assert cancelled and len(done) + len(cancelled) == len(prompts)
    assert engine.preemptions > 0
    for rid, out in done.items():
        assert out.stop_reason == ("eos" if solo[ids[rid]][-1] in eos else "length")
        assert streamed[rid] == solo[ids[rid]]


def test_streamed_tokens_of_a_batch_add_up_to_each_solo_output(tiny_target):
    prompts = _prompts(3, 4)
    solo = _solo(tiny_target, prompts, 16, drafter=NgramDrafter())
    engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(128, 4), NgramDrafter(), max_batch=4)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=16)) for p in prompts]
    streamed = {rid: [] for rid in ids}
    while engine.has_work():
        for out in engine.step():
            streamed[out.request_id] += out.new_tokens
    assert [streamed[rid] for rid in ids] == solo


def test_mixed_greedy_and_sampled_requests_share_steps_and_match_solo_runs(tiny_target):
    prompts = _prompts(5, 6)
    params = [SamplingParams(0.0) if i % 2 else SamplingParams(0.9, top_k=20, seed=i) for i in range(6)]
    solo_engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(128, 4), NgramDrafter())
    solo = [solo_engine.generate(p, 16, sampling=s).tokens for p, s in zip(prompts, params, strict=True)]
    engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(128, 4), NgramDrafter(), max_batch=6)
    batched = engine.generate_batch(prompts, 16, params)
    assert [r.tokens for r in batched] == solo  # per-request generators: batch composition changes nothing


def test_sampled_requests_inside_a_batch_follow_the_target_distribution():
    """First-two-token joint of T=1 requests run 8 at a time in batches that also hold greedy requests, against
    the exact joint (chi-square over the 64 cells of an 8-token vocabulary, 1,600 trials)."""
    from scipy.stats import chisquare

    from specdec.sampling import process_logits
    from specdec.target import TargetModel

    target, vocab, prompt = TargetModel(tiny_llama(vocab=8, seed=11)), 8, [1, 2, 1, 2, 1]
    params = SamplingParams(1.0)
    with torch.inference_mode():
        p1 = process_logits(target.model(torch.tensor([prompt])).logits[0, -1], params)
        p2 = process_logits(target.model(torch.tensor([prompt + [a] for a in range(vocab)])).logits[:, -1], params)
    expected = (p1[:, None] * p2).flatten()
    cache = target.new_cache(64, 4)
    engine = SpeculativeEngine(target, cache, NgramDrafter(min_ngram=1, max_nodes=8), max_batch=10,
                               max_tree_nodes=8)
    counts, accepted = torch.zeros(vocab * vocab, dtype=torch.float64), 0
    for start in range(0, 1600, 8):
        settings = [SamplingParams(1.0, seed=start + i) for i in range(8)] + [SamplingParams()] * 2
        results = engine.generate_batch([prompt] * 8 + [[3, 4], [5]], 3, settings)
        for r in results[:8]:
            counts[r.tokens[0] * vocab + r.tokens[1]] += 1
            accepted += int(r.stats.step_tokens > r.stats.steps)
    assert cache.allocator.num_free == 64
    keep = expected > 0
    assert counts[~keep].sum() == 0
    p = chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue
    assert p > 1e-3 and accepted > 100


def test_a_raising_drafter_fails_only_its_request(tiny_target):
    prompts = [[9, 1, 2, 3], [8, 1, 2], [7, 4, 4, 4]]
    solo = _solo(tiny_target, prompts, 12)
    drafter = OracleDrafter({tuple(p): s for p, s in zip(prompts, solo, strict=True)}, fail_on=8)
    cache = tiny_target.new_cache(64, 4)
    engine = SpeculativeEngine(tiny_target, cache, drafter, max_batch=3)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    final = {}
    while engine.has_work():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[ids[1]].stop_reason == "error" and "drafter failure" in final[ids[1]].error
    assert [engine_out.stop_reason for engine_out in (final[ids[0]], final[ids[2]])] == ["length", "length"]
    assert cache.allocator.num_free == 64 and not drafter.live


def test_cancel_frees_blocks_at_once_and_is_reported_by_the_next_step(tiny_target):
    cache = tiny_target.new_cache(64, 4)
    engine = SpeculativeEngine(tiny_target, cache, NgramDrafter())
    rid = engine.add_request(list(range(20)), SamplingParams(max_new_tokens=30))
    engine.step()
    assert cache.allocator.num_free < 64
    engine.cancel(rid)
    assert cache.allocator.num_free == 64
    [out] = engine.step()
    assert out.finished and out.stop_reason == "cancelled"
    assert not engine.has_work()
    with pytest.raises(ValueError, match="unknown request id 12345"):
        engine.cancel(12345)


def test_cancelling_another_request_from_inside_a_step_is_safe(tiny_target):
    cache = tiny_target.new_cache(64, 4)

    class Canceller(NgramDrafter):
        def propose(self, batch):
            if len(batch) == 2:
                engine.cancel(victim)
            return super().propose(batch)

    engine = SpeculativeEngine(tiny_target, cache, Canceller(), max_batch=2)
    keep = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))
    victim = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=8))
    finished = {}
    while engine.has_work():
        finished.update({o.request_id: o.stop_reason for o in engine.step() if o.finished})
    assert finished == {keep: "length", victim: "cancelled"}
    assert cache.allocator.num_free == 64


def test_bad_engine_settings_and_requests_name_the_limit(tiny_target):
    cache = tiny_target.new_cache(16, 4)
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        SpeculativeEngine(tiny_target, cache, max_batch=0)
    with pytest.raises(ValueError, match="max_step_tokens .4. must be at least max_tree_nodes .8."):
        SpeculativeEngine(tiny_target, cache, max_tree_nodes=8, max_step_tokens=4)
    engine = SpeculativeEngine(tiny_target, cache, max_tree_nodes=8)
    with pytest.raises(ValueError, match="use --num-blocks 18 or more"):
        engine.add_request(list(range(60)), SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"prompt token id 64 is outside the vocabulary \[0, 64\)"):
        engine.add_request([1, 64], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        SamplingParams(max_new_tokens=0)
    assert not engine.has_work() and cache.allocator.num_free == 16


def test_a_finished_request_leaves_no_state_behind(tiny_target):
    engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(32, 4), NgramDrafter())
    engine.generate_batch([[1, 2, 3], [4, 5]], 6)
    assert not engine._requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert not len(engine.drafter._state)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_decode_step_reads_the_device_once(tiny_target, monkeypatch, mixed):
    """Host syncs of one decode step's verify phase (forward, acceptance of greedy and sampled requests, KV moves,
    bookkeeping): exactly the one documented read, counted by patching the tensor methods that copy device
    values to the host."""
    prompts = _prompts(2, 3)
    solo = _solo(tiny_target, prompts, 12)
    drafter = OracleDrafter({tuple(p): s for p, s in zip(prompts, solo, strict=True)}, 1)
    engine = SpeculativeEngine(tiny_target, tiny_target.new_cache(64, 4), drafter, max_batch=3)
    for i, p in enumerate(prompts):
        temperature = 0.8 if mixed and i % 2 == 0 else 0.0
        engine.add_request(p, SamplingParams(temperature, top_k=10 * i, top_p=0.9, seed=i, max_new_tokens=12))
    engine.step()  # prefill
    reads = []
    verify = engine._verify

    def counted(*args):
        names = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")
        originals = {n: getattr(torch.Tensor, n) for n in names}
        for n, f in originals.items():
            monkeypatch.setattr(torch.Tensor, n,
                                lambda self, *a, _f=f, _n=n, **k: (reads.append(_n), _f(self, *a, **k))[1])
        try:
            return verify(*args)
        finally:
            for n, f in originals.items():
                monkeypatch.setattr(torch.Tensor, n, f)

    monkeypatch.setattr(engine, "_verify", counted)
    outs = engine.step()
    assert len(outs) == 3 and all(o.accepted is not None for o in outs)
    assert reads == ["tolist"]
    while engine.has_work():
        engine.step()
