"""``--tree-budget auto`` against fixed budgets on the real engine: tokens per second, tau, chosen sizes.

Each drafter spec runs at its fixed budget and under :class:`specdec.research.auto_budget.AutoBudgetDrafter`, set
up as ``--tree-budget auto`` does (``+auto``: budget planned before drafting; ``--prune-only`` adds
``+auto-prune``: the full inner budget drafted, then pruned), interleaved prompt by prompt with specdec's
autoregressive decoding as the baseline of the same run.

    python experiments/auto_budget_engine.py --prompts P.jsonl \
        --drafter "eagle:path=shipped,tree=dynamic,budget=16" --prune-only --out auto_engine.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

import torch

from specdec.research.auto_budget import auto_budget
from specdec.research.machine_cost import load_cost_model


def main(argv: Sequence[str] | None = None) -> int:
    """Real engine runs, interleaved prompt by prompt: each drafter at its fixed budget and under the adapter;
    tokens per second, tau, chosen sizes, the predicted speedup of each step's choice, and the reliability plot."""
    ap = argparse.ArgumentParser(prog="experiments/auto_budget_engine.py", description=main.__doc__.split(";")[0])
    ap.add_argument("--cost", default="auto", help="cost model: auto (this machine's cached step cost) or a JSON")
    ap.add_argument("--drafter", nargs="+", default=["eagle:path=shipped,tree=dynamic,budget=16"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--plot", default=None, help="reliability-curve PNG (the last drafter's tracker)")
    ap.add_argument("--prune-only", action="store_true", help="also each drafter under the adapter without planning")
    ap.add_argument("--fixed", nargs="*", default=[], help="more drafter specs run at their fixed budget only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.stats import RequestStats
    from specdec.target import TargetModel, eos_token_ids

    model, tok = load_model_and_tokenizer(args.model, torch.float32)
    target, eos = TargetModel(model), eos_token_ids(model, tok)
    cost = load_cost_model(args.cost, target)
    prompts = load_prompts(args.prompts or builtin_prompts_path(), args.limit)
    ids = [encode_prompt(tok, p.text) for p in prompts]
    runs = {"specdec_ar": None, **{spec: build_drafter(DrafterSpec.parse(spec), target) for spec in args.fixed}}
    adapters = {}
    for spec in args.drafter:
        runs[spec] = build_drafter(DrafterSpec.parse(spec), target)
        adapters[spec] = auto_budget(build_drafter(DrafterSpec.parse(spec), target), cost, spec)
        runs[f"{spec}+auto"] = adapters[spec]
        if args.prune_only:  # the previous adapter: draft the full inner budget, then prune
            runs[f"{spec}+auto-prune"] = auto_budget(build_drafter(DrafterSpec.parse(spec), target), cost, spec,
                                                     plan=False)
    engines = {k: SpeculativeEngine(target, target.new_cache(256), d, eos) for k, d in runs.items()}
    stats: dict[str, list[RequestStats]] = {k: [] for k in runs}
    for prompt in ids:
        for name, engine in engines.items():
            stats[name].append(engine.generate(prompt, args.max_new_tokens).stats)
    ar = RequestStats.combine(stats["specdec_ar"]).tokens_per_s
    report = {"cost_meta": cost.meta, "n_prompts": len(ids), "max_new_tokens": args.max_new_tokens, "runs": {}}
    for name, parts in stats.items():
        total = RequestStats.combine(parts)
        row = {"tau": total.tau, "tokens_per_s": total.tokens_per_s, "speedup_vs_specdec_ar": total.tokens_per_s / ar,
               "mean_tree_nodes": total.tree_nodes / max(total.steps, 1), "per_category": {}}
        for cat in dict.fromkeys(p.category for p in prompts):
            idx = [i for i, p in enumerate(prompts) if p.category == cat]
            mine = RequestStats.combine([parts[i] for i in idx]).tokens_per_s
            base = RequestStats.combine([stats["specdec_ar"][i] for i in idx]).tokens_per_s
            row["per_category"][cat] = mine / base
        if name.endswith("+auto"):
            row["chosen_sizes"] = dict(sorted(Counter(adapters[name.removesuffix("+auto")].chosen).items()))
        report["runs"][name] = row
        print(f"{name:<48} tau {row['tau']:.3f}  {row['tokens_per_s']:.2f} tok/s  x{row['speedup_vs_specdec_ar']:.2f}",
              file=sys.stderr)
    if args.plot and adapters:
        adapters[args.drafter[-1]].tracker.plot(args.plot)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
