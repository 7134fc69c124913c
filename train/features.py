"""EAGLE-3 training features: ONE teacher-forced target forward per example of any data folder.

Generation (token ids, :mod:`specdec.train.data`) and teacher-forced text (:mod:`specdec.train.teacher`) only
store ids; this step adds what the EAGLE-3 trainer reads, so the two are decoupled (features for the shards of a
generation job that is still running are computed later; a rerun picks up the shards that appeared since).

Per example, rows ``i = 0 .. R-1`` at the sequence position that PREDICTS response token ``i`` (position
``P - 1 + i``, the convention of :mod:`specdec.train.data`):

=================  ===========================  ========================================  =================
column             type                         meaning                                   bytes per token
=================  ===========================  ========================================  =================
``fused``          float16 ``[R, 3 H]``         HF ``hidden_states[l]`` for the low / mid /  ``6*H`` (3456)
                                                high layers of :func:`~specdec.drafters.
                                                eagle3.fused_layers`, concatenated
``topk_values``    float16 ``[R, k]``           the target's ``k`` largest logits          ``2*k``
``topk_indices``   int32 ``[R, k]``             their ids (``[:, 0]`` = the target's argmax)  ``4*k``
=================  ===========================  ========================================  =================

plus the input's ``index``, ``prompt``, ``prompt_ids``, ``response_ids``. Output shard ``shard_NNNNN`` holds the
features of input shard ``shard_NNNNN`` (written to a temporary folder, then renamed); ``manifest.json`` lists the
finished ones, so a rerun skips them (no duplicates) and an interrupted shard is redone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Features, load_from_disk
from transformers import PreTrainedModel

from specdec.drafters.eagle3 import fused_layers
from specdec.train.data import ID_COLUMNS, _left_pad, save_shard


def feature_columns(hidden_size: int, topk: int) -> Features:
    return Features({**ID_COLUMNS,
                     "fused": Array2D(shape=(None, 3 * hidden_size), dtype="float16"),
                     "topk_values": Array2D(shape=(None, topk), dtype="float16"),
                     "topk_indices": Array2D(shape=(None, topk), dtype="int32")})


@torch.no_grad()
def fused_target_features(model: PreTrainedModel, prompt_ids: list[list[int]], response_ids: list[list[int]],
                          topk: int) -> list[dict[str, np.ndarray]]:
    """One left-padded forward for a batch; per example ``fused`` ``[R, 3H]`` float16 and ``topk_values`` /
    ``topk_indices`` ``[R, k]`` at the rows predicting the response tokens. The LM head runs on those rows only."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    ids, mask = _left_pad(seqs, 0, model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                      use_cache=False)
    layers = fused_layers(len(out.hidden_states) - 1)
    width, items = ids.shape[1], []
    for b, resp in enumerate(response_ids):
        rows = slice(width - len(resp) - 1, width - 1)
        fused = torch.cat([out.hidden_states[i][b, rows] for i in layers], dim=-1)
        values, indices = model.get_output_embeddings()(out.last_hidden_state[b, rows]).float().topk(topk, dim=-1)
        items.append({"fused": fused.to(torch.float16).cpu().numpy(),
                      "topk_values": values.to(torch.float16).cpu().numpy(),
                      "topk_indices": indices.to(torch.int32).cpu().numpy()})
    return items


