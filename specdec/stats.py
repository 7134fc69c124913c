"""Per-request acceptance and timing statistics.

Definitions (shared by inference, benchmarks and training):

* **tau** = tokens produced by verification steps / verification steps. Each step yields the accepted draft tokens
  **plus the bonus token**, so plain autoregressive decoding has tau = 1 exactly. The first token, sampled from the
  prefill forward, counts in neither.
* **acceptance rate at depth d** = steps that accepted a token at depth ``d`` / steps whose tree reached depth ``d``
  and accepted every token above it (a conditional rate, as EAGLE's "n-alpha").
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Counters for one request; :meth:`record_step` is called once per verification step."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    step_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    tree_nodes: int = 0
    depth_tried: list[int] = field(default_factory=list)  # [max_depth], index d-1
    depth_accepted: list[int] = field(default_factory=list)
    accepted_hist: list[int] = field(default_factory=list)  # index = accepted draft tokens in a step

    def record_step(self, num_accepted: int, rejected_next: bool, num_nodes: int) -> None:
        """One verification step that accepted ``num_accepted`` draft tokens.

        ``rejected_next``: the last accepted node had children (so depth ``num_accepted + 1`` was tried and
        rejected); ``num_nodes``: tree size including the root.
        """
        reach = num_accepted + int(rejected_next)
        self.steps += 1
        self.step_tokens += num_accepted + 1
        self.tree_nodes += num_nodes
        _grow(self.depth_tried, reach)
        _grow(self.depth_accepted, reach)
        for d in range(reach):
            self.depth_tried[d] += 1
            self.depth_accepted[d] += int(d < num_accepted)
        _grow(self.accepted_hist, num_accepted + 1)
        self.accepted_hist[num_accepted] += 1

    @classmethod
    def combine(cls, parts: list[RequestStats]) -> RequestStats:
        """Counters summed over requests (so tau and acceptance are token-weighted aggregates)."""
        total = cls()
        for s in parts:
            for name in ("prompt_tokens", "new_tokens", "steps", "step_tokens", "tree_nodes"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            for name in ("prefill_s", "draft_s", "verify_s", "total_s"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            for name in ("depth_tried", "depth_accepted", "accepted_hist"):
                mine, theirs = getattr(total, name), getattr(s, name)
                _grow(mine, len(theirs))
                for i, x in enumerate(theirs):
                    mine[i] += x
        return total

    @property
    def tau(self) -> float:
        """Tokens per verification step, bonus token included (1.0 for autoregressive decoding)."""
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.depth_accepted, self.depth_tried, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.total_s:.2f}s ({self.tokens_per_s:.1f} tok/s) | "
            f"tau {self.tau:.2f} over {self.steps} steps | draft {self.draft_s:.2f}s verify {self.verify_s:.2f}s "
            f"prefill {self.prefill_s:.2f}s"
        )


def mean_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over prompts and a percentile-bootstrap confidence interval (fixed
    ``seed``, so a report is reproducible). One value gives ``(v, v, v)``; none raises ``ValueError``."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return mean, means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))]


def _grow(xs: list[int], n: int) -> None:
    xs.extend([0] * (n - len(xs)))
