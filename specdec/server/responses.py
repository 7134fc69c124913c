"""OpenAI response bodies: whole responses, streamed chunks (server-sent events) and usage.

Chat: ``chat.completion`` / ``chat.completion.chunk`` (the first chunk carries ``delta.role``); completions:
``text_completion`` (chunks too). A stream ends with a chunk holding ``finish_reason``, then (with
``stream_options.include_usage``) a chunk with empty ``choices`` and ``usage``, then ``data: [DONE]``. An error
mid-stream is sent as ``data: {"error": {...}}`` (the ``openai`` client raises it) before ``[DONE]``.

Every response also carries ``specdec`` (an extra field clients ignore): the drafter, tau, verification steps and
acceptance by depth of the request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from specdec.stats import RequestStats


@dataclass(frozen=True)
class Usage:
    """``completion_tokens``: tokens generated up to the end (an EOS token counts; after a stop string, the tokens
    up to the one that completed it)."""

    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def specdec_info(drafter: str, stats: RequestStats | None) -> dict:
    if stats is None:
        return {"drafter": drafter}
    return {"drafter": drafter, "tau": round(stats.tau, 4), "verification_steps": stats.steps,
            "acceptance_by_depth": [round(x, 4) for x in stats.acceptance_by_depth]}


class ResponseBuilder:
    """Bodies of one response (one id and creation time for all its chunks)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, usage: Usage, info: dict) -> dict:
        """A whole (not streamed) response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": usage.body(), "specdec": info}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: new ``text`` and/or the ``finish_reason``."""
        if self.kind == "chat":
            delta: dict = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage, info: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage.body(), "specdec": info}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")
