"""Auto budget vs fixed budgets per category, on a recorded trace (issue 16, item 3): the cost model's predicted
speedup of each fixed budget and of ``AutoBudgetDrafter`` (drafter built at the largest budget, pruned each step),
replayed at T = 0 with no target forward, plus the tracker's reliability curves (its predicted acceptance of every
tried node against the outcome, per depth).

Predicted speedup = specdec-AR time / speculative time for the same tokens, both from the cost model's verify fit
and each ``propose``'s measured time in the replay (:func:`specdec.research.simulate.predicted_speedup`): the auto
drafter pays for drafting its full tree before pruning. The configurations replay prompt by prompt, taking turns
(:func:`interleaved_replay`), so that the machine's drift in draft time hits them alike, and every table comes
twice: with each step's own draft time ("measured") and with the median time of its level count ("levelled",
:func:`levelled`), the one to compare choices by. Measured wall-clock speedups need an idle machine:
``python experiments/auto_budget_engine.py --cost COST --drafter SPEC ...`` (interleaved real engine runs).

    nice -n 10 .venv/bin/python experiments/auto_budget_sim.py --trace out/sim_vs_bench/trace.pt \\
        --cost docs/results/auto_budget/cost_cpu.json     # default: auto, this machine's cached step cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"ngram": "ngram:budget={b}", "store": "ngram:store=shipped,budget={b}",
            "store_steps": "ngram:store=shipped,steps=auto,budget={b}",
            "eagle": "eagle:path=shipped,tree=dynamic,budget={b}", "eagle3": "eagle3:path=shipped,budget={b}",
            "medusa": "medusa:path=shipped,tree=dynamic,budget={b}"}
# the drafters' shipped settings (n-gram's own default; the heads' measured shape, session 12; bench's Medusa)
DEFAULTS = {"ngram": 16, "store": 16, "store_steps": 16, "eagle": 6, "eagle3": 6, "medusa": 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(ROOT / "out" / "sim_vs_bench" / "trace.pt"))
    ap.add_argument("--cost", default="auto", help="cost model: auto (this machine's cached step cost) or a JSON")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--auto-inner", type=int, nargs="+", default=None,
                    help="budgets the auto drafter drafts before pruning, one auto run each (default: the largest "
                         "of --budgets; the last one is the 'auto' of the per-category table)")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=["default", "pooled", "per-sequence"],
                    help="auto-budget trackers: as --tree-budget auto sets them (per sequence for drafters that "
                         "declare acceptance_by_sequence, else pooled), pooled over sequences, or a child tracker "
                         "per sequence (SEQUENCE_TRACKER); the last one is the 'auto' of the per-category table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "auto_budget"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.auto_budget import SEQUENCE_TRACKER, auto_budget
    from specdec.research.cost_model import draft_levels
    from specdec.research.machine_cost import load_cost_model
    from specdec.research.simulate import summarize_replay
    from specdec.research.simulate_cli import _load_target
    from specdec.research.trace import Trace

    target, _, _ = _load_target(None)
    trace, cost = Trace.load(args.trace), load_cost_model(args.cost, target)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"cost_meta": cost.meta, "verify_coef": cost.verify_coef, "n_prompts": len(trace.prompts),
              "families": {}}
    for family in args.families:
        fmt = FAMILIES[family]
        runs = {f"b{b}": build_drafter(DrafterSpec.parse(fmt.format(b=b)), target) for b in args.budgets}
        autos, inners = {}, args.auto_inner or [max(args.budgets)]
        for inner in inners:
            top = fmt.format(b=inner)
            for variant in args.variants:
                options = {} if variant == "default" else {
                    "per_sequence": SEQUENCE_TRACKER if variant == "per-sequence" else None}
                auto = auto_budget(build_drafter(DrafterSpec.parse(top), target), cost, top, **options)
                runs[_key(inner, variant)] = auto
                autos[_key(inner, variant)] = f"{top}+auto" + ("" if variant == "default" else f"+{variant}")
        results, seconds = interleaved_replay(trace, runs, target.dtype)
        levels = {k: [draft_levels(runs[k].inner, n) for n in runs[k].planned] if k in autos
                  else [draft_levels(runs[k], int(k[1:]))] * sum(len(r.steps) for r in results[k]) for k in runs}
        timings = {"measured": results, "levelled": levelled(results, levels)}
        report["families"][family] = {}
        for timing, res in timings.items():
            rows = {}
            for key in runs:
                name = autos.get(key, fmt.format(b=key[1:]) if key.startswith("b") else key)
                rows[key] = summarize_replay(name, res[key], cost) | {"replay_s": seconds[key]}
                if key in autos:
                    auto = runs[key]
                    rows[key] |= {"chosen_sizes": dict(sorted(Counter(auto.chosen).items())),
                                  "reliability": {str(d): cells for d, cells in auto.tracker.reliability().items()}}
            rows["auto"] = rows[_key(inners[-1], args.variants[-1])]
            per_cat = compare(rows, DEFAULTS[family])
            report["families"][family][timing] = {"runs": rows, "per_category": per_cat}
            cats = [c for c in per_cat if c != "overall"]
            for key in autos:
                rel = {c: per_cat[c]["auto_by_inner"][key] / per_cat[c]["best_fixed_speedup"] - 1 for c in cats}
                print(f"{family} {timing} {key}: overall {per_cat['overall']['auto_by_inner'][key]:.3f} (best fixed "
                      f"{per_cat['overall']['best_fixed']} {per_cat['overall']['best_fixed_speedup']:.3f}), within 3 % "
                      f"of the best fixed on {sum(r >= -0.03 for r in rel.values())}/{len(cats)} categories, worst "
                      f"{100 * min(rel.values()):+.1f} %", flush=True)
        runs[_key(inners[-1], args.variants[-1])].tracker.plot(str(out_dir / f"reliability_{family}.png"))
    (out_dir / "auto_vs_fixed_sim.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = []
    for timing in ("levelled", "measured"):
        lines += [f"Draft time {timing}.", "", "| drafter | category | auto | best fixed | default | auto vs best |",
                  "|---|---|---:|---:|---:|---:|"]
        for family, data in report["families"].items():
            for c, v in data[timing]["per_category"].items():
                default = f"{v['default']:.3f}" if v["default"] is not None else "-"
                lines.append(f"| {family} | {c} | {v['auto']:.3f} | {v['best_fixed_speedup']:.3f} ({v['best_fixed']}) "
                             f"| {default} (b{DEFAULTS[family]}) | {100 * v['auto_vs_best']:+.1f} % |")
        lines.append("")
    (out_dir / "auto_vs_fixed_sim.md").write_text("\n".join(lines), encoding="utf-8")
    return 0


def compare(rows: dict, default: int) -> dict:
    """Per category (and ``overall``): the auto run against the best and the default fixed budget."""
    per_cat = {}
    for c in [*sorted(rows["auto"]["per_category"]), "overall"]:
        def speed(row, c=c):
            return row["predicted_speedup"] if c == "overall" else row["per_category"][c]["predicted_speedup"]

        fixed = {k: speed(v) for k, v in rows.items() if not k.startswith("auto")}
        best = max(fixed, key=fixed.get)
        per_cat[c] = {"auto": speed(rows["auto"]), "best_fixed": best, "best_fixed_speedup": fixed[best],
                      "auto_by_inner": {k: speed(v) for k, v in rows.items() if k.startswith("auto_inner")},
                      "default": fixed.get(f"b{default}"), "fixed": fixed,
                      "auto_vs_best": speed(rows["auto"]) / fixed[best] - 1.0}
    return per_cat


def levelled(results: dict, levels: dict) -> dict:
    """``results`` with every step's measured draft time replaced by the median, over all configurations' steps of
    this run, of the steps that drafted as many levels (``levels[name]``: one level count per step, in order).

    A step's own timer reading carries this machine's noise: three identical EAGLE b3 configurations replayed
    side by side disagreed by more than 3 % on 8 of 21 categories (b8: 15 of 21). With the median per level count
    every configuration pays the same price for the same drafting, so per-category differences are the choices'."""
    pooled: dict[int, list[float]] = {}
    for name, res in results.items():
        steps = [s for r in res for s in r.steps]
        if len(steps) != len(levels[name]):
            raise ValueError(f"{name}: {len(levels[name])} level counts for {len(steps)} steps")
        for s, lv in zip(steps, levels[name], strict=True):
            pooled.setdefault(lv, []).append(s.draft_s)
    median = {lv: statistics.median(v) for lv, v in pooled.items()}
    out = {}
    for name, res in results.items():
        lv = iter(levels[name])
        out[name] = [dataclasses.replace(r, steps=[dataclasses.replace(s, draft_s=median[next(lv)]) for s in r.steps])
                     for r in res]
    return out


def _key(inner: int, variant: str) -> str:
    return f"auto_inner_b{inner}" + ("" if variant == "default" else f"_{variant}")


def interleaved_replay(trace, runs: dict, hidden_dtype) -> tuple[dict, dict]:
    """Every configuration of ``runs`` (name -> drafter) replayed prompt by prompt, the configurations taking turns
    in a rotating order, so that this machine's drift (the same replay's draft time moves by up to 30 % between
    runs minutes apart) hits every configuration alike; each drafter keeps its state across prompts, as in
    :func:`specdec.research.simulate.replay`. Returns (name -> results in prompt order, name -> seconds)."""
    from specdec.research.simulate import replay_prompt

    names = list(runs)
    results = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    for i, p in enumerate(trace.prompts):
        for n in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            results[n].append(replay_prompt(trace, p, runs[n], seq_id=i, hidden_dtype=hidden_dtype))
            seconds[n] += time.perf_counter() - t0
    return results, seconds


if __name__ == "__main__":
    sys.exit(main())
