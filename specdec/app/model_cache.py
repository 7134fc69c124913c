"""A converted copy of a source file, built once and reused: the embedded GGUF model as a Hugging Face folder.

Parsing the embedded SmolLM2 GGUF costs three passes per run (config, tokenizer, weights). :func:`cached_folder`
converts a source once into ``CACHE/{name}-{specdec version}-{sha256 of the source}`` (written to a temporary folder
and renamed, so a folder found there is complete) and returns that folder on every later call. A changed source or
a new specdec version gives a new key, so the folder is rebuilt and the stale ones of the same name are removed.

``CACHE`` is ``$SPECDEC_CACHE``, else ``$XDG_CACHE_HOME/specdec``, else ``~/.cache/specdec``. It also holds the
per-machine measurements (:func:`read_keyed` / :func:`write_keyed`: one JSON object per file, keyed by what a
measurement depends on): the linear kernels' choices and the step cost by tree size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

DONE_MARK = ".complete"


def cache_root() -> Path:
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specdec"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specdec")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(name: str, source: Path) -> str:
    """``{name}-{specdec version}-{first 16 hex digits of the source's SHA-256}``."""
    return f"{name}-{package_version()}-{file_sha256(source)[:16]}"


def cached_folder(name: str, source: Path, convert: Callable[[Path], None], root: Path | None = None) -> Path:
    """The folder holding ``convert``'s output for ``source``; ``convert(folder)`` runs only when no complete folder
    exists for the current key. Raises ``ValueError`` if the cache folder cannot be written."""
    root = root or cache_root()
    folder = root / cache_key(name, source)
    if (folder / DONE_MARK).is_file():
        return folder
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        convert(tmp)
        (tmp / DONE_MARK).write_text(str(source) + "\n", encoding="utf-8")
        if folder.exists():  # a concurrent run finished first, or an incomplete leftover
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as err:
        raise ValueError(f"cannot write the model cache in {root} ({err}); set SPECDEC_CACHE to a writable folder") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in root.glob(f"{name}-*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def read_keyed(name: str) -> dict:
    """The JSON object kept in ``CACHE/{name}`` (measurements keyed by what they depend on); ``{}`` if missing or
    unreadable."""
    try:
        data = json.loads((cache_root() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_keyed(name: str, key: str, entry: object) -> Path:
    """Set ``key`` to ``entry`` in ``CACHE/{name}`` (written to a temporary file and renamed, so a reader never sees
    half a file); an unwritable cache is skipped. Returns the file's path."""
    path = cache_root() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**read_keyed(name), key: entry}, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return path
