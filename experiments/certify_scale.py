"""Losslessness certificates at scale on the embedded SmolLM2: resumable, chunk by chunk.

For every configuration (drafter x temperature x acceptance rule) it samples chunks of requests (``--chunk``
requests, batched ``--max-batch`` at a time through one engine, by :func:`specdec.research.certify.run_certificate`)
until ``--tokens`` tokens were emitted, and stores each chunk's PIT values under ``--work`` as it finishes: killed,
the same command resumes after the last finished chunk. Then it writes, per configuration, the report JSON and the
PIT-histogram PNG to ``--out-dir`` and a ``summary.json`` table of the p-values.

Prompts: the built-in set (``specdec/data/prompts.jsonl``) then the self-instruct seed tasks (instruction, a blank
line and the first instance's input), cycled with fresh seeds (request ``i`` of a configuration is seeded ``i``).
The evaluation-only ``user_oriented_instructions.jsonl`` is NOT used.

    nice -n 10 nohup .venv/bin/python experiments/certify_scale.py > out/logs/certify_scale.log 2>&1 &
    .venv/bin/python experiments/certify_scale.py --report-only      # reports from the chunks so far
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT.parent / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"
EAGLE = "eagle:path=shipped,tree=dynamic,budget=8,depth=5"
MEDUSA = "medusa:path=shipped,tree=dynamic,budget=4"
HYBRID = "hybrid:path=shipped,budget=16"
# (name, drafter spec, temperature, acceptance, tokens (None = --tokens)), in run order (breadth first: a small
# --tokens first, then the same command with a larger one extends every configuration): the lossy rule early,
# the drafters at T = 1.0 and 0.7, plain sampling (the test's own calibration), hybrid last. The shipped heads at
# the bench's settings (specdec.app.cmd_bench.SHIPPED_DRAFTERS).
CONFIGS = [
    ("ngram_t1.0", "ngram", 1.0, "exact", None),
    ("medusa_typical_lossy_t1.0", MEDUSA, 1.0, "typical_lossy", 2000),  # rejected at 2.6k: no need for 20k
    ("eagle_t1.0", EAGLE, 1.0, "exact", None),
    ("medusa_t1.0", MEDUSA, 1.0, "exact", None),
    ("ngram_t0.7", "ngram", 0.7, "exact", None),
    ("eagle_t0.7", EAGLE, 0.7, "exact", None),
    ("medusa_t0.7", MEDUSA, 0.7, "exact", None),
    ("none_t1.0", "none", 1.0, "exact", None),
    ("none_t0.7", "none", 0.7, "exact", None),
    ("hybrid_t1.0", HYBRID, 1.0, "exact", None),
    ("hybrid_t0.7", HYBRID, 0.7, "exact", None),
]


def prompt_texts() -> list[str]:
    from specdec.app.prompts import builtin_prompts_path, load_prompts

    texts = [p.text for p in load_prompts(builtin_prompts_path())]
    for line in SEED_TASKS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            inp = (task.get("instances") or [{}])[0].get("input", "").strip()
            texts.append(task["instruction"].strip() + (f"\n\n{inp}" if inp else ""))
    return texts


def load_chunks(folder: Path):
    from specdec.research.certify import Certificate

    cert, tokens, n, requests = Certificate(), 0, 0, 0
    for path in sorted(folder.glob("chunk_*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        requests += raw["settings"]["n_prompts"] * raw["settings"]["repeats"]
        cert.marginal += [tuple(x) for x in raw["marginal"]]
        cert.conditional += [tuple(x) for x in raw["conditional"]]
        cert.impossible += raw["impossible"]
        cert.settings = raw["settings"]
        tokens += len(raw["marginal"])
        n += 1
    return cert, tokens, n, requests


def write_reports(work: Path, out_dir: Path, alpha: float) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, spec, temp, acceptance, _ in CONFIGS:
        cert, tokens, n, requests = load_chunks(work / name)
        if not tokens:
            continue
        cert.settings = {**cert.settings, "drafter": spec, "n_chunks": n, "n_requests": requests}
        report = cert.report(alpha)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        cert.plot(str(out_dir / f"{name}.png"))
        summary[name] = {"drafter": spec, "temperature": temp, "acceptance": acceptance, "n_tokens": tokens,
                         "n_requests": requests,
                         "ks_p": report["overall"]["ks_p"], "ad_p": report["overall"]["ad_p"],
                         "conditional_n": report["conditional"]["n"],
                         "conditional_ks_p": report["conditional"]["ks_p"],
                         "conditional_ad_p": report["conditional"]["ad_p"],
                         "impossible_events": report["impossible_events"], "passed": report["passed"],
                         "groups_min_ks_p_bonferroni": report["groups_min_ks_p_bonferroni"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000, help="emitted tokens per configuration")
    ap.add_argument("--chunk", type=int, default=32, help="requests per stored chunk")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None,
                    help="configuration names, run in the order given (default: all, in the listed order)")
    ap.add_argument("--work", default=str(ROOT / "out" / "certify_scale"))
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "certify"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.report_only:
        for name, row in write_reports(work, Path(args.out_dir), args.alpha).items():
            print(f"{name:<28} n={row['n_tokens']:>6} KS p={row['ks_p']:.4g} AD p={row['ad_p']:.4g} "
                  f"passed={row['passed']}")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import encode_prompt
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.certify import run_certificate
    from specdec.sampling import SamplingParams
    from specdec.target import TargetModel, eos_token_ids

    model, tok = load_model_and_tokenizer(None, torch.float32)
    target, eos = TargetModel(model), eos_token_ids(model, tok)
    prompts = [encode_prompt(tok, t) for t in prompt_texts()]
    print(f"{len(prompts)} prompts", flush=True)
    by_name = {c[0]: c for c in CONFIGS}
    unknown = sorted(set(args.only or ()) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {sorted(by_name)}")
    for name, spec, temp, acceptance, want in [by_name[n] for n in args.only] if args.only else CONFIGS:
        want = want or args.tokens
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        _, tokens, k, start = load_chunks(folder)
        drafter = None if spec == "none" or tokens >= want else build_drafter(DrafterSpec.parse(spec), target)
        while tokens < want:
            batch = [prompts[(start + i) % len(prompts)] for i in range(args.chunk)]  # request i: seed start + i
            t0 = time.perf_counter()
            cert = run_certificate(target, {spec: drafter}, batch, SamplingParams(temp, seed=start),
                                   args.max_new_tokens, 1, eos, acceptance, max_batch=args.max_batch, seed=k)
            dt = time.perf_counter() - t0
            raw = {"settings": cert.settings, "impossible": cert.impossible, "marginal": cert.marginal,
                   "conditional": cert.conditional, "seconds": dt}
            tmp = folder / f"chunk_{k:04d}.json.tmp"
            tmp.write_text(json.dumps(raw), encoding="utf-8")
            tmp.rename(folder / f"chunk_{k:04d}.json")
            tokens += len(cert.marginal)
            k, start = k + 1, start + args.chunk
            print(f"{time.strftime('%H:%M:%S')} {name} chunk {k}: {len(cert.marginal)} tokens in {dt:.0f}s "
                  f"({len(cert.marginal) / dt:.1f} tok/s), total {tokens}/{want}", flush=True)
        write_reports(work, Path(args.out_dir), args.alpha)
        print(f"{time.strftime('%H:%M:%S')} {name} done: {tokens} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
