"""Host overhead of the decode loop: wall time per verification step outside the target model's forward.

Runs ``engine.generate`` (the one call every engine version has) on a few prompts and times, per step, the
whole step and the HF model forward inside it (patched at the model class), so the difference is what the
engine itself costs: drafting bookkeeping, metadata, acceptance, commit, Python. Prints a table, writes JSON.

    python experiments/step_overhead.py --drafter none ngram --max-new-tokens 64 --out out/step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _import(name: str, *modules: str):
    """``name`` from the first module that has it (this script also measures older checkouts for before/after)."""
    import importlib

    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} not found in {modules}")


def measure(target, tokenizer, drafter_spec: str, prompts: list[str], max_new_tokens: int) -> dict:
    encode_prompt = _import("encode_prompt", "specdec.app.prompts", "specdec.prompts")
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.target import eos_token_ids

    model_cls = type(target.model)
    inner = model_cls.forward
    forward_s = [0.0]

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            forward_s[0] += time.perf_counter() - t0

    drafter = build_drafter(DrafterSpec.parse(drafter_spec), target)
    engine = SpeculativeEngine(target, target.new_cache(512, 16), drafter, eos_token_ids(target.model, tokenizer))
    engine.generate(encode_prompt(tokenizer, prompts[0], True), 4)  # warm-up
    steps = total = fwd = 0.0
    model_cls.forward = timed
    try:
        for text in prompts:
            forward_s[0] = 0.0
            t0 = time.perf_counter()
            result = engine.generate(encode_prompt(tokenizer, text, True), max_new_tokens)
            total += time.perf_counter() - t0
            fwd += forward_s[0]
            steps += result.stats.steps + 1  # + the prefill
    finally:
        model_cls.forward = inner
    return {"drafter": drafter_spec, "steps": int(steps), "step_ms": 1000 * total / steps,
            "forward_ms": 1000 * fwd / steps, "host_overhead_ms": 1000 * (total - fwd) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drafter", nargs="+", default=["none", "ngram"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=4, help="prompts of the built-in set (first of each category)")
    p.add_argument("--out", default="out/step_overhead.json")
    args = p.parse_args()
    from specdec.target import TargetModel

    load_model_and_tokenizer = _import("load_model_and_tokenizer", "specdec.app.loaders", "specdec.target")
    builtin_prompts_path = _import("builtin_prompts_path", "specdec.app.prompts", "specdec.prompts")
    load_prompts = _import("load_prompts", "specdec.app.prompts", "specdec.prompts")

    model, tokenizer = load_model_and_tokenizer(None, torch.float32)
    target = TargetModel(model)
    prompts = [q.text for q in load_prompts(builtin_prompts_path(), None, 1)][: args.limit]
    rows = [measure(target, tokenizer, d, prompts, args.max_new_tokens) for d in args.drafter]
    print(f"{'drafter':<10} {'steps':>6} {'step ms':>8} {'forward ms':>11} {'host ms':>8}")
    for r in rows:
        print(f"{r['drafter']:<10} {r['steps']:>6} {r['step_ms']:>8.2f} {r['forward_ms']:>11.2f} "
              f"{r['host_overhead_ms']:>8.2f}")
    print(f"median host overhead: {statistics.median(r['host_overhead_ms'] for r in rows):.2f} ms per step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
