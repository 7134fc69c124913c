"""Measured cost model of one speculative step, and the tree-size chooser that maximises expected tokens per second.

A step costs ``draft(levels) + verify(nodes, context)`` seconds and yields ``1 + sum_i v_i`` tokens in expectation,
``v_i`` being the probability that draft node ``i`` is accepted (its whole path accepted). Calibration measures,
once per device and model (``python -m specdec.research.cost_model calibrate``, stored as JSON):

* ``verify(n, ctx)``: one engine step whose ``n``-node tree is rejected (default; ``--timing forward``: the target's
  forward alone) on top of ``ctx`` cached tokens, on a grid of tree sizes and contexts (median of repeats; see
  :mod:`specdec.research.cost_measure`), fitted by non-negative least squares as ``c0 + c1 n + c2 ctx + c3 n ctx``;
* ``draft(levels)``: per drafter spec, the wall time of each ``propose`` during real engine runs (a timing wrapper
  on the protocol) whose steps ask for tree budgets 2 .. depth + 1 in turn, so that every number of expanded
  levels is timed; fitted as ``d0 + d1 levels`` through the median of each level count.

:func:`choose_size` picks the number of nodes ``N`` (root included) maximising
``(1 + sum of the N - 1 largest v_i) / (draft + verify(N, ctx))``; :mod:`specdec.research.auto_budget` applies it
per step.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from specdec.interfaces import Drafter
from specdec.target import TargetModel


@dataclass
class CostModel:
    """``verify_coef`` = ``(c0, c1, c2, c3)`` seconds; ``draft_coef[spec]`` = ``(d0, d1)`` seconds; ``grid``: the
    measured points ``(n, ctx, seconds)``; ``meta``: device, model, threads. ``from_grid``: verify times
    interpolated from the grid (see :meth:`verify_time`) instead of the linear fit. ``prefill_coef`` = ``(p0, p1)``:
    a prompt of ``P`` tokens prefills in ``p0 + p1 P`` seconds (``(0, 0)``: not measured)."""

    verify_coef: tuple[float, float, float, float]
    draft_coef: dict[str, tuple[float, float]] = field(default_factory=dict)
    grid: list[tuple[int, int, float]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    from_grid: bool = False
    prefill_coef: tuple[float, float] = (0.0, 0.0)

    def prefill_time(self, prompt_tokens: int) -> float:
        """Seconds to prefill a ``prompt_tokens``-token prompt (0 when the model has no prefill measurement)."""
        p0, p1 = self.prefill_coef
        return max(p0 + p1 * prompt_tokens, 0.0)

    def verify_time(self, nodes: int, context: int) -> float:
        """Seconds of one verification forward. The linear fit by default; with ``from_grid`` the measured grid,
        made non-decreasing in ``n`` and ``ctx``, interpolated linearly in ``n`` then in ``ctx`` (beyond its edges
        the fit's slopes extend it). On CPU the fit overestimates a lone root (``n = 1`` takes SDPA's unmasked fast
        path: 55 ms measured vs 79 ms fitted for SmolLM2), which biases every predicted speedup against
        speculation."""
        if self.from_grid and self.grid:
            return max(self._grid_time(nodes, context), 1e-9)
        return max(self._fit_time(nodes, context), 1e-9)

    def verify_times(self, upto: int, context: int) -> list[float]:
        """``[verify_time(n, context) for n in 1..upto]``, the grid's per-size values at every measured context
        kept between calls (the chooser prices every tree size twice a step)."""
        if not (self.from_grid and self.grid):
            return [self.verify_time(n, context) for n in range(1, upto + 1)]
        ctxs = self._grid_tables()[1]
        out = []
        for n, per_ctx in enumerate(self._columns(upto), start=1):
            t = _interp(context, ctxs, per_ctx)
            if context > ctxs[-1]:
                t += self._fit_time(n, context) - self._fit_time(n, ctxs[-1])
            out.append(max(t, 1e-9))
        return out

    def relative_step(self, nodes: int, context: int) -> float:
        """Verification time of ``nodes`` nodes over that of a lone root, at ``context`` cached tokens."""
        return self.verify_time(nodes, context) / self.verify_time(1, context)

    def _fit_time(self, nodes: float, context: float) -> float:
        c0, c1, c2, c3 = self.verify_coef
        return c0 + c1 * nodes + c2 * context + c3 * nodes * context

    def _grid_tables(self) -> tuple[list[int], list[int], list[list[float]]]:
        """Sizes, contexts and each context's times, made non-decreasing in ``n`` and then in ``ctx``, both by
        lowering: a point above a larger size's (or the same size at a longer context) is lowered to it. Timings
        are minima of repeats, and a busy machine only adds time. Until session 14 the size direction took the
        running maximum instead, and one dear point lifted every larger size to it: on the 2-core AMD EPYC a 2-node
        step (47.0 ms, its 2-row products slow) made 3-8 nodes cost 47.0 ms where 6 nodes measured 41.4 ms and
        8 nodes 46.6 ms. The chooser then saw an 8-node tree as free against 6 nodes, while end to end the shipped
        EAGLE-3 head verified 8 nodes in 57.5 ms a step against 50.8 ms for 6 and ran 6 % slower. (Before session
        8 the noise that made 64 cached tokens cost more than 256 made 4..16 nodes cost the same there, and the
        planner bought 16-node trees at short contexts: the context direction.) Built once per grid (the chooser
        asks for dozens of verify times per step)."""
        key = id(self.grid), len(self.grid)
        cached = self.__dict__.get("_tables")
        if cached is None or cached[0] != key:
            table = {(n, c): t for n, c, t in self.grid}
            sizes, ctxs = sorted({g[0] for g in self.grid}), sorted({g[1] for g in self.grid})
            rows = np.array([[table[(n, c)] for n in sizes] for c in ctxs])
            rows = np.minimum.accumulate(rows[:, ::-1], axis=1)[:, ::-1]  # no dearer than any larger tree
            rows = np.minimum.accumulate(rows[::-1], axis=0)[::-1].tolist()  # nor than a longer context
            cached = self.__dict__["_tables"] = (key, (sizes, ctxs, rows))
            self.__dict__["_cols"] = []  # :meth:`_columns` of this grid
        return cached[1]

    def _per_context(self, nodes: int) -> list[float]:
        """The time of ``nodes`` nodes at each measured context (interpolated in ``n``; the fit's slope beyond)."""
        sizes, ctxs, rows = self._grid_tables()
        per_ctx = []
        for c, ys in zip(ctxs, rows, strict=True):
            y = _interp(nodes, sizes, ys)
            if nodes > sizes[-1]:
                y += self._fit_time(nodes, c) - self._fit_time(sizes[-1], c)
            per_ctx.append(y)
        return per_ctx

    def _columns(self, upto: int) -> list[list[float]]:
        """:meth:`_per_context` of sizes 1..``upto``, kept with the grid's tables."""
        self._grid_tables()  # a replaced grid starts the columns again
        have = self.__dict__["_cols"]
        have += [self._per_context(n) for n in range(len(have) + 1, upto + 1)]
        return have[:upto]

    def _grid_time(self, nodes: int, context: int) -> float:
        ctxs = self._grid_tables()[1]
        per_ctx = self._per_context(nodes)
        t = _interp(context, ctxs, per_ctx)
        if context > ctxs[-1]:
            t += self._fit_time(nodes, context) - self._fit_time(nodes, ctxs[-1])
        return t

    def draft_time(self, levels: int, measured: float | None = None, drafter: str | None = None) -> float:
        """``measured`` if given (the simulator times the real drafter), else the calibrated fit for ``drafter`` at
        ``levels`` expanded levels, else 0 (model-free drafters cost ~nothing next to a forward)."""
        if measured is not None:
            return measured
        if drafter is not None and drafter in self.draft_coef:
            d0, d1 = self.draft_coef[drafter]
            return max(d0 + d1 * levels, 0.0)
        return 0.0

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cost-model file not found: {path} "
                             "(make one: python -m specdec.research.cost_model calibrate)")
        raw = json.loads(path.read_text(encoding="utf-8"))
        if "verify_coef" not in raw or len(raw["verify_coef"]) != 4:
            raise ValueError(f"{path} is not a cost model: it needs verify_coef with 4 numbers")
        return cls(tuple(raw["verify_coef"]), {k: tuple(v) for k, v in raw.get("draft_coef", {}).items()},
                   [tuple(g) for g in raw.get("grid", [])], raw.get("meta", {}), bool(raw.get("from_grid", False)),
                   tuple(raw.get("prefill_coef", (0.0, 0.0))))


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """``np.interp`` for one point (clamped at the ends), without numpy's per-call overhead."""
    i = bisect.bisect_right(xs, x)
    if i == 0:
        return float(ys[0])
    if i == len(xs):
        return float(ys[-1])
    x0, x1 = xs[i - 1], xs[i]
    return float(ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0))


