"""``python -m specdec.train <command>``: training-side tools.

Commands: ``data`` (self-distillation data, see :mod:`specdec.train.data`). Trainers (``medusa``, ``eagle``,
``draft``) are meant to be added as further subcommands. Bad input is reported as one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_OUT = "out/distill"


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate self-distillation data (the target answers instruction prompts)")
    p.add_argument("--source", action="append", default=None,
                   help="self-instruct | gsm8k | PATH (.jsonl) | HF dataset id; repeatable "
                        "(default: self-instruct and gsm8k)")
    p.add_argument("--field", default=None, help="text field of a PATH / HF source")
    p.add_argument("--data-dir", default="../shared/data", help="folder of the built-in sources")
    p.add_argument("--limit", type=int, default=None, help="number of prompts (after shuffling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (shards + manifest.json); reruns resume")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--store-hidden", action="store_true", help="store the last hidden state (2*H bytes/token)")
    p.add_argument("--topk-logits", type=int, default=0, help="store the top-K logits (6*K bytes/token)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m specdec.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    return parser


def cmd_data(args: argparse.Namespace) -> None:
    from specdec.target import load_model_and_tokenizer
    from specdec.train.data import DataConfig, generate_distillation_data, load_instruction_prompts

    config = DataConfig(
        sources=tuple(args.source or ("self-instruct", "gsm8k")), field=args.field, data_dir=args.data_dir,
        limit=args.limit, seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, store_hidden=args.store_hidden, topk_logits=args.topk_logits,
        out_dir=args.out, shard_size=args.shard_size, model=args.model,
    )
    prompts = load_instruction_prompts(config)  # fail on bad sources before loading the model
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    out = generate_distillation_data(model, tokenizer, prompts, config)
    print(f"wrote {len(prompts)} examples to {out} (see {out / 'manifest.json'})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"data": cmd_data}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"specdec.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
