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

from specdec.app.prompts import Prompt, encode_conversation, encode_prompt
from specdec.drafters import DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.sampling import GREEDY, SamplingParams
from specdec.stats import RequestStats, mean_ci
from specdec.target import TargetModel, eos_token_ids

NEAR_TIE = 1e-4  # logit margin under which a greedy difference is a floating-point tie, not a bug


@dataclass
class _Run:
    name: str
    engine: SpeculativeEngine
    stats: list[RequestStats] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    checks: list[EqualityCheck | None] = field(default_factory=list)


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
    multi_turn: bool = False,
) -> dict:
    """Benchmark and return the report (see README for the JSON shape); ``report["requests"]`` holds one record
    per (method, prompt, turn).

    With ``multi_turn`` every turn of each prompt runs, each method's own earlier answers in its context (the
    baseline's in the baseline's). At temperature > 0 every method samples with ``sampling`` (seed
    ``sampling.seed + request index``) and ``identical_to_baseline`` is ``None``: outputs are compared as
    distributions by the tests, not token by token.
    """
    model = target.model
    eos = eos_token_ids(model, tokenizer)
    cache = target.new_cache(num_blocks, block_size)
    runs = [_Run("specdec_ar", SpeculativeEngine(target, cache, None, eos))]
    runs += [_Run(name, SpeculativeEngine(target, cache, build_drafter(spec, target), eos, acceptance=acceptance))
             for name, spec in drafters.items() if spec.name != "none"]
    _warm_up(model, runs, encode_prompt(tokenizer, prompts[0].text, chat))
    base_tokens, base_seconds, requests, categories, index = 0, 0.0, [], [], 0
    for p_idx, prompt in enumerate(tqdm(prompts, desc="bench", unit="prompt")):
        turns = list(prompt.all_turns if multi_turn else prompt.all_turns[:1])
        answers: dict[str, list[str]] = {name: [] for name in ["baseline", *(r.name for r in runs)]}
        for t in range(len(turns)):
            params = sampling if sampling.greedy else replace(sampling, seed=(sampling.seed or 0) + index)
            index += 1
            ids = encode_conversation(tokenizer, turns[: t + 1], answers["baseline"], chat)
            ref, seconds = hf_generate(model, ids, max_new_tokens, params)
            base_tokens, base_seconds = base_tokens + len(ref), base_seconds + seconds
            answers["baseline"].append(tokenizer.decode(ref, skip_special_tokens=True))
            categories.append(prompt.category)
            for run in runs:
                own = encode_conversation(tokenizer, turns[: t + 1], answers[run.name], chat)
                result = run.engine.generate(own, max_new_tokens, sampling=params)
                answers[run.name].append(tokenizer.decode(result.tokens, skip_special_tokens=True))
                run.stats.append(result.stats)
                run.speedups.append(result.stats.tokens_per_s / (len(ref) / seconds))
                check = check_greedy(model, ids, ref, result.tokens) if sampling.greedy else None
                run.checks.append(check)
                requests.append(_record(run.name, p_idx, t, prompt, result.stats, len(ref) / seconds,
                                        run.speedups[-1], check))
    summaries = [_summarize(run, categories) for run in runs]
    baseline = "hf_greedy" if sampling.greedy else "hf_sample"
    return {
        "baseline": {"name": baseline, "tokens_per_s": base_tokens / base_seconds},
        "max_new_tokens": max_new_tokens,
        "sampling": asdict(sampling),
        "multi_turn": multi_turn,
        "runs": summaries,
        "requests": requests,
    }


def _record(name: str, p_idx: int, turn: int, prompt: Prompt, stats: RequestStats, base_tps: float, speedup: float,
            check: EqualityCheck | None) -> dict:
    return {
        "method": name, "prompt_index": p_idx, "question_id": prompt.question_id, "category": prompt.category,
        "turn": turn, "new_tokens": stats.new_tokens, "tau": stats.tau, "tokens_per_s": stats.tokens_per_s,
        "baseline_tokens_per_s": base_tps, "speedup": speedup, "draft_s": stats.draft_s, "verify_s": stats.verify_s,
        "acceptance_by_depth": stats.acceptance_by_depth,
        "equality": None if check is None else asdict(check),
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
    greedy = all(c is not None for c in run.checks)
    return {
        "name": run.name,
        "tokens_per_s": total.tokens_per_s,
        "speedup": statistics.median(run.speedups),
        "speedup_mean_ci": list(mean_ci(run.speedups)),
        "tau": total.tau,
        "tau_mean_ci": list(mean_ci([s.tau for s in run.stats])),
        "acceptance_by_depth": total.acceptance_by_depth,
        "accepted_length_hist": total.accepted_hist,
        "draft_s": total.draft_s,
        "verify_s": total.verify_s,
        "identical_to_baseline": sum(c.identical for c in run.checks) if greedy else None,
        "differences": [{"request": i, **asdict(c)} for i, c in enumerate(run.checks)
                        if c is not None and not c.identical],
        "n_prompts": len(run.stats),
        "per_category": {
            c: {
                "speedup": statistics.median(run.speedups[i] for i in idx),
                "tau": RequestStats.combine([run.stats[i] for i in idx]).tau,
                "n": len(idx),
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
