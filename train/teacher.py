"""Teacher-forced data: human-written answers as the assistant turn.

**Teacher-forced** (``python -m specdec.train teacher``): existing human-written answers become the assistant turn
after their question in the chat template; no generation at all, so this step only tokenizes. The one target
forward over each example happens in the ``features`` step (:mod:`specdec.train.features`), which stores what the
target would have predicted at every position. Sources: ``gsm8k`` (train questions -> answers, with the
``<<48/2=24>>`` calculator annotations removed and ``#### 72`` written as ``The answer is 72.``) and
``self-instruct`` (seed tasks: instruction + first instance input -> its output). The user-oriented instructions
stay evaluation-only.

The output folder has the :mod:`specdec.train.data` layout (``shard_NNNNN`` + ``manifest.json``; columns
``index``, ``prompt``, ``prompt_ids``, ``response_ids``), so every trainer and the ``features`` step read it as
they read generated data. A rerun with the same settings keeps the shards already written (no duplicates).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from specdec.app.prompts import encode_prompt
from specdec.train.data import ID_COLUMNS, save_shard, trim_response
from specdec.train.prompt_sources import read_records, resolve_data_dir

TEACHER_SOURCES = {"gsm8k": "gsm8k/train.jsonl", "self-instruct": "self-instruct/seed_tasks.jsonl"}


def clean_gsm8k_answer(answer: str) -> str:
    """GSM8K's answer without calculator annotations, its ``#### N`` line as a sentence."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?####\s*(.+)\s*$", r"\nThe answer is \1.", text).strip()


def teacher_pairs(source: str, data_dir: str | Path) -> list[tuple[str, str]]:
    """``(question, human answer)`` pairs of a teacher-forced source (``gsm8k`` or ``self-instruct``)."""
    if source not in TEACHER_SOURCES:
        raise ValueError(f"unknown teacher-forced source {source!r}; choose from {sorted(TEACHER_SOURCES)}")
    records = read_records(resolve_data_dir(data_dir) / TEACHER_SOURCES[source])
    if source == "gsm8k":
        return [(r["question"], clean_gsm8k_answer(r["answer"])) for r in records]
    pairs = []
    for r in records:
        inst = (r.get("instances") or [{}])[0]
        extra = (inst.get("input") or "").strip()
        if (inst.get("output") or "").strip():
            pairs.append((r["instruction"].strip() + (f"\n\n{extra}" if extra else ""), inst["output"].strip()))
    return pairs


def encode_answer(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: the chat-templated question with the generation prompt, and the answer as
    the assistant turn up to and including the first EOS (what the target would have had to generate)."""
    prompt = encode_prompt(tokenizer, question).tolist()
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], return_dict=True)["input_ids"]
    full = [int(t) for t in full]
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the answered conversation as prompt + answer")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt, trim_response(full[len(prompt):], eos)


def write_teacher_forced(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], data_dir: str | Path,
                         out_dir: str | Path, shard_size: int = 512, seed: int = 0, max_tokens: int = 2048) -> Path:
    """Tokenize every pair of ``sources`` (shuffled with ``seed``; sequences over ``max_tokens`` dropped) into
    shards under ``out_dir``; resumes: shards already listed in the manifest are kept."""
    if shard_size < 1 or max_tokens < 2:
        raise ValueError(f"need shard_size >= 1 and max_tokens >= 2, got {shard_size}, {max_tokens}")
    pairs = [p for s in sources for p in teacher_pairs(s, data_dir)]
    random.Random(seed).shuffle(pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"mode": "teacher-forced", "sources": list(sources), "seed": seed, "max_tokens": max_tokens,
                "shard_size": shard_size}
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("config") != settings:
            raise ValueError(f"{out} was written with {old.get('config')}, not {settings}: use a fresh --out")
        shards = old["shards"]
    start = sum(s["rows"] for s in shards)
    while start < len(pairs):
        rows: dict[str, list] = {k: [] for k in ID_COLUMNS}
        for i, (question, answer) in enumerate(pairs[start: start + shard_size]):
            prompt_ids, response_ids = encode_answer(tokenizer, question, answer)
            if len(prompt_ids) + len(response_ids) > max_tokens:
                continue
            for key, value in zip(ID_COLUMNS, (start + i, question, prompt_ids, response_ids), strict=True):
                rows[key].append(value)
        name = f"shard_{len(shards):05d}"
        size = save_shard(out, name, rows, ID_COLUMNS)
        taken = min(shard_size, len(pairs) - start)
        shards.append({"name": name, "start": start, "rows": taken, "examples": len(rows["index"]),
                       "bytes": size, "response_tokens": sum(map(len, rows["response_ids"]))})
        start += taken
        _write(manifest_path, settings, shards)
    _write(manifest_path, settings, shards)
    return out


def _write(path: Path, settings: dict, shards: list[dict]) -> None:
    manifest = {"config": settings, "num_examples": sum(s["examples"] for s in shards), "num_shards": len(shards),
                "response_tokens": sum(s["response_tokens"] for s in shards), "shards": shards}
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def add_teacher_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="teacher-forced data: human-written answers as the assistant turn (no "
                                       "generation; run 'features' on the folder)")
    p.add_argument("--source", action="append", default=None, choices=sorted(TEACHER_SOURCES),
                   help="repeatable (default: gsm8k)")
    p.add_argument("--data-dir", required=True,
                   help="folder holding gsm8k/train.jsonl, self-instruct/seed_tasks.jsonl (required, no default)")
    p.add_argument("--out", required=True,
                   help="output folder (shards + manifest.json); reruns resume (required, no default)")
    p.add_argument("--shard-size", type=int, default=512, help="examples per shard")
    p.add_argument("--max-tokens", type=int, default=2048, help="drop examples longer than this (prompt + answer)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the examples")
    p.add_argument("--model", default=None, help="HF id or folder whose tokenizer is used (default: embedded SmolLM2)")


def cmd_teacher(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    out = write_teacher_forced(tokenizer, args.source or ["gsm8k"], args.data_dir, args.out, args.shard_size,
                               args.seed, args.max_tokens)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {manifest['num_examples']} examples, {manifest['response_tokens']} response tokens to {out}")

