"""``specdec bench``: HF generate vs specdec autoregressive vs drafters on a prompt set; a table and a JSON report.

Finished prompts are kept in ``OUT.partial.jsonl`` while the run lasts: Ctrl-C writes the partial report (and its
table) and exits with status 130; the same command again resumes from the finished prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.app.args import add_model_args, add_prompt_args, auto_cost_model, check_args, spec_defaults, spec_paths

HELP = "HF generate vs specdec autoregressive vs drafters on a prompt set (table + JSON report)"
DEFAULT_DRAFTER = "ngram"
# What is shipped for the embedded SmolLM2: the retrieval store of its own answers (its tree sized by this machine's
# measured step cost, docs/results/session13), and the trained heads (the EAGLE heads' dynamic trees take their
# measured shape, ``specdec.drafters.eagle.SHIPPED_TREE``, docs/results/session12).
SHIPPED_DRAFTERS = ("ngram:store=shipped,steps=auto",
                    "hybrid:model=eagle3,path=shipped,store=shipped,cost=auto,steps=auto",
                    "medusa:path=shipped,tree=dynamic,budget=4", "eagle:path=shipped,tree=dynamic",
                    "eagle3:path=shipped")
INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", nargs="+", default=None,
                   help="drafter specs NAME[:key=value,...] to run, NAME one of none, ngram, draft-model, self, "
                        "medusa, eagle, eagle3, hybrid, published (default: ngram and, on the embedded model, ngram "
                        "with the shipped store, the hybrid and the shipped Medusa, EAGLE and EAGLE-3 heads)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="requests run concurrently; B > 1 compares aggregate throughput with HF generate on "
                        "left-padded batches of B")
    p.add_argument("--repeats", type=int, default=1,
                   help="greedy: time each request this many times per method, interleaved, and keep the median run "
                        "(steadier per-prompt and per-category ratios on a noisy machine)")
    add_prompt_args(p)
    p.add_argument("--out", default="report.json",
                   help="JSON report (PNG plots beside it; OUT.partial.jsonl holds finished prompts until done)")
    add_model_args(p)


def default_drafters(args: argparse.Namespace) -> list[str]:
    """n-gram, plus on the embedded model the heads trained for it (their weights fit no other model)."""
    return [DEFAULT_DRAFTER, *(SHIPPED_DRAFTERS if args.model is None else ())]


def journal_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.batch_size > 1 and args.multi_turn:
        raise ValueError("--multi-turn runs one request at a time: drop --multi-turn or use --batch-size 1")
    from specdec.app.experiment import Grid

    grid = Grid(drafters=tuple(args.drafter or default_drafters(args)), temperatures=(args.temperature,),
                max_new_tokens=args.max_new_tokens, multi_turn=args.multi_turn, chat=args.chat, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed or 0, acceptance=args.acceptance, num_blocks=args.num_blocks,
                block_size=args.block_size, spec_defaults=spec_defaults(args), paths=spec_paths(args),
                batch_size=args.batch_size, model=args.model, cost_model=auto_cost_model(args), repeats=args.repeats)
    methods = grid.methods()  # a bad spec fails here, before the model loads
    grid.settings(args.temperature)  # so do bad --repeats combinations
    from specdec.app.bench import run_bench
    from specdec.app.cmd_generate import check_cache, engine_tree_nodes
    from specdec.app.loaders import load_prompt_set, load_target, load_tokenizer
    from specdec.app.plots import plot_report
    from specdec.app.prompts import encode_prompt
    from specdec.app.report import format_table, write_report

    prompts = load_prompt_set(args)
    tokenizer = load_tokenizer(args.model)
    longest = max(encode_prompt(tokenizer, p.text, args.chat).numel() for p in prompts)
    check_cache(longest, args, engine_tree_nodes(), what="the longest prompt")
    target, tokenizer = load_target(args, tokenizer)
    report = run_bench(target, tokenizer, prompts, methods, grid.settings(args.temperature), journal_path(args.out))
    print(format_table(report))
    write_report(report, args.out)
    out = Path(args.out)
    pngs = plot_report(report.to_json(requests=False), out.parent, out.stem)
    if not report.complete:
        print(f"specdec: interrupted after {report.n_done} of {report.n_total} prompts: wrote the partial report "
              f"{out}; run the same command again to resume ({journal_path(out)} holds the finished prompts)",
              file=sys.stderr)
        return INTERRUPTED
    journal_path(out).unlink(missing_ok=True)
    print(f"wrote {out} and {', '.join(str(p) for p in pngs)}")
    return 0
