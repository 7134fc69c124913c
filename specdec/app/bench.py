"""``specdec bench``: HF ``generate`` greedy, specdec autoregressive and each drafter on the same prompts, in one
process, interleaved prompt by prompt so machine noise hits every method alike.

Speed is reported as the **median over prompts of (method tok/s) / (HF greedy tok/s on the same prompt)**. With a
:class:`~specdec.app.journal.Journal` every finished prompt is saved as it completes: Ctrl-C returns a partial
report (``complete=False``) and a rerun with the same journal resumes. ``batch_size > 1`` runs
:mod:`specdec.app.batch_bench` instead.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.app.journal import Journal
from specdec.app.prompts import Prompt, encode_conversation, encode_prompt
from specdec.app.report import (
    NEAR_TIE,
    Baseline,
    BenchReport,
    CategorySummary,
    EqualityCheck,
    RequestRecord,
    RunSummary,
    short_label,
)
from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.sampling import GREEDY, SamplingParams
from specdec.stats import RequestStats, mean_ci
from specdec.target import TargetModel, eos_token_ids


@dataclass(frozen=True)
class BenchSettings:
    """How every method runs. ``model`` only identifies the run (a journal of another model is not resumed)."""

    max_new_tokens: int = 128
    chat: bool = True
    num_blocks: int = 256
    block_size: int = 16
    sampling: SamplingParams = GREEDY
    acceptance: str = "exact"
    multi_turn: bool = False
    batch_size: int = 1
    model: str | None = None
    cost_model: str | None = None  # --tree-budget auto: every drafter under the chooser, this cost model
    repeats: int = 1  # greedy: each request timed this many times per method (interleaved), the median run kept

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.repeats > 1 and not self.sampling.greedy:
            raise ValueError("--repeats times greedy runs only (repeated sampled runs differ): use --temperature 0")
        if self.repeats > 1 and self.batch_size > 1:
            raise ValueError("--repeats applies to --batch-size 1")

    @property
    def baseline_name(self) -> str:
        return "hf_greedy" if self.sampling.greedy else "hf_sample"

    def journal_key(self, methods: Sequence[str], prompts: Sequence[Prompt]) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([asdict(p) for p in prompts]).encode()).hexdigest()[:16]
        key = asdict(self)
        for name, default in (("cost_model", None), ("repeats", 1)):  # journals written before these existed resume
            if key[name] == default:
                del key[name]
        return {**key, "methods": list(methods), "prompts": digest}


@dataclass
class _Run:
    name: str
    engine: SpeculativeEngine
    stats: list[RequestStats] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    checks: list[EqualityCheck | None] = field(default_factory=list)


def hf_sampling_kwargs(sampling: SamplingParams) -> dict:
    """HF ``generate`` keywords for the same sampling settings; seeds the global RNG (how HF samples)."""
    if sampling.greedy:
        return {"do_sample": False}
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}


def hf_generate(
    model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingParams = GREEDY
) -> tuple[list[int], float]:
    """Tokens and seconds of Hugging Face ``generate`` on ``ids [L]``: greedy, or sampling with the same
    temperature / top-k / top-p (seeded through the global RNG, which is how HF samples)."""
    kwargs = hf_sampling_kwargs(sampling)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids[None], max_new_tokens=max_new_tokens, attention_mask=None, **kwargs)
        return out[0, ids.numel() :].tolist(), time.perf_counter() - t0


def check_greedy(model: PreTrainedModel, ids: torch.Tensor, ref: Sequence[int], out: Sequence[int],
                 tolerance: float = NEAR_TIE) -> EqualityCheck:
    """Compare ``out`` with the baseline ``ref`` for prompt ``ids [L]``; at a difference, measure the target's
    top-2 logit margin after the common prefix."""
    i = next((k for k, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), None)
    if i is None:
        if len(out) == len(ref):
            return EqualityCheck(True)
        return EqualityCheck(False, min(len(out), len(ref)))
    with torch.inference_mode():
        prefix = torch.cat([ids, torch.as_tensor(list(ref[:i]), dtype=ids.dtype)]).to(model.device)
        logits = model(prefix[None]).logits[0, -1].float()
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    return EqualityCheck(False, i, margin, margin < tolerance)


def build_engines(target: TargetModel, tokenizer: PreTrainedTokenizerBase, drafters: Mapping[str, DrafterSpec],
                  settings: BenchSettings, **engine_kwargs: Any) -> list[tuple[str, SpeculativeEngine]]:
    """``specdec_ar`` (no drafter) then one engine per drafter spec, all on one shared cache."""
    eos = eos_token_ids(target.model, tokenizer)
    cache = target.new_cache(settings.num_blocks, settings.block_size)
    engines = [("specdec_ar", SpeculativeEngine(target, cache, None, eos, **engine_kwargs))]
    engines += [(name, SpeculativeEngine(target, cache, _drafter(name, spec, target, settings, engine_kwargs), eos,
                                         acceptance=settings.acceptance, **engine_kwargs))
                for name, spec in drafters.items() if spec.name != "none"]
    return engines


def _drafter(name: str, spec: DrafterSpec, target: TargetModel, settings: BenchSettings, engine_kwargs: dict):
    drafter = build_drafter(spec, target)
    if settings.cost_model is None:
        return drafter
    from specdec.research.auto_budget import wrap_auto_budget

    return wrap_auto_budget(drafter, settings.cost_model, name.removesuffix("+auto"),
                            engine_kwargs.get("max_tree_nodes", 64), target)


def run_bench(target: TargetModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
              drafters: Mapping[str, DrafterSpec], settings: BenchSettings = BenchSettings(),
              journal_path: str | Path | None = None) -> BenchReport:
    """Benchmark every method on ``prompts``; the report's ``requests`` hold one record per (method, prompt, turn).

    With ``multi_turn`` every turn of each prompt runs, each method's own earlier answers in its context (the
    baseline's in the baseline's). At temperature > 0 every method samples with ``settings.sampling`` (seed
    ``sampling.seed + request index``) and ``identical_to_baseline`` is ``None``: outputs are compared as
    distributions by the tests, not token by token. Ctrl-C after at least one finished prompt returns the
    partial report; before that it propagates."""
    if settings.batch_size > 1:
        from specdec.app.batch_bench import run_batched_bench

        return run_batched_bench(target, tokenizer, prompts, drafters, settings)
    runs = [_Run(name, engine) for name, engine in build_engines(target, tokenizer, drafters, settings)]
    journal = None
    if journal_path is not None:
        journal = Journal(journal_path, settings.journal_key([r.name for r in runs], prompts))
    acc = _Accumulator(runs)
    _warm_up(target.model, runs, encode_prompt(tokenizer, prompts[0].text, settings.chat),
             min(4, settings.max_new_tokens))
    bar = tqdm(total=len(prompts), desc="bench", unit="prompt")
    complete = True
    try:
        for p_idx, prompt in enumerate(prompts):
            entry = journal.done.get(p_idx) if journal else None
            if entry is None:
                entry = _run_prompt(target.model, tokenizer, runs, prompt, settings, acc.n_requests)
                if journal:
                    journal.record(p_idx, entry)
            acc.add(p_idx, prompt, entry)
            bar.update(1)
    except KeyboardInterrupt:
        if not acc.n_done:
            raise
        complete = False
    finally:
        bar.close()
    return acc.report(settings, complete, len(prompts))


def _run_prompt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, runs: Sequence[_Run], prompt: Prompt,
                settings: BenchSettings, first_index: int) -> dict[str, Any]:
    """Every turn of ``prompt`` for the baseline and every method: the journal entry of the prompt."""
    turns = list(prompt.all_turns if settings.multi_turn else prompt.all_turns[:1])
    answers: dict[str, list[str]] = {name: [] for name in ["baseline", *(r.name for r in runs)]}
    entry: dict[str, Any] = {"baseline": [], "runs": {r.name: [] for r in runs}}
    sampling = settings.sampling
    for t in range(len(turns)):
        params = sampling if sampling.greedy else replace(sampling, seed=(sampling.seed or 0) + first_index + t)
        ids = encode_conversation(tokenizer, turns[: t + 1], answers["baseline"], settings.chat)
        owns = [encode_conversation(tokenizer, turns[: t + 1], answers[run.name], settings.chat) for run in runs]
        trials = [(hf_generate(model, ids, settings.max_new_tokens, params),
                   [run.engine.generate(own, settings.max_new_tokens, sampling=params)
                    for run, own in zip(runs, owns, strict=True)]) for _ in range(settings.repeats)]
        ref, seconds = _median_by(lambda x: x[1], [hf for hf, _ in trials])
        answers["baseline"].append(tokenizer.decode(ref, skip_special_tokens=True))
        entry["baseline"].append({"tokens": len(ref), "seconds": seconds})
        for i, run in enumerate(runs):
            result = _median_by(lambda r: r.stats.total_s, [results[i] for _, results in trials])
            answers[run.name].append(tokenizer.decode(result.tokens, skip_special_tokens=True))
            check = check_greedy(model, ids, ref, result.tokens) if sampling.greedy else None
            entry["runs"][run.name].append({
                "stats": asdict(result.stats), "speedup": result.stats.tokens_per_s / (len(ref) / seconds),
                "equality": None if check is None else asdict(check)})
    return entry


def _median_by(key, items: Sequence[Any]) -> Any:
    """The item of median ``key`` (the lower middle one of an even count): a repeated run's typical timing."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


