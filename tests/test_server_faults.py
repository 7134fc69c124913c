"""Bad input and faults of ``specdec serve``: every bad request gets its documented status and an OpenAI error
body; disconnects and cancellations free every KV block; overload gets 429 and the server serves on; a failing
request (drafter or engine step) fails alone; shutdown ends open streams and refuses new requests with 503.
Every loop is bounded in count and time; loopback only."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import openai
import pytest

from specdec.sampling import SamplingParams
from specdec.server.engine_loop import Job

from .test_server import (  # noqa: F401 - fixtures
    MODEL,
    client,
    metric,
    reference,
    served,
    start_server,
    tiny_parts,
    wait_idle,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
# (path, body (dict, or raw bytes), status, param, code, a fragment of the message)
BAD_INPUTS = [
    (CHAT, b"{not json", 400, None, "invalid_json", "malformed JSON"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json", "must be a JSON object"),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_field", "missing required field 'messages'"),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt", "missing_field", "missing required field 'prompt'"),
    (CHAT, {"messages": "hi"}, 400, "messages", "invalid_value", "invalid 'messages'"),
    (CHAT, {"messages": []}, 400, "messages", "empty_prompt", "need at least one message"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty_prompt", "empty prompt"),
    (COMPLETIONS, {"prompt": "   "}, 400, "prompt", "empty_prompt", "empty prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "empty_prompt", "empty prompt"),
    (COMPLETIONS, {"prompt": [5] * 1000}, 400, "prompt", "context_length_exceeded", "context of 1024 tokens"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt", "invalid_value", "outside the vocabulary"),
    (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value", "max_tokens must be >= 1, got 0"),
    (CHAT, {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value",
     "max_completion_tokens must be >= 1, got 0"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 5000}, 400, "prompt", "context_length_exceeded", "1024"),
    (CHAT, {"messages": HI, "temperature": -0.5}, 400, "temperature", "invalid_value", "must be >= 0"),
    (CHAT, {"messages": HI, "top_p": 0}, 400, "top_p", "invalid_value", "top_p must be in (0, 1]"),
    (CHAT, {"messages": HI, "top_p": 1.5}, 400, "top_p", "invalid_value", "got 1.5"),
    (CHAT, {"messages": HI, "top_k": -1}, 400, "top_k", "invalid_value", "top_k must be >= 0"),
    (CHAT, {"messages": HI, "n": 2}, 400, "n", "invalid_value", "n must be 1"),
    (CHAT, {"messages": HI, "model": "gpt-9"}, 400, "model", "model_not_found", f"serves '{MODEL}'"),
    (CHAT, {"messages": HI, "specdec": {"drafter": "medusa"}}, 400, "specdec.drafter", "unknown_drafter",
     "allows ['ngram', 'none', 'failing', 'oracle', 'self:layers=1', 'eagle:tree=dynamic,budget=6']"),
    (CHAT, {"messages": HI, "specdec": {"drafter": "self:layers=2"}}, 400, "specdec.drafter", "unknown_drafter",
     "unknown drafter 'self:layers=2'"),
    (CHAT, {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value", "at most 4"),
    (CHAT, {"messages": HI, "stop": [""]}, 400, "stop", "invalid_value", "non-empty"),
    (CHAT, {"messages": HI, "seed": -1}, 400, "seed", "invalid_value", "seed must be in [0,"),
]


def check_error_body(response: httpx.Response, status: int, param, code, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code, error
    assert fragment in error["message"], error["message"]


def test_every_bad_input_gets_its_status_and_an_openai_error_body(served):  # noqa: F811
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for path, body, status, param, code, fragment in BAD_INPUTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(path, content=content, headers={"content-type": "application/json"})
            check_error_body(response, status, param, code, fragment)
        check_error_body(http.get("/v1/nope"), 404, None, None, "GET /v1/nope")
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client(served.url).chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    wait_idle(served)


def test_a_prompt_longer_than_the_cache_is_refused_up_front(start_server):  # noqa: F811
    small = start_server(num_blocks=8)  # 128 KV slots, under the model's 1024-token context
    response = httpx.post(f"{small.url}{COMPLETIONS}", json={"prompt": [5] * 60, "max_tokens": 16}, timeout=30)
    check_error_body(response, 400, "prompt", "context_length_exceeded", "the cache holds 128")
    small.stop()


def test_a_cancel_frees_the_blocks_before_the_next_step(served, monkeypatch):  # noqa: F811
    loop = served.state.loop
    got: list = []
    first = threading.Event()
    at_cancel: list = []
    real_cancel = loop.engine.cancel

    def cancel(rid: int) -> None:
        real_cancel(rid)
        at_cancel.append((loop.cache.allocator.num_free, loop.engine.steps))

    def deliver(out) -> None:
        got.append((out, loop.engine.steps))
        first.set()

    monkeypatch.setattr(loop.engine, "cancel", cancel)
    job = Job(list(range(10, 40)), SamplingParams(max_new_tokens=600), "none", deliver)
    loop.submit(job)
    assert first.wait(30)
    loop.cancel(job)
    deadline = time.monotonic() + 10
    while not got[-1][0].finished:
        assert time.monotonic() < deadline, "the cancelled request never ended"
        time.sleep(0.01)
    (out, steps_at_end), [(free, steps_at_cancel)] = got[-1], at_cancel
    assert out.stop_reason == "cancelled" and len(got) < 600
    assert free == loop.cache.allocator.num_blocks  # every block free as soon as the cancel is applied
    assert steps_at_end - steps_at_cancel <= 1  # and the request ends within one step
    wait_idle(served)


def test_fifty_random_disconnects_and_cancellations_leave_every_block_free(served, tiny_parts):  # noqa: F811
    rng = random.Random(13)
    plans = [(rng.choice(["read_then_close", "timeout", "complete", "stop"]), rng.randrange(4), rng.randrange(8, 160))
             for _ in range(50)]

    async def one(http: httpx.AsyncClient, gate: asyncio.Semaphore, i: int, plan: tuple) -> None:
        kind, chunks, max_tokens = plan
        body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": max_tokens,
                "temperature": 0, "specdec": {"drafter": "ngram" if i % 2 else "none"}}
        async with gate:
            if kind == "timeout":  # a whole (not streamed) request whose client gives up long before its end
                body.update(max_tokens=400, specdec={"drafter": "none"})  # >= 400 forwards: cannot end in 70 ms
                with pytest.raises(httpx.TimeoutException):
                    await http.post(CHAT, json=body, timeout=0.01 + 0.02 * chunks)
                return
            body["stream"] = True
            if kind == "stop":
                body["stop"] = ["e"]
            async with http.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                n = 0
                async for line in response.aiter_lines():
                    n += line.startswith("data:")
                    if kind == "read_then_close" and n > chunks:
                        break  # leaving the block closes the connection mid-stream

    async def run_all() -> None:
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as http:
            await asyncio.wait_for(asyncio.gather(*(one(http, gate, i, p) for i, p in enumerate(plans))), 120)

    asyncio.run(run_all())
    health = wait_idle(served, timeout=15)
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert sum(metric(text, "specdec_requests_finished_total", drafter=d, reason="disconnected")
               for d in ("ngram", "none")) > 0
    expected, _, _ = reference(tiny_parts, "after the storm", 12, chat=True)
    after = client(served.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "after the storm"}], max_tokens=12, temperature=0)
    assert after.choices[0].message.content == expected


def test_overload_returns_429_and_the_server_serves_afterwards(start_server, tiny_parts):  # noqa: F811
    busy = start_server(max_batch=2, max_waiting=1)  # at most 3 requests in flight
    body = {"messages": HI, "max_tokens": 600, "temperature": 0, "stream": True, "specdec": {"drafter": "none"}}
    with httpx.Client(base_url=busy.url, timeout=60) as http:
        streams = [http.stream("POST", CHAT, json=body) for _ in range(3)]
        opened = [s.__enter__() for s in streams]
        try:
            for response in opened:
                assert response.status_code == 200
            refused = http.post(CHAT, json=body)
            check_error_body(refused, 429, None, "queue_full", "the limit is 3 (2 running + 1 waiting")
            assert refused.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client(busy.url).chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    wait_idle(busy)
    expected, _, _ = reference(tiny_parts, "hi", 8, chat=True)
    again = client(busy.url).chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == expected
    text = httpx.get(f"{busy.url}/metrics", timeout=10).text
    assert metric(text, "specdec_request_errors_total", drafter="none", kind="overloaded") == 1
    assert metric(text, "specdec_request_errors_total", drafter="ngram", kind="overloaded") == 1
    busy.stop()


def test_a_failing_request_gets_500_or_an_error_event_and_the_others_finish(served, tiny_parts):  # noqa: F811
    expected, _, _ = reference(tiny_parts, "still fine", 16, chat=True)
    c = client(served.url)
    results: dict = {}

    def good() -> None:
        results["good"] = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still fine"}], max_tokens=16, temperature=0)

    worker = threading.Thread(target=good)
    worker.start()
    with pytest.raises(openai.InternalServerError, match="drafter failed on purpose"):
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, extra_body={"specdec": {"drafter":
                                                                                                 "failing"}})
    with pytest.raises(openai.APIError, match="drafter failed on purpose"):
        for _ in c.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, stream=True,
                                           extra_body={"specdec": {"drafter": "failing"}}):
            pass
    worker.join(60)
    assert results["good"].choices[0].message.content == expected
    assert httpx.get(f"{served.url}/health", timeout=10).json()["status"] == "ok"
    wait_idle(served)


def test_an_exception_in_the_engine_step_fails_open_requests_and_the_loop_goes_on(start_server):  # noqa: F811
    flaky = start_server()
    engine = flaky.state.loop.engine
    real_step, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step exploded on purpose")
        return real_step()

    engine.step = step
    c = client(flaky.url)
    with pytest.raises(openai.InternalServerError, match="step exploded on purpose"):
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0)
    after = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
    assert after.usage.completion_tokens == 5
    wait_idle(flaky)
    flaky.stop()


def test_shutdown_ends_open_streams_and_new_requests_get_503(start_server):  # noqa: F811
    doomed = start_server()
    body = {"messages": HI, "max_tokens": 900, "temperature": 0, "stream": True, "specdec": {"drafter": "none"}}
    with httpx.Client(base_url=doomed.url, timeout=30) as http, http.stream("POST", CHAT, json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        doomed.state.loop.stop_soon()  # what SIGINT/SIGTERM does first (GracefulServer.handle_exit)
        rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
        refused = http.post(CHAT, json={"messages": HI})
        check_error_body(refused, 503, None, "shutting_down", "shutting down")
        assert http.get("/health").status_code == 503
    started = time.monotonic()
    doomed.stop()
    assert time.monotonic() - started < 10
    assert doomed.state.loop.join(0) and doomed.state.loop.cache.allocator.num_free == 160


def test_a_cache_too_small_for_the_batch_preempts_and_every_request_still_completes(start_server, tiny_parts):  # noqa: F811
    tight = start_server(num_blocks=8, max_tree_nodes=16)  # 128 KV slots: one request fits, four at once do not
    prompts = ["first", "second one", "third request", "fourth"]
    expected = [reference(tiny_parts, p, 24, chat=True)[0] for p in prompts]

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{tight.url}/v1", api_key="unused", timeout=120,
                                      max_retries=0) as c:
            jobs = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                              max_tokens=24, temperature=0,
                                              extra_body={"specdec": {"drafter": "ngram" if i % 2 else "none"}})
                    for i, p in enumerate(prompts)]
            return [r.choices[0].message.content for r in await asyncio.wait_for(asyncio.gather(*jobs), 120)]

    assert asyncio.run(run_all()) == expected
    text = httpx.get(f"{tight.url}/metrics", timeout=10).text
    assert metric(text, "specdec_preemptions_total") > 0
    wait_idle(tight)
    tight.stop()
