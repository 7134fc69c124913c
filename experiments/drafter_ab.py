"""Drafter specs against the first one, interleaved prompt by prompt: a quick sweep of tree shapes or options.

Every spec gets its own engine on one target; for each prompt the specs generate greedily in turn (order reversed
on every other prompt, so machine drift hits all alike). Per spec it reports the median over prompts of the first
spec's time / this spec's time (``speedup_over_first``), summed tokens per second, tau, verification ms per step
(median over prompts), tree nodes per step, the median ``propose`` time and how many outputs equal the first spec's
(greedy: all must). No HF baseline (``specdec bench`` has one): use ``none`` first for ratios over specdec's
autoregressive decoding. Prints a table, writes JSON.

    python experiments/drafter_ab.py none eagle3:path=shipped,budget=6,depth=3 eagle3:path=shipped,budget=4 \\
        --prompts out/tune32_s4000.jsonl --limit 12 --max-new-tokens 96 --out out/shapes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SpecResult:
    """One spec's row (``per_prompt_s``: generation wall time per prompt, in prompt order)."""

    spec: str
    speedup_over_first: float
    tokens_per_s: float
    tau: float
    verify_ms_per_step: float
    nodes_per_step: float
    propose_ms: float
    same_as_first: int
    per_prompt_s: list[float] = field(default_factory=list)


def main() -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.target import TargetModel, eos_token_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("specs", nargs="+", help="drafter specs; 'none' = autoregressive; the first is the reference")
    p.add_argument("--prompts", required=True, help="JSONL prompt file (prompt, category)")
    p.add_argument("--skip", type=int, default=0, help="skip the first K prompts")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default="out/drafter_ab.json")
    args = p.parse_args()

    model, tokenizer = load_model_and_tokenizer()
    target = TargetModel(model)
    eos = eos_token_ids(model, tokenizer)
    prompts = [q.text for q in load_prompts(args.prompts)][args.skip : args.skip + args.limit]
    encoded = [encode_prompt(tokenizer, text) for text in prompts]
    engines, propose_s = {}, {}
    for spec in args.specs:
        drafter = None if spec == "none" else build_drafter(DrafterSpec.parse(spec), target)
        times = propose_s[spec] = []
        if drafter is not None:
            inner = drafter.propose

            def timed(batch, inner=inner, times=times):
                t0 = time.perf_counter()
                out = inner(batch)
                times.append(time.perf_counter() - t0)
                return out

            drafter.propose = timed
        engines[spec] = SpeculativeEngine(target, target.new_cache(512, 16), drafter, eos)
    for spec, engine in engines.items():  # warm-up (kernel choices, caches)
        engine.generate(encoded[0], 8)
        propose_s[spec].clear()
    runs: dict[str, list] = {spec: [] for spec in engines}
    for i, ids in enumerate(encoded):
        for spec in list(engines) if i % 2 == 0 else list(engines)[::-1]:
            t0 = time.perf_counter()
            result = engines[spec].generate(ids, args.max_new_tokens)
            runs[spec].append((time.perf_counter() - t0, result))
    first = args.specs[0]
    rows = []
    print(f"{'spec':<64} {'speedup':>7} {'tok/s':>6} {'tau':>5} {'verify ms':>9} {'nodes':>5} {'draft ms':>8} same")
    for spec, done in runs.items():
        secs = [s for s, _ in done]
        stats = [r.stats for _, r in done]
        row = SpecResult(
            spec=spec,
            speedup_over_first=statistics.median(a / b for (a, _), b in zip(runs[first], secs, strict=True)),
            tokens_per_s=sum(len(r.tokens) for _, r in done) / sum(secs),
            tau=sum(len(r.tokens) for _, r in done) / max(1, sum(s.steps for s in stats)),
            verify_ms_per_step=1e3 * statistics.median(s.verify_s / max(1, s.steps) for s in stats),
            nodes_per_step=sum(s.tree_nodes for s in stats) / max(1, sum(s.steps for s in stats)),
            propose_ms=1e3 * statistics.median(propose_s[spec]) if propose_s[spec] else 0.0,
            same_as_first=sum(r.tokens == f.tokens for (_, r), (_, f) in zip(done, runs[first], strict=True)),
            per_prompt_s=secs)
        rows.append(row)
        print(f"{spec:<64} {row.speedup_over_first:>7.3f} {row.tokens_per_s:>6.2f} {row.tau:>5.2f} "
              f"{row.verify_ms_per_step:>9.1f} {row.nodes_per_step:>5.2f} {row.propose_ms:>8.2f} "
              f"{row.same_as_first}/{len(encoded)}", flush=True)
    meta = {"prompts": args.prompts, "skip": args.skip, "limit": len(encoded), "max_new_tokens": args.max_new_tokens}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n",
                              encoding="utf-8")


if __name__ == "__main__":
    main()
