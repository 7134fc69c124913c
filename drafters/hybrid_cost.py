"""The hybrid drafter's cost rule: whether asking the model pays this step, how many merged nodes to keep, and the
running measurement of what the model costs (see :mod:`specdec.drafters.hybrid`'s docstring for the rule itself).

A mixin of :class:`specdec.drafters.hybrid.HybridDrafter`: it reads the drafter's ``ngram``, ``model_cost``,
``measure_cost``, ``step_cost``, ``min_value``, ``probe``, ``skip_model_above`` and its running ``step_s`` /
``model_s``.
"""

from __future__ import annotations

from collections.abc import Callable

from specdec.drafters.draft_paths import Path, path_values
from specdec.drafters.ngram import NgramDrafter

MAX_PROBE_BACKOFF = 4  # probes that find the model not paying space out to at most 4 x ``probe`` steps
PRIOR_STEPS = 4  # a sequence's own model value counts as much as the pooled one after 4 asks (shrinkage)


def running(old: float | None, new: float, weight: float, clip: float | None = None) -> float:
    """Moving average of measured seconds; with ``clip``, a value over ``clip`` times the average is ignored."""
    if old is None:
        return new
    if clip is not None and new > clip * old:
        return old
    return old + weight * (new - old)


class CostRule:
    """When to ask the model and how many nodes pay (mixed into the hybrid drafter, which sets these)."""

    ngram: NgramDrafter
    model_cost: float | None
    measure_cost: bool
    step_cost: Callable[[int, int], float] | None
    min_value: float
    probe: int
    skip_model_above: float | None
    step_s: float | None
    model_s: float | None
    pooled_value: float | None
    weight: float

    @property
    def current_model_cost(self) -> float | None:
        """The model's cost as a share of a step: measured (``measure_cost``, once both times are known) or the
        configured ``model_cost``."""
        if self.measure_cost and self.step_s and self.model_s is not None:
            return self.model_s / self.step_s
        return self.model_cost

    def _decide(self, state, ngram_paths: list[Path], source: str, budget: int) -> bool:
        if ngram_paths and self.skip_model_above is not None and state.rates[source][0][0] >= self.skip_model_above:
            return False
        model_value = self.model_value(state)
        if self.model_cost is None or model_value is None:
            return True
        gap = state.probe_gap or self.probe
        if state.since_model + 1 >= gap:  # a probe; the next one comes later unless the model pays meanwhile
            state.probe_gap = min(2 * gap, MAX_PROBE_BACKOFF * self.probe)
            return True
        values = path_values(ngram_paths, state.rates[source])
        ctx = state.context
        if self.step_cost is None:
            v_n, n_n = self._kept_worth(values, self._floor(state), budget)
        else:
            ranked = sorted(values.values(), reverse=True)[: budget - 1]
            v_n, n_n = sum(ranked[: self._best_prefix(ranked, ctx)]), self._best_prefix(ranked, ctx)
        n_m = max(n_n, state.model_nodes)
        with_model = (1 + max(v_n, model_value)) / (self._rel(n_m + 1, ctx) + self.current_model_cost)
        pays = with_model > (1 + v_n) / self._rel(n_n + 1, ctx)
        if pays:
            state.probe_gap = self.probe
        return pays

    def model_value(self, state) -> float | None:
        """Accepted tokens the model's tree is expected to hold for this sequence: its own running value shrunk
        toward the value pooled over all sequences, as if the pooled one were ``PRIOR_STEPS`` more asks (one
        unlucky probe does not switch a good model off for the rest of a sequence; a sequence the model has not
        drafted yet starts from the pooled value)."""
        own, pooled = state.model_value, self.pooled_value
        if own is None or pooled is None:
            return own if pooled is None else pooled
        seen = min(state.model_asks, round((2 - self.weight) / self.weight))  # what a running average amounts to
        return (seen * own + PRIOR_STEPS * pooled) / (seen + PRIOR_STEPS)

    def _rel(self, nodes: float, ctx: int) -> float:
        """Verification cost of a ``nodes``-node tree relative to a lone root."""
        if self.step_cost is None:
            return 1 + self.ngram.node_cost * (nodes - 1)
        return self.step_cost(max(1, round(nodes)), ctx)

    def _best_prefix(self, values: list[float], ctx: int) -> int:
        """How many of ``values`` (best first) to keep: maximises ``(1 + their sum) / step cost``."""
        best, best_rate, gained = 0, 1.0 / self._rel(1, ctx), 1.0
        for i, v in enumerate(values):
            gained += v
            if gained / self._rel(i + 2, ctx) > best_rate:
                best, best_rate = i + 1, gained / self._rel(i + 2, ctx)
        return best

    def _floor(self, state) -> float:
        """The value a node needs to pay for its verification cost at this sequence's running speed."""
        return self.min_value * max(1.0, state.speed)

    def _kept_worth(self, values: dict[Path, float], floor: float, budget: int) -> tuple[float, int]:
        """Sum and count of the values a tree of these candidates alone would keep."""
        kept = sorted((v for v in values.values() if v >= floor), reverse=True)[: budget - 1]
        return sum(kept), len(kept)