def compute_features(model: PreTrainedModel, in_dir: str | Path, out_dir: str | Path, topk: int = 8,
                     batch_tokens: int = 2048, max_shards: int | None = None, log=None) -> Path:
    """Features (module docstring) of every finished shard of ``in_dir`` not yet in ``out_dir``; at most
    ``max_shards`` new shards this call. Examples are batched by length, ``batch_tokens`` padded tokens per
    forward (an example longer than that goes alone)."""
    if topk < 1 or batch_tokens < 1:
        raise ValueError(f"need topk >= 1 and batch_tokens >= 1, got {topk}, {batch_tokens}")
    src, out = Path(in_dir), Path(out_dir)
    if not (src / "manifest.json").is_file():
        raise ValueError(f"no data in {src} (manifest.json missing)")
    out.mkdir(parents=True, exist_ok=True)
    hidden = int(model.config.hidden_size)
    layers = list(fused_layers(model.config.num_hidden_layers))
    settings = {"source": str(src.resolve()), "topk": topk, "layers": layers,
                "hidden_size": hidden}
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old["config"] != settings:
            raise ValueError(f"{out} holds features made with {old['config']}, not {settings}: use a fresh --out")
        shards = old["shards"]
    done = {s["name"] for s in shards}
    todo = [s for s in json.loads((src / "manifest.json").read_text())["shards"] if s["name"] not in done]
    columns = feature_columns(hidden, topk)
    model.eval()
    for shard in todo[:max_shards]:
        t0 = time.perf_counter()
        rows = load_from_disk(str(src / shard["name"])).with_format("numpy", dtype=None)
        data = {k: [] for k in columns}
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["response_ids"]))
        order = [i for i in order if len(rows[i]["response_ids"]) > 0]
        forwarded = 0
        while order:
            batch = [order.pop(0)]
            while order and (len(batch) + 1) * _length(rows[order[0]]) <= batch_tokens:
                batch.append(order.pop(0))
            ex = [rows[i] for i in batch]
            p_ids = [[int(t) for t in r["prompt_ids"]] for r in ex]
            r_ids = [[int(t) for t in r["response_ids"]] for r in ex]
            feats = fused_target_features(model, p_ids, r_ids, topk)
            forwarded += sum(len(p) + len(r) for p, r in zip(p_ids, r_ids, strict=True))
            for r, p, resp, f in zip(ex, p_ids, r_ids, feats, strict=True):
                row = {"index": int(r["index"]), "prompt": str(r["prompt"]), "prompt_ids": p, "response_ids": resp,
                       **f}
                for key in columns:
                    data[key].append(row[key])
        size = save_shard(out, shard["name"], data, columns)  # replaces a half-written earlier attempt
        seconds = time.perf_counter() - t0
        shards.append({"name": shard["name"], "rows": len(data["index"]), "bytes": size,
                       "response_tokens": sum(map(len, data["response_ids"])), "forward_tokens": forwarded,
                       "seconds": round(seconds, 2)})
        _write_manifest(manifest_path, settings, shards)
        if log is not None:
            log(f"{shard['name']}: {shards[-1]['response_tokens']} response tokens in {seconds:.0f} s "
                f"({3600 * shards[-1]['response_tokens'] / seconds:.0f} response tokens/hour)")
    _write_manifest(manifest_path, settings, shards)
    return out


def _length(row: dict) -> int:
    return len(row["prompt_ids"]) + len(row["response_ids"])


def _write_manifest(path: Path, settings: dict, shards: list[dict]) -> None:
    tokens, seconds = sum(s["response_tokens"] for s in shards), sum(s["seconds"] for s in shards)
    manifest = {"config": settings, "num_examples": sum(s["rows"] for s in shards), "num_shards": len(shards),
                "response_tokens": tokens, "total_bytes": sum(s["bytes"] for s in shards),
                "response_tokens_per_hour": round(3600 * tokens / seconds) if seconds else 0, "shards": shards}
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="EAGLE-3 features (fused low/mid/high hidden states + target top-k) of a "
                                        "data folder, one teacher-forced forward per example; reruns resume")
    p.add_argument("--data", required=True, help="a 'data' or 'teacher' output folder (required, no default)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json; required, no default)")
    p.add_argument("--topk", type=int, default=8, help="target logits kept per position")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", default=None, help="HF id or folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")


def cmd_features(args: argparse.Namespace) -> None:
    from specdec.app.args import check_device
    from specdec.app.loaders import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, device=check_device(args.device))
    out = compute_features(model, args.data, args.out, args.topk, args.batch_tokens, args.max_shards,
                           log=lambda m: print(m, flush=True))
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"{out}: {manifest['num_examples']} examples, {manifest['response_tokens']} response tokens with features")
