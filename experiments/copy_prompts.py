"""Copy-heavy tuning prompts: editing requests over human-written GSM8K train texts (rewrite, correct, reformat).

Answers to these prompts mostly copy their input, the case where prompt lookup shines and where a retrieval store
or a model head can only get in its way. The held-out set has such categories too (rewriting, grammar, sheets);
this file lets a drafter be tuned for them without looking at the held-out prompts. Questions and answers come
from ``gsm8k/train.jsonl`` starting at ``--start`` (default 5000: far from the few questions whose generated
answers are in the shipped store). Writes JSONL (``prompt``, ``category`` = the template's name).

    python experiments/copy_prompts.py --out out/copy_tune.jsonl --per-template 4
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TEMPLATES = {
    "correct": "Correct any spelling or grammar mistakes in the following text and return the corrected text:\n\n{q}",
    "formal": "Rewrite the following text in a more formal tone:\n\n{q}",
    "bullets": "Turn the following text into a bulleted list, one sentence per bullet:\n\n{q}",
    "title": "Give the following text a short title, then repeat the text below the title:\n\n{q}",
    "clean": "Rewrite this solution as plain sentences, without the calculations in double angle brackets:\n\n{a}",
    "names": "Rewrite the following text, replacing every person's name with 'the student':\n\n{q}",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
                   help="folder holding gsm8k/train.jsonl")
    p.add_argument("--start", type=int, default=5000, help="first GSM8K train record used")
    p.add_argument("--per-template", type=int, default=4)
    p.add_argument("--out", default="out/copy_tune.jsonl")
    args = p.parse_args()
    lines = (Path(args.data) / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[args.start:]]
    if len(rows) < args.per_template * len(TEMPLATES):
        raise SystemExit(f"need {args.per_template * len(TEMPLATES)} GSM8K records from {args.start}, "
                         f"found {len(rows)}")
    out = []
    for i in range(args.per_template):  # interleave the templates so --limit keeps a mix
        for j, (name, template) in enumerate(TEMPLATES.items()):
            row = rows[i * len(TEMPLATES) + j]
            answer = re.sub(r"\n#### .*$", "", row["answer"].strip())
            out.append({"prompt": template.format(q=row["question"], a=answer), "category": name})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    print(f"{len(out)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