def fit_verify(grid: Sequence[tuple[int, int, float]]) -> tuple[float, float, float, float]:
    """Non-negative least-squares ``(c0, c1, c2, c3)`` of ``seconds ~ c0 + c1 n + c2 ctx + c3 n ctx`` over
    ``(n, ctx, s)`` points (needs at least two sizes and two contexts)."""
    if len({g[0] for g in grid}) < 2 or len({g[1] for g in grid}) < 2:
        raise ValueError(f"the verify fit needs >= 2 tree sizes and >= 2 contexts, got {len(grid)} points")
    a = np.array([[1.0, n, c, n * c] for n, c, _ in grid])
    y = np.array([s for _, _, s in grid])
    return tuple(float(x) for x in nnls(a, y)[0])


def fit_prefill(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Non-negative least-squares ``(p0, p1)`` of ``seconds ~ p0 + p1 P`` over ``(P, seconds)`` prefill timings (at
    least two prompt lengths)."""
    if len({p for p, _ in samples}) < 2:
        raise ValueError(f"the prefill fit needs >= 2 prompt lengths, got {sorted({p for p, _ in samples})}")
    return _fit_line([p for p, _ in samples], [s for _, s in samples])


def fit_draft(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Non-negative least-squares ``(d0, d1)`` of ``seconds ~ d0 + d1 levels`` through the median time of each
    level count in ``(levels, seconds)`` (a slow call does not tilt the line); one level count only:
    ``(median, 0)``."""
    if not samples:
        raise ValueError("no draft timings to fit")
    by_level: dict[int, list[float]] = {}
    for d, sec in samples:
        by_level.setdefault(d, []).append(sec)
    medians = {d: statistics.median(v) for d, v in sorted(by_level.items())}
    if len(medians) < 2:
        return next(iter(medians.values())), 0.0
    return _fit_line(list(medians), list(medians.values()))


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Non-negative least-squares intercept and slope of ``y ~ a + b x``."""
    return tuple(float(v) for v in nnls(np.array([[1.0, x] for x in xs]), np.array(ys, dtype=float))[0])


def drafter_depth(drafter: Drafter) -> int:
    """The deepest level a drafter drafts: its ``depth`` or ``max_depth`` attribute (8 if it has neither)."""
    return int(getattr(drafter, "depth", None) or getattr(drafter, "max_depth", None) or 8)


def draft_levels(drafter: Drafter, budget: int) -> int:
    """Levels a best-first drafter expands for a ``budget``-node tree (root included): ``budget - 1`` up to its
    depth, its own budget (``budget`` / ``max_nodes`` attribute) capping the one asked for."""
    own = getattr(drafter, "budget", None) or getattr(drafter, "max_nodes", None)
    return min(drafter_depth(drafter), (budget if own is None else min(budget, int(own))) - 1)


def choose_size(values: Sequence[float], step_time: Callable[[int], float], max_nodes: int | None = None) -> int:
    """The tree size ``N`` (root included, ``1 <= N <= len(values) + 1``, at most ``max_nodes``) maximising
    ``(1 + sum of the N - 1 largest values) / step_time(N)``. ``values``: acceptance probabilities of the
    candidate nodes (each node's whole path; a node's value never exceeds its parent's, so the best ``N - 1`` are
    ancestor-closed when ties go parent-first)."""
    ranked = sorted((float(v) for v in values), reverse=True)
    limit = len(ranked) + 1 if max_nodes is None else min(len(ranked) + 1, max_nodes)
    best, best_rate, gained = 1, 1.0 / step_time(1), 1.0
    for n in range(2, limit + 1):
        gained += ranked[n - 2]
        rate = gained / step_time(n)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


def main(argv: Sequence[str] | None = None) -> int:
    from specdec.app.cmd_calibrate import HELP, add_arguments

    ap = argparse.ArgumentParser(prog="python -m specdec.research.cost_model", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("calibrate", help=HELP))
    return run_calibrate(ap.parse_args(argv))


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure and store the cost model (arguments: :func:`specdec.app.cmd_calibrate.add_arguments`)."""
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.cost_measure import measure_draft, measure_prefill, measure_step, measure_verify
    from specdec.target import eos_token_ids

    model, tok = load_model_and_tokenizer(args.model, torch.float32)
    target = TargetModel(model)
    if args.threads:
        torch.set_num_threads(args.threads)
    measure = measure_step if args.timing == "step" else measure_verify
    grid = measure(target, args.sizes, args.contexts, args.repeats, statistic=args.statistic)
    cost = CostModel(fit_verify(grid), grid=grid, from_grid=args.verify_model == "grid", meta={
        "model": args.model or "embedded SmolLM2-135M-Instruct", "device": str(target.device),
        "threads": torch.get_num_threads(), "dtype": str(target.dtype), "packed_linears": target.packed_linears,
        "measured_at": time.time(), "timing": args.timing,
        "statistic": args.statistic})
    if args.prefill:
        cost.prefill_coef = fit_prefill(measure_prefill(target, args.prefill, args.repeats, statistic=args.statistic))
    prompts = [encode_prompt(tok, p.text) for p in load_prompts(args.prompts or builtin_prompts_path(), args.limit)]
    for spec in args.drafter:
        samples = measure_draft(target, build_drafter(DrafterSpec.parse(spec), target), prompts,
                                args.max_new_tokens, eos_token_ids(model, tok))
        cost.draft_coef[spec] = fit_draft(samples)
    cost.save(args.out)
    for n, ctx, s in grid:
        print(f"verify n={n:>3} ctx={ctx:>5}: {1e3 * s:7.2f} ms (fit {1e3 * cost.verify_time(n, ctx):7.2f})",
              file=sys.stderr)
    if args.prefill:
        p0, p1 = cost.prefill_coef
        print(f"prefill: {1e3 * p0:.2f} ms + {1e3 * p1:.3f} ms/token", file=sys.stderr)
    for spec, (d0, d1) in cost.draft_coef.items():
        print(f"draft {spec}: {1e3 * d0:.2f} ms + {1e3 * d1:.2f} ms/level", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
