"""Simulator vs bench over a budget sweep at T = 0 (issue 16): is the replayed tau the measured tau, and how much
faster is it?

Steps (each skipped when its output exists, so the same command resumes; the bench resumes from its own journal):

1. ``specdec simulate record`` on the held-out prompts (``out/heldout.jsonl``, measurement only), timed;
2. ``specdec simulate replay`` of every method of the sweep (n-gram, shipped EAGLE and Medusa at each budget);
3. ``specdec bench`` of the same methods on the same prompts (HF greedy and specdec AR included, as always);
4. the comparison: per method sim tau, bench tau, relative error, replay seconds vs bench seconds (the bench's
   generation time for that method: its new tokens / its tokens per second, summed over prompts), a JSON, a
   Markdown table and a plot under ``docs/results/simulate/``.

    nice -n 10 nohup .venv/bin/python experiments/sim_vs_bench.py > out/logs/sim_vs_bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (4, 8, 16, 32)
THREADS = ["1"]
FAMILIES = {"ngram": "ngram:budget={b}", "eagle": "eagle:path=shipped,tree=dynamic,depth=5,budget={b}",
            "medusa": "medusa:path=shipped,tree=dynamic,budget={b}"}


def methods(budgets=BUDGETS) -> list[str]:
    return [fmt.format(b=b) for fmt in FAMILIES.values() for b in budgets]


def specdec(*args: str) -> float:
    """Run a specdec command on ``--threads`` torch threads (one: on a loaded 2-core machine two threads spin-wait
    on each other and run several times slower); its wall time."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "specdec.app.cli", *args]
    print(f"{time.strftime('%H:%M:%S')} $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": THREADS[0]})
    return time.perf_counter() - t0


def torch_load_prompts(path: Path) -> list:
    from specdec.research.trace import Trace

    return Trace.load(path).prompts


