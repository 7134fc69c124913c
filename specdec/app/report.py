"""Typed bench reports: what ``specdec bench`` and ``experiments/run.py`` measure, and the JSON they write.

The JSON shape (:meth:`BenchReport.to_json`) is the documented one: ``baseline``, ``runs[].name / tokens_per_s /
speedup / tau / identical_to_baseline / n_prompts / per_category``, plus ``batch_size`` and, per run, a short
``label`` (the table's row name; ``name`` keeps the full drafter spec).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NEAR_TIE = 1e-4  # logit margin under which a greedy difference is a floating-point tie, not a bug


@dataclass(frozen=True)
class EqualityCheck:
    """Greedy output of a method against the baseline's.

    ``first_diff``: first differing position (``None`` = identical); ``margin``: the target's top-1 minus top-2
    logit there (``None`` when identical); ``near_tie``: ``margin < tolerance``, the only excusable difference
    (floating-point reordering may flip an exact tie)."""

    identical: bool
    first_diff: int | None = None
    margin: float | None = None
    near_tie: bool = False


@dataclass(frozen=True)
class Baseline:
    name: str
    tokens_per_s: float


@dataclass(frozen=True)
class CategorySummary:
    speedup: float
    tau: float
    n: int


@dataclass(frozen=True)
class RunSummary:
    """One method over the prompt set (``speedup``: median over requests of method / baseline tok/s at B = 1; the
    aggregate throughput ratio at B > 1)."""

    name: str
    label: str
    tokens_per_s: float
    speedup: float
    speedup_mean_ci: tuple[float, float, float]
    tau: float
    tau_mean_ci: tuple[float, float, float]
    acceptance_by_depth: list[float]
    accepted_length_hist: list[int]
    draft_s: float
    verify_s: float
    identical_to_baseline: int | None
    near_ties: int | None
    differences: list[dict[str, Any]]
    n_prompts: int
    per_category: dict[str, CategorySummary]
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """One (method, prompt, turn)."""

    method: str
    prompt_index: int
    question_id: str | None
    category: str
    turn: int
    new_tokens: int
    tau: float
    tokens_per_s: float
    baseline_tokens_per_s: float
    speedup: float
    draft_s: float
    verify_s: float
    acceptance_by_depth: list[float]
    equality: EqualityCheck | None
    latency_s: float | None = None


@dataclass(frozen=True)
class BenchReport:
    """``complete`` is ``False`` for a run stopped early (Ctrl-C): it covers ``n_done`` of ``n_total`` prompts."""

    baseline: Baseline
    max_new_tokens: int
    sampling: dict[str, Any]
    multi_turn: bool
    runs: list[RunSummary]
    requests: list[RequestRecord] = field(default_factory=list)
    batch_size: int = 1
    complete: bool = True
    n_done: int = 0
    n_total: int = 0

    @property
    def temperature(self) -> float:
        return float(self.sampling["temperature"])

    def to_json(self, requests: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not requests:
            del out["requests"]
        return out


def write_report(report: BenchReport, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


_ABBREVIATIONS = {"budget": "b", "depth": "d", "topk": "k", "layers": "L", "heads": "h"}
_TREES = {"dynamic": "dyn", "chain": "chain", "static": "static"}


def short_label(spec: str) -> str:
    """A table row name for a drafter spec: ``eagle:path=shipped,tree=dynamic,budget=8,depth=5`` ->
    ``eagle shipped dyn b8 d5`` (a path shows its last folder name)."""
    name, _, options = spec.partition(":")
    parts = [name]
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key == "path":
            parts.append(Path(value).name or value)
        elif key == "tree":
            parts.append(_TREES.get(value, value))
        else:
            parts.append(f"{_ABBREVIATIONS.get(key, key + '=')}{value}")
    return " ".join(parts)


def _same(run: RunSummary) -> str:
    if run.identical_to_baseline is None:
        return "-"
    ties = f"+{run.near_ties}" if run.near_ties else ""
    return f"{run.identical_to_baseline}{ties}/{run.n_prompts}"


def format_table(report: BenchReport) -> str:
    """The report as a plain-text table: one row per method (short labels), speedup per category (full names),
    and a footer explaining the columns."""
    cats = sorted({c for r in report.runs for c in r.per_category})
    width = max(12, *(len(r.label) for r in report.runs)) if report.runs else 12
    cat_w = {c: max(7, len(c)) for c in cats}
    batched = report.batch_size > 1
    head = f"{'method':<{width}} {'tok/s':>7} {'speedup':>8} {'tau':>5} {'same':>8}"
    head += f" {'p50 s':>7} {'p99 s':>7}" if batched else ""
    head += "  " + " ".join(f"{c:>{cat_w[c]}}" for c in cats)
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    lines.append(f"{report.baseline.name:<{width}} {report.baseline.tokens_per_s:>7.2f} {1.0:>8.2f}")
    for r in report.runs:
        row = f"{r.label:<{width}} {r.tokens_per_s:>7.2f} {r.speedup:>8.2f} {r.tau:>5.2f} {_same(r):>8}"
        if batched:
            row += f" {r.latency_p50_s or 0.0:>7.2f} {r.latency_p99_s or 0.0:>7.2f}"
        row += "  " + " ".join(f"{r.per_category[c].speedup:>{cat_w[c]}.2f}" if c in r.per_category
                               else f"{'-':>{cat_w[c]}}" for c in cats)
        lines.append(row.rstrip())
    lines.append("")
    what = ("aggregate throughput ratio vs the baseline" if batched
            else "median over requests of (method tok/s) / (baseline tok/s on the same request)")
    lines.append(f"speedup: {what}; tau: tokens per verification step, bonus token included.")
    if any(r.identical_to_baseline is not None for r in report.runs):
        lines.append(f"same: greedy outputs token-identical to the baseline / requests; +k: k more first differ at a "
                     f"near-tie (top-2 logit margin < {NEAR_TIE:g}, a floating-point tie, not a bug).")
    if batched:
        lines.append(f"batch size {report.batch_size}; p50 / p99: per-request latency in seconds.")
    if not report.complete:
        lines.append(f"PARTIAL: {report.n_done} of {report.n_total} prompts (interrupted).")
    return "\n".join(lines)
