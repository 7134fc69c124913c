"""What the hybrid's model adds, by kind of step: accepted tokens its n-gram / store candidates held and what the
model's tree held, on steps with a history match (``ngram``), with store continuations (``store``) and with neither
(``store-empty``). Runs the hybrid with the model asked on EVERY step (``cost=-1``), so each step says what both
sources would have delivered; "held" is the longest prefix of the accepted tokens (bonus included) among a source's
candidate paths, kept in the merged tree or not. Greedy; prints a table, writes JSON.

    python experiments/hybrid_step_kinds.py --skip 40 --limit 10 --out out/step_kinds.json \\
        --prompts train/corpus/smollm2-135m-instruct/selfprompts-seed4000/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.drafters.draft_paths import held
    from specdec.engine import SpeculativeEngine
    from specdec.target import TargetModel, eos_token_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", required=True, help="JSONL prompt file (prompt, category)")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--drafter", default="hybrid:model=eagle3,path=shipped,store=shipped",
                   help="the hybrid spec (cost=-1 is appended: the model drafts every step)")
    p.add_argument("--out", default="out/step_kinds.json")
    args = p.parse_args()

    model, tokenizer = load_model_and_tokenizer()
    target = TargetModel(model)
    hybrid = build_drafter(DrafterSpec.parse(f"{args.drafter},cost=-1"), target)
    engine = SpeculativeEngine(target, target.new_cache(512, 16), hybrid, eos_token_ids(model, tokenizer))
    steps: list[dict] = []
    accept = hybrid.accept

    def recording(seq_id, tokens, hidden=None):
        state = hybrid._state.get(seq_id)
        if state is not None and state.proposed:
            got = tokens.tolist()
            row = {"accepted": len(got) - 1}
            for source, paths in state.proposed.items():
                if source == "model":
                    row["model"] = held(paths, got)
                else:
                    row.update(ngram=held(paths, got), kind=("ngram" if source != "store" else
                                                 "store" if paths else "store-empty"))
            steps.append(row)
        return accept(seq_id, tokens, hidden)

    hybrid.accept = recording
    for prompt in load_prompts(args.prompts)[args.skip: args.skip + args.limit]:
        engine.generate(encode_prompt(tokenizer, prompt.text), args.max_new_tokens)
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in steps:
        k = kinds[row["kind"]]
        k["steps"] += 1
        for field in ("ngram", "model", "accepted"):
            k[field] += row[field]
        k["best_of_two"] += max(row["ngram"], row["model"])
    table = {kind: {"steps": int(k["steps"]), **{f"{f}_held": k[f] / k["steps"] for f in
                                                  ("ngram", "model", "best_of_two")}} for kind, k in kinds.items()}
    print(f"{'kind':<12} {'steps':>6} {'n-gram/store held':>18} {'model held':>11} {'best of two':>12}")
    for kind, row in sorted(table.items()):
        print(f"{kind:<12} {row['steps']:>6} {row['ngram_held']:>18.2f} {row['model_held']:>11.2f} "
              f"{row['best_of_two_held']:>12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": vars(args), "kinds": table}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
