"""Acceptance per category for n-gram, a model drafter and the hybrid: tau (tokens per verification step, bonus
included), tree nodes per step and, for the hybrid, the share of steps that asked the model. Timing on a loaded
machine is unreliable, so alongside the measured draft / verify milliseconds the table gives a cost-model speed
relative to autoregressive decoding: ``tau / (1 + node_cost * (nodes - 1) + model_cost * model_share)`` (a
verification node costs ``node_cost`` of a one-token forward; a model draft costs ``model_cost``, measured by
experiments/draft_cost.py). Prints a table and writes JSON.

Tune on the built-in prompts (specdec/data/prompts.jsonl); report on held-out ones:

    python experiments/hybrid_categories.py --prompts out/heldout.jsonl --max-new-tokens 96 \\
        --out out/hybrid_categories_heldout.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

DRAFTERS = ["ngram", "eagle:path=shipped,tree=dynamic", "hybrid:path=shipped"]


def run(target, tokenizer, spec: str, prompts, max_new_tokens: int) -> dict:
    from specdec.app.prompts import encode_prompt
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.target import eos_token_ids

    drafter = build_drafter(DrafterSpec.parse(spec), target)
    engine = SpeculativeEngine(target, target.new_cache(512, 16), drafter, eos_token_ids(target.model, tokenizer))
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    outputs = []
    for p in prompts:
        calls = getattr(drafter, "model_calls", 0)
        t0 = time.perf_counter()
        result = engine.generate(encode_prompt(tokenizer, p.text, True), max_new_tokens)
        s, c = result.stats, per[p.category or "all"]
        c["wall_s"] += time.perf_counter() - t0
        c["tokens"] += s.step_tokens
        c["steps"] += s.steps
        c["nodes"] += s.tree_nodes
        c["draft_s"] += s.draft_s
        c["verify_s"] += s.verify_s
        c["model_calls"] += getattr(drafter, "model_calls", 0) - calls
        outputs.append(result.tokens)
    return {"drafter": spec, "per_category": {k: dict(v) for k, v in per.items()}, "outputs": outputs}


def summarise(row: dict, node_cost: float, model_cost: float) -> dict:
    out = {}
    cats = dict(row["per_category"])
    total = defaultdict(float)
    for c in cats.values():
        for k, v in c.items():
            total[k] += v
    cats["ALL"] = total
    for cat, c in cats.items():
        steps = max(c["steps"], 1)
        tau, nodes = c["tokens"] / steps, c["nodes"] / steps
        share = c["model_calls"] / steps if "hybrid" in row["drafter"] else float(row["drafter"] != "ngram")
        out[cat] = {"tau": tau, "nodes_per_step": nodes, "model_share": share,
                    "draft_ms_per_step": 1000 * c["draft_s"] / steps,
                    "verify_ms_per_step": 1000 * c["verify_s"] / steps,
                    "modelled_speed": tau / (1 + node_cost * (nodes - 1) + model_cost * share)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drafter", nargs="+", default=DRAFTERS)
    p.add_argument("--prompts", default=None, help="prompt file (default: the built-in tuning set)")
    p.add_argument("--per-category", type=int, default=None, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--node-cost", type=float, default=0.05)
    p.add_argument("--model-cost", type=float, default=None, help="default: the hybrid's MODEL_COST")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/hybrid_categories.json")
    args = p.parse_args()
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, load_prompts
    from specdec.drafters.hybrid import MODEL_COST
    from specdec.target import TargetModel

    torch.set_num_threads(args.threads)
    model_cost = MODEL_COST if args.model_cost is None else args.model_cost
    model, tokenizer = load_model_and_tokenizer(None, torch.float32)
    target = TargetModel(model)
    prompts = load_prompts(args.prompts or builtin_prompts_path(), None, args.per_category)
    rows = []
    for spec in args.drafter:
        row = run(target, tokenizer, spec, prompts, args.max_new_tokens)
        row["summary"] = summarise(row, args.node_cost, model_cost)
        rows.append(row)
        _write(args.out, {"meta": {"prompts": args.prompts or "builtin", "partial": True}, "rows": rows})
        print(f"{spec}: " + " | ".join(f"{cat} tau {v['tau']:.2f} model {v['model_share']:.2f} "
                                       f"speed {v['modelled_speed']:.2f}" for cat, v in row["summary"].items()),
              flush=True)
    same = all(r["outputs"] == rows[0]["outputs"] for r in rows)
    cats = list(rows[0]["summary"])
    print(f"\n{'category':<14}" + "".join(f"{r['drafter'][:22]:>24}" for r in rows) + "   (tau / modelled speed)")
    for cat in cats:
        print(f"{cat:<14}" + "".join(f"{r['summary'][cat]['tau']:>15.2f} / {r['summary'][cat]['modelled_speed']:<6.2f}"
                                     for r in rows))
    print(f"outputs identical across drafters: {same}")
    meta = {"prompts": args.prompts or "builtin", "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "node_cost": args.node_cost, "model_cost": model_cost, "identical_outputs": same}
    _write(args.out, {"meta": meta, "rows": rows})


def _write(path: str, report: dict) -> None:
    report = {**report, "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in report["rows"]]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
