"""Draft time per step: the drafter's ``propose`` timed on its own (separately from verification) on real prompts.

For each drafter spec two variants run the same prompts, interleaved prompt by prompt and repetition by
repetition (the machine may be loaded; medians over many steps): ``new`` is the shipped code, the other an earlier
code path kept here as the baseline (``--baseline``):

* ``per-node`` (default): EAGLE / Medusa best-first trees built with Python per node through
  :func:`~specdec.tree_builders.best_first_steps`, logits expanded to the full vocabulary before ``log_softmax`` /
  top-k, Medusa's shared LM head applied head by head. Both must propose the same trees.
* ``unpacked``: the heads' linears as plain ``nn.Linear`` (``F.linear``) and exact, as before session 12 (only
  EAGLE-3's LM head and the shared LM-head rows packed, in float32).
* ``float32``: the shipped packing, but exact kernels only (``SPECDEC_DRAFT_PRECISION=float32``): what the
  bfloat16 draft kernel saves. Its trees may differ a little; outputs must not.

Outputs must agree (checked and reported). Prints a table and writes JSON.

    python experiments/draft_cost.py --drafter eagle:path=shipped,tree=dynamic medusa:path=shipped,tree=dynamic \\
        --limit 6 --max-new-tokens 64 --reps 3 --out out/draft_cost.json
    python experiments/draft_cost.py --baseline unpacked --threads 2 --drafter eagle3:path=shipped,budget=4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from specdec.draft_vocab import expand_logits
from specdec.drafters.common import GrowingTree
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.interfaces import Draft
from specdec.linear_kernels import DRAFT_PRECISION_ENV
from specdec.packed_linear import PackedLinear
from specdec.sampling import process_logits, sample
from specdec.tree import TokenTree
from specdec.tree_builders import best_first_steps, best_first_tree, drive_batch, static_tree


class PerNodeEagleDrafter(EagleDrafter):
    """The previous paths: dynamic trees by the per-node Python builder with full-vocabulary ``log_softmax`` and
    top-k; chains one sequence at a time through full-vocabulary logits and ``process_logits``."""

    def _dynamic(self, dseqs, roots, root_out, budgets):
        grown = [GrowingTree(r) for r in roots]
        pred = [{(): row} for row in root_out]

        def expand_batch(requests):
            need = [i for i, r in enumerate(requests) if r is not None and any(p not in pred[i] for p in r)]
            for i in need:
                grown[i].add(requests[i])
            self._forward_new([dseqs[i] for i in need], [grown[i] for i in need], [pred[i] for i in need])
            return [None if r is None else self.head.full_logits(torch.stack([pred[i][p] for p in r])).log_softmax(-1)
                    for i, r in enumerate(requests)]

        builders = [best_first_steps(r, b, self.depth, self.topk) for r, b in zip(roots, budgets, strict=True)]
        return [Draft(tree) for tree, _ in drive_batch(builders, expand_batch)]

    def _chains(self, batch, dseqs, grown, pred):
        v = self.head.config.vocab_size
        rows = [[torch.zeros(v, dtype=self.head.fc.weight.dtype, device=self.cache.device)] for _ in batch]
        for d in range(self.depth):
            for i, item in enumerate(batch):
                path = tuple(grown[i].tokens[1:])
                logits = self.head.full_logits(pred[i][path])
                q = process_logits(logits, item.sampling)
                tok = int(logits.argmax()) if item.sampling.greedy else int(sample(q, item.generator))
                grown[i].add([path + (tok,)])
                rows[i].append(q.to(rows[i][0].dtype))
            if d + 1 < self.depth:
                self._forward_new(dseqs, grown, pred)
        return [Draft(TokenTree.chain(g.tokens), None if item.sampling.greedy else torch.stack(r))
                for g, r, item in zip(grown, rows, batch, strict=True)]


class PerNodeMedusaDrafter(MedusaDrafter):
    """The previous path: the shared LM head once per head, full-vocabulary logits, per-node trees."""

    @torch.inference_mode()
    def propose(self, batch):
        heads = self.heads
        hidden = torch.stack([self._hidden[item.seq_id] for item in batch])
        out = []
        for head in heads.heads:
            first = next(head.parameters(), None)
            h = head(hidden if first is None else hidden.to(first.dtype))
            if heads.shared_weight is not None:
                h = nn.functional.linear(h.to(heads.shared_weight.dtype), heads.shared_weight)
            out.append(h)
        logits = expand_logits(torch.stack(out, dim=-2), heads.vocab_ids, heads.config.vocab_size)
        drafts = []
        for head_logits, item in zip(logits, batch, strict=True):
            root = int(item.history[-1])
            if self.budget is None:
                tree = static_tree(root, self.choices, head_logits.topk(self._ranks, dim=-1).indices)
            else:
                logprobs = head_logits.log_softmax(-1)
                expand = lambda paths, lp=logprobs: lp[[len(p) for p in paths]]  # noqa: E731
                tree, _ = best_first_tree(root, expand, self.budget, self.depth, self.topk)
            drafts.append(Draft(tree))
        return drafts


def per_node(drafter):
    """The same drafter object switched to the previous code path (a fresh one: its own caches)."""
    for new, old in ((EagleDrafter, PerNodeEagleDrafter), (MedusaDrafter, PerNodeMedusaDrafter)):
        if type(drafter) is new:
            drafter.__class__ = old
            return drafter
    raise TypeError(f"no per-node baseline for {type(drafter).__name__}")


def unpacked(drafter):
    """The same drafter with its head's linears back to ``nn.Linear`` (EAGLE-3's LM head stays packed, as before)."""
    module = getattr(drafter, "head", None) or drafter.heads
    for parent in module.modules():
        for name, child in list(parent._modules.items()):
            if isinstance(child, PackedLinear) and not (name == "lm_head" and parent is module):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                parent._modules[name] = linear
    return drafter


@contextlib.contextmanager
def draft_precision(value: str | None):
    """``SPECDEC_DRAFT_PRECISION`` set to ``value`` (read at every product) for the duration; ``None``: unchanged."""
    old = os.environ.get(DRAFT_PRECISION_ENV)
    if value is not None:
        os.environ[DRAFT_PRECISION_ENV] = value
    try:
        yield
    finally:
        if value is not None and old is None:
            os.environ.pop(DRAFT_PRECISION_ENV, None)
        elif value is not None:
            os.environ[DRAFT_PRECISION_ENV] = old


BASELINES = {"per-node": (per_node, None), "unpacked": (unpacked, "float32"), "float32": (lambda d: d, "float32")}


class Timed:
    """Wraps a drafter's ``propose``: wall time per call (one call = one engine step) and the proposed trees;
    ``precision``: the draft precision its calls run under."""

    def __init__(self, drafter, precision: str | None = None) -> None:
        self.drafter, self.times, self.trees = drafter, [], []
        inner = drafter.propose

        def propose(batch):
            t0 = time.perf_counter()
            with draft_precision(precision):
                drafts = inner(batch)
            self.times.append(time.perf_counter() - t0)
            self.trees += [(d.tree.tokens.tolist(), d.tree.parents.tolist()) for d in drafts]
            return drafts

        drafter.propose = propose


def run(target, tokenizer, spec: str, prompts: list[str], max_new_tokens: int, reps: int,
        baseline: str = "per-node") -> dict:
    from specdec.app.prompts import encode_prompt
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.target import eos_token_ids

    eos = eos_token_ids(target.model, tokenizer)
    make, precision = BASELINES[baseline]
    variants = {"new": Timed(build_drafter(DrafterSpec.parse(spec), target)),
                baseline: Timed(make(build_drafter(DrafterSpec.parse(spec), target)), precision)}
    engines = {k: SpeculativeEngine(target, target.new_cache(512, 16), v.drafter, eos) for k, v in variants.items()}
    encoded = [encode_prompt(tokenizer, p, True) for p in prompts]
    for e in engines.values():
        e.generate(encoded[0], 4)  # warm-up
    for v in variants.values():
        v.times.clear()
        v.trees.clear()
    stats = {k: {"steps": 0, "tokens": 0, "verify_s": 0.0} for k in variants}
    same_text = True
    for rep in range(reps):
        for i, ids in enumerate(encoded):
            order = list(variants) if (rep + i) % 2 == 0 else list(variants)[::-1]  # interleave, alternate first
            texts = {}
            for k in order:
                result = engines[k].generate(ids, max_new_tokens)
                texts[k] = result.tokens
                stats[k]["steps"] += result.stats.steps
                stats[k]["tokens"] += len(result.tokens)
                stats[k]["verify_s"] += result.stats.verify_s
            same_text &= texts["new"] == texts[baseline]
    row = {"drafter": spec, "baseline": baseline, "same_outputs": same_text,
           "same_trees": variants["new"].trees == variants[baseline].trees}
    for k, v in variants.items():
        ms = sorted(1000 * t for t in v.times)
        row[k] = {"draft_ms_median": statistics.median(ms), "draft_ms_p25": ms[len(ms) // 4],
                  "draft_ms_p75": ms[3 * len(ms) // 4], "calls": len(ms),
                  "verify_ms_per_step": 1000 * stats[k]["verify_s"] / max(stats[k]["steps"], 1),
                  "tau": stats[k]["tokens"] / max(stats[k]["steps"], 1)}
    row["saved_ms"] = row[baseline]["draft_ms_median"] - row["new"]["draft_ms_median"]
    return row


def micro(target, tokenizer, spec: str, prompts: list[str], reps: int) -> dict:
    """``propose`` alone on a fixed state: after a prompt's prefill the same input is proposed ``reps`` times per
    variant, switching the same drafter object between the new and the per-node path call by call (the caches see
    the same work: each call re-forwards only the root pair and the tree). Less noise than whole generations."""
    from specdec.app.prompts import encode_prompt
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.interfaces import DraftInput

    drafter = build_drafter(DrafterSpec.parse(spec), target)
    new_cls = type(drafter)
    old_cls = type(per_node(drafter))
    times: dict[str, list[float]] = {"new": [], "per-node": []}
    same = True
    for i, text in enumerate(prompts):
        ids = encode_prompt(tokenizer, text, True).flatten()
        with torch.inference_mode():
            hidden = target.model(ids[None], output_hidden_states=True).hidden_states[-1][0]
        drafter.accept(i, ids, hidden[:-1] if issubclass(new_cls, EagleDrafter) else hidden)
        item = [DraftInput(i, ids)]
        drafter.__class__ = new_cls
        drafter.propose(item)  # catch-up of the prompt (not timed)
        trees = {}
        for r in range(2 * reps):
            name = "new" if r % 2 == (i % 2) else "per-node"
            drafter.__class__ = new_cls if name == "new" else old_cls
            t0 = time.perf_counter()
            [draft] = drafter.propose(item)
            times[name].append(time.perf_counter() - t0)
            trees.setdefault(name, (draft.tree.tokens.tolist(), draft.tree.parents.tolist()))
        same &= trees["new"] == trees["per-node"]
        drafter.release(i)
    drafter.__class__ = new_cls
    row = {"drafter": spec, "mode": "micro", "same_trees": same}
    for k, v in times.items():
        ms = sorted(1000 * t for t in v)
        row[k] = {"draft_ms_median": statistics.median(ms), "draft_ms_p25": ms[len(ms) // 4],
                  "draft_ms_p75": ms[3 * len(ms) // 4], "calls": len(ms)}
    row["saved_ms"] = row["per-node"]["draft_ms_median"] - row["new"]["draft_ms_median"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drafter", nargs="+", default=["eagle:path=shipped,tree=dynamic", "eagle:path=shipped",
                                                    "medusa:path=shipped,tree=dynamic",
                                                    "medusa:path=shipped,tree=static"])
    p.add_argument("--prompts", default=None, help="prompt file (default: the built-in set)")
    p.add_argument("--limit", type=int, default=6, help="prompts (first of each category)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--micro", type=int, default=0,
                   help="instead: this many propose calls per variant and prompt on a fixed state (see micro)")
    p.add_argument("--baseline", choices=sorted(BASELINES), default="per-node",
                   help="the earlier code path compared (module docstring; --micro needs per-node)")
    p.add_argument("--out", default="out/draft_cost.json")
    args = p.parse_args()
    if args.micro and args.baseline != "per-node":
        p.error("--micro compares against the per-node path only")
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, load_prompts
    from specdec.target import TargetModel

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(None, torch.float32)
    target = TargetModel(model)
    prompts = [q.text for q in load_prompts(args.prompts or builtin_prompts_path(), None, 1)][: args.limit]
    rows = []
    print(f"{'drafter':<36} {'old ms':>7} {'new ms':>7} {'saved':>6} {'verify ms':>9} {'tau':>5} {'calls':>5} same")
    for spec in args.drafter:
        if args.micro:
            r = micro(target, tokenizer, spec, prompts, args.micro)
            r["new"].update(verify_ms_per_step=float("nan"), tau=float("nan"))
            r["same_outputs"] = True
        else:
            r = run(target, tokenizer, spec, prompts, args.max_new_tokens, args.reps, args.baseline)
        rows.append(r)
        print(f"{spec:<36} {r[args.baseline]['draft_ms_median']:>7.2f} {r['new']['draft_ms_median']:>7.2f} "
              f"{r['saved_ms']:>6.2f} {r['new']['verify_ms_per_step']:>9.2f} {r['new']['tau']:>5.2f} "
              f"{r['new']['calls']:>5} {r['same_outputs'] and r['same_trees']}", flush=True)
    meta = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "reps": args.reps, "micro": args.micro,
            "baseline": args.baseline,
            "threads": args.threads, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
