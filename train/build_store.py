"""``python -m specdec.train store``: the retrieval store (:mod:`specdec.drafters.store`) from generated data.

Reads the ``response_ids`` (the target's own answers) of one or more data folders written by ``data``,
``followups`` or ``selfprompts``, and writes ``tokens.safetensors`` + ``config.json``. Prompts are left out: they
are the user's words, not the target's, and diluted the store in the session-9 replay.

    python -m specdec.train store --data out/gen_self out/gen_diverse --out out/store
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specdec.drafters.store import TokenStore


def build_store(data: list[str], vocab_size: int) -> TokenStore:
    from specdec.train.data import load_distillation_data

    sequences, sources = [], []
    for folder in data:
        rows = load_distillation_data(folder).select_columns(["response_ids"])
        answers = [list(r["response_ids"]) for r in rows]
        sequences.extend(answers)
        manifest = Path(folder) / "manifest.json"
        kind = json.loads(manifest.read_text())["config"]["sources"] if manifest.is_file() else []
        sources.append(f"{Path(folder).name} ({', '.join(kind) or 'unknown'}): {len(answers)} answers, "
                       f"{sum(map(len, answers))} tokens")
    if not sequences:
        raise ValueError(f"no answers in {data}")
    return TokenStore(sequences, vocab_size, sources=sources)


def add_store_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="retrieval store for ngram:store=... from generated data folders")
    p.add_argument("--data", nargs="+", required=True, help="generated data folders (required, no default)")
    p.add_argument("--out", required=True, help="output folder (required, no default)")
    p.add_argument("--model", default=None,
                   help="the target whose vocabulary the store uses (default: embedded SmolLM2-135M-Instruct)")


def cmd_store(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model)
    store = build_store(args.data, int(model.config.vocab_size))
    out = store.save(args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {store.lengths.size} answers, {store.num_tokens} tokens ({size / 1e6:.2f} MB)")
