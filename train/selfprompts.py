"""Instructions the target writes for itself, and its answers: diverse self-distillation data without a prompt set.

An instruction-tuned model, given its chat template only up to the start of a user turn (the "pre-query"
template: system prompt, then the user header), continues with a user message drawn from what it was tuned on
(the Magpie recipe, Xu et al. 2024). Sampled at temperature 1 this gives as many varied instructions as one asks
for, in the target's own distribution, with no dataset and nothing held out touched. Each instruction is then
answered greedily as in :mod:`specdec.train.data`, so the rows have that module's layout and every trainer, the
``features`` step and the retrieval store (:mod:`specdec.drafters.store`) read them as they read single-turn data.

Kept: instructions that ended (the model closed its turn within ``question_tokens``), have at least
:data:`MIN_WORDS` words, and were not written before in this folder (exact duplicates after whitespace
normalisation are dropped).

Resumes chunk by chunk: ``questions.jsonl`` gets one chunk of ``shard_size`` kept instructions (sampled with the
seed ``seed + chunk``, so a rerun writes the same ones), then that chunk is answered into the next shard; an
interrupted run continues where it stopped, without duplicates.

    python -m specdec.train selfprompts --num 2000 --out out/gen_self
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.target import eos_token_ids
from specdec.train.data import DataConfig, generate_batch, generate_distillation_data

MIN_WORDS = 4
_MARK = "\x00"


def pre_query_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The chat template rendered up to where a user message's text would start (system prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    if _MARK not in text:
        raise ValueError("the tokenizer's chat template does not show the user message: cannot build the pre-query")
    return tokenizer(text.split(_MARK)[0], add_special_tokens=False)["input_ids"]


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def sample_instructions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, seen: set[str],
                        seed: int, batch_size: int, question_tokens: int, max_tries: int = 20) -> list[str]:
    """``count`` new instructions (not in ``seen``, which is updated), sampled at temperature 1 from the
    pre-query template with the seed ``seed``; raises after ``max_tries`` times the batches ``count`` needs."""
    pre = pre_query_ids(tokenizer)
    config = DataConfig(max_new_tokens=question_tokens, batch_size=batch_size, temperature=1.0)
    ends = set(eos_token_ids(model, tokenizer))  # the ids generate_batch stops on
    torch.manual_seed(seed)
    kept: list[str] = []
    batches = 0
    while len(kept) < count:
        if batches >= max_tries * max(1, count // batch_size):
            raise ValueError(f"kept {len(kept)} of {count} instructions after {batches} batches: the model does not "
                             f"write usable user turns from its pre-query template")
        batches += 1
        for out in generate_batch(model, tokenizer, [pre] * batch_size, config):
            if not out or out[-1] not in ends:
                continue  # ran out of tokens mid-instruction
            text = tokenizer.decode(out, skip_special_tokens=True).strip()
            key = _normal(text)
            if len(text.split()) < MIN_WORDS or key in seen:
                continue
            seen.add(key)
            kept.append(text)
            if len(kept) == count:
                break
    return kept


def generate_selfprompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num: int, config: DataConfig,
                         question_tokens: int = 96) -> Path:
    """``num`` self-written instructions and their greedy answers into ``config.out_dir`` (module docstring)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    path = out / "questions.jsonl"
    questions = [json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip()] if path.is_file() else []
    seen = {_normal(q) for q in questions}
    bar = tqdm(total=num, initial=min(len(questions), num), desc="instructions", unit="ex")
    while True:
        if questions:
            generate_distillation_data(model, tokenizer, questions, config)  # answers the chunk not yet answered
        if len(questions) >= num:
            break
        chunk = len(questions) // config.shard_size
        want = min(config.shard_size, num - len(questions))
        new = sample_instructions(model, tokenizer, want, seen, config.seed + chunk, config.batch_size,
                                  question_tokens)
        with path.open("a", encoding="utf-8") as f:
            for i, q in enumerate(new):
                f.write(json.dumps({"index": len(questions) + i, "question": q}, ensure_ascii=False) + "\n")
        questions.extend(new)
        bar.update(len(new))
    bar.close()
    return out


def add_selfprompts_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selfprompts", help="diverse data with no prompt set: the target writes user instructions "
                                           "from its own chat template and answers them")
    p.add_argument("--num", type=int, required=True, help="instructions to write and answer (required, no default)")
    p.add_argument("--out", required=True,
                   help="output folder (questions.jsonl, shards, manifest.json); reruns resume (required, no default)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--question-tokens", type=int, default=96, help="longest instruction (longer ones are dropped)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated at once")
    p.add_argument("--shard-size", type=int, default=64, help="instructions per chunk and examples per shard")
    p.add_argument("--seed", type=int, default=0, help="chunk k samples its instructions with seed + k")
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def cmd_selfprompts(args: argparse.Namespace) -> None:
    from specdec.app.args import check_device
    from specdec.app.loaders import load_model_and_tokenizer

    if args.question_tokens < 1:
        raise SystemExit(f"--question-tokens must be >= 1, got {args.question_tokens}")
    config = DataConfig(sources=("selfprompts",), out_dir=args.out, model=args.model, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size)
    model, tokenizer = load_model_and_tokenizer(args.model, device=check_device(args.device))
    out = generate_selfprompts(model, tokenizer, args.num, config, args.question_tokens)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {manifest['num_examples']} self-prompted examples, {manifest['response_tokens']} response tokens "
          f"to {out}")
