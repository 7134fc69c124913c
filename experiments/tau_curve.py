"""Held-out tau against training pairs seen, one line per training run (the trainer's ``metrics.jsonl``: steps that
logged ``eval/tau`` and ``train/pairs_seen``), to a PNG and a JSON table; extra points as ``label:pairs:tau``.

    python experiments/tau_curve.py --run "mixed data=out/eagle3_long/metrics.jsonl" \\
        --point "GSM8K only:55000:1.285" --out docs/results/training/eagle3_tau_curve.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def curve(path: str) -> list[tuple[int, float]]:
    """``(pairs seen, eval tau)`` of every evaluated step (step 0: no pairs)."""
    points, pairs = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        pairs = int(rec.get("train/pairs_seen", pairs))
        if "eval/tau" in rec:
            points.append((pairs if rec.get("step", 0) else 0, float(rec["eval/tau"])))
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], help="LABEL=metrics.jsonl (repeatable)")
    ap.add_argument("--point", action="append", default=[], help="LABEL:PAIRS:TAU, a measured point of another run")
    ap.add_argument("--reference", action="append", default=[], help="LABEL:TAU, a horizontal line (e.g. a target)")
    ap.add_argument("--out", required=True, help="PNG (the JSON goes beside it)")
    args = ap.parse_args(argv)
    lines: dict[str, list[tuple[int, float]]] = {}
    for item in args.run:
        label, _, path = item.partition("=")
        lines[label] = curve(path)
    extra: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for item in args.point:
        label, pairs, tau = item.rsplit(":", 2)
        extra[label].append((int(pairs), float(tau)))
    for label, pts in extra.items():
        lines[label] = sorted(lines.get(label, []) + pts)
    refs = {label: float(tau) for label, _, tau in (r.rpartition(":") for r in args.reference)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, pts in lines.items():
        ax.plot([p / 1000 for p, _ in pts], [t for _, t in pts], "o-", ms=3, label=label)
    for label, tau in refs.items():
        ax.axhline(tau, ls="--", lw=1, color="gray")
        ax.annotate(label, (0, tau), textcoords="offset points", xytext=(2, 2), fontsize=7, color="gray")
    ax.set_xlabel("training pairs seen (thousands)")
    ax.set_ylabel("held-out tau (greedy)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps({"lines": lines, "references": refs}, indent=1) + "\n",
                                        encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
