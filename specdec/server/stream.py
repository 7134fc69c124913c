"""One request from the HTTP side: submit it to the engine loop, then turn its step outputs (delivered on an
``asyncio.Queue`` from the engine thread) into text pieces, cutting stop strings exactly.

A stop string ends the request early: the engine request is cancelled at once (its blocks freed before the next
step) and the finish reason is ``stop``. An engine error or a shutdown ends it with :class:`GenerationFailed`.
:meth:`RequestStream.close` is idempotent and cancels the engine request if it is still open (client gone).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from transformers import PreTrainedTokenizerBase

from specdec.request import StepOutput
from specdec.server.detok import IncrementalDetokenizer
from specdec.server.engine_loop import EngineLoop, Job, Overloaded, Unavailable
from specdec.server.metrics import ServerMetrics
from specdec.server.protocol import APIError, Generation
from specdec.server.responses import Usage, specdec_info
from specdec.stats import RequestStats


class GenerationFailed(Exception):
    """The request failed in the engine (HTTP ``status`` 500) or the server is shutting down (503)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.error = APIError(status, message, "server_error" if status == 500 else "service_unavailable", None,
                              code)


class RequestStream:
    """The life of one :class:`Generation` on the HTTP side (create it inside the running event loop)."""

    def __init__(self, gen: Generation, loop: EngineLoop, tokenizer: PreTrainedTokenizerBase,
                 metrics: ServerMetrics) -> None:
        self.gen, self.loop, self.metrics = gen, loop, metrics
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        aio = asyncio.get_running_loop()

        def deliver(out: StepOutput) -> None:  # engine thread
            aio.call_soon_threadsafe(self.queue.put_nowait, out)

        self.job = Job(gen.prompt_ids, gen.params, gen.drafter, deliver)
        self.detok = IncrementalDetokenizer(tokenizer, gen.stop)
        self.finish_reason: str | None = None
        self.stats: RequestStats | None = None
        self.closed = False

    def submit(self) -> None:
        """Queue the request; 429 when the wait queue is full, 503 when shutting down."""
        try:
            self.loop.submit(self.job)
        except Overloaded as err:
            self.metrics.error(self.gen.drafter, "overloaded")
            raise APIError(429, str(err), "rate_limit_error", None, "queue_full") from None
        except Unavailable as err:
            self.metrics.error(self.gen.drafter, "unavailable")
            raise APIError(503, str(err), "service_unavailable", None, "shutting_down") from None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.gen.prompt_ids), self.detok.tokens_used)

    @property
    def info(self) -> dict:
        return specdec_info(self.gen.drafter, self.stats)

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces until the request ends (``finish_reason`` is then set); raises :class:`GenerationFailed`."""
        while self.finish_reason is None:
            out = await self.queue.get()
            for token in out.new_tokens:
                text = self.detok.add(token)
                if text:
                    yield text
                if self.detok.stopped:
                    self._end("stop")
                    self.loop.cancel(self.job)  # the rest is not needed: free the blocks now
                    return
            if not out.finished:
                continue
            self.stats = out.stats
            if out.stop_reason in ("error", "cancelled", "shutdown"):
                self._end(out.stop_reason)
                self.metrics.error(self.gen.drafter, out.stop_reason)
                if out.stop_reason == "shutdown":
                    raise GenerationFailed(503, out.error or "the server is shutting down", "shutting_down")
                raise GenerationFailed(500, f"generation failed: {out.error or out.stop_reason}", "generation_failed")
            tail = self.detok.finish()
            if tail:
                yield tail
            self._end("length" if out.stop_reason == "length" and not self.detok.stopped else "stop")

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.closed = True
        self.metrics.finish(self.gen.drafter, reason)

    def close(self) -> None:
        """The response is over (sent, failed or the client left): cancel the engine request if still open."""
        if not self.closed:
            self.closed = True
            self.loop.cancel(self.job)
            self.metrics.finish(self.gen.drafter, "disconnected")
