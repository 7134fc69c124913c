"""``specdec simulate`` (light command module: argparse only; the work is in :mod:`specdec.research.simulate`)."""

from __future__ import annotations

import argparse

HELP = "trace-replay acceptance simulator: record a target trace once, score drafters offline (no target forward)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="record a trace (greedy trajectory, hidden states, top-K logits)")
    rec.add_argument("--model", default=None, help="HF id or folder (default: the embedded SmolLM2)")
    rec.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    rec.add_argument("--limit", type=int, default=None)
    rec.add_argument("--no-chat", action="store_true")
    rec.add_argument("--max-new-tokens", type=int, default=128)
    rec.add_argument("--lookahead", type=int, default=16)
    rec.add_argument("--topk", type=int, default=32)
    rec.add_argument("--feature-layers", default=None,
                     help="also record these HF hidden_states layers fused, for EAGLE-3: 'eagle3' (its low/mid/high "
                          "layers for this model) or a comma list such as 2,15,27 (default: none)")
    rec.add_argument("--out", required=True)
    rep = sub.add_parser("replay", help="score drafters on a trace (no target forward)")
    rep.add_argument("trace")
    rep.add_argument("--model", default=None, help="the traced model (drafters share its embeddings/LM head)")
    rep.add_argument("--drafter", nargs="+", default=["ngram"])
    rep.add_argument("--budget", type=int, nargs="*", default=[], help="sweep: each tree=dynamic drafter per budget")
    rep.add_argument("--max-new-tokens", type=int, default=None)
    rep.add_argument("--max-tree-nodes", type=int, default=64)
    rep.add_argument("--batch", type=int, default=None,
                     help="T = 0: prompts replayed in lockstep, one batched propose per step (1 = one at a time, as "
                          "the bench runs). Default 8, or 1 with --cost: predicted speedups use the measured draft "
                          "times, which batching shares out")
    rep.add_argument("--temperature", type=float, default=0.0, help="> 0: first-order ESTIMATE")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--cost", default=None,
                     help="cost model of the predicted speedups: auto (this machine's measured step cost) or a JSON "
                          "from specdec calibrate (adds prefill and drafter times)")
    rep.add_argument("--auto-budget", action="store_true", help="also each drafter under AutoBudgetDrafter (--cost)")
    rep.add_argument("--out", default=None)


def run(args: argparse.Namespace) -> int:
    from specdec.research.simulate_cli import run_command

    return run_command(args)
