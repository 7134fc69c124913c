"""``specdec certify`` (light command module: argparse only; the work is in :mod:`specdec.research.certify`)."""

from __future__ import annotations

import argparse

HELP = "losslessness certificate: PIT of every sampled token under the target, KS/AD uniformity tests and a plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--drafter", nargs="+", default=["none", "ngram"],
                        help="drafter specs ('none' = plain sampling)")
    parser.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    parser.add_argument("--limit", type=int, default=None, help="first K prompts (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="samples per prompt (seeds seed, seed + 1, ...)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p filter (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    parser.add_argument("--acceptance", choices=["exact", "typical_lossy"], default="exact",
                        help="acceptance rule to certify")
    parser.add_argument("--max-batch", type=int, default=16, help="requests sampled concurrently")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance level of the verdict")
    parser.add_argument("--out", default=None, help="JSON report (default: none)")
    parser.add_argument("--plot", default=None, help="PIT histogram PNG (default: none)")


def run(args: argparse.Namespace) -> int:
    from specdec.research.certify import run_command

    return run_command(args)
