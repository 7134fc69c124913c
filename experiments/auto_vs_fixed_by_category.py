"""Auto budget against the best fixed budget per category, from one ``specdec simulate replay --auto-budget`` JSON
(issue 16's target: within 3 % on every category, better than the default overall).

A family is a drafter spec whose fixed budgets were replayed as ``SPEC,budget=B`` (or ``SPEC:budget=B`` for a spec
without options) next to ``SPEC`` itself (its default budget) and ``SPEC+auto`` (the replay's auto-budget wrapper
at the default cap). Per category, the best fixed budget is chosen after the fact. Prints a table, writes JSON.

    python experiments/auto_vs_fixed_by_category.py replay.json --family ngram "ngram:store=shipped" --out cmp.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def compare(runs: dict[str, dict], family: str, tolerance: float = 0.03) -> dict:
    """Auto against the best fixed budget of ``family`` per category (relative predicted speedup)."""
    sep = "," if ":" in family else ":"
    fixed = [n for n in runs if n == family or (n.startswith(f"{family}{sep}budget=") and not n.endswith("+auto"))]
    auto = runs.get(f"{family}+auto")
    if auto is None or len(fixed) < 2:
        raise ValueError(f"{family}: need '{family}+auto' and at least two fixed budgets in the replay; "
                         f"have {sorted(runs)}")
    rows = []
    for cat, got in sorted(auto["per_category"].items()):
        best_name = max(fixed, key=lambda n: runs[n]["per_category"][cat]["predicted_speedup"])
        best = runs[best_name]["per_category"][cat]["predicted_speedup"]
        rows.append({"category": cat, "auto": got["predicted_speedup"], "best_fixed": best, "best_name": best_name,
                     "relative": got["predicted_speedup"] / best - 1})
    worst = min(rows, key=lambda r: r["relative"])
    return {"family": family, "fixed": fixed, "within": sum(r["relative"] >= -tolerance for r in rows),
            "categories": len(rows), "worst": worst, "auto": auto["predicted_speedup"],
            "default": runs[family]["predicted_speedup"],
            "best_fixed_overall": max(runs[n]["predicted_speedup"] for n in fixed), "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/auto_vs_fixed_by_category.py", description=__doc__.splitlines()[0])
    ap.add_argument("replay", help="JSON of specdec simulate replay --cost ... --auto-budget")
    ap.add_argument("--family", nargs="+", required=True, help="drafter specs replayed at several budgets")
    ap.add_argument("--tolerance", type=float, default=0.03, help="relative shortfall still 'within' (default 0.03)")
    ap.add_argument("--out", default=None, help="JSON report (default: none)")
    args = ap.parse_args(argv)
    with open(args.replay) as f:
        raw = json.load(f)
    runs = {r["name"]: r for r in (raw["runs"] if isinstance(raw, dict) else raw)}
    report = [compare(runs, fam, args.tolerance) for fam in args.family]
    print(f"{'family':<24} {'within':>8} {'worst':>18} {'auto':>7} {'default':>8} {'best fixed':>10}")
    for r in report:
        w = r["worst"]
        print(f"{r['family']:<24} {r['within']:>3}/{r['categories']:<4} {100 * w['relative']:>6.1f} % "
              f"({w['category'][:8]:>8}) {r['auto']:>7.3f} {r['default']:>8.3f} {r['best_fixed_overall']:>10.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
