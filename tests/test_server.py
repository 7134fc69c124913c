"""``specdec serve`` end to end: the app runs in-process on 127.0.0.1 (uvicorn on a bound socket, daemon thread)
over a tiny random float64 Llama that uses the SmolLM2 tokenizer; the official ``openai`` client (sync and async)
checks outputs against the engine's own greedy ``generate``, usage, stop strings, concurrency and metrics.

Fault tests (bad input, disconnects, overload, failing requests, shutdown) are in ``test_server_faults.py``;
detokenization in ``test_server_detok.py``. Every loop is bounded in count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from specdec.app.prompts import encode_prompt
from specdec.drafters import DrafterSpec, NgramDrafter, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft
from specdec.server.lifecycle import serve_in_thread
from specdec.server.openai_api import ServerState, create_app
from specdec.server.settings import ServerSettings, build_state
from specdec.target import TargetModel, eos_token_ids
from specdec.tree import TokenTree

from .conftest import tiny_llama

MODEL = "tiny-llama"
MODEL_DRAFTERS = ("self:layers=1", "eagle:tree=dynamic,budget=6")  # untrained EAGLE heads: they need hidden states
PROMPTS = ["Repeat after me: red green blue red green blue", "Say hi", "Count: 1 2 3 4 5 6", "Write a haiku",
           "a b c a b c a b c", "Translate: bonjour", "Tell me a story about a cat", "x y z x y z"]


class FailingDrafter:
    """Raises on every proposal: requests that choose it must fail alone."""

    vocab_size = None
    needs_hidden = False

    def propose(self, batch):
        raise RuntimeError("drafter failed on purpose")

    def accept(self, seq_id, tokens, hidden=None):
        return None

    def release(self, seq_id):
        return None


class OracleDrafter:
    """Proposes the target's own greedy continuation (``depth`` tokens, one plain HF forward each): every draft
    token is accepted, so tau and acceptance do not depend on what the random model happens to repeat."""

    vocab_size = None
    needs_hidden = False

    def __init__(self, model, depth: int = 3) -> None:
        self.model, self.depth = model, depth

    @torch.inference_mode()
    def propose(self, batch):
        drafts = []
        for item in batch:
            seq = item.history.clone()
            for _ in range(self.depth):
                seq = torch.cat([seq, self.model(seq[None]).logits[0, -1].argmax().view(1)])
            drafts.append(Draft(TokenTree.chain(seq[item.history.numel() - 1 :])))
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        return None

    def release(self, seq_id):
        return None


@dataclass
class Served:
    url: str
    state: ServerState
    server: object
    thread: object

    def stop(self, timeout: float = 15.0) -> None:
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server thread did not stop"


@pytest.fixture(scope="session")
def tiny_parts():
    """(target, tokenizer): a random float64 Llama with the SmolLM2 tokenizer's vocabulary and EOS."""
    from specdec.app.loaders import load_tokenizer

    tokenizer = load_tokenizer(None)
    model = tiny_llama(vocab=len(tokenizer), layers=2, dtype=torch.float64)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return TargetModel(model), tokenizer


@pytest.fixture(scope="session")
def start_server(tiny_parts):
    """``start_server(**settings) -> Served`` (drafters: ngram, none, failing and :data:`MODEL_DRAFTERS`); all are
    stopped at the end."""
    target, tokenizer = tiny_parts
    started: list[Served] = []

    def start(**overrides) -> Served:
        settings = ServerSettings(**{"model_name": MODEL, "default_drafter": "ngram", "num_blocks": 160,
                                     "max_waiting": 16, "default_max_tokens": 16, **overrides})
        drafters = {"ngram": NgramDrafter(), "none": None, "failing": FailingDrafter(),
                    "oracle": OracleDrafter(target.model),
                    **{spec: build_drafter(DrafterSpec.parse(spec), target) for spec in MODEL_DRAFTERS}}
        state = build_state(target, tokenizer, drafters, settings)
        server, thread, url = serve_in_thread(create_app(state), state.loop.stop_soon)
        served = Served(url, state, server, thread)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.thread.is_alive():
            served.stop()


@pytest.fixture(scope="module")
def served(start_server) -> Served:
    return start_server()


DRAFTERS = ("none", "ngram", *MODEL_DRAFTERS)


