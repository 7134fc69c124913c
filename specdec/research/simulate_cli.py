"""``specdec simulate`` / ``python -m specdec.research.simulate``: record a trace, replay drafters on it (the command
side of :mod:`specdec.research.simulate`; arguments in :mod:`specdec.app.cmd_simulate`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from specdec.research.simulate import replay, summarize_replay
from specdec.research.trace import Trace
from specdec.sampling import GREEDY, SamplingParams


def _with_budget(text: str, budget: int):
    """``(name, spec)`` of drafter spec ``text`` with its ``budget`` key set (replaced if present)."""
    from specdec.drafters import DrafterSpec

    name, _, opts = text.partition(":")
    items = [o for o in opts.split(",") if o and not o.startswith("budget=")] + [f"budget={budget}"]
    new = f"{name}:{','.join(items)}"
    return new, DrafterSpec.parse(new)


def _feature_layers(text: str | None, target) -> tuple[int, ...] | None:
    """``--feature-layers``: ``None``, ``eagle3`` (its fused layers for ``target``) or a comma list of ints."""
    if text is None:
        return None
    if text == "eagle3":
        from specdec.drafters.eagle3 import fused_layers

        return fused_layers(target.num_layers)
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--feature-layers takes 'eagle3' or comma-separated integers, got {text!r}") from None
    bad = [i for i in layers if not -target.num_layers - 1 <= i <= target.num_layers]
    if bad:
        raise SystemExit(f"--feature-layers {bad} outside the model's hidden_states [0, {target.num_layers}]")
    return layers


def _load_target(model: str | None):
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.target import TargetModel, eos_token_ids

    m, tok = load_model_and_tokenizer(model, torch.float32)
    return TargetModel(m), tok, eos_token_ids(m, tok)


def main(argv: Sequence[str] | None = None) -> int:
    from specdec.app.cmd_simulate import HELP, add_arguments

    parser = argparse.ArgumentParser(prog="python -m specdec.research.simulate", description=HELP)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """``record`` or ``replay`` (arguments: :func:`specdec.app.cmd_simulate.add_arguments`)."""
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.research.machine_cost import load_cost_model
    from specdec.research.sim_estimate import estimate_replay
    from specdec.research.trace import record_trace

    target, tok, eos = _load_target(args.model)
    if args.action == "record":
        prompts = load_prompts(args.prompts or builtin_prompts_path(), args.limit)
        ids = [encode_prompt(tok, p.text, not args.no_chat) for p in prompts]
        trace = record_trace(target, ids, args.max_new_tokens, eos, [p.category for p in prompts], args.lookahead,
                             args.topk, model_name=args.model or "embedded SmolLM2-135M-Instruct",
                             feature_layers=_feature_layers(args.feature_layers, target))
        trace.save(args.out)
        print(f"recorded {len(ids)} prompts in {trace.meta['record_s']:.1f}s -> {args.out}", file=sys.stderr)
        return 0
    trace = Trace.load(args.trace)
    cost = load_cost_model(args.cost, target) if args.cost else None
    specs = []
    for text in args.drafter:
        spec = DrafterSpec.parse(text)
        for b in args.budget if spec.tree == "dynamic" and args.budget else [None]:
            specs.append((text, spec) if b is None else _with_budget(text, b))
    if args.auto_budget and cost is None:
        raise SystemExit("--auto-budget needs --cost (auto: this machine's step cost; or a calibrate JSON)")
    if args.auto_budget:
        specs += [(f"{name}+auto", spec) for name, spec in specs]
    sampling = SamplingParams(args.temperature, seed=args.seed) if args.temperature > 0 else GREEDY
    runs = []
    batch = args.batch or (1 if cost is not None else 8)
    for name, spec in specs:
        drafter = build_drafter(spec, target)
        if name.endswith("+auto"):  # set up exactly as --tree-budget auto sets it (per-sequence trackers included)
            from specdec.research.auto_budget import auto_budget

            drafter = auto_budget(drafter, cost, name.removesuffix("+auto"), args.max_tree_nodes)
        t0 = time.perf_counter()
        if sampling.greedy:
            results = replay(trace, drafter, args.max_new_tokens, args.max_tree_nodes, target.dtype, target.device,
                             batch)
        else:
            results = estimate_replay(trace, drafter, sampling, args.max_new_tokens, args.max_tree_nodes,
                                      target.dtype, target.device)
        run = summarize_replay(name, results, cost, estimate=not sampling.greedy)
        run["replay_s"] = time.perf_counter() - t0
        runs.append(run)
        print(f"{run['label']:<28} tau {run['tau']:.3f}{' (estimate)' if run['estimate'] else ''}  "
              f"predicted speedup {run['predicted_speedup'] or float('nan'):.2f}  replay {run['replay_s']:.1f}s",
              file=sys.stderr)
    report = {"trace": {k: v for k, v in trace.meta.items()}, "n_prompts": len(trace.prompts), "replay_batch": batch,
              "sampling": {"temperature": sampling.temperature, "seed": sampling.seed}, "runs": runs}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0
