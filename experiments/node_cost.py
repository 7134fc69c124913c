"""What a draft node costs in the real engine: time per step with rejected chain drafts of k nodes
(:class:`specdec.research.cost_measure.RejectedTrees`) against plain decoding, interleaved prompt by prompt, on
real prompts (the whole step: forward, acceptance, KV bookkeeping).

``specdec calibrate`` times the same kind of step on a grid of bushy trees and contexts for the cost model; this
times chains on a prompt set.
Prints a table and writes JSON (median ms per step and the ratio to plain decoding, per k).

    python experiments/node_cost.py --prompts P.jsonl --limit 6 --rounds 3 --nodes 1 2 3 --out node_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/node_cost.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2)")
    ap.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    ap.add_argument("--limit", type=int, default=6, help="prompts used (default: 6)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens per run (default: 48)")
    ap.add_argument("--rounds", type=int, default=3, help="times every prompt runs every k (default: 3)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="draft nodes k (default: 1 2 3)")
    ap.add_argument("--out", default=None, help="JSON report (default: none)")
    args = ap.parse_args(argv)
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.engine import SpeculativeEngine
    from specdec.research.cost_measure import RejectedTrees
    from specdec.target import TargetModel

    model, tokenizer = load_model_and_tokenizer(args.model, torch.float32)
    target = TargetModel(model)
    prompts = [encode_prompt(tokenizer, p.text).tolist()
               for p in load_prompts(args.prompts or builtin_prompts_path())[: args.limit]]
    cache = target.new_cache(64 + sum(len(p) for p in prompts) // 16 + 16 * len(prompts), 16)
    ks = [0, *sorted(set(args.nodes))]
    drafters = {k: RejectedTrees(target.vocab_size, nodes=k + 1, chain=True) if k else None for k in ks}
    per_step: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(args.rounds):
        for ids in prompts:
            for k in ks:
                engine = SpeculativeEngine(target, cache, drafters[k], max_tree_nodes=k + 1)
                t0 = time.perf_counter()
                out = engine.generate(ids, args.max_new_tokens)
                per_step[k].append((time.perf_counter() - t0) / out.stats.steps)
    base = statistics.median(per_step[0])
    rows = [{"draft_nodes": k, "ms_per_step": 1e3 * statistics.median(v), "ratio": statistics.median(v) / base}
            for k, v in per_step.items()]
    print(f"{'draft nodes':>11}  {'ms/step':>8}  {'ratio':>6}")
    for r in rows:
        print(f"{r['draft_nodes']:>11}  {r['ms_per_step']:>8.1f}  {r['ratio']:>6.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