class _Accumulator:
    """Finished prompts (run now or read from the journal) folded into the runs' lists and request records."""

    def __init__(self, runs: Sequence[_Run]) -> None:
        self.runs = runs
        self.categories: list[str] = []
        self.requests: list[RequestRecord] = []
        self.base_tokens, self.base_seconds, self.n_done = 0, 0.0, 0

    @property
    def n_requests(self) -> int:
        return len(self.categories)

    def add(self, p_idx: int, prompt: Prompt, entry: dict[str, Any]) -> None:
        self.n_done += 1
        for t, base in enumerate(entry["baseline"]):
            self.base_tokens += base["tokens"]
            self.base_seconds += base["seconds"]
            self.categories.append(prompt.category)
            for run in self.runs:
                item = entry["runs"][run.name][t]
                stats = stats_from_json(item["stats"])
                check = None if item["equality"] is None else EqualityCheck(**item["equality"])
                run.stats.append(stats)
                run.speedups.append(item["speedup"])
                run.checks.append(check)
                self.requests.append(RequestRecord(
                    run.name, p_idx, prompt.question_id, prompt.category, t, stats.new_tokens, stats.tau,
                    stats.tokens_per_s, base["tokens"] / base["seconds"], item["speedup"], stats.draft_s,
                    stats.verify_s, stats.acceptance_by_depth, check))

    def report(self, settings: BenchSettings, complete: bool, n_total: int) -> BenchReport:
        baseline = Baseline(settings.baseline_name, self.base_tokens / self.base_seconds)
        return BenchReport(baseline, settings.max_new_tokens, asdict(settings.sampling), settings.multi_turn,
                           [summarize(r.name, r.stats, r.speedups, r.checks, self.categories) for r in self.runs],
                           self.requests, settings.batch_size, complete, self.n_done, n_total)


