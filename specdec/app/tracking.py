"""Experiment tracking for training and experiments: a thin layer over Weights & Biases.

Runs are **offline by default**: without ``WANDB_API_KEY`` in the environment ``wandb.init`` gets
``mode="offline"`` (files only, sync later with ``wandb sync``); with a key it runs online. An explicit
``WANDB_MODE`` wins. Run files go under ``out_dir/wandb``. Every helper accepts ``run=None`` (tracking disabled,
CLI ``--no-wandb``) and then does nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str | None:
    """``git rev-parse HEAD`` of the project, or ``None`` when git or the repository is unavailable."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def wandb_mode() -> str:
    """``$WANDB_MODE`` if set, else ``"online"`` with ``$WANDB_API_KEY`` and ``"offline"`` without."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def start_run(project: str, config: Mapping[str, Any], enabled: bool, out_dir: str | Path,
              name: str | None = None) -> Any | None:
    """Start a W&B run logging ``config`` (plus ``git_sha``) into ``out_dir/wandb``; ``None`` if not ``enabled``."""
    if not enabled:
        return None
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=name, config={**config, "git_sha": git_sha()}, dir=str(out_dir),
                      mode=wandb_mode(), settings=wandb.Settings(silent=True, console="off"))


def log(run: Any | None, metrics: Mapping[str, float], step: int) -> None:
    """Log scalar ``metrics`` at optimizer step ``step``."""
    if run is not None:
        run.log(dict(metrics), step=step)


def log_acceptance_table(run: Any | None, acceptance_by_depth: Sequence[float], tau: float,
                         step: int | None = None) -> None:
    """A ``wandb.Table`` of (depth, acceptance rate) and the final tau (also put in the run summary)."""
    if run is None:
        return
    import wandb

    table = wandb.Table(columns=["depth", "acceptance"],
                        data=[[d + 1, float(a)] for d, a in enumerate(acceptance_by_depth)])
    run.log({"final/acceptance_by_depth": table, "final/tau": float(tau)}, step=step)
    run.summary["final/tau"] = float(tau)


def finish(run: Any | None) -> None:
    """Close the run and shut the W&B service down, so that the offline files are complete on return."""
    if run is not None:
        import wandb

        run.finish()
        wandb.teardown()


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Decode an offline run's ``run-*.wandb`` file (W&B's leveldb-style log of protobuf records; offline runs
    write no ``wandb-summary.json``): ``{"history": [{key: value}, ...], "summary": {...}, "config": {...}}``,
    values parsed from JSON, nested keys joined with ``/``."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    [path] = Path(run_dir).glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    pos, chunks, records = 7, b"", []  # 7-byte file header, then 32 KiB blocks of (crc32, len u16, type u8, data)
    while pos + 7 <= len(data):
        space = block - pos % block
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        if space < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += space
            continue
        chunks += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":  # the run record carries the initial config
            kind, rec = "config", rec.run
        if kind not in out:
            continue
        items = rec.history.item if kind == "history" else getattr(rec, kind).update
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        if kind == "history":
            out["history"].append(values)
        else:
            out[kind].update(values)
    return out
