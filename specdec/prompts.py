"""Prompt sets and chat-template encoding."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = "default"


def builtin_prompts_path() -> Path:
    """The project's own prompt set (a few prompts each: summarization, rewriting, code, qa, math, chat)."""
    return Path(str(resources.files("specdec") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path, limit: int | None = None, per_category: int | None = None) -> list[Prompt]:
    """Read a JSON list of strings, or JSONL whose records have ``prompt`` or Spec-Bench ``turns`` (first turn)
    and an optional ``category``. Raises ``ValueError`` naming the file and line for anything else.

    ``per_category`` keeps the first K prompts of each category; ``limit`` then keeps the first K overall."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = [_to_prompt(r, path, i) for i, r in enumerate(records, start=1)]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    if per_category:
        kept, seen = [], Counter()
        for p in prompts:
            seen[p.category] += 1
            if seen[p.category] <= per_category:
                kept.append(p)
        prompts = kept
    return prompts[:limit] if limit else prompts


def _to_prompt(record: object, path: Path, line: int) -> Prompt:
    if isinstance(record, str):
        return Prompt(record)
    if isinstance(record, dict):
        category = str(record.get("category", "default"))
        if isinstance(record.get("prompt"), str):
            return Prompt(record["prompt"], category)
        turns = record.get("turns")
        if isinstance(turns, list) and turns and isinstance(turns[0], str):
            return Prompt(turns[0], category)
    raise ValueError(f"{path}:{line}: expected a string or an object with 'prompt' or 'turns'")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool = True) -> torch.Tensor:
    """``[L]`` int64 token ids; wrapped in the tokenizer's chat template when ``chat`` and one exists."""
    if not text.strip():
        raise ValueError("empty prompt: need at least one token")
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids[0].to(torch.long)
