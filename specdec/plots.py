"""PNG plots of a bench report: speedup by category and acceptance rate by tree depth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """Write ``{stem}_speedup_by_category.png`` and ``{stem}_acceptance_by_depth.png``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    cats = sorted({c for r in runs for c in r["per_category"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) + 2), 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [r["per_category"].get(c, {}).get("speedup", 0.0) for c in cats], width, label=r["name"])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylabel(f"speedup vs {report['baseline']['name']} (median)")
    ax.legend()
    ax.set_title("Speedup by category")
    fig.tight_layout()
    speed = out_dir / f"{stem}_speedup_by_category.png"
    fig.savefig(speed, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        acc = r["acceptance_by_depth"]
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{r['name']} (tau {r['tau']:.2f})")
    ax.set_xlabel("tree depth")
    ax.set_ylabel("acceptance rate (conditional)")
    ax.set_ylim(0, 1.05)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title("Acceptance by depth")
    fig.tight_layout()
    depth = out_dir / f"{stem}_acceptance_by_depth.png"
    fig.savefig(depth, dpi=100)
    plt.close(fig)
    return [speed, depth]
