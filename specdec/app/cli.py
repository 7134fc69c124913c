"""Command line: ``specdec generate`` and ``specdec bench``.

Errors the user can fix (bad prompt, unknown model or drafter, too long a request, out of KV blocks) are printed
as one ``specdec: error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from specdec.app.bench import format_table, write_report
from specdec.app.experiment import Grid, run_experiment
from specdec.app.loaders import DEFAULT_MODEL, DTYPES, load_prompt_set, load_target
from specdec.app.plots import plot_report
from specdec.app.prompts import encode_prompt
from specdec.drafters import DRAFTER_NAMES, DrafterSpec, build_drafter
from specdec.engine import SpeculativeEngine
from specdec.kv_cache import OutOfBlocks
from specdec.sampling import SamplingParams
from specdec.target import eos_token_ids

# Measured on the 2-core CPU (docs/results/exp_t0): n-gram is the fastest drafter for the embedded SmolLM2
# (1.55x HF greedy); of the trained heads shipped for it, Medusa with a 4-node tree is the fastest (1.12x).
DEFAULT_DRAFTER = "ngram"
SHIPPED_DRAFTERS = ("medusa:path=shipped,tree=dynamic,budget=4", "eagle:path=shipped,tree=dynamic,budget=8,depth=5")


def add_model_args(p: argparse.ArgumentParser, many_temperatures: bool = False) -> None:
    """Model, cache, sampling and drafter-shape flags shared by the commands (and experiments/run.py)."""
    p.add_argument("--model", default=None, help=f"HF model id or path (default: embedded {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", choices=["torch", "triton"], default=None,
                   help="attention backend (default: triton on CUDA, torch on CPU; env SPECDEC_ATTENTION)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the model's chat template")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=512, help="KV cache blocks (capacity = blocks x block size)")
    if many_temperatures:
        p.add_argument("--temperature", type=float, nargs="+", default=None,
                       help="one run per temperature (0 = greedy, checked token by token against the baseline)")
    else:
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (lossless: identical to the target)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--acceptance", choices=["exact", "typical_lossy"], default="exact",
                   help="exact: output follows the target's distribution; typical_lossy: Medusa's rule (lossy)")
    p.add_argument("--draft-model", default=None, help="draft model path or id (drafter draft-model)")
    p.add_argument("--draft-layers", type=int, default=None, help="target layers the self drafter runs")
    p.add_argument("--drafter-path", default=None, help="trained drafter weights (heads)")
    p.add_argument("--tree", choices=["chain", "dynamic", "static"], default=None, help="draft tree shape")
    p.add_argument("--tree-budget", type=int, default=None, help="nodes per tree, root included")
    p.add_argument("--tree-depth", type=int, default=None, help="draft depth")
    p.add_argument("--tree-topk", type=int, default=None, help="children per expanded node (dynamic tree)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Where prompts come from: a file (default: the built-in set) or a Hugging Face dataset."""
    p.add_argument("--prompts", default=None,
                   help="JSON list or JSONL file (prompt or Spec-Bench question_id/category/turns records; "
                        "default: the built-in set)")
    p.add_argument("--dataset", default=None, help="Hugging Face dataset id instead of --prompts (e.g. gsm8k)")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name (e.g. main)")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--field", default=None, help="dataset text column (default: question, prompt, ...)")
    p.add_argument("--limit", type=int, default=None, help="K prompts (a dataset: a fixed sample of K rows)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the dataset sample")
    p.add_argument("--per-category", type=int, default=None, help="first K prompts of each category")
    p.add_argument("--multi-turn", action="store_true", help="run every turn, earlier answers in the context")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Speculative decoding with token trees.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streaming, then one statistics line")
    gen.add_argument("prompt")
    gen.add_argument("--drafter", default=None,
                     help=f"NAME[:key=value,...], NAME one of {list(DRAFTER_NAMES)} (default: {DEFAULT_DRAFTER}, "
                          "the fastest measured)")
    add_model_args(gen)
    bench = sub.add_parser("bench", help="HF greedy vs specdec autoregressive vs drafters on a prompt set")
    bench.add_argument("--drafter", nargs="+", default=None,
                       help=f"drafter specs to run, NAME[:key=value,...] with NAME in {list(DRAFTER_NAMES)} "
                            "(default: ngram and, on the embedded model, the shipped Medusa and EAGLE heads)")
    add_prompt_args(bench)
    bench.add_argument("--out", default="report.json")
    add_model_args(bench)
    return parser


