"""Sampling parameters and the logits processing shared by the target and drafters.

The same :func:`process_logits` turns logits into the distribution that is actually sampled (temperature, then
top-k, then top-p), for the target and for any drafter that reports probabilities, so the rejection rule compares
like with like. Sampling uses the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``), which needs no cumulative
sum and no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    Attributes:
        temperature: 0 means greedy (argmax, the lossless greedy path); > 0 samples.
        top_k: keep the ``k`` most likely tokens (0 = off).
        top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (1.0 = off).
        seed: seeds the request's own ``torch.Generator`` so a run reproduces; ``None`` draws a fresh seed.
        max_new_tokens: the request stops after this many generated tokens (stop reason ``"length"``).
        stop_token_ids: extra token ids that end the request (included in the output, stop reason ``"stop"``);
            the model's EOS ids always stop it (``"eos"``).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for one request, seeded with ``seed`` (or a fresh random seed)."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def draft_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for a drafter's own samples: seeded from ``seed`` but a different stream than
        :meth:`generator`, so draft and verification randomness are independent (fresh seed if ``seed`` is None)."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed + 1_000_003)
        return gen


GREEDY = SamplingParams()


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities ``[..., V]`` (float32 or wider) after temperature, top-k and top-p.

    ``logits [..., V]``. With ``params.greedy`` the result is one-hot at the argmax.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        drop_sorted = mass_before >= params.top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs [..., V]`` (int64 ``[...]``), by the exponential race ``argmax(p / E)``."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)
