"""Self-distillation data: the target answers instruction prompts with its own chat template, and we keep its tokens.

Drafters (Medusa heads, EAGLE, small draft models) are trained on the target's *own* outputs, so that what they learn
to predict is what the target would say. :func:`generate_distillation_data` runs batched HF ``model.generate``
(greedy by default) and stores, per example (one row of a :mod:`datasets` dataset):

=================  ==========================  ================================================  ==================
column             type                        meaning                                           bytes per token
=================  ==========================  ================================================  ==================
``index``          int64                       position of the prompt in the (shuffled) list     -
``prompt``         string                      the instruction (a conversation: JSON)            -
``prompt_ids``     list[int32]                 chat-templated prompt tokens                      4 (prompt tokens)
``response_ids``   list[int32]                 the target's answer, cut after its first EOS      4
``hidden``         float16 ``[R, H]`` (opt.)   last hidden state (after the final norm)          ``2*H``
``topk_values``    float16 ``[R, k]`` (opt.)   the ``k`` largest next-token logits (raw)         ``2*k``
``topk_indices``   int32 ``[R, k]`` (opt.)     their token ids                                   ``4*k``
=================  ==========================  ================================================  ==================

``R = len(response_ids)``. Row ``i`` of ``hidden`` / ``topk_*`` is taken at the position that *predicts* response
token ``i`` (sequence position ``len(prompt_ids) - 1 + i``): ``hidden[i]`` is what the LM head read to produce
``response_ids[i]`` and, under greedy decoding, ``topk_indices[i, 0] == response_ids[i]``. They come from ONE extra
forward of the target over prompt + response (the ``generate`` pass does not keep them).

Sizes for SmolLM2-135M (``H = 576``): hidden = 1152 bytes/token; top-k = ``6*k`` bytes/token (48 for k = 8); token ids
4 bytes/token. A 256-token answer with hidden + top-8 is about 0.3 MB, so 10k examples ~ 3 GB; ids alone ~ 1 kB.
Measured (CPU, 4 self-instruct/GSM8K prompts, 64 new tokens, hidden + top-8): 1240 bytes per response token on
disk including prompt ids and Arrow overhead, 79 kB per example.

Output layout: ``out_dir/shard_00000, shard_00001, ...`` (``Dataset.save_to_disk``, written to a temporary folder
and renamed, so a shard on disk is complete) and ``out_dir/manifest.json`` (config, counts, bytes). A rerun with the
same prompt order skips the prompts the existing shards already cover (resume); the manifest's generation settings
must match.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Dataset, Features, Value, concatenate_datasets, load_from_disk
from datasets import Sequence as DSequence
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.app.prompts import encode_conversation, encode_prompt

# Settings that change what is stored: a resumed run must use the same ones.
_RESUME_KEYS = ("sources", "field", "max_per_source", "seed", "max_new_tokens", "temperature", "store_hidden",
                "topk_logits", "model")


@dataclass(frozen=True)
class DataConfig:
    """Settings of a distillation-data run.

    Attributes:
        sources: ``"self-instruct"`` (seed tasks; never ``user_oriented_instructions``, which upstream asks not to
            train on), ``"gsm8k"`` (train questions), a local ``.jsonl``/``.json`` file or a Hugging Face dataset id
            (``owner/name``, read from the local cache) whose text column is ``field``.
        field: text column of a file / HF source (default: the first of instruction, question, prompt, text).
        data_dir: folder holding the built-in sources' files (``self-instruct/seed_tasks.jsonl``,
            ``gsm8k/train.jsonl``); relative paths are tried against the cwd, then the project root. ``None``: the
            seed tasks shipped in the package and GSM8K from the Hugging Face hub (a fresh clone needs nothing else).
        max_per_source: keep at most this many prompts of each source (drawn with ``seed``) before mixing, so a
            small source (175 self-instruct tasks) is not drowned by a large one (7,473 GSM8K questions).
        limit: keep the first ``limit`` prompts after shuffling (``None`` = all).
        seed: shuffles the prompt order (and seeds sampling when ``temperature > 0``).
        max_new_tokens / batch_size / temperature: generation settings; ``temperature = 0`` is greedy.
        store_hidden: store the last hidden state per response token (float16, ``2*H`` bytes/token).
        topk_logits: store the top-k logits per response token (0 = none; ``6*k`` bytes/token).
        out_dir / shard_size: where shards go, and at most how many examples each holds.
        model: recorded in the manifest (the model itself is passed to :func:`generate_distillation_data`).
    """

    sources: tuple[str, ...] = ("self-instruct", "gsm8k")
    field: str | None = None
    max_per_source: int | None = None
    data_dir: str | None = None
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 8
    temperature: float = 0.0
    store_hidden: bool = False
    topk_logits: int = 0
    out_dir: str = "out/distill"
    shard_size: int = 256
    model: str | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("need at least one source")
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size),
                            ("shard_size", self.shard_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("limit", self.limit), ("max_per_source", self.max_per_source)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.temperature < 0 or self.topk_logits < 0:
            raise ValueError("temperature and topk_logits must be >= 0")


def prompt_text(prompt: str | dict) -> str:
    """The ``prompt`` column of a prompt: the text itself, or a conversation (``{"turns": [...], "answers": [...]}``,
    user turns and the target's answers, ending with a user turn) as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | dict) -> list[int]:
    """Chat-templated ids of a prompt or a conversation (see :func:`prompt_text`), with the generation prompt."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt).tolist()
    return encode_conversation(tokenizer, list(prompt["turns"]), list(prompt["answers"])).tolist()


def trim_response(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Cut generated ids right after the first EOS (kept); without one all ids are kept."""
    ids = [int(t) for t in ids]
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1]
    return ids


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no EOS token")
    return sorted(ids)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` int64 ids and attention mask, left-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[Sequence[int]],
                   config: DataConfig) -> list[list[int]]:
    """Batched (left-padded) ``model.generate``; returns each response cut after its first EOS, padding removed."""
    eos_ids = _eos_ids(model, tokenizer)
    ids, mask = _left_pad(prompt_ids, tokenizer.pad_token_id, model.device)
    kwargs: dict = {"do_sample": False}
    if config.temperature > 0:
        kwargs = {"do_sample": True, "temperature": config.temperature, "top_k": None, "top_p": None}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                         min_new_tokens=0, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return [trim_response(row[ids.shape[1]:].tolist(), eos_ids) for row in out]


@torch.no_grad()
def target_features(model: PreTrainedModel, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_id: int, store_hidden: bool, topk: int) -> list[dict[str, np.ndarray]]:
    """One forward over prompt + response per batch; per example ``hidden`` ``[R, H]`` float16, ``topk_values``
    ``[R, k]`` float16 and ``topk_indices`` ``[R, k]`` int32, at the positions predicting the response tokens."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    ids, mask = _left_pad(seqs, pad_id, model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=store_hidden)
    width, feats = ids.shape[1], []
    for b, resp in enumerate(response_ids):
        # position j predicts token j+1; response token i sits at width - R + i, so it is predicted at width - R - 1 + i
        rows = slice(width - len(resp) - 1, width - 1)
        item: dict[str, np.ndarray] = {}
        if store_hidden:
            item["hidden"] = out.hidden_states[-1][b, rows].to(torch.float16).cpu().numpy()
        if topk:
            values, indices = out.logits[b, rows].float().topk(topk, dim=-1)
            item["topk_values"] = values.to(torch.float16).cpu().numpy()
            item["topk_indices"] = indices.to(torch.int32).cpu().numpy()
        feats.append(item)
    return feats


# the columns every data folder has (teacher-forced and unpacked corpus folders have only these)
ID_COLUMNS = Features({"index": Value("int64"), "prompt": Value("string"), "prompt_ids": DSequence(Value("int32")),
                       "response_ids": DSequence(Value("int32"))})


def _features(config: DataConfig, hidden_size: int) -> Features:
    cols = dict(ID_COLUMNS)
    if config.store_hidden:
        cols["hidden"] = Array2D(shape=(None, hidden_size), dtype="float16")
    if config.topk_logits:
        cols["topk_values"] = Array2D(shape=(None, config.topk_logits), dtype="float16")
        cols["topk_indices"] = Array2D(shape=(None, config.topk_logits), dtype="int32")
    return Features(cols)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_shard(out_dir: Path, name: str, columns: dict[str, list], features: Features) -> int:
    """Write ``columns`` as the shard ``out_dir/name`` (``Dataset.save_to_disk`` into a temporary folder, then
    renamed over any half-written earlier attempt, so a shard on disk is always complete); returns its bytes."""
    tmp = out_dir / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
    shutil.rmtree(out_dir / name, ignore_errors=True)
    tmp.rename(out_dir / name)
    return _dir_bytes(out_dir / name)


def _shard_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("shard_[0-9]*") if p.is_dir())


def _check_resume(out_dir: Path, config: DataConfig, prompts: Sequence[str]) -> list[dict]:
    """Shard records of a previous run (validated against this one); ``[]`` for a fresh ``out_dir``."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        if _shard_dirs(out_dir):
            raise ValueError(f"{out_dir} has shards but no manifest.json: use a fresh --out")
        return []
    manifest = json.loads(manifest_path.read_text())
    old, new = manifest["config"], json.loads(json.dumps(asdict(config)))
    changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"{out_dir} was made with different settings ({', '.join(changed)}): use a fresh --out")
    shards = manifest["shards"]
    for shard in shards:
        if not (out_dir / shard["name"]).is_dir():
            raise ValueError(f"{out_dir}: shard {shard['name']} listed in manifest.json is missing")
        expected = [prompt_text(p) for p in prompts[shard["start"]: shard["start"] + shard["rows"]]]  # limit shrank
        done = load_from_disk(str(out_dir / shard["name"]))["prompt"]
        if list(done)[: len(expected)] != expected:
            raise ValueError(f"{out_dir}: {shard['name']} holds other prompts than this run: use a fresh --out")
    return shards


def _write_manifest(out_dir: Path, config: DataConfig, shards: list[dict], hidden_size: int) -> dict:
    examples = sum(s["rows"] for s in shards)
    tokens = sum(s["response_tokens"] for s in shards)
    total = sum(s["bytes"] for s in shards)
    manifest = {
        "config": asdict(config), "hidden_size": hidden_size, "num_examples": examples, "num_shards": len(shards),
        "response_tokens": tokens, "total_bytes": total,
        "bytes_per_example": total / examples if examples else 0.0,
        "bytes_per_response_token": total / tokens if tokens else 0.0, "shards": shards,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def generate_distillation_data(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                               prompts: Sequence[str | dict], config: DataConfig) -> Path:
    """Generate (or resume) the dataset described in the module docstring for ``prompts`` (texts, or conversations
    as :func:`prompt_text` describes them) into ``config.out_dir``.

    Sets ``tokenizer.padding_side = "left"`` and, if missing, the pad token to EOS. Returns ``out_dir``."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    hidden_size = int(model.config.hidden_size)
    shards = _check_resume(out_dir, config, prompts)
    start = sum(s["rows"] for s in shards)
    features = _features(config, hidden_size)
    if config.temperature > 0:
        torch.manual_seed(config.seed + start)
    model.eval()
    bar = tqdm(total=len(prompts), initial=min(start, len(prompts)), desc="distill", unit="ex")
    while start < len(prompts):
        chunk = prompts[start: start + config.shard_size]
        columns: dict[str, list] = {name: [] for name in features}
        for b in range(0, len(chunk), config.batch_size):
            texts = chunk[b: b + config.batch_size]
            p_ids = [prompt_ids(tokenizer, t) for t in texts]
            r_ids = generate_batch(model, tokenizer, p_ids, config)
            feats = [{}] * len(texts)
            if config.store_hidden or config.topk_logits:
                feats = target_features(model, p_ids, r_ids, tokenizer.pad_token_id, config.store_hidden,
                                        config.topk_logits)
            for i, (text, p, r, f) in enumerate(zip(texts, p_ids, r_ids, feats, strict=True)):
                row = {"index": start + b + i, "prompt": prompt_text(text), "prompt_ids": p, "response_ids": r, **f}
                for name in features:
                    columns[name].append(row[name])
            bar.update(len(texts))
        name = f"shard_{len(shards):05d}"
        shards.append({"name": name, "start": start, "rows": len(chunk),
                       "bytes": save_shard(out_dir, name, columns, features),
                       "response_tokens": sum(len(r) for r in columns["response_ids"])})
        _write_manifest(out_dir, config, shards, hidden_size)
        start += len(chunk)
    bar.close()
    _write_manifest(out_dir, config, shards, hidden_size)
    return out_dir


def load_distillation_data(out_dir: str | Path | Sequence[str | Path]) -> Dataset:
    """All shards of ``out_dir`` (or of several such folders, in the order given) concatenated, in prompt order.

    ``.with_format("numpy", dtype=None)`` gives the arrays as stored (float16); the plain numpy format upcasts to
    float32, ``.with_format("torch")`` gives tensors."""
    dirs = [Path(out_dir)] if isinstance(out_dir, (str, Path)) else [Path(d) for d in out_dir]
    parts = []
    for folder in dirs:
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"no distillation data in {folder} (manifest.json missing)")
        shards = json.loads(manifest_path.read_text())["shards"]
        if not shards:
            raise ValueError(f"no shards in {folder}")
        parts += [load_from_disk(str(folder / s["name"])) for s in shards]
    if not parts:
        raise ValueError("no distillation data folders given")
    columns = {tuple(sorted(p.column_names)) for p in parts}
    if len(columns) > 1:
        raise ValueError(f"distillation data folders {[str(d) for d in dirs]} hold different columns: {columns}")
    return concatenate_datasets(parts)
