"""``specdec calibrate`` (light command module: argparse only; the work is in :mod:`specdec.research.cost_model`)."""

from __future__ import annotations

import argparse

HELP = "measure the cost model for --tree-budget auto: verify time by tree size and context, draft time per level"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="tree sizes timed")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 768], help="cached contexts timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per point")
    parser.add_argument("--prefill", type=int, nargs="*", default=[32, 128, 512],
                        help="prompt lengths whose prefill is timed (the replay adds each prompt's prefill to both "
                             "sides of a predicted speedup, as the bench's per-prompt tok/s do; none: skip)")
    parser.add_argument("--timing", choices=["step", "forward"], default="step",
                        help="what a grid point times: a whole engine step with a rejected tree of that size (what a "
                             "drafter pays per node), or the target's forward alone (cheaper by the step's "
                             "acceptance and KV bookkeeping)")
    parser.add_argument("--statistic", choices=["median", "min"], default="min",
                        help="per point: min (default: a noisy machine adds time, never removes it; on a VM whose "
                             "speed drifts, the median grid had a lone root dearer than 2 nodes and the replay came "
                             "out 4-19 %% optimistic, the min grid 1-5 %%) or median")
    parser.add_argument("--verify-model", choices=["fit", "grid"], default="grid",
                        help="verify time from the linear fit, or interpolated from the measured grid (set in the "
                             "JSON as from_grid; better at n = 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while measuring (default: torch's own; --tree-budget auto runs should "
                             "use the same)")
    parser.add_argument("--drafter", nargs="*", default=[],
                        help="drafter specs whose propose time to fit (greedy engine runs; default: none, then "
                             "--tree-budget auto uses each step's measured time)")
    parser.add_argument("--prompts", default=None, help="prompts of the drafter runs (default: the built-in set)")
    parser.add_argument("--limit", type=int, default=2, help="prompts per drafter run")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per drafter-run prompt")
    parser.add_argument("--out", required=True,
                        help="the cost-model JSON to write (pass it as --cost-model; required, no default)")


def run(args: argparse.Namespace) -> int:
    for flag, values in (("--sizes", args.sizes), ("--contexts", args.contexts), ("--repeats", [args.repeats]),
                         ("--limit", [args.limit]), ("--max-new-tokens", [args.max_new_tokens]),
                         ("--threads", [args.threads or 1])):
        if min(values) < 1:
            raise ValueError(f"{flag} must be >= 1, got {min(values)}")
    if len(set(args.sizes)) < 2 or len(set(args.contexts)) < 2:
        raise ValueError("the verify fit needs at least two --sizes and two --contexts")
    if args.prefill and (len(set(args.prefill)) < 2 or min(args.prefill) < 1):
        raise ValueError(f"--prefill needs at least two prompt lengths >= 1 (or none to skip), got {args.prefill}")
    from specdec.research.cost_model import run_calibrate

    return run_calibrate(args)