def reference(tiny_parts, prompt: str, max_new_tokens: int, chat: bool) -> tuple[str, list[int], list[int]]:
    """``(text, prompt ids, tokens)`` of the engine's greedy ``generate`` (what ``specdec generate`` prints)."""
    target, tokenizer = tiny_parts
    ids = encode_prompt(tokenizer, prompt, chat)
    engine = SpeculativeEngine(target, target.new_cache(64), None, eos_token_ids(target.model, tokenizer))
    tokens = engine.generate(ids, max_new_tokens).tokens
    return tokenizer.decode(tokens, skip_special_tokens=True), ids.tolist(), tokens


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def wait_idle(served: Served, timeout: float = 10.0) -> dict:
    """Poll ``/health`` until no request is open and every KV block is free (bounded); return the last body."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{served.url}/health", timeout=10).json()
        if health["open_requests"] == 0 and health["kv_blocks_free"] == health["kv_blocks_total"]:
            return health
        assert time.monotonic() < deadline, f"the server did not become idle: {health}"
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` in ``/metrics`` text (0.0 if absent)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    return 0.0


def test_greedy_chat_and_completion_equal_the_engines_output_streamed_and_whole(served, tiny_parts):
    c = client(served.url)
    n = 20
    chat_text, chat_ids, chat_tokens = reference(tiny_parts, PROMPTS[0], n, chat=True)
    whole = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                      max_tokens=n, temperature=0)
    assert whole.choices[0].message.content == chat_text and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(chat_ids) and whole.usage.completion_tokens == len(chat_tokens) == n
    assert whole.usage.total_tokens == len(chat_ids) + n
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)

    text, ids, tokens = reference(tiny_parts, PROMPTS[4], n, chat=False)
    done = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=n, temperature=0)
    assert done.choices[0].text == text and done.usage.prompt_tokens == len(ids)
    assert done.usage.completion_tokens == len(tokens)
    streamed = list(c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=n, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length"
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=n, temperature=0)  # token-id prompt
    assert by_ids.choices[0].text == text


def test_stop_strings_cut_exactly_before_the_first_match_streamed_and_whole(served, tiny_parts):
    c = client(served.url)
    full, _, _ = reference(tiny_parts, PROMPTS[6], 24, chat=True)
    assert len(full) >= 12, f"the reference text is too short to cut: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    messages = [{"role": "user", "content": PROMPTS[6]}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                      stop=["\x00never", stop])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(served)  # the cut request was cancelled: its blocks are free again


def test_eight_concurrent_streams_equal_their_sequential_outputs_and_share_a_batch(served, tiny_parts):
    """Requests with four drafters (n-gram, none, the target's first layer, EAGLE heads) share one batch."""
    n = 24
    expected = [reference(tiny_parts, p, n, chat=True)[0] for p in PROMPTS]
    before = httpx.get(f"{served.url}/metrics", timeout=10).text

    async def one(c: openai.AsyncOpenAI, prompt: str, drafter: str) -> str:
        stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=n, temperature=0, stream=True,
                                                 extra_body={"specdec": {"drafter": drafter}})
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=60,
                                      max_retries=0) as c:
            jobs = [one(c, p, DRAFTERS[i % 4]) for i, p in enumerate(PROMPTS)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    assert asyncio.run(run_all()) == expected
    after = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert metric(after, "specdec_running_batch_peak") > 1
    for drafter in DRAFTERS:
        grown = (metric(after, "specdec_generated_tokens_total", drafter=drafter)
                 - metric(before, "specdec_generated_tokens_total", drafter=drafter))
        assert grown == 2 * n, drafter
    none_steps = metric(after, "specdec_tokens_per_step_count", drafter="none")
    assert none_steps > 0 and metric(after, "specdec_tokens_per_step_sum", drafter="none") == none_steps  # tau 1
    assert metric(after, "specdec_time_to_first_token_seconds_count", drafter="ngram") >= 2
    assert metric(after, "specdec_inter_token_latency_seconds_count", drafter="ngram") > 0
    wait_idle(served)


def test_metrics_health_and_models_describe_the_server(served):
    health = httpx.get(f"{served.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["kv_blocks_total"] == 160
    models = client(served.url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    for name in ("specdec_requests_running", "specdec_requests_waiting", "specdec_kv_blocks_used",
                 "specdec_kv_blocks_free", "specdec_engine_steps_total", "specdec_preemptions_total",
                 "specdec_step_batch_size_bucket", "specdec_running_batch_peak"):
        assert re.search(rf"^{name}", text, re.M), f"{name} missing from /metrics"
    assert metric(text, "specdec_kv_blocks_free") + metric(text, "specdec_kv_blocks_used") == 160


def test_accepted_drafts_show_in_tau_acceptance_by_depth_and_the_metrics(served, tiny_parts):
    c = client(served.url)
    expected, _, _ = reference(tiny_parts, PROMPTS[2], 32, chat=False)
    out = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=32, temperature=0,
                               extra_body={"specdec": {"drafter": "oracle"}})
    assert out.choices[0].text == expected
    info = out.model_extra["specdec"]
    assert info["drafter"] == "oracle" and info["tau"] > 2.5  # 3 planted tokens + the bonus, but near the end
    assert info["acceptance_by_depth"][:3] == [1.0, 1.0, 1.0]
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert metric(text, "specdec_depth_tried_total", drafter="oracle", depth="3") > 0
    assert metric(text, "specdec_acceptance_rate_by_depth", drafter="oracle", depth="1") == 1.0
    steps = metric(text, "specdec_verification_steps_total", drafter="oracle")
    # 32 tokens = 1 from the prefill + (accepted + 1) per step; the last step may be clipped at max_tokens
    assert 31 - steps <= metric(text, "specdec_accepted_draft_tokens_total", drafter="oracle") <= 31 - steps + 3
    assert metric(text, "specdec_tree_nodes_total", drafter="oracle") > 3 * steps
    ngram = c.completions.create(model=MODEL, prompt=" ".join(["one two three four"] * 12), max_tokens=16,
                                 temperature=0)
    assert ngram.model_extra["specdec"]["drafter"] == "ngram" and ngram.model_extra["specdec"]["tau"] >= 1.0


def test_a_seeded_sampled_request_reproduces_and_top_k_one_is_greedy(served, tiny_parts):
    c = client(served.url)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 12}
    first = c.chat.completions.create(**ask, temperature=0.9, top_p=0.95, seed=7)
    again = c.chat.completions.create(**ask, temperature=0.9, top_p=0.95, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content
    greedy, _, _ = reference(tiny_parts, PROMPTS[3], 12, chat=True)
    top1 = c.chat.completions.create(**ask, temperature=0.9, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy


def test_a_drafter_named_without_options_resolves_to_the_one_allowed_spec(served):
    out = client(served.url).completions.create(model=MODEL, prompt="a b a b a b", max_tokens=4, temperature=0,
                                                extra_body={"specdec": {"drafter": "eagle"}})
    assert out.model_extra["specdec"]["drafter"] == "eagle:tree=dynamic,budget=6"
