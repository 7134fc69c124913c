"""A committable corpus of generated examples, so that data generated in one session survives into the next.

``out/`` does not outlive a session here; the repository does. A data folder (``data``, ``selfprompts``,
``followups`` or ``teacher`` layout: Arrow shards, a few bytes per token plus any hidden states) packs into
a small corpus folder holding only what cannot be cheaply recomputed: each example's prompt text, prompt token ids
and answer token ids (the target's greedy answer: the expensive part, about 0.25M tokens per CPU-hour here). Hidden
states and top-k logits are not kept: ``features`` recomputes them in one teacher-forced forward.

Files: ``corpus.safetensors`` (``prompt_tokens``, ``prompt_lengths``, ``response_tokens``, ``response_lengths``;
token ids as int32), ``prompts.jsonl`` (one JSON string per example: the prompt text) and ``config.json``
(``kind``: ``"corpus"``, ``vocab_size``, ``sources``, ``num_examples``, ``response_tokens``).

    python -m specdec.train corpus pack --data out/gen_self3 --out train/corpus/smollm2-selfprompts-s2000
    python -m specdec.train corpus unpack train/corpus/smollm2-selfprompts-s2000 --out out/gen_self3_restored

``unpack`` writes the data layout again (columns ``index``, ``prompt``, ``prompt_ids``, ``response_ids``), which
``features``, every trainer and ``store`` read. Packing is lossless for those columns (tested).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from specdec.checkpoint import CONFIG_FILE, KIND_KEY, read_json_object

TOKENS_FILE, PROMPTS_FILE = "corpus.safetensors", "prompts.jsonl"


def pack_corpus(data: Sequence[str | Path], out: str | Path, vocab_size: int) -> Path:
    """Pack the examples of the data folders ``data`` (in order) into the corpus folder ``out``."""
    from safetensors.torch import save_file

    from specdec.train.data import load_distillation_data

    prompts, prompt_ids, response_ids, sources = [], [], [], []
    for folder in data:
        rows = load_distillation_data(folder)
        if "prompt_ids" not in rows.column_names or "response_ids" not in rows.column_names:
            raise ValueError(f"{folder} has no prompt_ids/response_ids columns (not a data folder)")
        rows = rows.select_columns([c for c in ("prompt", "prompt_ids", "response_ids") if c in rows.column_names])
        before = len(response_ids)
        for r in rows:
            prompts.append(str(r.get("prompt", "")))
            prompt_ids.append([int(t) for t in r["prompt_ids"]])
            response_ids.append([int(t) for t in r["response_ids"]])
        tokens = sum(map(len, response_ids[before:]))
        sources.append(f"{Path(folder).name}: {len(response_ids) - before} examples, {tokens} response tokens")
    if not response_ids:
        raise ValueError(f"no examples in {list(map(str, data))}")
    for ids in (*prompt_ids, *response_ids):
        if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{min(ids)}, {max(ids)}]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_tokens": _flat(prompt_ids), "prompt_lengths": _lengths(prompt_ids),
               "response_tokens": _flat(response_ids), "response_lengths": _lengths(response_ids)},
              str(out / TOKENS_FILE))
    (out / PROMPTS_FILE).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts),
                                    encoding="utf-8")
    config = {KIND_KEY: "corpus", "vocab_size": int(vocab_size), "sources": sources,
              "num_examples": len(response_ids), "response_tokens": sum(map(len, response_ids))}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_corpus(folder: str | Path) -> tuple[list[str], list[list[int]], list[list[int]], dict]:
    """``(prompts, prompt_ids, response_ids, config)`` of a corpus folder; ``ValueError`` naming what is wrong."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / TOKENS_FILE).is_file():
        raise ValueError(f"{folder} is not a corpus (needs {CONFIG_FILE}, {TOKENS_FILE} and {PROMPTS_FILE})")
    config = read_json_object(folder / CONFIG_FILE)
    if config.get(KIND_KEY) != "corpus":
        raise ValueError(f"{folder} holds {config.get(KIND_KEY)!r} data, not a corpus")
    arrays = load_file(str(folder / TOKENS_FILE))
    prompt_ids = _split(arrays["prompt_tokens"], arrays["prompt_lengths"], folder)
    response_ids = _split(arrays["response_tokens"], arrays["response_lengths"], folder)
    prompts = [json.loads(line) for line in (folder / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()]
    if not len(prompts) == len(prompt_ids) == len(response_ids) == config.get("num_examples"):
        raise ValueError(f"{folder}: {len(prompts)} prompts, {len(prompt_ids)} prompt and {len(response_ids)} answer "
                         f"sequences, config says {config.get('num_examples')} examples")
    return prompts, prompt_ids, response_ids, config


def unpack_corpus(corpus: str | Path, out: str | Path, shard_size: int = 512) -> Path:
    """Write the corpus as a data folder (shards + ``manifest.json``) that ``features``, the trainers and ``store``
    read. ``out`` must not hold data already (no silent mixing)."""
    from specdec.train.data import ID_COLUMNS, save_shard

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    prompts, prompt_ids, response_ids, config = load_corpus(corpus)
    out = Path(out)
    if (out / "manifest.json").exists():
        raise ValueError(f"{out} already holds data (manifest.json): use a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(prompts), shard_size):
        stop = min(start + shard_size, len(prompts))
        name = f"shard_{len(shards):05d}"
        rows = {"index": list(range(start, stop)), "prompt": prompts[start:stop], "prompt_ids": prompt_ids[start:stop],
                "response_ids": response_ids[start:stop]}
        shards.append({"name": name, "start": start, "rows": stop - start, "examples": stop - start,
                       "bytes": save_shard(out, name, rows, ID_COLUMNS),
                       "response_tokens": sum(map(len, response_ids[start:stop]))})
    manifest = {"config": {"mode": "corpus", "corpus": str(corpus), "sources": config.get("sources", [])},
                "num_examples": len(prompts), "num_shards": len(shards),
                "response_tokens": sum(s["response_tokens"] for s in shards), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _flat(seqs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([t for s in seqs for t in s], dtype=torch.int32)


def _lengths(seqs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(s) for s in seqs], dtype=torch.int32)


def _split(tokens: torch.Tensor, lengths: torch.Tensor, folder: Path) -> list[list[int]]:
    if int(lengths.sum()) != tokens.numel():
        raise ValueError(f"{folder}: lengths sum to {int(lengths.sum())} but there are {tokens.numel()} tokens")
    return [part.tolist() for part in torch.split(tokens.long(), lengths.tolist())] if lengths.numel() else []


def add_corpus_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="pack data folders into a small committable corpus (prompts + answer ids), or "
                                      "unpack one into a data folder")
    action = p.add_subparsers(dest="action", required=True)
    pack = action.add_parser("pack", help="data folders -> corpus folder")
    pack.add_argument("--data", nargs="+", required=True, help="data folders (required, no default)")
    pack.add_argument("--out", required=True, help="corpus folder to write (required, no default)")
    pack.add_argument("--model", default=None, help="the target whose vocabulary the ids use (default: embedded "
                                                    "SmolLM2-135M-Instruct)")
    unpack = action.add_parser("unpack", help="corpus folder -> data folder (features, trainers and store read it)")
    unpack.add_argument("corpus", help="a corpus folder")
    unpack.add_argument("--out", required=True, help="data folder to write (fresh; required, no default)")
    unpack.add_argument("--shard-size", type=int, default=512, help="examples per shard")


def cmd_corpus(args: argparse.Namespace) -> None:
    if args.action == "unpack":
        out = unpack_corpus(args.corpus, args.out, args.shard_size)
        manifest = json.loads((out / "manifest.json").read_text())
        print(f"wrote {out}: {manifest['num_examples']} examples, {manifest['response_tokens']} response tokens")
        return
    from transformers import AutoConfig

    from specdec.app.loaders import resolve_model

    where, local = resolve_model(args.model)
    vocab = int(AutoConfig.from_pretrained(where, local_files_only=local).get_text_config().vocab_size)
    out = pack_corpus(args.data, args.out, vocab)
    config = read_json_object(out / CONFIG_FILE)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {config['num_examples']} examples, {config['response_tokens']} response tokens "
          f"({size / 1e6:.2f} MB)")
