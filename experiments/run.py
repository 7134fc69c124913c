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

from specdec.app.cli import add_model_args, add_prompt_args, spec_defaults, spec_paths
from specdec.app.experiment import Grid, format_tables, log_to_wandb, run_experiment, write_outputs
from specdec.app.loaders import load_prompt_set, load_target
from specdec.drafters import DRAFTER_NAMES
from specdec.kv_cache import OutOfBlocks

LIST_KEYS = {"drafter", "budget", "temperature"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML file with any of the flags below (flags given win)")
    p.add_argument("--drafter", nargs="+", default=None,
                   help=f"drafter specs NAME[:key=value,...], NAME in {list(DRAFTER_NAMES)} (default: ngram)")
    p.add_argument("--budget", nargs="+", type=int, default=None,
                   help="run every tree=dynamic drafter once per budget (tau vs budget plot)")
    p.add_argument("--out", default="out/experiment", help="output folder")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (default: offline unless WANDB_API_KEY)")
    p.add_argument("--wandb-project", default="specdec-experiments")
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        grid = grid_from_args(args)
        grid.methods()  # a bad spec fails here, before the model loads
        prompts = load_prompt_set(args)
        target, tokenizer = load_target(args)
        result = run_experiment(target, tokenizer, prompts, grid)
        print(format_tables(result))
        paths = write_outputs(result, args.out)
        config = {"grid": asdict(grid), "model": args.model, "prompts": args.prompts, "dataset": args.dataset,
                  "n_prompts": len(prompts)}
        log_to_wandb(result, args.out, paths, config, enabled=not args.no_wandb, project=args.wandb_project)
    except (ValueError, OutOfBlocks, KeyError) as err:
        print(f"experiments/run.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
