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
    """One prompt: ``text`` is the first user turn; ``turns`` all of them (Spec-Bench multi-turn records)."""

    text: str
    category: str = "default"
    turns: tuple[str, ...] = ()
    question_id: str | None = None

    @property
    def all_turns(self) -> tuple[str, ...]:
        return self.turns or (self.text,)


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
    records = read_json_records(path)
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


def read_json_records(path: Path) -> list:
    """A JSON list, or JSON lines (blank lines skipped); invalid JSON is a ``ValueError`` naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}, column {err.colno})") from None
    return records


def _to_prompt(record: object, path: Path, line: int) -> Prompt:
    if isinstance(record, str):
        return Prompt(record)
    if isinstance(record, dict):
        category = str(record.get("category", "default"))
        qid = None if record.get("question_id") is None else str(record["question_id"])
        if isinstance(record.get("prompt"), str):
            return Prompt(record["prompt"], category, question_id=qid)
        turns = record.get("turns")
        if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
            return Prompt(turns[0], category, tuple(turns), qid)
    raise ValueError(f"{path}:{line}: expected a string or an object with 'prompt' or 'turns' (a list of strings)")


def load_hf_prompts(dataset: str, split: str = "test", field: str | None = None, config: str | None = None,
                    limit: int | None = None, seed: int = 0, category: str | None = None) -> list[Prompt]:
    """Prompts from a Hugging Face dataset through :func:`datasets.load_dataset` (local cache or hub).

    ``field``: the text column (default: the first of question, prompt, instruction, text, problem). With ``limit``
    a fixed sample of ``limit`` rows drawn with ``seed`` (the same rows every run). ``category`` defaults to the
    dataset name."""
    from datasets import load_dataset

    try:
        rows = load_dataset(dataset, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report them as one
        raise ValueError(f"cannot load dataset {dataset!r} split {split!r}: {err}") from err
    columns = rows.column_names
    field = field or next((c for c in ("question", "prompt", "instruction", "text", "problem") if c in columns), None)
    if field is None or field not in columns:
        raise ValueError(f"dataset {dataset!r} has no text field {field!r}; columns: {columns} (use --field)")
    if limit is not None and limit < len(rows):
        rows = rows.shuffle(seed=seed).select(range(limit))
    name = category or dataset.rsplit("/", 1)[-1]
    return [Prompt(str(r[field]), name) for r in rows if str(r[field]).strip()]


def encode_conversation(tokenizer: PreTrainedTokenizerBase, turns: list[str], answers: list[str],
                        chat: bool = True) -> torch.Tensor:
    """``[L]`` int64 ids of a conversation: user ``turns[i]`` answered by ``answers[i]``, ending with the last
    user turn (``len(answers) == len(turns) - 1``) and the generation prompt. Without a chat template (or
    ``chat=False``) the turns and answers are joined by blank lines."""
    if len(answers) != len(turns) - 1:
        raise ValueError(f"a conversation of {len(turns)} user turns needs {len(turns) - 1} answers")
    if len(turns) == 1:
        return encode_prompt(tokenizer, turns[0], chat)
    if chat and tokenizer.chat_template:
        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return ids[0].to(torch.long)
    parts = [x for pair in zip(turns, [*answers, ""], strict=True) for x in pair if x]
    return encode_prompt(tokenizer, "\n\n".join(parts), chat=False)


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
