"""``python -m specdec.train <command>``: training-side tools.

Commands: ``data`` (self-distillation data, :mod:`specdec.train.data`), ``teacher`` (teacher-forced human answers,
:mod:`specdec.train.teacher`), ``followups`` (multi-turn: the target asks and answers its own follow-up question,
:mod:`specdec.train.followups`), ``selfprompts`` (the target writes instructions and answers them,
:mod:`specdec.train.selfprompts`), ``store`` (retrieval store for ``ngram:store=``,
:mod:`specdec.train.build_store`), ``corpus`` (pack data folders into a small committable corpus, or unpack
one, :mod:`specdec.train.corpus`), ``features`` (EAGLE-3 features of a data folder, :mod:`specdec.train.features`),
``eagle3`` (EAGLE-3 head, :mod:`specdec.train.eagle3`), ``medusa`` (Medusa heads,
:mod:`specdec.train.medusa`), ``eagle`` (EAGLE-style head, :mod:`specdec.train.eagle`), ``draft`` (small draft
LM, :mod:`specdec.train.draft_lm`), ``export`` (a checkpoint in float16/bfloat16, as shipped). Bad input is
reported as one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace

from specdec.app.args import HelpFormatter
from specdec.train.loop import LoopConfig

DEFAULT_OUT = "out/distill"


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate self-distillation data (the target answers instruction prompts)")
    p.add_argument("--source", action="append", default=None,
                   help="self-instruct | gsm8k | humaneval | PATH (.jsonl) | HF dataset id; repeatable "
                        "(default: self-instruct and gsm8k)")
    p.add_argument("--field", default=None,
                   help="text field of a PATH / HF source (default: instruction, question, prompt or text)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding self-instruct/seed_tasks.jsonl and gsm8k/train.jsonl (default: the "
                        "self-instruct seed tasks shipped in the package and GSM8K from the Hugging Face hub)")
    p.add_argument("--max-per-source", type=int, default=None, help="at most N prompts of each source (default: all)")
    p.add_argument("--limit", type=int, default=None, help="number of prompts after shuffling (default: all)")
    p.add_argument("--seed", type=int, default=0, help="shuffles the prompts (and seeds sampling)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (shards + manifest.json); reruns resume")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer generated per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated at once")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--store-hidden", action="store_true", help="store the last hidden state (2*H bytes/token)")
    p.add_argument("--topk-logits", type=int, default=0, help="store the top-K logits (6*K bytes/token)")
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard on disk")
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def add_loop_args(p: argparse.ArgumentParser, lr: float) -> None:
    """Arguments every trainer shares (:class:`specdec.train.loop.LoopConfig`, data, model)."""
    p.add_argument("--data", required=True, action="append",
                   help="distillation data folder (from the 'data' command); repeat to train on several (required, "
                        "no default)")
    p.add_argument("--out", required=True,
                   help="output folder (checkpoints step_N, metrics.jsonl, wandb; required, no default)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--seq-len", type=int, default=512, help="max response tokens used per example")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="score only the N most frequent response tokens (0 = the full vocabulary)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between verifier (tau) evaluations")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0 = only the last)")
    p.add_argument("--eval-holdout", type=int, default=4, help="last N examples held out as eval prompts")
    p.add_argument("--eval-max-new-tokens", type=int, default=64, help="tokens generated per tau evaluation")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and noise")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (default: offline unless WANDB_API_KEY)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def loop_config(args: argparse.Namespace, project: str) -> LoopConfig:
    return LoopConfig(
        out_dir=args.out, steps=args.steps, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
        eval_every=args.eval_every, save_every=args.save_every, eval_max_new_tokens=args.eval_max_new_tokens,
        seed=args.seed, wandb=not args.no_wandb, wandb_project=project, resume=args.resume,
    )


def add_medusa_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("medusa", help="train Medusa heads on self-distillation data")
    add_loop_args(p, lr=1e-3)
    p.add_argument("--heads", type=int, default=3, help="number of Medusa heads (= max draft depth)")
    p.add_argument("--share-lm-head", action="store_true", help="heads end in the target's own LM head")
    p.add_argument("--head-layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--kd-weight", type=float, default=0.0, help="weight of the KL term against the target")


def add_eagle_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eagle", help="train an EAGLE-style feature head on self-distillation data")
    add_loop_args(p, lr=1e-3)
    p.add_argument("--unroll", type=int, default=3, help="training-time-test passes (1 = teacher forcing)")
    p.add_argument("--kd-weight", type=float, default=0.1, help="weight of the KD term through the LM head")
    p.add_argument("--noise", type=float, default=0.2, help="width of the uniform noise on input features")


def add_draft_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("draft", help="distill a small draft LM (forward KL / TV, optionally on-policy)")
    add_loop_args(p, lr=1e-4)
    p.add_argument("--draft-model", default=None, help="HF id or folder (default: the target's first --layers)")
    p.add_argument("--layers", type=int, default=4, help="layers of the target copied into the draft model")
    p.add_argument("--loss", default="forward_kl", choices=["forward_kl", "tv"],
                   help="forward KL or total variation against the target")
    p.add_argument("--on-policy", type=float, default=0.0, help="fraction of steps on the draft's own samples")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of on-policy samples")
    p.add_argument("--on-policy-tokens", type=int, default=64, help="tokens the draft samples per on-policy step")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a head checkpoint with its weights cast to float16/bfloat16")
    p.add_argument("checkpoint", help="a step_N folder (config.json + model.safetensors)")
    p.add_argument("out", help="destination folder")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="floating-point weights as")


def _device(args: argparse.Namespace) -> str:
    from specdec.app.args import check_device

    return check_device(args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m specdec.train", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    from specdec.train import build_store, corpus, eagle3, features, followups, selfprompts, teacher

    build_store.add_store_parser(sub)
    corpus.add_corpus_parser(sub)
    teacher.add_teacher_parser(sub)
    followups.add_followups_parser(sub)
    selfprompts.add_selfprompts_parser(sub)
    features.add_features_parser(sub)
    add_medusa_parser(sub)
    eagle3.add_eagle3_parser(sub)
    add_eagle_parser(sub)
    add_draft_parser(sub)
    add_export_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def cmd_data(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.train.data import DataConfig, generate_distillation_data
    from specdec.train.prompt_sources import load_instruction_prompts

    config = DataConfig(
        sources=tuple(args.source or ("self-instruct", "gsm8k")), field=args.field, max_per_source=args.max_per_source,
        data_dir=args.data_dir,
        limit=args.limit, seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, store_hidden=args.store_hidden, topk_logits=args.topk_logits,
        out_dir=args.out, shard_size=args.shard_size, model=args.model,
    )
    prompts = load_instruction_prompts(config)  # fail on bad sources before loading the model
    model, tokenizer = load_model_and_tokenizer(args.model, device=_device(args))
    out = generate_distillation_data(model, tokenizer, prompts, config)
    print(f"wrote {len(prompts)} examples to {out} (see {out / 'manifest.json'})")


def cmd_medusa(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.train.evaluation import EvalConfig
    from specdec.train.medusa import MedusaTrainConfig, train_medusa

    config = MedusaTrainConfig(
        data_dir=tuple(args.data), loop=loop_config(args, "specdec-medusa"), num_heads=args.heads,
        num_layers=args.head_layers, share_lm_head=args.share_lm_head, draft_vocab_size=args.draft_vocab,
        batch_size=args.batch_size, seq_len=args.seq_len, kd_weight=args.kd_weight,
        evaluation=EvalConfig(holdout=args.eval_holdout),
    )
    model, tokenizer = load_model_and_tokenizer(args.model, device=_device(args))
    out = train_medusa(model, tokenizer, config)
    print(f"trained Medusa heads: {out}")


def cmd_eagle(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.train.eagle import EVAL as EAGLE_EVAL
    from specdec.train.eagle import EagleTrainConfig, train_eagle

    config = EagleTrainConfig(
        data_dir=tuple(args.data), loop=loop_config(args, "specdec-eagle"), draft_vocab_size=args.draft_vocab,
        unroll=args.unroll, batch_size=args.batch_size, seq_len=args.seq_len, kd_weight=args.kd_weight,
        noise=args.noise, evaluation=replace(EAGLE_EVAL, holdout=args.eval_holdout),
    )
    model, tokenizer = load_model_and_tokenizer(args.model, device=_device(args))
    out = train_eagle(model, tokenizer, config)
    print(f"trained EAGLE head: {out}")


def cmd_draft(args: argparse.Namespace) -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.train.draft_lm import EVAL as DRAFT_EVAL
    from specdec.train.draft_lm import DraftTrainConfig, train_draft_lm

    config = DraftTrainConfig(
        data_dir=tuple(args.data), loop=loop_config(args, "specdec-draft"), draft=args.draft_model, layers=args.layers,
        loss=args.loss, on_policy=args.on_policy, temperature=args.temperature,
        on_policy_tokens=args.on_policy_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
        evaluation=replace(DRAFT_EVAL, holdout=args.eval_holdout),
    )
    model, tokenizer = load_model_and_tokenizer(args.model, device=_device(args))
    out = train_draft_lm(model, tokenizer, config)
    print(f"trained draft model: {out}")


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from specdec.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from specdec.train import build_store, corpus, eagle3, features, followups, selfprompts, teacher

        commands = {"data": cmd_data, "medusa": cmd_medusa, "eagle": cmd_eagle, "draft": cmd_draft,
                    "export": cmd_export, "teacher": teacher.cmd_teacher, "features": features.cmd_features,
                    "followups": followups.cmd_followups, "selfprompts": selfprompts.cmd_selfprompts,
                    "store": build_store.cmd_store, "corpus": corpus.cmd_corpus, "eagle3": eagle3.cmd_eagle3}
        commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"specdec.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
