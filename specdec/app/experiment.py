"""One experiment runner: drafters x tree settings x temperatures on a prompt set, against HF ``generate``.

:func:`run_experiment` runs :func:`specdec.app.bench.run_bench` once per temperature (each with its own HF baseline,
measured in the same process on the same prompts, interleaved prompt by prompt) over the methods of a
:class:`Grid`; :func:`write_outputs` writes JSON lines (one record per request, one per method summary), the
summary JSON and PNG plots; :func:`log_to_wandb` sends the same to Weights & Biases (offline without an API key).
``specdec bench`` and ``experiments/run.py`` are both thin front ends to this module.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from specdec.app import tracking
from specdec.app.args import parse_spec
from specdec.app.bench import BenchSettings, run_bench
from specdec.app.plots import plot_report, plot_tau_vs_budget
from specdec.app.prompts import Prompt
from specdec.app.report import BenchReport, format_table
from specdec.drafters import DrafterSpec
from specdec.sampling import SamplingParams
from specdec.target import TargetModel


@dataclass(frozen=True)
class Grid:
    """What to run.

    Attributes:
        drafters: drafter specs ``NAME[:key=value,...]`` (:class:`DrafterSpec`); autoregressive specdec always runs.
        budgets: each spec with ``tree=dynamic`` also runs once per budget here (``name:...,budget=B``), for the
            tau-vs-budget plot; empty = as written.
        temperatures: one full run (own baseline) per temperature.
        max_new_tokens / multi_turn / chat: generation settings; ``multi_turn`` runs every turn of each prompt.
        top_k / top_p / seed / acceptance: sampling settings (``seed`` + request index seeds each request).
        num_blocks / block_size: the target's KV cache.
        spec_defaults: drafter-spec keys applied where a spec string does not set them (CLI ``--tree`` ...).
        paths: default ``path`` per drafter name (CLI ``--draft-model``, ``--drafter-path``).
        batch_size: requests run concurrently (1 = one at a time, interleaved per prompt with the baseline).
        model: the model's id or folder (identifies a resumable run).
        cost_model: ``--tree-budget auto``: every drafter runs under the budget chooser with this cost model, a
            JSON path or ``auto`` (this machine's measured step cost) (method names get ``+auto``).
        repeats: greedy timing repeats per request (every method, the baseline included, interleaved; the run of
            median time is kept).
    """

    drafters: tuple[str, ...] = ("ngram",)
    budgets: tuple[int, ...] = ()
    temperatures: tuple[float, ...] = (0.0,)
    max_new_tokens: int = 128
    multi_turn: bool = False
    chat: bool = True
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    acceptance: str = "exact"
    num_blocks: int = 512
    block_size: int = 16
    spec_defaults: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1
    model: str | None = None
    cost_model: str | None = None
    repeats: int = 1

    def _parse(self, text: str) -> DrafterSpec:
        return parse_spec(text, self.paths, self.spec_defaults)

    def settings(self, temperature: float) -> BenchSettings:
        sampling = SamplingParams(temperature, self.top_k, self.top_p, self.seed)
        return BenchSettings(self.max_new_tokens, self.chat, self.num_blocks, self.block_size, sampling,
                             self.acceptance, self.multi_turn, self.batch_size, self.model, self.cost_model,
                             self.repeats)

    def methods(self) -> dict[str, DrafterSpec]:
        """Method name -> parsed spec, budgets expanded (raises ``ValueError`` for a bad spec)."""
        out: dict[str, DrafterSpec] = {}
        for text in self.drafters:
            spec = self._parse(text)
            if self.budgets and spec.tree == "dynamic":
                name, _, options = text.partition(":")
                kept = [o for o in options.split(",") if o and not o.startswith("budget=")]  # the sweep sets it
                for budget in self.budgets:
                    full = f"{name}:{','.join([*kept, f'budget={budget}'])}"
                    out[full] = self._parse(full)
            else:
                out[text] = spec
        if self.cost_model is not None:
            out = {f"{name}+auto" if spec.name != "none" else name: spec for name, spec in out.items()}
        return out


@dataclass(frozen=True)
class ExperimentResult:
    """``reports``: one :func:`run_bench` report per temperature (with its ``requests``); ``grid``: the input.
    ``complete`` is ``False`` when Ctrl-C stopped the run (the last report is partial, later ones missing)."""

    grid: Grid
    reports: list[BenchReport]

    @property
    def complete(self) -> bool:
        return len(self.reports) == len(self.grid.temperatures) and all(r.complete for r in self.reports)

    def records(self) -> list[dict]:
        """JSON-lines records: every request, then every method summary, each tagged with its temperature."""
        rows = []
        for report in self.reports:
            data = report.to_json()
            temp = report.temperature
            rows += [{"kind": "request", "temperature": temp, **r} for r in data["requests"]]
            rows += [{"kind": "summary", "temperature": temp, "baseline": data["baseline"], **r}
                     for r in data["runs"]]
        return rows


def journal_path(out_dir: str | Path, temperature: float) -> Path:
    """Where the finished prompts of one temperature's run are kept until the experiment is written."""
    return Path(out_dir) / f"T{temperature:g}.partial.jsonl"


def run_experiment(target: TargetModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                   grid: Grid, out_dir: str | Path | None = None) -> ExperimentResult:
    """Run every method of ``grid`` at every temperature on ``prompts``. With ``out_dir`` finished prompts are
    journaled there (:func:`journal_path`): Ctrl-C returns the partial result and a rerun resumes."""
    if not prompts:
        raise ValueError("no prompts to run")
    methods = grid.methods()
    reports: list[BenchReport] = []
    for temperature in grid.temperatures:
        journal = None if out_dir is None else journal_path(out_dir, temperature)
        try:
            reports.append(run_bench(target, tokenizer, prompts, methods, grid.settings(temperature), journal))
        except KeyboardInterrupt:
            if not reports:
                raise
            break
        if not reports[-1].complete:
            break
    return ExperimentResult(grid, reports)


def discard_journals(result: ExperimentResult, out_dir: str | Path) -> None:
    """Remove the journals once a complete result is written."""
    for temperature in result.grid.temperatures:
        journal_path(out_dir, temperature).unlink(missing_ok=True)


def budget_series(report: BenchReport, grid: Grid) -> dict[str, list[tuple[int, float]]]:
    """``{drafter spec as written: [(budget, tau), ...]}`` for the budget-expanded methods of ``report``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if not grid.budgets:
        return {}
    for run in report.runs:
        base, sep, budget = run.name.rpartition("budget=")
        if sep and budget.isdigit():
            series[base.rstrip(",:")].append((int(budget), run.tau))
    return dict(series)


def _stem(report: BenchReport) -> str:
    return f"T{report.temperature:g}"


def write_outputs(result: ExperimentResult, out_dir: str | Path) -> list[Path]:
    """``results.jsonl`` (:meth:`ExperimentResult.records`), ``summary.json`` (reports without the per-request
    records) and per temperature ``T{t}_speedup_by_category.png``, ``T{t}_acceptance_by_depth.png`` and, with
    budgets, ``T{t}_tau_vs_budget.png``. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.jsonl", out_dir / "summary.json"]
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in result.records()), encoding="utf-8")
    summary = {"grid": asdict(result.grid), "complete": result.complete,
               "reports": [r.to_json(requests=False) for r in result.reports]}
    paths[1].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for report in result.reports:
        paths += plot_report(report.to_json(requests=False), out_dir, _stem(report))
        series = budget_series(report, result.grid)
        if series:
            paths.append(plot_tau_vs_budget(series, out_dir / f"{_stem(report)}_tau_vs_budget.png"))
    return paths


