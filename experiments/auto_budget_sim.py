"""Auto budget vs fixed budgets per category, on a recorded trace (issue 16, item 3): the cost model's predicted
speedup of each fixed budget and of ``AutoBudgetDrafter`` (drafter built at the largest budget, pruned each step),
replayed at T = 0 with no target forward, plus the tracker's reliability curves (its predicted acceptance of every
tried node against the outcome, per depth).

Predicted speedup = specdec-AR time / speculative time for the same tokens, both from the cost model's verify fit
and each ``propose``'s measured time in the replay (:func:`specdec.research.simulate.predicted_speedup`): the auto
drafter pays for drafting its full tree before pruning. Measured wall-clock speedups need an idle machine:
``python experiments/auto_budget_engine.py --cost COST --drafter SPEC ...`` (interleaved real engine runs).

    nice -n 10 .venv/bin/python experiments/auto_budget_sim.py --trace out/sim_vs_bench/trace.pt \\
        --cost docs/results/auto_budget/cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"ngram": "ngram:budget={b}", "eagle": "eagle:path=shipped,tree=dynamic,depth=5,budget={b}",
            "medusa": "medusa:path=shipped,tree=dynamic,budget={b}"}
DEFAULTS = {"ngram": 16, "eagle": 8, "medusa": 4}  # the drafters' shipped settings (n-gram's own default; bench)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(ROOT / "out" / "sim_vs_bench" / "trace.pt"))
    ap.add_argument("--cost", default=str(ROOT / "docs" / "results" / "auto_budget" / "cost_cpu.json"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--auto-inner", type=int, nargs="+", default=None,
                    help="budgets the auto drafter drafts before pruning, one auto run each (default: the largest "
                         "of --budgets; the last one is the 'auto' of the per-category table)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "auto_budget"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.auto_budget import AutoBudgetDrafter
    from specdec.research.cost_model import CostModel
    from specdec.research.simulate import replay, summarize_replay
    from specdec.research.simulate_cli import _load_target
    from specdec.research.trace import Trace

    target, _, _ = _load_target(None)
    trace, cost = Trace.load(args.trace), CostModel.load(args.cost)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"cost_meta": cost.meta, "verify_coef": cost.verify_coef, "n_prompts": len(trace.prompts),
              "families": {}}
    for family in args.families:
        fmt, rows = FAMILIES[family], {}
        for b in args.budgets:
            spec = fmt.format(b=b)
            t0 = time.perf_counter()
            res = replay(trace, build_drafter(DrafterSpec.parse(spec), target), hidden_dtype=target.dtype)
            rows[f"b{b}"] = summarize_replay(spec, res, cost) | {"replay_s": time.perf_counter() - t0}
        for inner in args.auto_inner or [max(args.budgets)]:
            top = fmt.format(b=inner)
            auto = AutoBudgetDrafter(build_drafter(DrafterSpec.parse(top), target), cost,
                                     drafter_name=top if top in cost.draft_coef else None)
            t0 = time.perf_counter()
            res = replay(trace, auto, hidden_dtype=target.dtype)
            run = summarize_replay(f"{top}+auto", res, cost) | {
                "replay_s": time.perf_counter() - t0, "chosen_sizes": dict(sorted(Counter(auto.chosen).items())),
                "reliability": {str(d): cells for d, cells in auto.tracker.reliability().items()}}
            rows[f"auto_inner_b{inner}"] = rows["auto"] = run
        auto.tracker.plot(str(out_dir / f"reliability_{family}.png"))
        cats = sorted(rows["auto"]["per_category"])
        per_cat = {}
        for c in [*cats, "overall"]:
            def speed(row, c=c):
                return row["predicted_speedup"] if c == "overall" else row["per_category"][c]["predicted_speedup"]

            fixed = {k: speed(v) for k, v in rows.items() if not k.startswith("auto")}
            best = max(fixed, key=fixed.get)
            per_cat[c] = {"auto": speed(rows["auto"]), "best_fixed": best, "best_fixed_speedup": fixed[best],
                          "auto_by_inner": {k: speed(v) for k, v in rows.items() if k.startswith("auto_inner")},
                          "default": fixed.get(f"b{DEFAULTS[family]}"), "fixed": fixed,
                          "auto_vs_best": speed(rows["auto"]) / fixed[best] - 1.0}
        report["families"][family] = {"runs": rows, "per_category": per_cat}
        print(f"{family}: " + ", ".join(f"{c} auto {v['auto']:.3f} vs best {v['best_fixed']} "
                                       f"{v['best_fixed_speedup']:.3f} ({100 * v['auto_vs_best']:+.1f} %)"
                                       for c, v in per_cat.items()), flush=True)
    (out_dir / "auto_vs_fixed_sim.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = ["| drafter | category | auto | best fixed | default | auto vs best |", "|---|---|---:|---:|---:|---:|"]
    for family, data in report["families"].items():
        for c, v in data["per_category"].items():
            default = f"{v['default']:.3f}" if v["default"] is not None else "-"
            lines.append(f"| {family} | {c} | {v['auto']:.3f} | {v['best_fixed_speedup']:.3f} ({v['best_fixed']}) | "
                         f"{default} (b{DEFAULTS[family]}) | {100 * v['auto_vs_best']:+.1f} % |")
    (out_dir / "auto_vs_fixed_sim.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
