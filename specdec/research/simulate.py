"""Trace-replay acceptance simulator: score any drafter x tree shape x budget with NO target forward.

The real drafter objects run through their protocol (:class:`specdec.interfaces.Drafter`) on a recorded
:class:`specdec.research.trace.Trace`, step by step exactly as :class:`specdec.engine.SpeculativeEngine` drives them:

1. after the prefill: ``accept(seq, [first token], hidden rows of the prompt)``;
2. each step: ``propose`` on the recorded history; the engine's tree checks (root token, ``max_tree_nodes``,
   vocabulary range); the draft path is accepted exactly as far as it matches the recorded greedy trajectory
   (:func:`specdec.acceptance.greedy_accept`: the first child carrying the target's token), the bonus token is the
   next recorded token; ``accept(seq, accepted + bonus, recorded hidden rows of root + accepted)``; statistics
   with :meth:`specdec.stats.RequestStats.record_step`; the output is clipped at EOS / ``max_new_tokens`` by
   :meth:`specdec.request.Request.append` (the engine's own bookkeeping);
3. ``release(seq)`` at the end.

At temperature 0 tau, acceptance by depth and per-category figures therefore equal the engine's up to numerical
differences between a verification pass and the teacher-forced recording (none on the float64 test model; float16
hidden states may flip a model drafter's near-tie). At temperature > 0 see :mod:`specdec.research.sim_estimate` (an
ESTIMATE). The JSON has the bench's fields minus timing, plus a predicted speedup from a measured cost model
(:mod:`specdec.research.cost_model`) and the replay's own wall time.

Usage::

    python -m specdec.research.simulate record --prompts P.jsonl --max-new-tokens 128 --out trace.pt
    python -m specdec.research.simulate replay trace.pt --drafter ngram "eagle:path=shipped,tree=dynamic,budget=8" \\
        --cost cost.json --out sim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.acceptance import greedy_accept
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.request import Request
from specdec.research.trace import PromptTrace, Trace
from specdec.sampling import GREEDY, SamplingParams
from specdec.stats import RequestStats, mean_ci
from specdec.step_draft import check_draft
from specdec.tree import TokenTree


@dataclass
class StepRecord:
    """One replayed step: context length (history incl. root), tree size (nodes incl. root), depth, accepted
    draft tokens and the drafter's wall time for this ``propose``."""

    context: int
    nodes: int
    depth: int
    accepted: int
    draft_s: float


@dataclass
class ReplayResult:
    """One prompt replayed: the engine's ``RequestStats`` (timings zero), the emitted tokens and every step."""

    stats: RequestStats
    tokens: list[int]
    stop_reason: str
    category: str
    steps: list[StepRecord] = field(default_factory=list)


class TraceTooShort(ValueError):
    """A step needed the target's token beyond the recorded lookahead."""


