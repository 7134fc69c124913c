"""``specdec bench``: HF ``generate`` greedy, specdec autoregressive and each drafter on the same prompts, in one
process, interleaved prompt by prompt so machine noise hits every method alike.

Speed is reported as the **median over prompts of (method tok/s) / (HF greedy tok/s on the same prompt)**.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.drafters import make_drafter
from specdec.engine import SpeculativeEngine
from specdec.prompts import Prompt, encode_prompt
from specdec.stats import RequestStats
from specdec.target import TargetModel, eos_token_ids


@dataclass
class _Run:
    name: str
    engine: SpeculativeEngine
    stats: list[RequestStats] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)


def hf_greedy(model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], float]:
    """Tokens and seconds of Hugging Face ``generate`` greedy on ``ids [L]``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False, attention_mask=None)
        return out[0, ids.numel() :].tolist(), time.perf_counter() - t0


def run_bench(
    target: TargetModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    drafters: Sequence[str],
    max_new_tokens: int = 128,
    chat: bool = True,
    num_blocks: int = 256,
    block_size: int = 16,
) -> dict:
    """Benchmark and return the report (see README for the JSON shape)."""
    model = target.model
    eos = eos_token_ids(model, tokenizer)
    cache = target.new_cache(num_blocks, block_size)
    runs = [_Run("specdec_ar", SpeculativeEngine(target, cache, None, eos))]
    runs += [_Run(d, SpeculativeEngine(target, cache, make_drafter(d), eos)) for d in drafters if d != "none"]
    encoded = [encode_prompt(tokenizer, p.text, chat) for p in prompts]
    _warm_up(model, runs, encoded[0])
    base_tokens, base_seconds = 0, 0.0
    for ids in tqdm(encoded, desc="bench", unit="prompt"):
        ref, seconds = hf_greedy(model, ids, max_new_tokens)
        base_tokens, base_seconds = base_tokens + len(ref), base_seconds + seconds
        for run in runs:
            result = run.engine.generate(ids, max_new_tokens)
            run.stats.append(result.stats)
            run.speedups.append(result.stats.tokens_per_s / (len(ref) / seconds))
            run.identical.append(result.tokens == ref)
    categories = [p.category for p in prompts]
    return {
        "baseline": {"name": "hf_greedy", "tokens_per_s": base_tokens / base_seconds},
        "max_new_tokens": max_new_tokens,
        "runs": [_summarize(run, categories) for run in runs],
    }


def _warm_up(model: PreTrainedModel, runs: Sequence[_Run], ids: torch.Tensor) -> None:
    hf_greedy(model, ids, 4)
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
    head = f"{'method':<12} {'tok/s':>7} {'speedup':>8} {'tau':>5} {'same':>6}  "
    head += " ".join(f"{c[:8]:>8}" for c in cats)
    lines = [head, "-" * len(head)]
    lines.append(f"{'hf_greedy':<12} {report['baseline']['tokens_per_s']:>7.2f} {1.0:>8.2f} {'':>5} {'':>6}")
    for r in report["runs"]:
        per = " ".join(f"{r['per_category'][c]['speedup']:>8.2f}" for c in cats)
        same = f"{r['identical_to_baseline']}/{r['n_prompts']}"
        row = f"{r['name']:<12} {r['tokens_per_s']:>7.2f} {r['speedup']:>8.2f} {r['tau']:>5.2f} {same:>6}  {per}"
        lines.append(row)
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