def stats_from_json(values: dict[str, Any]) -> RequestStats:
    """A :class:`RequestStats` from its ``asdict`` form (keys it no longer has are ignored)."""
    return RequestStats(**{f.name: values[f.name] for f in fields(RequestStats) if f.init and f.name in values})


def _warm_up(model: PreTrainedModel, runs: Sequence[_Run], ids: torch.Tensor, tokens: int) -> None:
    hf_generate(model, ids, tokens)
    for run in runs:
        run.engine.generate(ids, tokens)


def summarize(name: str, stats: Sequence[RequestStats], speedups: Sequence[float],
              checks: Sequence[EqualityCheck | None], categories: Sequence[str],
              latencies: Sequence[float] = ()) -> RunSummary:
    """One method's summary over its requests (``speedups`` per request; ``latencies`` only in batched runs)."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_cat[c].append(i)
    total = RequestStats.combine(list(stats))
    greedy = all(c is not None for c in checks)
    return RunSummary(
        name=name, label=short_label(name), tokens_per_s=total.tokens_per_s, speedup=statistics.median(speedups),
        speedup_mean_ci=mean_ci(list(speedups)), tau=total.tau, tau_mean_ci=mean_ci([s.tau for s in stats]),
        acceptance_by_depth=total.acceptance_by_depth, accepted_length_hist=total.accepted_hist,
        draft_s=total.draft_s, verify_s=total.verify_s,
        identical_to_baseline=sum(c.identical for c in checks) if greedy else None,
        near_ties=sum(c.near_tie for c in checks) if greedy else None,
        differences=[{"request": i, **asdict(c)} for i, c in enumerate(checks) if c is not None and not c.identical],
        n_prompts=len(stats),
        per_category={c: CategorySummary(statistics.median(speedups[i] for i in idx),
                                         RequestStats.combine([stats[i] for i in idx]).tau, len(idx))
                      for c, idx in by_cat.items()},
        latency_p50_s=_percentile(latencies, 50), latency_p99_s=_percentile(latencies, 99),
    )


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
