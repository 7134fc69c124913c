"""The held-out prompt file every measurement since session 6 used, rebuilt from the shared data (never copied into
the repository): Self-Instruct's evaluation-only ``user_oriented_instructions.jsonl``, shuffled with
``random.Random(0)``, the first ``--limit`` records; prompt = instruction, and when the first instance has an
input, a blank line and that input; category = the record's ``motivation_app``.

``out/`` does not survive between sessions, so the file is rebuilt rather than kept:

    python experiments/heldout_prompts.py --limit 24 --out out/heldout24.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "self-instruct" / \
    "user_oriented_instructions.jsonl"


def heldout_records(source: Path, limit: int) -> list[dict]:
    """The first ``limit`` shuffled records as ``{"prompt", "category", "id"}``."""
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(records)
    out = []
    for rec in records[:limit]:
        instance = (rec.get("instances") or [{}])[0]
        text = rec["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else "")
        out.append({"prompt": text, "category": rec["motivation_app"], "id": rec["id"]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/heldout_prompts.py", description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"default: {DEFAULT_SOURCE}")
    ap.add_argument("--limit", type=int, default=24, help="records kept (default: 24)")
    ap.add_argument("--out", type=Path, required=True, help="JSONL prompt file to write")
    args = ap.parse_args(argv)
    if not args.source.is_file():
        ap.error(f"source not found: {args.source} (the shared data folder's self-instruct set)")
    rows = heldout_records(args.source, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts ({len({r['category'] for r in rows})} categories) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
