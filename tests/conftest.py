"""Shared fixtures: tiny random-weight Llama models built in code, and the embedded SmolLM2 (loaded once)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (transformers imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from specdec.target import TargetModel  # noqa: E402

ROPE_THETA = 10.0  # fast-turning RoPE: a few positions of error rotate every frequency pair noticeably
QK_SCALE, VO_SCALE = 16.0, 4.0  # trained-like attention: sharp, position-dependent scores that move the logits


def tiny_llama(vocab: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype: torch.dtype = torch.float64, position_sensitive: bool | None = None) -> LlamaForCausalLM:
    """A random-weight Llama small enough for exhaustive CPU tests (GQA 4/2, head_dim 8).

    Position-sensitive on purpose (``tests/test_positions.py`` checks it): at the default initialisation (weights
    of std 0.02, ``rope_theta`` 1e4) attention is nearly uniform, so moving a token's RoPE position by 5 moves the
    logits by ~6e-4 against a median top-2 margin of ~0.027, and end-to-end tests could not see position bugs.
    Here ``rope_theta`` is small and the attention projections are scaled up (q, k by ``QK_SCALE``; v, o by
    ``VO_SCALE``), so the same shift moves the logits by about ten times the typical margin.

    ``position_sensitive`` defaults to True for float64 models (the exact verification tests) and False
    otherwise: the float32 teachers of the training tests keep the smooth HF initialisation, which a drafter
    learns to imitate within those tests' few steps."""
    if position_sensitive is None:
        position_sensitive = dtype == torch.float64
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **({"rope_theta": ROPE_THETA} if position_sensitive else {}),
    )
    model = LlamaForCausalLM(cfg)
    if position_sensitive:
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj, scale in ((attn.q_proj, QK_SCALE), (attn.k_proj, QK_SCALE), (attn.v_proj, VO_SCALE),
                                    (attn.o_proj, VO_SCALE)):
                    proj.weight.mul_(scale)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run ~15x faster on one thread than on two contended ones
    (thread hand-off dominates). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_for_the_model_size(request):
    """Every test runs torch on one thread unless it uses the real SmolLM2 (``smollm2`` fixture): the tiny models'
    ops are too small to split, and two threads handing them off cost more than they compute (many times more
    when the machine is busy)."""
    if "smollm2" in request.fixturenames:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture()
def tiny_target(tiny_model) -> TargetModel:
    return TargetModel(tiny_model)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32, loaded once per session."""
    from specdec.app.loaders import load_model_and_tokenizer

    return load_model_and_tokenizer(None, torch.float32)


def run_first_two(target, drafter, prompt, trials, params, max_tree_nodes=8, batch=64):
    """Counts ``[V * V]`` of the first two generated tokens over ``trials`` seeded requests (seed = trial index), run
    ``batch`` at a time through one engine (each request has its own generators, so batching changes no request's
    distribution and exercises batched acceptance), and how many requests accepted a draft token. Checks that every
    KV block is free afterwards."""
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams

    vocab = target.vocab_size
    blocks = batch * (-(-(len(prompt) + 3 + max_tree_nodes) // 4) + 1)
    cache = target.new_cache(blocks, 4)
    engine = SpeculativeEngine(target, cache, drafter, max_tree_nodes=max_tree_nodes, max_batch=batch,
                               max_step_tokens=batch * (len(prompt) + max_tree_nodes))
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    accepted = 0
    for start in range(0, trials, batch):
        seeds = range(start, min(trials, start + batch))
        runs = [SamplingParams(params.temperature, params.top_k, params.top_p, seed=i) for i in seeds]
        for result in engine.generate_batch([prompt] * len(runs), 3, runs):
            counts[result.tokens[0] * vocab + result.tokens[1]] += 1
            accepted += int(result.stats.step_tokens > result.stats.steps)
    assert cache.allocator.num_free == blocks
    return counts, accepted


def first_two_tokens_pvalue(target, drafter, prompt, trials, params, max_tree_nodes=8):
    """Chi-square p-value of the first two generated tokens' joint (``trials`` seeded speculative runs) against the
    exact target joint computed by enumerating the first token; also returns how many runs accepted a draft token.

    The vocabulary must be small (the joint has ``V**2`` cells); the target cache is checked for leaks."""
    from scipy.stats import chisquare

    from specdec.sampling import process_logits

    vocab = target.vocab_size
    with torch.inference_mode():
        p1 = process_logits(target.model(torch.tensor([prompt])).logits[0, -1], params)
        p2 = process_logits(target.model(torch.tensor([prompt + [a] for a in range(vocab)])).logits[:, -1], params)
    expected = (p1[:, None] * p2).flatten()
    counts, accepted = run_first_two(target, drafter, prompt, trials, params, max_tree_nodes)
    assert counts[expected == 0].sum() == 0, "a token pair with zero target probability was generated"
    keep = expected > 0
    return chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue, accepted


def assert_same_committed_kv(cache_a, seq_a, cache_b, seq_b, n):
    """K and V of logical positions ``[0, n)`` agree (all layers) between two paged caches."""
    for a, b in ((cache_a.k, cache_b.k), (cache_a.v, cache_b.v)):
        ours = a.flatten(1, 2)[:, cache_a.slots(seq_a, torch.arange(n))]
        ref = b.flatten(1, 2)[:, cache_b.slots(seq_b, torch.arange(n))]
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def crash_on_call(fn, n: int):
    """``fn`` wrapped to raise ``KeyboardInterrupt`` on its ``n``-th call (a training run dying mid-way)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def inputs(seq_ids, histories, sampling=None, generator=None, budget=None):
    """The :class:`DraftInput` list a drafter's ``propose`` takes, from parallel lists (test shorthand)."""
    from specdec.interfaces import DraftInput
    from specdec.sampling import GREEDY

    return [DraftInput(s, torch.as_tensor(h), sampling or GREEDY, generator, budget)
            for s, h in zip(seq_ids, histories, strict=True)]