def format_tables(result: ExperimentResult) -> str:
    """One table per temperature (:func:`specdec.app.bench.format_table`)."""
    parts = []
    for report in result.reports:
        parts.append(f"temperature {report.temperature:g}, baseline {report.baseline.name}")
        parts.append(format_table(report))
    return "\n\n".join(parts)


def log_to_wandb(result: ExperimentResult, out_dir: str | Path, pngs: Sequence[Path], config: dict[str, Any],
                 enabled: bool = True, project: str = "specdec-experiments") -> Any | None:
    """One W&B run: ``config``; per-request metrics (one history row each); per method and temperature the
    summary metrics (``T{t}/{method}/tau`` ...); the request and summary tables; the PNG plots. Offline unless
    ``WANDB_API_KEY`` is set (:mod:`specdec.app.tracking`); ``enabled=False`` does nothing. Returns the finished run."""
    run = tracking.start_run(project, config, enabled, out_dir)
    if run is None:
        return None
    import wandb

    try:
        step = 0
        for report in result.reports:
            stem = _stem(report)
            data = report.to_json()
            for r in data["requests"]:
                run.log({f"{stem}/request/{k}": r[k] for k in ("tau", "speedup", "tokens_per_s")}
                        | {f"{stem}/request/method": r["method"]}, step=step)
                step += 1
            for s in data["runs"]:
                metrics = {f"{stem}/{s['name']}/{k}": s[k] for k in ("tau", "speedup", "tokens_per_s")}
                run.log(metrics, step=step)
                run.summary.update(metrics)
            columns = ["method", "tau", "speedup", "tokens_per_s", "identical", "n"]
            rows = [[s["name"], s["tau"], s["speedup"], s["tokens_per_s"], s["identical_to_baseline"],
                     s["n_prompts"]] for s in data["runs"]]
            run.log({f"{stem}/summary_table": wandb.Table(columns=columns, data=rows)}, step=step)
        run.log({p.stem: wandb.Image(str(p)) for p in pngs if p.suffix == ".png"}, step=step)
    finally:
        tracking.finish(run)
    return run
