"""A/B two target configurations on the same drafters and prompts, interleaved so machine noise hits both alike.

For every prompt, repetition and drafter, the engine generates greedily once with target A and once with target B
(order alternating), and the wall time of each ``generate`` is kept. Per drafter it reports the median over
prompts of B's time / A's time (each prompt's median over repetitions), the summed tokens per second of each, and
whether both produced the same tokens. The two targets share one HF model; only ``TargetModel`` keywords differ
(``--a`` / ``--b`` as ``key=value``: ``packed=false``, ``split_gemv=true`` ...). Prints a table, writes JSON.

    python experiments/target_ab.py --a packed=false --b packed=true --drafter none ngram \\
        "eagle:path=shipped,tree=dynamic,budget=8,depth=5" --prompts out/heldout.jsonl --reps 3 --out out/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _kwargs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        out[key] = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    return out


def main() -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.engine import SpeculativeEngine
    from specdec.target import TargetModel, eos_token_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", nargs="*", default=["packed=false"], help="TargetModel keywords of A (key=value)")
    p.add_argument("--b", nargs="*", default=["packed=true"], help="TargetModel keywords of B (key=value)")
    p.add_argument("--drafter", nargs="+", default=["none", "ngram"], help="drafter specs ('none': autoregressive)")
    p.add_argument("--prompts", default=None, help="JSONL prompt file (default: the built-in set)")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="out/target_ab.json")
    args = p.parse_args()

    model, tok = load_model_and_tokenizer(None, torch.float32)
    eos = eos_token_ids(model, tok)
    targets = {"A": TargetModel(model, **_kwargs(args.a)), "B": TargetModel(model, **_kwargs(args.b))}
    prompts = [encode_prompt(tok, q.text) for q in load_prompts(args.prompts or builtin_prompts_path(), args.limit)]
    rows = []
    for spec in args.drafter:
        times: dict[str, list[list[float]]] = {k: [[] for _ in prompts] for k in targets}
        tokens: dict[str, list[int]] = {k: [0] * len(prompts) for k in targets}
        same = 0
        for i, prompt in enumerate(prompts):
            outs = {}
            for rep in range(args.reps):
                for name in (("A", "B") if rep % 2 == 0 else ("B", "A")):
                    target = targets[name]
                    drafter = None if spec == "none" else build_drafter(DrafterSpec.parse(spec), target)
                    cache = target.new_cache(-(-(prompt.numel() + args.max_new_tokens + 80) // 16), 16)
                    engine = SpeculativeEngine(target, cache, drafter, eos)
                    t0 = time.perf_counter()
                    result = engine.generate(prompt, args.max_new_tokens)
                    times[name][i].append(time.perf_counter() - t0)
                    outs[name], tokens[name][i] = result.tokens, len(result.tokens)
            same += outs["A"] == outs["B"]
        med = {k: [statistics.median(t) for t in v] for k, v in times.items()}
        ratios = [b / a for a, b in zip(med["A"], med["B"], strict=True)]
        row = {"drafter": spec, "ratio_b_over_a": statistics.median(ratios),
               "tok_s_a": sum(tokens["A"]) / sum(med["A"]), "tok_s_b": sum(tokens["B"]) / sum(med["B"]),
               "same": same, "prompts": len(prompts), "median_s": med}
        rows.append(row)
        print(f"{spec:<48} A {row['tok_s_a']:6.2f} tok/s  B {row['tok_s_b']:6.2f} tok/s  time B/A "
              f"{row['ratio_b_over_a']:.3f}  same {same}/{len(prompts)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "reps": args.reps,
                                          "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