def compare(sim: dict, bench: dict, record_s: float) -> dict:
    by_name = {r["name"]: r for r in bench["runs"]}
    rows = []
    for run in sim["runs"]:
        b = by_name.get(run["name"])
        if b is None:
            continue
        new_tokens = run["new_tokens"]
        reqs = [q for q in bench.get("requests", []) if q["method"] == run["name"] and q["tokens_per_s"]]
        bench_s = sum(q["new_tokens"] / q["tokens_per_s"] for q in reqs) if reqs else new_tokens / b["tokens_per_s"]
        family = run["name"].partition(":")[0]
        budget = int(run["name"].rpartition("budget=")[2])
        rows.append({"name": run["name"], "family": family, "budget": budget, "sim_tau": run["tau"],
                     "bench_tau": b["tau"], "rel_err": abs(run["tau"] - b["tau"]) / b["tau"],
                     "sim_acceptance_by_depth": run["acceptance_by_depth"],
                     "bench_acceptance_by_depth": b["acceptance_by_depth"],
                     "replay_s": run["replay_s"], "bench_s": bench_s, "speed_ratio": bench_s / run["replay_s"],
                     "bench_speedup": b.get("speedup"), "bench_tokens_per_s": b.get("tokens_per_s"),
                     "predicted_speedup": run.get("predicted_speedup")})
    replay_total = sum(r["replay_s"] for r in rows)
    bench_total = sum(r["bench_s"] for r in rows)
    return {"rows": rows, "max_rel_err": max((r["rel_err"] for r in rows), default=None),
            "replay_total_s": replay_total, "record_s": record_s, "bench_methods_total_s": bench_total,
            "speed_ratio_replay_only": bench_total / replay_total if replay_total else None,
            "speed_ratio_with_record": bench_total / (replay_total + record_s) if replay_total else None,
            "n_prompts": sim.get("n_prompts"), "note": "timings measured on a shared, loaded 2-core CPU "
            "(other jobs running): seconds are load-distorted, taus are not (T = 0, deterministic)"}


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_vs_bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = ["| method | budget | sim tau | bench tau | rel. error | replay s | bench s | bench/replay |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['budget']} | {r['sim_tau']:.4f} | {r['bench_tau']:.4f} | "
                     f"{100 * r['rel_err']:.2f} % | {r['replay_s']:.1f} | {r['bench_s']:.1f} | "
                     f"{r['speed_ratio']:.1f}x |")
    lines.append(f"\nmax relative error {100 * (result['max_rel_err'] or 0):.2f} %; "
                 f"replay {result['replay_total_s']:.0f} s "
                 f"(+ record {result['record_s']:.0f} s once) vs bench {result['bench_methods_total_s']:.0f} s: "
                 f"{result['speed_ratio_replay_only']:.1f}x ({result['speed_ratio_with_record']:.1f}x with the record)")
    (out / "sim_vs_bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, family in enumerate(FAMILIES):
        rows = sorted((r for r in result["rows"] if r["family"] == family), key=lambda r: r["budget"])
        if not rows:
            continue
        color = f"C{i}"
        ax.plot([r["budget"] for r in rows], [r["bench_tau"] for r in rows], "o-", color=color,
                label=f"{family} bench")
        ax.plot([r["budget"] for r in rows], [r["sim_tau"] for r in rows], "x--", color=color, ms=9,
                label=f"{family} simulator")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree budget (nodes, root included)")
    ax.set_ylabel("tau (tokens per step)")
    ax.set_title("T = 0, held-out prompts: simulator vs bench", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sim_vs_bench.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(ROOT / "out" / "heldout.jsonl"))
    ap.add_argument("--max-new-tokens", type=int, default=128, help="recorded (the replay and bench may use fewer)")
    ap.add_argument("--bench-max-new-tokens", type=int, default=None, help="replayed and benched (default: all)")
    ap.add_argument("--limit", type=int, default=None, help="first K prompts replayed and benched (default: all)")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="simulated budgets")
    ap.add_argument("--bench-budgets", type=int, nargs="+", default=None,
                    help="benched budgets (default: --budgets; fewer when the CPU is busy: the bench is the slow part)")
    ap.add_argument("--work", default=str(ROOT / "out" / "sim_vs_bench"))
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "simulate"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every command")
    ap.add_argument("--extra-bench", nargs="*", default=[],
                    help="more bench JSONs of the same prompts and settings (other budgets, run separately) whose "
                         "drafter runs join the comparison")
    args = ap.parse_args(argv)
    THREADS[0] = str(args.threads)
    work, out = Path(args.work), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    trace, sim, bench = work / "trace.pt", work / "sim.json", work / "bench.json"
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    n = str(args.max_new_tokens)
    if not trace.exists():
        times["record_s"] = specdec("simulate", "record", "--prompts", args.prompts, "--max-new-tokens", n,
                                    *(["--limit", str(args.limit)] if args.limit is not None else []),
                                    "--out", str(trace))
        times_path.write_text(json.dumps(times))
    specs = methods(args.budgets)
    measured = trace
    if args.limit is not None and args.limit < len(torch_load_prompts(trace)):  # a longer trace recorded before
        from specdec.research.trace import Trace

        full = Trace.load(trace)
        measured = work / f"trace_first{args.limit}.pt"
        Trace(full.prompts[: args.limit], full.meta).save(measured)
    m = str(args.bench_max_new_tokens or args.max_new_tokens)
    limit = ["--limit", str(args.limit)] if args.limit is not None else []
    if not sim.exists():
        times["replay_cmd_s"] = specdec("simulate", "replay", str(measured), "--max-new-tokens", m, "--drafter",
                                        *specs, "--out", str(sim))
        times_path.write_text(json.dumps(times))
    if not bench.exists():
        times["bench_cmd_s"] = times.get("bench_cmd_s", 0.0) + specdec(
            "bench", "--prompts", args.prompts, *limit, "--max-new-tokens", m, "--drafter",
            *methods(args.bench_budgets or args.budgets), "--out", str(bench))
        times_path.write_text(json.dumps(times))
    sim_report = json.loads(sim.read_text())
    record_s = times.get("record_s", sim_report["trace"].get("record_s", 0.0))
    bench_report = json.loads(bench.read_text())
    for extra in args.extra_bench:
        more = json.loads(Path(extra).read_text())
        known = {r["name"] for r in bench_report["runs"]}
        bench_report["runs"] += [r for r in more["runs"] if r["name"] not in known]
        bench_report["requests"] += [q for q in more.get("requests", []) if q["method"] not in known]
    result = compare(sim_report, bench_report, record_s)
    result["sim_runs"] = [{k: r[k] for k in ("name", "tau", "acceptance_by_depth", "replay_s", "mean_tree_nodes")}
                          for r in sim_report["runs"]]
    result["command_s"] = times
    write_outputs(result, out)
    print((out / "sim_vs_bench.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
