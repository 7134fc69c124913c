"""The FastAPI app: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events or
whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Statuses: 400 bad input (:mod:`.protocol`), 404 unknown path, 429 wait queue full, 500 the request failed in the
engine (a stream gets an error event instead, the status being already sent), 503 shutting down. Every error body is
OpenAI's ``{"error": {"message", "type", "param", "code"}}``. A client that disconnects (streamed or not) cancels
its engine request; its KV blocks are freed before the engine's next step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from specdec.server.engine_loop import EngineLoop
from specdec.server.metrics import ServerMetrics
from specdec.server.protocol import APIError, ChatBody, CompletionBody, Limits, parse_body, to_generation
from specdec.server.responses import DONE, ResponseBuilder, sse
from specdec.server.stream import GenerationFailed, RequestStream


@dataclass
class ServerState:
    """What the routes share: the engine loop, the tokenizer, the request limits and the metrics."""

    loop: EngineLoop
    tokenizer: PreTrainedTokenizerBase
    limits: Limits
    metrics: ServerMetrics
    shutdown_timeout_s: float = 10.0


class EngineStreamResponse(StreamingResponse):
    """A streaming response that always runs ``on_close`` when it ends, however it ends (sent, failed, client
    disconnected, or cancelled before the first chunk)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def until_disconnect(receive: Receive, work: Awaitable) -> tuple | None:
    """``(result,)`` of ``work``, or ``None`` if the client disconnected first (``work`` is then cancelled)."""
    result: tuple | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal result, failure
            try:
                result = (await work,)
            except Exception as err:  # re-raised below, outside the task group (no exception group)
                failure = err
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if failure is not None:
        raise failure
    return result


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(state: ServerState) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, ends every open request and joins it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start()
        yield
        state.loop.request_stop()
        await run_in_threadpool(state.loop.join, state.shutdown_timeout_s)

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.specdec = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"invalid request: {err.errors()[0]['msg']}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        state.metrics.error("n/a", "internal")
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, state, ChatBody)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, state, CompletionBody)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.limits.model, "object": "model", "created": 0,
                                            "owned_by": "specdec", "drafters": list(state.limits.drafters)}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = state.loop.alive
        body = {"status": "ok" if alive else "unavailable", **state.loop.snapshot()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _generate(request: Request, state: ServerState, cls) -> Response:
    try:
        gen = to_generation(parse_body(await request.body(), cls), state.tokenizer, state.limits)
    except APIError:
        state.metrics.error("n/a", "bad_request")
        raise
    stream = RequestStream(gen, state.loop, state.tokenizer, state.metrics)
    stream.submit()
    builder = ResponseBuilder(gen.kind, gen.model)
    if gen.stream:
        return EngineStreamResponse(_events(stream, builder), stream.close)
    try:
        started = time.perf_counter()
        result = await until_disconnect(request.receive, _collect(stream))
    except GenerationFailed as err:
        return error_response(err.error)
    finally:
        stream.close()
    if result is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    body = builder.full(result[0], stream.finish_reason or "stop", stream.usage, stream.info)
    body["specdec"]["latency_s"] = round(time.perf_counter() - started, 4)
    return JSONResponse(body)


async def _collect(stream: RequestStream) -> str:
    return "".join([piece async for piece in stream.pieces()])


async def _events(stream: RequestStream, builder: ResponseBuilder) -> AsyncIterator[str]:
    if builder.kind == "chat":
        yield sse(builder.chunk("", first=True))
    try:
        async for piece in stream.pieces():
            yield sse(builder.chunk(piece))
    except GenerationFailed as err:
        yield sse(err.error.body())
        yield DONE
        return
    yield sse(builder.chunk(None, stream.finish_reason))
    if stream.gen.include_usage:
        yield sse(builder.usage_chunk(stream.usage, stream.info))
    yield DONE
