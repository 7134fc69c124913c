"""Where the cost model's step time differs from the real engine's: every step of real greedy runs timed and set
against the model's prediction for that step (the drafter's measured ``propose`` time + ``verify(nodes, ctx)``), then
the residual (wall - predicted) summarised by accepted tokens and by tree size, plus the prefill each request paid.

The replay (``specdec simulate replay --cost``) predicts speedups from the same two terms; a residual that grows
with accepted tokens or tree size is a cost the grid lacks. Prints tables and writes JSON.

    python experiments/step_residuals.py --cost cost.json --prompts P.jsonl --limit 8 \\
        --drafter none ngram ngram:store=shipped --out residuals.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

import torch


def run_steps(engine, prompt: torch.Tensor, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Prefill seconds and one record per verification step (``nodes``, ``context``, ``accepted``, ``draft_s``,
    ``wall_s``) of one greedy request run to its end on an idle engine."""
    from specdec.sampling import SamplingParams

    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=max_new_tokens))
    req = engine.request(rid)
    steps, prefill, done = [], 0.0, False
    while not done:
        nodes0, draft0, ctx = req.stats.tree_nodes, req.stats.draft_s, prompt.numel() + len(req.output)
        t0 = time.perf_counter()
        outs = engine.step()
        wall = time.perf_counter() - t0
        for out in outs:
            done |= out.finished
            if out.accepted is None and not out.finished:
                prefill += wall
            elif out.accepted is not None:
                steps.append({"nodes": req.stats.tree_nodes - nodes0, "context": ctx, "accepted": out.accepted,
                              "draft_s": req.stats.draft_s - draft0, "wall_s": wall})
    return prefill, steps


def summarise(steps: Sequence[dict], key: str) -> list[dict]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for s in steps:
        groups[s[key]].append(s)
    return [{key: k, "steps": len(g), "wall_ms": 1e3 * statistics.median(s["wall_s"] for s in g),
             "predicted_ms": 1e3 * statistics.median(s["predicted_s"] for s in g),
             "residual_ms": 1e3 * statistics.median(s["wall_s"] - s["predicted_s"] for s in g)}
            for k, g in sorted(groups.items())]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/step_residuals.py", description=__doc__.splitlines()[0])
    ap.add_argument("--cost", required=True, help="cost model JSON (specdec calibrate; required)")
    ap.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    ap.add_argument("--limit", type=int, default=8, help="prompts used (default: 8)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens per request (default: 96)")
    ap.add_argument("--drafter", nargs="+", default=["none", "ngram"], help="drafter specs (default: none ngram)")
    ap.add_argument("--out", default=None, help="JSON report (default: none)")
    args = ap.parse_args(argv)
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.research.cost_model import CostModel
    from specdec.target import TargetModel, eos_token_ids

    cost = CostModel.load(args.cost)
    model, tokenizer = load_model_and_tokenizer(None, torch.float32)
    target = TargetModel(model)
    eos = eos_token_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, p.text)
               for p in load_prompts(args.prompts or builtin_prompts_path(), args.limit)]
    longest = max(p.numel() for p in prompts) + args.max_new_tokens + 80
    report = {"settings": vars(args), "threads": torch.get_num_threads(), "methods": {}}
    for spec in args.drafter:
        drafter = None if spec == "none" else build_drafter(DrafterSpec.parse(spec), target)
        engine = SpeculativeEngine(target, target.new_cache(-(-longest // 16) + 2, 16), drafter, eos)
        steps, prefills = [], []
        for p in prompts:
            prefill, got = run_steps(engine, p, args.max_new_tokens)
            prefills.append(prefill)
            steps += got
        for s in steps:
            s["predicted_s"] = cost.draft_time(0, measured=s["draft_s"]) + cost.verify_time(s["nodes"], s["context"])
        wall, pred = sum(s["wall_s"] for s in steps), sum(s["predicted_s"] for s in steps)
        report["methods"][spec] = {
            "steps": len(steps), "wall_s": wall, "predicted_s": pred, "wall_over_predicted": wall / pred,
            "prefill_s": sum(prefills), "by_accepted": summarise(steps, "accepted"),
            "by_nodes": summarise(steps, "nodes"), "step_records": steps}
        print(f"\n{spec}: {len(steps)} steps, wall {wall:.2f} s, predicted {pred:.2f} s "
              f"(wall / predicted {wall / pred:.3f}), prefill {sum(prefills):.2f} s")
        for key in ("accepted", "nodes"):
            print(f"  {key:>9}  {'steps':>5}  {'wall ms':>8}  {'pred ms':>8}  {'resid ms':>8}")
            for row in report["methods"][spec][f"by_{key}"]:
                print(f"  {row[key]:>9}  {row['steps']:>5}  {row['wall_ms']:>8.1f}  {row['predicted_ms']:>8.1f}  "
                      f"{row['residual_ms']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
