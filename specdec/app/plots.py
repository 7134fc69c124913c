"""PNG plots of bench / experiment reports: speedup by category, acceptance rate by tree depth, tau vs budget."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """Write ``{stem}_speedup_by_category.png`` and ``{stem}_acceptance_by_depth.png``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _speedup_by_category(report, out_dir / f"{stem}_speedup_by_category.png"),
        _acceptance_by_depth(report, out_dir / f"{stem}_acceptance_by_depth.png"),
    ]


def _speedup_by_category(report: dict, path: Path) -> Path:
    runs = report["runs"]
    cats = sorted({c for r in runs for c in r["per_category"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cats) + 5), 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [r["per_category"].get(c, {}).get("speedup", 0.0) for c in cats], width, label=r["name"])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylabel(f"speedup vs {report['baseline']['name']} (median)")
    return _finish(fig, ax, "Speedup by category", path)


def _acceptance_by_depth(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    for r in report["runs"]:
        acc = r["acceptance_by_depth"]
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{r['name']} (tau {r['tau']:.2f})")
    ax.set_xlabel("tree depth")
    ax.set_ylabel("acceptance rate (conditional)")
    ax.set_ylim(0, 1.05)
    return _finish(fig, ax, "Acceptance by depth", path)


def plot_tau_vs_budget(series: dict[str, list[tuple[int, float]]], path: str | Path,
                       ylabel: str = "tau (tokens per target forward)") -> Path:
    """One line per drafter: ``series[name] = [(tree budget, tau), ...]`` (e.g. dynamic trees of 4..64 nodes)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree budget (nodes, root included)")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, "tau vs tree budget", Path(path))


def plot_training_curves(runs: dict[str, list[dict]], path: str | Path, smooth: int = 20) -> Path:
    """Training curves of one or more runs (``metrics.jsonl`` records, the same numbers W&B receives): the
    training loss (moving average over ``smooth`` steps) and the verifier's tau on held-out prompts, by step."""
    fig, (loss_ax, tau_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for name, records in sorted(runs.items()):
        train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        if train:
            values = [v for _, v in train]
            avg = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
                   for i in range(len(values))]
            loss_ax.plot([s for s, _ in train], avg, label=name)
        evals = [(r["step"], r["eval/tau"]) for r in records if "eval/tau" in r]
        tau_ax.plot([s for s, _ in evals], [t for _, t in evals], marker="o", label=name)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel(f"training loss ({smooth}-step average)")
    loss_ax.set_title("Loss")
    tau_ax.set_xlabel("step")
    tau_ax.set_ylabel("tau on held-out prompts (real verifier)")
    return _finish(fig, tau_ax, "tau while training", Path(path))


def _finish(fig, ax, title: str, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
