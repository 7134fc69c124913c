"""``specdec generate PROMPT``: stream the answer to stdout, then one statistics line on stderr (``--json``: one JSON
object on stdout instead, for scripts). Ctrl-C stops cleanly and reports the statistics so far (exit 130).

Everything that can be checked before the model loads is: flags, the drafter spec, the prompt and whether the
request fits the KV cache (which only needs the tokenizer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field

from specdec.app.args import add_model_args, auto_cost_model, check_args, parse_spec, spec_defaults, spec_paths

HELP = "generate text for one prompt, streaming, then one statistics line on stderr"
# Measured on the 2-core CPU, idle, each request timed 3 times (docs/results/final/end_b1.json: 8 held-out prompts,
# same run as HF greedy): n-gram 1.22x HF, the hybrid (n-gram + shipped EAGLE head) 1.10x (1.19x with a calibrated
# step cost), the shipped EAGLE head 0.68x. So n-gram is the default on the embedded model too (a single-run
# measurement the session before had put the hybrid first: 1.23x vs 1.07x, within that run's timing noise).
# Re-measured with packed linears (docs/results/session7/bench24.json, 24 held-out prompts, one run): n-gram 1.27x,
# hybrid 1.20x (1 % more tokens per second overall), EAGLE b3 0.97x: still n-gram.
# Session 9 (docs/results/session9/bench24_final.json, the same 24 prompts, each request timed 3 times): n-gram with
# the shipped retrieval store 1.40x HF (36.4 tok/s, tau 2.14) against n-gram alone 1.36x (34.6 tok/s, tau 1.82).
# Session 13 (docs/results/session13/bench24.json, each request timed twice): the store's tree sized by this machine's
# measured step cost (steps=auto) 2.48x HF (41.8 tok/s) against the fixed two-node store tree 2.39x (39.9 tok/s).
DEFAULT_DRAFTER = "ngram"
EMBEDDED_DEFAULT_DRAFTER = "ngram:store=shipped,steps=auto"
INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message (wrapped in the chat template unless --no-chat)")
    p.add_argument("--drafter", default=None,
                   help="NAME[:key=value,...]: none, ngram, hybrid, draft-model, self, medusa, eagle or eagle3, e.g. "
                        f"eagle:path=shipped,tree=dynamic (default: the fastest measured, {EMBEDDED_DEFAULT_DRAFTER} "
                        f"on the embedded model, {DEFAULT_DRAFTER} on any other)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, stop reason, statistics) instead of streaming")
    add_model_args(p)


def cache_blocks_needed(prompt_tokens: int, max_new_tokens: int, tree_nodes: int, block_size: int) -> int:
    return math.ceil((prompt_tokens + max_new_tokens + tree_nodes) / block_size)


def check_cache(prompt_tokens: int, args: argparse.Namespace, tree_nodes: int, what: str = "this prompt") -> None:
    """``ValueError`` suggesting ``--num-blocks N`` if ``what`` cannot fit the KV cache."""
    need = cache_blocks_needed(prompt_tokens, args.max_new_tokens, tree_nodes, args.block_size)
    if need > args.num_blocks:
        raise ValueError(
            f"the KV cache is too small: {what} ({prompt_tokens} tokens) + --max-new-tokens {args.max_new_tokens} "
            f"+ {tree_nodes} draft-tree nodes need {need} blocks of {args.block_size} tokens, the cache has "
            f"{args.num_blocks}: use --num-blocks {need}")


def engine_tree_nodes() -> int:
    """The engine's default per-step tree limit (the KV slots a step may use beyond the committed tokens)."""
    import inspect

    from specdec.engine import SpeculativeEngine

    return int(inspect.signature(SpeculativeEngine).parameters["max_tree_nodes"].default)


