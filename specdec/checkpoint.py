"""Drafter checkpoints: a folder with ``config.json`` (a frozen config dataclass plus the checkpoint's ``kind``,
e.g. ``"eagle"`` or ``"medusa"``) and ``model.safetensors``.

Every problem with a checkpoint folder (missing, not a checkpoint, a ``config.json`` that is not JSON, a corrupt
weights file, another drafter's checkpoint) is a ``ValueError`` that names the file. Configs never carry local
paths: ``_name_or_path`` entries (written by Hugging Face configs) are cleared on save.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KIND_KEY = "kind"
_LOCAL_PATH_KEYS = ("_name_or_path",)


def save_checkpoint(module: torch.nn.Module, config: Any, path: str | Path, kind: str | None = None) -> None:
    """Write ``{"kind": kind, **asdict(config)}`` as JSON (local paths cleared) and the module's registered
    parameters/buffers as safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    values = asdict(config)
    _write_config(path, {KIND_KEY: kind, **values} if kind is not None else values)
    save_model(module, str(path / WEIGHTS_FILE))


def read_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict (without ``kind``) and the state dict of a folder written by :func:`save_checkpoint`.

    With ``kind``, a checkpoint that declares another kind is refused (one written before kinds were stored is
    accepted as it is)."""
    path = Path(path)
    config = read_config(path, kind)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt drafter checkpoint: {path / WEIGHTS_FILE} is not a readable safetensors file "
                         f"({err}); re-export or re-download it") from None
    return config, state


def read_config(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, checked as :func:`read_checkpoint` describes (weights not read)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"drafter checkpoint {path} does not exist")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"not a drafter checkpoint: {path} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_json_object(path / CONFIG_FILE)
    stored = config.pop(KIND_KEY, None)
    if kind is not None and stored is not None and stored != kind:
        raise ValueError(f"{path} is a {stored} checkpoint, not a {kind} one: use {stored}:path={path}")
    return config


def check_checkpoint(path: str | Path, kind: str | None = None) -> None:
    """Check a checkpoint folder without loading its tensors (config, kind, safetensors header): fast enough to
    run before a model loads. Raises the errors :func:`read_checkpoint` would."""
    path = Path(path)
    read_config(path, kind)
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt drafter checkpoint: {path / WEIGHTS_FILE} is not a readable safetensors file "
                         f"({err}); re-export or re-download it") from None


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a drafter checkpoint with its floating-point tensors cast to ``dtype`` (integer buffers such as a
    draft vocabulary stay as they are; a ``torch_dtype`` in the config follows the cast): the compact form the
    project ships. Returns ``dst``."""
    config, state = read_checkpoint(src)
    if "torch_dtype" in config:
        config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    kind = read_json_object(Path(src) / CONFIG_FILE).get(KIND_KEY)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _write_config(dst, {KIND_KEY: kind, **config} if kind is not None else config)
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(cast, str(dst / WEIGHTS_FILE))
    return dst


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object from ``file`` (a shipped or saved config); ``ValueError`` naming the file otherwise."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _write_config(path: Path, values: dict[str, Any]) -> None:
    (path / CONFIG_FILE).write_text(json.dumps(_without_local_paths(values), indent=2) + "\n", encoding="utf-8")


def _without_local_paths(value: Any) -> Any:
    """``value`` with every ``_name_or_path`` entry (at any depth) emptied: a build machine's folder means nothing
    elsewhere."""
    if isinstance(value, dict):
        return {k: ("" if k in _LOCAL_PATH_KEYS else _without_local_paths(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    return value
