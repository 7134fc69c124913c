"""``specdec bench``: HF ``generate`` greedy, specdec autoregressive and each drafter on the same prompts, in one
process, interleaved prompt by prompt so machine noise hits every method alike.

Speed is reported as the **median over prompts of (method tok/s) / (HF greedy tok/s on the same prompt)**.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.prompts import Prompt, encode_prompt
from specdec.sampling import GREEDY, SamplingParams
from specdec.stats import RequestStats
from specdec.target import TargetModel, eos_token_ids


@dataclass
class _Run:
    name: str
    engine: SpeculativeEngine
    stats: list[RequestStats] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)


def hf_generate(
    model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingParams = GREEDY
) -> tuple[list[int], float]:
    """Tokens and seconds of Hugging Face ``generate`` on ``ids [L]``: greedy, or sampling with the same
    temperature / top-k / top-p (seeded through the global RNG, which is how HF samples)."""
    kwargs: dict = {"do_sample": False}
    if not sampling.greedy:
        kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
                  "top_p": sampling.top_p}
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids[None], max_new_tokens=max_new_tokens, attention_mask=None, **kwargs)
        return out[0, ids.numel() :].tolist(), time.perf_counter() - t0


def run_bench(
    target: TargetModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    drafters: Mapping[str, DrafterSpec],
    max_new_tokens: int = 128,
    chat: bool = True,
    num_blocks: int = 256,
    block_size: int = 16,
    sampling: SamplingParams = GREEDY,
    acceptance: str = "exact",
) -> dict:
    """Benchmark and return the report (see README for the JSON shape).

    At temperature > 0 every method samples with ``sampling`` (seed ``sampling.seed + prompt index``) and
    ``identical_to_baseline`` is ``None``: outputs are compared as distributions by the tests, not token by token.
    """
    model = target.model
    eos = eos_token_ids(model, tokenizer)
    cache = target.new_cache(num_blocks, block_size)
    runs = [_Run("specdec_ar", SpeculativeEngine(target, cache, None, eos))]
    runs += [_Run(name, SpeculativeEngine(target, cache, build_drafter(spec, target), eos, acceptance=acceptance))
             for name, spec in drafters.items() if spec.name != "none"]
    encoded = [encode_prompt(tokenizer, p.text, chat) for p in prompts]
    _warm_up(model, runs, encoded[0])
    base_tokens, base_seconds = 0, 0.0
    for i, ids in enumerate(tqdm(encoded, desc="bench", unit="prompt")):
        params = sampling if sampling.greedy else replace(sampling, seed=(sampling.seed or 0) + i)
        ref, seconds = hf_generate(model, ids, max_new_tokens, params)
        base_tokens, base_seconds = base_tokens + len(ref), base_seconds + seconds
        for run in runs:
            result = run.engine.generate(ids, max_new_tokens, sampling=params)
            run.stats.append(result.stats)
            run.speedups.append(result.stats.tokens_per_s / (len(ref) / seconds))
            run.identical.append(result.tokens == ref)
    categories = [p.category for p in prompts]
    summaries = [_summarize(run, categories) for run in runs]
    if not sampling.greedy:
        for summary in summaries:
            summary["identical_to_baseline"] = None
    baseline = "hf_greedy" if sampling.greedy else "hf_sample"
    return {
        "baseline": {"name": baseline, "tokens_per_s": base_tokens / base_seconds},
        "max_new_tokens": max_new_tokens,
        "sampling": asdict(sampling),
        "runs": summaries,
    }


def _warm_up(model: PreTrainedModel, runs: Sequence[_Run], ids: torch.Tensor) -> None:
    hf_generate(model, ids, 4)
    for run in runs:
        run.engine.generate(ids, 4)


def _summarize(run: _Run, categories: Sequence[str]) -> dict:
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        by_cat[c].append(i)
    total = RequestStats.combine(run.stats)
    return {
        "name": run.name,
        "tokens_per_s": total.tokens_per_s,
        "speedup": statistics.median(run.speedups),
        "tau": total.tau,
        "acceptance_by_depth": total.acceptance_by_depth,
        "accepted_length_hist": total.accepted_hist,
        "draft_s": total.draft_s,
        "verify_s": total.verify_s,
        "identical_to_baseline": sum(run.identical),
        "n_prompts": len(run.stats),
        "per_category": {
            c: {
                "speedup": statistics.median(run.speedups[i] for i in idx),
                "tau": RequestStats.combine([run.stats[i] for i in idx]).tau,
            }
            for c, idx in by_cat.items()
        },
    }


def format_table(report: dict) -> str:
    """The report as a plain-text table (one row per method, then per-category speedups)."""
    cats = sorted({c for r in report["runs"] for c in r["per_category"]})
    width = max(12, *(len(r["name"]) for r in report["runs"]))
    head = f"{'method':<{width}} {'tok/s':>7} {'speedup':>8} {'tau':>5} {'same':>6}  "
    head += " ".join(f"{c[:8]:>8}" for c in cats)
    lines = [head, "-" * len(head)]
    lines.append(f"{report['baseline']['name']:<{width}} {report['baseline']['tokens_per_s']:>7.2f} {1.0:>8.2f}")
    for r in report["runs"]:
        per = " ".join(f"{r['per_category'][c]['speedup']:>8.2f}" for c in cats)
        same = "-" if r["identical_to_baseline"] is None else f"{r['identical_to_baseline']}/{r['n_prompts']}"
        row = f"{r['name']:<{width}} {r['tokens_per_s']:>7.2f} {r['speedup']:>8.2f} {r['tau']:>5.2f} {same:>6}  {per}"
        lines.append(row)
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