def spec_defaults(args: argparse.Namespace) -> dict:
    """Drafter-spec keys set by flags (``--tree``, ``--tree-budget``, ...); a spec string's own keys win."""
    return {"layers": args.draft_layers, "tree": args.tree, "depth": args.tree_depth, "budget": args.tree_budget,
            "topk": args.tree_topk}


def spec_paths(args: argparse.Namespace) -> dict[str, str]:
    """Default ``path`` per drafter name from ``--draft-model`` / ``--drafter-path``."""
    paths = {"draft-model": args.draft_model, "medusa": args.drafter_path, "eagle": args.drafter_path}
    return {k: v for k, v in paths.items() if v is not None}


def _spec(text: str, args: argparse.Namespace) -> DrafterSpec:
    return DrafterSpec.parse(text, path=spec_paths(args).get(text.partition(":")[0]), **spec_defaults(args))


def default_drafters(args: argparse.Namespace) -> list[str]:
    """n-gram, plus on the embedded model the heads trained for it (their weights fit no other model)."""
    return [DEFAULT_DRAFTER, *(SHIPPED_DRAFTERS if args.model is None else ())]


def cmd_generate(args: argparse.Namespace) -> None:
    args.drafter = args.drafter or DEFAULT_DRAFTER
    spec = _spec(args.drafter, args)  # fail fast on a bad spec, before loading the model
    target, tokenizer = load_target(args)
    drafter = build_drafter(spec, target)
    ids = encode_prompt(tokenizer, args.prompt, args.chat)
    sampling = _sampling(args)
    engine = SpeculativeEngine(
        target, target.new_cache(args.num_blocks, args.block_size), drafter, eos_token_ids(target.model, tokenizer),
        acceptance=args.acceptance,
    )
    generated: list[int] = []
    printed = 0

    def stream(tokens: list[int]) -> None:
        nonlocal printed
        generated.extend(tokens)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[printed:], end="", flush=True)
            printed = len(text)

    result = engine.generate(ids, args.max_new_tokens, on_tokens=stream, sampling=sampling)
    print()
    print(f"[{args.drafter}] {result.stats.summary()} | stop: {result.stop_reason}", flush=True)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)


def cmd_bench(args: argparse.Namespace) -> None:
    drafters = args.drafter or default_drafters(args)
    grid = Grid(drafters=tuple(drafters), temperatures=(args.temperature,), max_new_tokens=args.max_new_tokens,
                multi_turn=args.multi_turn, chat=args.chat, top_k=args.top_k, top_p=args.top_p, seed=args.seed or 0,
                acceptance=args.acceptance, num_blocks=args.num_blocks, block_size=args.block_size,
                spec_defaults=spec_defaults(args), paths=spec_paths(args))
    grid.methods()  # fail fast on a bad spec, before loading the model
    prompts = load_prompt_set(args)
    target, tokenizer = load_target(args)
    result = run_experiment(target, tokenizer, prompts, grid)
    [report] = result.reports
    print(format_table(report))
    write_report(report, args.out)
    out = Path(args.out)
    pngs = plot_report(report, out.parent, out.stem)
    print(f"wrote {out} and {', '.join(str(p) for p in pngs)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": cmd_generate, "bench": cmd_bench}[args.command](args)
    except (ValueError, OutOfBlocks, KeyError) as err:
        print(f"specdec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
