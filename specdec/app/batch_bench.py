"""``specdec bench --batch-size B`` (B > 1): B requests at once through each engine (``generate_batch``, continuous
batching) against Hugging Face ``generate`` on the same prompts in left-padded batches of B, batch by batch
(interleaved, as the B = 1 bench is prompt by prompt).

Reported per method: aggregate throughput (generated tokens / wall seconds over all batches), ``speedup`` = that
throughput / the HF baseline's, per-request latency p50 / p99 (seconds from the batch's start to the request's end;
for HF every request of a batch ends with the batch), tau, and the greedy equality check per request against HF's
output for it. Only first turns run; Ctrl-C returns the finished batches as a partial report (no resume).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.app.bench import BenchSettings, build_engines, check_greedy, hf_sampling_kwargs, summarize
from specdec.app.prompts import Prompt, encode_prompt
from specdec.app.report import Baseline, BenchReport, EqualityCheck, RequestRecord
from specdec.drafters import DrafterSpec
from specdec.sampling import SamplingParams
from specdec.stats import RequestStats, mean_ci
from specdec.target import TargetModel, eos_token_ids


def hf_generate_batch(model: PreTrainedModel, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                      sampling: SamplingParams, pad_id: int, eos: Sequence[int]) -> tuple[list[list[int]], float]:
    """HF ``generate`` on ``prompts`` left-padded into one batch (with its attention mask); each row's tokens up to
    and including its first EOS, and the batch's seconds."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():] = p
        mask[b, width - p.numel():] = 1
    kwargs = hf_sampling_kwargs(sampling)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=list(eos) or None, **kwargs)
        seconds = time.perf_counter() - t0
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows, seconds


def run_batched_bench(target: TargetModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                      drafters: Mapping[str, DrafterSpec], settings: BenchSettings) -> BenchReport:
    """The B > 1 bench described in the module docstring (``settings.batch_size`` = B)."""
    if settings.multi_turn:
        raise ValueError("--multi-turn runs one request at a time: drop --multi-turn or use --batch-size 1")
    size = settings.batch_size
    model, eos = target.model, eos_token_ids(target.model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    engines = build_engines(target, tokenizer, drafters, settings, max_batch=size)
    encoded = [encode_prompt(tokenizer, p.text, settings.chat) for p in prompts]
    batches = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]
    _warm_up(model, engines, encoded[: size], settings.sampling, pad_id, eos, min(4, settings.max_new_tokens))
    base = {"tokens": 0, "seconds": 0.0, "latency": []}
    runs = {name: {"tokens": 0, "seconds": 0.0, "stats": [], "speedups": [], "checks": [], "latency": [],
                   "batch_ratio": []} for name, _ in engines}
    requests: list[RequestRecord] = []
    done = 0
    try:
        for batch in tqdm(batches, desc=f"bench B={size}", unit="batch"):
            params = _params(settings.sampling, batch)
            ref, base_s = hf_generate_batch(model, [encoded[i] for i in batch], settings.max_new_tokens, params[0],
                                            pad_id, eos)
            base_tps = sum(len(r) for r in ref) / base_s
            rows = []
            for name, engine in engines:
                t0 = time.perf_counter()
                results = engine.generate_batch([encoded[i] for i in batch], settings.max_new_tokens, params)
                seconds = time.perf_counter() - t0
                checks = [check_greedy(model, encoded[i], r, res.tokens) if settings.sampling.greedy else None
                          for i, r, res in zip(batch, ref, results, strict=True)]
                rows.append((name, results, seconds, checks))
            base["tokens"] += sum(len(r) for r in ref)
            base["seconds"] += base_s
            base["latency"] += [base_s] * len(batch)
            for name, results, seconds, checks in rows:
                run = runs[name]
                tokens = sum(len(r.tokens) for r in results)
                run["tokens"] += tokens
                run["seconds"] += seconds
                run["batch_ratio"].append((tokens / seconds) / base_tps)
                for i, r, res, check in zip(batch, ref, results, checks, strict=True):
                    latency = min(res.stats.total_s or seconds, seconds)
                    speedup = (len(res.tokens) / latency) / (len(r) / base_s) if r and latency else 0.0
                    run["stats"].append(res.stats)
                    run["speedups"].append(speedup)
                    run["checks"].append(check)
                    run["latency"].append(latency)
                    requests.append(_record(name, i, prompts[i], res.stats, len(r) / base_s, speedup, check,
                                            latency))
            done += len(batch)
    except KeyboardInterrupt:
        if not done:
            raise
    categories = [prompts[i].category for i in range(done)]
    baseline = Baseline(settings.baseline_name, base["tokens"] / base["seconds"])
    summaries = []
    for name, run in runs.items():
        s = summarize(name, run["stats"], run["speedups"], run["checks"], categories, run["latency"])
        throughput = run["tokens"] / run["seconds"]
        summaries.append(replace(s, tokens_per_s=throughput, speedup=throughput / baseline.tokens_per_s,
                                 speedup_mean_ci=mean_ci(run["batch_ratio"])))
    return BenchReport(baseline, settings.max_new_tokens, asdict(settings.sampling), False, summaries, requests,
                       size, done == len(prompts), done, len(prompts))


def _params(sampling: SamplingParams, batch: Sequence[int]) -> list[SamplingParams]:
    if sampling.greedy:
        return [sampling] * len(batch)
    return [replace(sampling, seed=(sampling.seed or 0) + i) for i in batch]


def _record(name: str, index: int, prompt: Prompt, stats: RequestStats, base_tps: float, speedup: float,
            check: EqualityCheck | None, latency: float) -> RequestRecord:
    return RequestRecord(name, index, prompt.question_id, prompt.category, 0, stats.new_tokens, stats.tau,
                         stats.tokens_per_s, base_tps, speedup, stats.draft_s, stats.verify_s,
                         stats.acceptance_by_depth, check, latency)


def _warm_up(model: PreTrainedModel, engines, prompts: Sequence[torch.Tensor], sampling: SamplingParams, pad_id: int,
             eos: Sequence[int], tokens: int) -> None:
    hf_generate_batch(model, prompts, tokens, sampling, pad_id, eos)
    for _, engine in engines:
        engine.generate_batch(list(prompts), tokens)


