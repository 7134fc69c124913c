"""Run an experiment grid: drafters x tree settings x temperatures on a prompt set, against HF ``generate``.

    python experiments/run.py --drafter ngram "eagle:path=shipped,tree=dynamic" --budget 4 8 16 \\
        --temperature 0 0.7 --max-new-tokens 128 --out out/exp
    python experiments/run.py --config experiments/grid.yaml            # the same from YAML (CLI flags win)

Prints one table per temperature and writes ``OUT/results.jsonl`` (one record per request and per method
summary), ``OUT/summary.json`` and PNG plots (speedup by category, acceptance by depth, tau vs tree budget).
Greedy runs are checked token by token against the baseline (count, first differing position, near-tie margin).
The run is logged to W&B (offline unless ``WANDB_API_KEY`` is set; ``--no-wandb`` disables it).

YAML keys are the flags' long names with ``_`` (``drafter: [ngram, ...]``, ``budget: [4, 8]``, ``temperature:
[0, 0.7]``, ``prompts: file.jsonl``, ``dataset: gsm8k``, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

from specdec.app.args import (
    HelpFormatter,
    add_model_args,
    add_prompt_args,
    auto_cost_model,
    check_args,
    spec_defaults,
    spec_paths,
)
from specdec.app.cli import error_line, is_user_error
from specdec.app.experiment import Grid

LIST_KEYS = {"drafter", "budget", "temperature"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file with any of the flags below (flags given win; default: none)")
    p.add_argument("--drafter", nargs="+", default=None,
                   help="drafter specs NAME[:key=value,...], NAME one of none, ngram, draft-model, self, medusa, "
                        "eagle (default: ngram)")
    p.add_argument("--budget", nargs="+", type=int, default=None,
                   help="run every tree=dynamic drafter once per budget (tau vs budget plot; default: as written)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="requests run concurrently (B > 1: aggregate throughput vs HF batched generate)")
    p.add_argument("--out", default="out/experiment",
                   help="output folder (T{t}.partial.jsonl there hold finished prompts until the run is written)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (default: offline unless WANDB_API_KEY)")
    p.add_argument("--wandb-project", default="specdec-experiments", help="W&B project name")
    add_prompt_args(p)
    add_model_args(p, many_temperatures=True)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, with YAML values filling whatever the command line left at its default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        defaults = parser.parse_args([])
        for key, value in values.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, list(value) if key in LIST_KEYS and isinstance(value, list) else
                        [value] if key in LIST_KEYS else value)
    args.drafter = args.drafter or ["ngram"]
    args.temperature = [float(t) for t in (args.temperature or [0.0])]
    return args


def grid_from_args(args: argparse.Namespace) -> Grid:
    return Grid(
        drafters=tuple(args.drafter), budgets=tuple(args.budget or ()), temperatures=tuple(args.temperature),
        max_new_tokens=args.max_new_tokens, multi_turn=args.multi_turn, chat=args.chat, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed or 0, acceptance=args.acceptance, num_blocks=args.num_blocks,
        block_size=args.block_size, spec_defaults=spec_defaults(args), paths=spec_paths(args),
        batch_size=args.batch_size, model=args.model, cost_model=auto_cost_model(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(parse_args(argv))
    except KeyboardInterrupt:
        print("\nexperiments/run.py: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"experiments/run.py: error: {error_line(err)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    grid = grid_from_args(args)
    grid.methods()  # a bad spec fails here, before the model loads
    from specdec.app.experiment import discard_journals, format_tables, log_to_wandb, run_experiment, write_outputs
    from specdec.app.loaders import load_prompt_set, load_target

    prompts = load_prompt_set(args)
    target, tokenizer = load_target(args)
    result = run_experiment(target, tokenizer, prompts, grid, args.out)
    print(format_tables(result))
    paths = write_outputs(result, args.out)
    if not result.complete:
        done = sum(r.n_done for r in result.reports)
        print(f"experiments/run.py: interrupted: wrote the partial results ({done} prompt runs) to {args.out}; run "
              "the same command again to resume", file=sys.stderr)
        return 130
    discard_journals(result, args.out)
    config = {"grid": asdict(grid), "model": args.model, "prompts": args.prompts, "dataset": args.dataset,
              "n_prompts": len(prompts)}
    log_to_wandb(result, args.out, paths, config, enabled=not args.no_wandb, project=args.wandb_project)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
