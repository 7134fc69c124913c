"""A request's own state: its tokens, sampling settings, random streams, statistics and where it is in its life.

Life of a request: ``WAITING`` (queued, no KV) -> ``RUNNING`` (has a cache sequence; first its prompt is prefilled,
possibly in chunks, then it decodes one verified tree per step) -> ``FINISHED``. Preemption sends a running request
back to ``WAITING`` with its tokens kept; it is prefilled again from its history (prompt + generated tokens).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from specdec.sampling import SamplingParams
from specdec.stats import RequestStats


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


STOP_REASONS = ("eos", "stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request.

    Attributes:
        request_id: the id :meth:`SpeculativeEngine.add_request` returned.
        new_tokens: tokens generated in this step (empty for a prefill chunk that is not the last one).
        finished: the request ended in this step; its KV blocks are already free.
        stop_reason: when finished, one of ``eos`` (a model EOS id, included in the tokens), ``stop`` (one of the
            request's ``stop_token_ids``, included), ``length`` (``max_new_tokens`` reached), ``cancelled``,
            ``error`` (see ``error``).
        error: the message of the error that failed the request.
        accepted: draft tokens accepted in this step (``None`` for a prefill step).
        stats: the request's statistics, when finished.
    """

    request_id: int
    new_tokens: list[int]
    finished: bool = False
    stop_reason: str | None = None
    error: str | None = None
    accepted: int | None = None
    stats: RequestStats | None = None


@dataclass(eq=False)
class Request:
    """One generation request.

    Attributes:
        request_id: engine-assigned id.
        prompt: ``[P]`` int64 (CPU).
        params: sampling and stopping settings.
        generator: the target's sampling stream (on the target's device).
        draft_generator: the drafter's independent stream (same device), for drafters that sample.
        arrival: admission order key; the youngest running request (largest ``arrival``) is preempted first.
        history: ``[P + max_new_tokens]`` int64 static buffer; ``history[:length]`` is prompt + output.
        output: generated tokens so far.
        seq_id: cache sequence while running (``None`` otherwise).
        prefill_target: tokens to prefill before decoding (the prompt, or ``length - 1`` after a preemption).
        prefilled: tokens of ``history[:prefill_target]`` already in the KV cache.
        pending_hidden: hidden-state rows of earlier prefill chunks, for drafters that need them.
    """

    request_id: int
    prompt: torch.Tensor
    params: SamplingParams
    generator: torch.Generator | None
    draft_generator: torch.Generator | None
    arrival: int
    stats: RequestStats = field(default_factory=RequestStats)
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    seq_id: int | None = None
    prefill_target: int = 0
    prefilled: int = 0
    pending_hidden: list[torch.Tensor] = field(default_factory=list)
    stop_reason: str | None = None
    error: str | None = None
    exception: Exception | None = None
    start_time: float = 0.0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.history = torch.empty(self.prompt.numel() + self.params.max_new_tokens, dtype=torch.long)
        self.history[: self.prompt.numel()] = self.prompt
        self.prefill_target = self.prompt.numel()
        self.stats.prompt_tokens = self.prompt.numel()

    @property
    def length(self) -> int:
        """Prompt + generated tokens."""
        return self.prompt.numel() + len(self.output)

    @property
    def decoding(self) -> bool:
        """Prefill done: the last history token is the root of the next tree."""
        return self.status is Status.RUNNING and self.prefilled == self.prefill_target and bool(self.output)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)

    def append(self, tokens: list[int], eos: frozenset[int]) -> list[int]:
        """Clip ``tokens`` at ``max_new_tokens`` and after the first stop token, append them to the history and
        output, set ``stop_reason`` if the request is done; return the tokens kept."""
        tokens = tokens[: self.remaining]
        stops = eos | frozenset(self.params.stop_token_ids)
        for i, t in enumerate(tokens):
            if t in stops:
                tokens = tokens[: i + 1]
                self.stop_reason = "eos" if t in eos else "stop"
                break
        at = self.length
        self.history[at : at + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        self.output.extend(tokens)
        if self.stop_reason is None and self.remaining == 0:
            self.stop_reason = "length"
        return tokens

    def reset_for_prefill(self) -> None:
        """After preemption: prefill ``history[:length - 1]`` again; the last generated token stays the root."""
        self.prefill_target = self.length - 1 if self.output else self.prompt.numel()
        self.prefilled = 0
        self.pending_hidden = []
        self.seq_id = None
        self.status = Status.WAITING