@dataclass
class Progress:
    """What has been streamed so far (kept here, so an interrupted run can still report it)."""

    tokens: list[int] = field(default_factory=list)
    printed: int = 0
    start: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run(args: argparse.Namespace) -> int:
    if args.drafter is None:
        args.drafter = EMBEDDED_DEFAULT_DRAFTER if args.model is None else DEFAULT_DRAFTER
    check_args(args)
    if not args.prompt.strip():
        raise ValueError("empty prompt: need at least one token")
    spec = parse_spec(args.drafter, spec_paths(args), spec_defaults(args))
    from specdec.app.loaders import load_target, load_tokenizer
    from specdec.app.prompts import encode_prompt

    tokenizer = load_tokenizer(args.model)
    ids = encode_prompt(tokenizer, args.prompt, args.chat)
    tree_nodes = engine_tree_nodes()
    check_cache(ids.numel(), args, tree_nodes)
    target, tokenizer = load_target(args, tokenizer)

    from specdec.drafters import build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.sampling import SamplingParams
    from specdec.target import eos_token_ids

    drafter = build_drafter(spec, target)
    if auto_cost_model(args) is not None:  # --tree-budget auto
        from specdec.research.auto_budget import wrap_auto_budget

        drafter = wrap_auto_budget(drafter, auto_cost_model(args), args.drafter, tree_nodes, target)
    engine = SpeculativeEngine(
        target, target.new_cache(args.num_blocks, args.block_size), drafter,
        eos_token_ids(target.model, tokenizer), max_tree_nodes=tree_nodes, acceptance=args.acceptance,
    )
    progress = Progress()

    def stream(tokens: list[int]) -> None:
        progress.tokens.extend(tokens)
        if args.json:
            return
        text = tokenizer.decode(progress.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[progress.printed:], end="", flush=True)
            progress.printed = len(text)

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    try:
        result = engine.generate(ids, args.max_new_tokens, on_tokens=stream, sampling=sampling)
    except KeyboardInterrupt:
        _report_interrupted(args, tokenizer, progress)
        return INTERRUPTED
    sizes = getattr(drafter, "chosen", None)  # --tree-budget auto: each step's chosen tree size
    if args.json:
        out = _json_result(args, tokenizer.decode(result.tokens, skip_special_tokens=True), result.tokens,
                           result.stop_reason, result.stats)
        if sizes is not None:
            out["auto_tree_sizes"] = sizes
        print(json.dumps(out))
    else:
        print(flush=True)
        auto = f" | auto budget: {sum(sizes) / max(len(sizes), 1):.1f} nodes/step" if sizes is not None else ""
        print(f"[{args.drafter}] {result.stats.summary()}{auto} | stop: {result.stop_reason}", file=sys.stderr,
              flush=True)
    return 0


def _report_interrupted(args: argparse.Namespace, tokenizer, progress: Progress) -> None:
    n, seconds = len(progress.tokens), progress.seconds
    rate = n / seconds if seconds else 0.0
    if args.json:
        text = tokenizer.decode(progress.tokens, skip_special_tokens=True)
        print(json.dumps({"text": text, "tokens": progress.tokens, "stop_reason": "interrupted",
                          "drafter": args.drafter, "stats": {"new_tokens": n, "total_s": seconds,
                                                             "tokens_per_s": rate}}))
    else:
        print(flush=True)
    print(f"[{args.drafter}] interrupted: {n} tokens in {seconds:.2f}s ({rate:.1f} tok/s) | stop: interrupted",
          file=sys.stderr, flush=True)


def _json_result(args: argparse.Namespace, text: str, tokens: list[int], stop_reason: str, stats) -> dict:
    return {
        "text": text, "tokens": list(tokens), "stop_reason": stop_reason, "drafter": args.drafter,
        "stats": {"new_tokens": stats.new_tokens, "total_s": stats.total_s, "tokens_per_s": stats.tokens_per_s,
                  "tau": stats.tau, "steps": stats.steps, "acceptance_by_depth": stats.acceptance_by_depth,
                  "prefill_s": stats.prefill_s, "draft_s": stats.draft_s, "verify_s": stats.verify_s},
    }
