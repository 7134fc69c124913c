"""The OpenAI request bodies, their validation and OpenAI-style errors.

Every problem with a request is an :class:`APIError`: HTTP 400 with ``{"error": {"message", "type", "param",
"code"}}`` whose message names the problem and the limit. Accepted fields (others are ignored, as OpenAI-compatible
servers do): ``model``, ``messages`` (chat) or ``prompt`` (completions: a string, a list of one string, or a list of
token ids), ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature`` (0 = greedy; default: the
server's ``--temperature``, 0), ``top_p``, ``top_k`` (extra), ``seed``, ``stop`` (a string or at most
:data:`MAX_STOP` strings), ``n`` (1 only), ``stream``, ``stream_options.include_usage`` and ``specdec.drafter``
(one of the drafters the server was started with, see ``specdec serve --allow-drafter``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from transformers import PreTrainedTokenizerBase

from specdec.sampling import SamplingParams

MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SpecdecOptions(_Strict):
    drafter: str | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    specdec: SpecdecOptions | None = None


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


@dataclass(frozen=True)
class Generation:
    """A validated request: ``prompt_ids`` (token ids), ``params`` (``max_new_tokens`` set), ``stop`` strings,
    the ``drafter`` name, and how to answer (``kind`` ``chat`` or ``completion``, ``stream``, ``include_usage``)."""

    kind: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    drafter: str
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Limits:
    """What the server accepts: its model names, drafters, default ``max_tokens``, and the engine's checks
    (``check_fits(prompt_tokens, max_new_tokens)`` raises ``ValueError``; ``room(prompt_tokens)`` is the most new
    tokens that fit), and the sampling defaults for requests that omit them."""

    model: str
    drafters: tuple[str, ...]
    default_drafter: str
    default_max_tokens: int
    vocab_size: int
    check_fits: Callable[[int, int], None]
    room: Callable[[int], int]
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0


def parse_body(raw: bytes, cls: type[_Body]) -> _Body:
    """The JSON body as ``cls``; malformed JSON or a wrong field is a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"malformed JSON body: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = str(first["loc"][0]) if first["loc"] else "body"
        if first["type"] == "missing" and len(first["loc"]) == 1:
            raise bad_request(f"missing required field '{loc}'", loc, "missing_field") from None
        raise bad_request(f"invalid '{loc}': {first['msg']}", loc) from None


def resolve_drafter(name: str | None, limits: Limits) -> str:
    """An allowed drafter name: exact, or the one allowed spec with that drafter name (``eagle`` for
    ``eagle:path=shipped``); anything else is a 400 listing what is allowed."""
    if name is None:
        return limits.default_drafter
    if name in limits.drafters:
        return name
    same = [d for d in limits.drafters if d.partition(":")[0] == name]
    if len(same) == 1:
        return same[0]
    raise bad_request(f"unknown drafter {name!r}: this server allows {list(limits.drafters)} "
                      "(start it with --allow-drafter SPEC for more)", "specdec.drafter", "unknown_drafter")


def to_generation(body: _Body, tokenizer: PreTrainedTokenizerBase, limits: Limits) -> Generation:
    """Check every field against its limit and tokenize the prompt (400 :class:`APIError` on any problem)."""
    if body.model is not None and body.model != limits.model:
        raise bad_request(f"unknown model {body.model!r}: this server serves {limits.model!r} (GET /v1/models)",
                          "model", "model_not_found")
    if body.n is not None and body.n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {body.n}", "n")
    drafter = resolve_drafter(body.specdec.drafter if body.specdec else None, limits)
    temperature = limits.default_temperature if body.temperature is None else body.temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise bad_request(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature")
    top_p = limits.default_top_p if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = limits.default_top_k if body.top_k is None else body.top_k
    if top_k < 0:
        raise bad_request(f"top_k must be >= 0 (0 = off), got {top_k}", "top_k")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise bad_request(f"seed must be in [0, {MAX_SEED}], got {body.seed}", "seed")
    stop = _stop_strings(body.stop)
    chat = isinstance(body, ChatBody)
    prompt_ids = _chat_ids(body, tokenizer) if chat else _completion_ids(body, tokenizer, limits.vocab_size)
    param = "messages" if chat else "prompt"
    field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, field)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.room(len(prompt_ids)))
        if max_tokens < 1:
            max_tokens = 1  # check_fits below names the limit
    elif max_tokens < 1:
        raise bad_request(f"{field} must be >= 1, got {max_tokens}", field)
    try:
        limits.check_fits(len(prompt_ids), max_tokens)
    except ValueError as err:
        raise bad_request(str(err), param, "context_length_exceeded") from None
    params = SamplingParams(temperature, top_k, top_p, body.seed, max_tokens)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Generation("chat" if chat else "completion", limits.model, prompt_ids, params, stop, drafter,
                      body.stream, include_usage or not body.stream)


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(items) > MAX_STOP:
        raise bad_request(f"stop has {len(items)} strings; at most {MAX_STOP} are allowed", "stop")
    for s in items:
        if not s:
            raise bad_request("stop strings must be non-empty", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}", "stop")
    return tuple(items)


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _chat_ids(body: ChatBody, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not body.messages:
        raise bad_request("messages is empty: need at least one message", "messages", "empty_prompt")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                for m in body.messages]
    if not tokenizer.chat_template:
        text = "\n\n".join(m["content"] for m in messages if m["content"])
        if not text.strip():
            raise bad_request("empty prompt: every message is empty", "messages", "empty_prompt")
        return list(tokenizer(text)["input_ids"])
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def _completion_ids(body: CompletionBody, tokenizer: PreTrainedTokenizerBase, vocab: int) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise bad_request(f"prompt holds {len(prompt)} prompts; this server takes one per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise bad_request("empty prompt: need at least one token", "prompt", "empty_prompt")
        return list(tokenizer(prompt)["input_ids"])
    if not prompt:
        raise bad_request("empty prompt: need at least one token", "prompt", "empty_prompt")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
    return list(prompt)
