"""Instruction prompts for self-distillation: the built-in sources, local files and Hugging Face datasets.

``self-instruct`` (seed tasks: instruction + first instance input; never ``user_oriented_instructions``, which
upstream asks not to train on), ``gsm8k`` (train questions), ``humaneval`` (the ``prompt`` field of
``humaneval/HumanEval.jsonl.gz`` under the data dir: 164 function stubs, asked as "Complete the following Python
function"), a local ``.jsonl`` / ``.json`` file or an HF dataset id (``owner/name``, read from the local cache).
:func:`load_instruction_prompts` mixes them as :class:`specdec.train.data.DataConfig` says.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from specdec.train.data import DataConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_SOURCES = {
    # name -> (file under the data dir, how to turn a record into a prompt)
    "self-instruct": "self-instruct/seed_tasks.jsonl",
    "gsm8k": "gsm8k/train.jsonl",
}
# Without a data dir: self-instruct ships in the package (Apache-2.0, specdec/data/README.md); GSM8K comes from the
# Hugging Face hub: (dataset id, configuration, split, text column).
SHIPPED_SELF_INSTRUCT = "self_instruct_seed_tasks.jsonl"
HUB_GSM8K = ("openai/gsm8k", "main", "train", "question")
HUMANEVAL_FILE = "humaneval/HumanEval.jsonl.gz"
HUMANEVAL_ASK = "Complete the following Python function.\n\n"


def read_records(path: Path) -> list[dict]:
    """Records of a ``.jsonl`` or ``.jsonl.gz`` file."""
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_prompts(config: DataConfig) -> list[str]:
    """The HumanEval stubs as instructions (needs ``config.data_dir``: HumanEval is not shipped)."""
    if config.data_dir is None:
        raise ValueError(f"the humaneval source needs --data-dir DIR holding {HUMANEVAL_FILE}")
    records = read_records(resolve_data_dir(config.data_dir) / HUMANEVAL_FILE)
    return [HUMANEVAL_ASK + "```python\n" + r["prompt"].rstrip() + "\n```" for r in records]


def resolve_data_dir(data_dir: str | Path) -> Path:
    """The built-in data folder: absolute as is; relative against the cwd, else against the project root."""
    path = Path(data_dir)
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a ``.jsonl`` file or of a ``.json`` list."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _self_instruct_text(record: dict) -> str:
    instances = record.get("instances") or [{}]
    extra = (instances[0].get("input") or "").strip()
    return record["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def _field_text(records: Sequence[dict], field: str | None, where: str) -> list[str]:
    if not records:
        return []
    if field is None:
        field = next((f for f in ("instruction", "question", "prompt", "text") if f in records[0]), None)
        if field is None:
            raise ValueError(f"{where}: no text field found (pass --field; columns: {sorted(records[0])})")
    if field not in records[0]:
        raise ValueError(f"{where}: no field {field!r} (columns: {sorted(records[0])})")
    return [str(r[field]) for r in records]


def _builtin_file(source: str, config: DataConfig) -> Path | None:
    """The local file of a built-in source (``None``: GSM8K from the hub)."""
    if config.data_dir is not None:
        return resolve_data_dir(config.data_dir) / BUILTIN_SOURCES[source]
    if source == "self-instruct":
        from importlib import resources

        return Path(str(resources.files("specdec") / "data" / SHIPPED_SELF_INSTRUCT))
    return None


def _hub_gsm8k() -> list[str]:
    from specdec.app.loaders import hub_reachable

    name, config, split, column = HUB_GSM8K
    fix = ("use a local copy: --source FILE.jsonl --field question (GSM8K's train.jsonl from "
           "github.com/openai/grade-school-math), or --data-dir DIR holding gsm8k/train.jsonl")
    if not hub_reachable() and not os.environ.get("HF_HUB_OFFLINE"):
        raise ValueError(f"cannot load gsm8k: the Hugging Face hub ({name}) cannot be reached (offline); {fix}")
    try:
        from datasets import load_dataset

        rows = load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report them as one
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load gsm8k from the Hugging Face hub ({name}: {first}); {fix}") from None
    return [str(q) for q in rows[column]]


def _load_source(source: str, config: DataConfig) -> list[str]:
    if source == "humaneval":
        return humaneval_prompts(config)
    if source in BUILTIN_SOURCES:
        path = _builtin_file(source, config)
        if path is None:
            return _hub_gsm8k()
        if not path.is_file():
            raise ValueError(f"data file not found: {path}")
        records = _read_jsonl(path)
        if source == "self-instruct":
            return [_self_instruct_text(r) for r in records]
        return _field_text(records, "question", str(path))
    path = Path(source)
    if path.is_file():
        return _field_text(_read_jsonl(path), config.field, str(path))
    if "/" not in source or source.endswith((".json", ".jsonl")) or path.exists():
        raise ValueError(f"unknown source {source!r}: not self-instruct, gsm8k, humaneval, a file or an HF dataset id")
    try:
        from datasets import load_dataset

        records = load_dataset(source, split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report them as one
        raise ValueError(f"cannot load dataset {source!r}: {err}") from err
    return _field_text(list(records), config.field, source)


def load_instruction_prompts(config: DataConfig) -> list[str]:
    """All prompts of ``config.sources`` (empty ones dropped; at most ``max_per_source`` of each, drawn with
    ``config.seed``), shuffled with ``config.seed``, cut to ``limit``."""
    prompts = []
    for source in config.sources:
        texts = [p for p in _load_source(source, config) if p.strip()]
        if config.max_per_source is not None and len(texts) > config.max_per_source:
            texts = random.Random(config.seed).sample(texts, config.max_per_source)
        prompts += texts
    random.Random(config.seed).shuffle(prompts)
    return prompts[: config.limit] if config.limit else prompts
