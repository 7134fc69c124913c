"""Drafter checkpoints: a folder with ``config.json`` (a frozen config dataclass) and ``model.safetensors``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(module: torch.nn.Module, config: Any, path: str | Path) -> None:
    """Write ``asdict(config)`` as JSON and the module's registered parameters/buffers as safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    save_model(module, str(path / WEIGHTS_FILE))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and the state dict of a folder written by :func:`save_checkpoint`."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"not a drafter checkpoint: {path} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / WEIGHTS_FILE))


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a drafter checkpoint with its floating-point tensors cast to ``dtype`` (integer buffers such as a
    draft vocabulary stay as they are): the compact form the project ships. Returns ``dst``."""
    config, state = read_checkpoint(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(cast, str(dst / WEIGHTS_FILE))
    return dst
