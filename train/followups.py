"""Multi-turn follow-ups the target writes for itself: a second user turn and its answer, from generated data.

For every example of a generated folder (a prompt and the target's own answer), the target is asked, as the next
user turn, to write the question a user would ask next (:data:`ASK`; greedy, at most ``question_tokens``). That
question becomes the second user turn, and the target answers it with the whole conversation in context. The rows
have the layout of :mod:`specdec.train.data` (``prompt`` = the conversation as JSON, ``prompt_ids`` = the
chat-templated conversation up to the second answer, ``response_ids`` = that answer), so every trainer and the
``features`` step read them as they read single-turn data. Examples whose answer did not end (no EOS) or whose
question came out empty are skipped.

Both stages resume: the questions are appended to ``questions.jsonl`` batch by batch (a rerun asks only the
examples after the last one written), and the answers go through :func:`generate_distillation_data`'s shards.

    python -m specdec.train followups --data out/gen_diverse --out out/gen_followups
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.train.data import (
    DataConfig,
    generate_batch,
    generate_distillation_data,
    load_distillation_data,
    prompt_ids,
)

ASK = ("Now write the one question I, the user, would most likely ask you next about this. "
       "Reply with the question only.")


def first_turn(row: dict) -> tuple[list[str], list[str]]:
    """``(turns, answers)`` of a data row's prompt (a text, or a conversation stored as JSON)."""
    text = str(row["prompt"])
    if text.startswith("{"):
        try:
            conv = json.loads(text)
            return list(conv["turns"]), list(conv["answers"])
        except (ValueError, KeyError):
            pass
    return [text], []


def write_questions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], path: Path,
                    batch_size: int, question_tokens: int) -> list[dict]:
    """Stage 1: one follow-up question per row, appended to ``path`` (JSONL ``{"index", "turns", "answers",
    "question"}``); resumes after the rows already there. Returns every record (old and new), in row order."""
    done = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []
    if [d["index"] for d in done] != [int(r["index"]) for r in rows[: len(done)]]:
        raise ValueError(f"{path} was written from other data: use a fresh --out")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ask_config = DataConfig(max_new_tokens=question_tokens, batch_size=batch_size)
    bar = tqdm(total=len(rows), initial=len(done), desc="questions", unit="ex")
    with path.open("a", encoding="utf-8") as f:
        for b in range(len(done), len(rows), batch_size):
            batch = rows[b: b + batch_size]
            convs = []
            for row in batch:
                turns, answers = first_turn(row)
                answer = tokenizer.decode(list(row["response_ids"]), skip_special_tokens=True).strip()
                convs.append({"turns": turns, "answers": [*answers, answer]})
            asks = [prompt_ids(tokenizer, {"turns": [*c["turns"], ASK], "answers": c["answers"]}) for c in convs]
            outs = generate_batch(model, tokenizer, asks, ask_config)
            for row, conv, out in zip(batch, convs, outs, strict=True):
                ended = bool(list(row["response_ids"])) and int(row["response_ids"][-1]) in eos
                question = tokenizer.decode(out, skip_special_tokens=True).strip() if ended else ""
                record = {"index": int(row["index"]), **conv, "question": question}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done.append(record)
            f.flush()
            bar.update(len(batch))
    bar.close()
    return done


def generate_followups(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: str | Path,
                       config: DataConfig, question_tokens: int = 64) -> Path:
    """Both stages for every example of ``data`` into ``config.out_dir`` (see the module docstring)."""
    rows = list(load_distillation_data(data).select_columns(["index", "prompt", "response_ids"]))
    if not rows:
        raise ValueError(f"no examples in {data}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = write_questions(model, tokenizer, rows, out / "questions.jsonl", config.batch_size, question_tokens)
    convs = [{"turns": [*r["turns"], r["question"]], "answers": r["answers"]} for r in records if r["question"]]
    return generate_distillation_data(model, tokenizer, convs, config)


def add_followups_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("followups", help="multi-turn data: the target writes a follow-up question to each generated "
                                         "example and answers it")
    p.add_argument("--data", required=True, help="generated data folder (from 'data'; required, no default)")
    p.add_argument("--out", required=True,
                   help="output folder (questions.jsonl, shards, manifest.json); reruns resume (required, no default)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest second answer")
    p.add_argument("--question-tokens", type=int, default=64, help="longest follow-up question")
    p.add_argument("--batch-size", type=int, default=8, help="conversations generated at once")
    p.add_argument("--shard-size", type=int, default=64, help="examples per shard on disk")
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def cmd_followups(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer

    if args.question_tokens < 1:
        raise SystemExit(f"--question-tokens must be >= 1, got {args.question_tokens}")
    from specdec.app.args import check_device

    config = DataConfig(sources=(f"followups:{args.data}",), out_dir=args.out, model=args.model,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size)
    model, tokenizer = load_model_and_tokenizer(args.model, device=check_device(args.device))
    out = generate_followups(model, tokenizer, args.data, config, args.question_tokens)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {manifest['num_examples']} follow-up examples, {manifest['response_tokens']} response tokens "
          f"to {out}")