def replay_prompt(trace: Trace, p: PromptTrace, drafter: Drafter | None, seq_id: int = 0,
                  max_new_tokens: int | None = None, max_tree_nodes: int = 64,
                  hidden_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> ReplayResult:
    """Replay one prompt of ``trace`` at temperature 0 (see the module docstring).

    ``max_new_tokens`` (default: the recording's, at most it) caps the output; ``hidden_dtype`` is the dtype the
    drafter receives hidden rows in (the target's dtype, as the engine passes them; default: the recorded one).
    Raises :class:`TraceTooShort` when a step would read past the recorded lookahead.
    """
    cap = trace.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not 1 <= cap <= trace.max_new_tokens:
        raise ValueError(f"max_new_tokens {cap} outside [1, {trace.max_new_tokens}] (the trace's recording)")
    seq = p.tokens
    total, plen = seq.numel(), p.prompt_len
    eos = frozenset(trace.eos_token_ids)
    req = Request(0, seq[:plen].clone(), SamplingParams(max_new_tokens=cap), None, None, arrival=0)
    hidden = p.hidden if hidden_dtype is None else p.hidden.to(hidden_dtype)
    hidden = hidden.to(device)
    vocab = int(trace.meta["vocab_size"])
    result = ReplayResult(req.stats, [], "length", p.category)
    need_hidden = drafter is not None and drafter.needs_hidden
    first = int(seq[plen])
    try:
        if drafter is not None:
            drafter.accept(seq_id, torch.tensor([first]), hidden[:plen] if need_hidden else None)
        req.append([first], eos)
        while req.stop_reason is None:
            length = req.length
            root = int(seq[length - 1])
            t0 = time.perf_counter()
            if drafter is None:
                draft = Draft(TokenTree.chain([root]))
            else:
                [draft] = drafter.propose([DraftInput(seq_id, req.history[:length], req.params, None)])
            draft_s = time.perf_counter() - t0
            check_draft(draft, root, max_tree_nodes, vocab)
            tree = draft.tree
            want = torch.full((tree.num_nodes,), -1, dtype=torch.long)  # target argmax after each node
            known = tree.depth + length < total
            want[known] = seq[(tree.depth + length)[known]]
            verdict = greedy_accept(tree, want)
            accepted = verdict.num_accepted
            if length + accepted >= total:
                raise TraceTooShort(
                    f"prompt of {plen} tokens: a step at history length {length} accepted {accepted} draft tokens "
                    f"and needs the target's token at position {length + accepted}, past the {total} recorded; "
                    f"record with a lookahead >= the deepest tree ({tree.max_depth})")
            tokens = verdict.tokens
            if drafter is not None:
                rows = hidden[length - 1 : length + accepted] if need_hidden else None
                drafter.accept(seq_id, tokens, rows)
            has_children = bool((tree.parents == verdict.path[-1]).any())
            req.stats.record_step(accepted, has_children, tree.num_nodes)
            result.steps.append(StepRecord(length, tree.num_nodes, tree.max_depth, accepted, draft_s))
            req.append(tokens.tolist(), eos)
    finally:
        if drafter is not None:
            drafter.release(seq_id)
    req.stats.new_tokens = len(req.output)
    result.tokens, result.stop_reason = list(req.output), req.stop_reason
    return result


def replay(trace: Trace, drafter: Drafter | None, max_new_tokens: int | None = None, max_tree_nodes: int = 64,
           hidden_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> list[ReplayResult]:
    """Every prompt of ``trace`` in order, one at a time (as ``specdec bench`` runs them), sequence ids 0, 1, ..."""
    return [replay_prompt(trace, p, drafter, i, max_new_tokens, max_tree_nodes, hidden_dtype, device)
            for i, p in enumerate(trace.prompts)]


def summarize_replay(name: str, results: Sequence[ReplayResult], cost=None, estimate: bool = False) -> dict:
    """The bench's per-run JSON fields minus timing (``tau``, ``tau_mean_ci``, ``acceptance_by_depth``,
    ``accepted_length_hist``, ``n_prompts``, ``per_category``), plus ``predicted_speedup`` (median over prompts of
    the cost model's specdec-AR step time per token over the predicted speculative time per token; ``None``
    without a cost model) and ``estimate`` (True: first-order T > 0 estimate, not an exact replay)."""
    from specdec.app.report import short_label

    total = RequestStats.combine([r.stats for r in results])
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_cat[r.category].append(i)
    speedups = [predicted_speedup(r, cost) for r in results] if cost is not None else None
    per_cat = {}
    for c, idx in by_cat.items():
        per_cat[c] = {"tau": RequestStats.combine([results[i].stats for i in idx]).tau, "n": len(idx)}
        if speedups is not None:
            per_cat[c]["predicted_speedup"] = statistics.median(speedups[i] for i in idx)
    return {
        "name": name, "label": short_label(name), "estimate": estimate, "tau": total.tau,
        "tau_mean_ci": mean_ci([r.stats.tau for r in results]),
        "acceptance_by_depth": total.acceptance_by_depth, "accepted_length_hist": total.accepted_hist,
        "steps": total.steps, "new_tokens": total.new_tokens,
        "mean_tree_nodes": total.tree_nodes / total.steps if total.steps else 0.0,
        "n_prompts": len(results), "per_category": per_cat,
        "predicted_speedup": statistics.median(speedups) if speedups else None,
        "replay_draft_s": sum(s.draft_s for r in results for s in r.steps),
    }


def predicted_speedup(result: ReplayResult, cost) -> float:
    """Cost-model speedup of one replayed request over specdec's autoregressive decoding of the same tokens:
    ``sum_steps verify(1, ctx) * tokens / sum_steps (draft + verify(nodes, ctx))``, the draft time being the
    drafter's measured ``propose`` time in this replay (it runs the real drafter)."""
    spec = sum(cost.draft_time(s.depth, measured=s.draft_s) + cost.verify_time(s.nodes, s.context)
               for s in result.steps)
    ar = sum(cost.verify_time(1, s.context + k) for s in result.steps for k in range(s.accepted + 1))
    return ar / spec if spec > 0 else 0.0


def _with_budget(text: str, budget: int):
    """``(name, spec)`` of drafter spec ``text`` with its ``budget`` key set (replaced if present)."""
    from specdec.drafters import DrafterSpec

    name, _, opts = text.partition(":")
    items = [o for o in opts.split(",") if o and not o.startswith("budget=")] + [f"budget={budget}"]
    new = f"{name}:{','.join(items)}"
    return new, DrafterSpec.parse(new)


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
    from specdec.research.cost_model import CostModel
    from specdec.research.sim_estimate import estimate_replay
    from specdec.research.trace import record_trace

    target, tok, eos = _load_target(args.model)
    if args.action == "record":
        prompts = load_prompts(args.prompts or builtin_prompts_path(), args.limit)
        ids = [encode_prompt(tok, p.text, not args.no_chat) for p in prompts]
        trace = record_trace(target, ids, args.max_new_tokens, eos, [p.category for p in prompts], args.lookahead,
                             args.topk, model_name=args.model or "embedded SmolLM2-135M-Instruct")
        trace.save(args.out)
        print(f"recorded {len(ids)} prompts in {trace.meta['record_s']:.1f}s -> {args.out}", file=sys.stderr)
        return 0
    trace = Trace.load(args.trace)
    cost = CostModel.load(args.cost) if args.cost else None
    specs = []
    for text in args.drafter:
        spec = DrafterSpec.parse(text)
        for b in args.budget if spec.tree == "dynamic" and args.budget else [None]:
            specs.append((text, spec) if b is None else _with_budget(text, b))
    if args.auto_budget and cost is None:
        raise SystemExit("--auto-budget needs --cost (python -m specdec.research.cost_model calibrate)")
    if args.auto_budget:
        specs += [(f"{name}+auto", spec) for name, spec in specs]
    sampling = SamplingParams(args.temperature, seed=args.seed) if args.temperature > 0 else GREEDY
    runs = []
    for name, spec in specs:
        drafter = build_drafter(spec, target)
        if name.endswith("+auto"):
            from specdec.research.auto_budget import AutoBudgetDrafter

            base = name.removesuffix("+auto")
            drafter = AutoBudgetDrafter(drafter, cost, drafter_name=base if base in cost.draft_coef else None,
                                        max_nodes=args.max_tree_nodes)
        t0 = time.perf_counter()
        if sampling.greedy:
            results = replay(trace, drafter, args.max_new_tokens, args.max_tree_nodes, target.dtype, target.device)
        else:
            results = estimate_replay(trace, drafter, sampling, args.max_new_tokens, args.max_tree_nodes,
                                      target.dtype, target.device)
        run = summarize_replay(name, results, cost, estimate=not sampling.greedy)
        run["replay_s"] = time.perf_counter() - t0
        runs.append(run)
        print(f"{run['label']:<28} tau {run['tau']:.3f}{' (estimate)' if run['estimate'] else ''}  "
              f"predicted speedup {run['predicted_speedup'] or float('nan'):.2f}  replay {run['replay_s']:.1f}s",
              file=sys.stderr)
    report = {"trace": {k: v for k, v in trace.meta.items()}, "n_prompts": len(trace.prompts),
              "sampling": {"temperature": sampling.temperature, "seed": sampling.seed}, "runs": runs}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
