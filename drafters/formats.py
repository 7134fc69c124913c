"""Public drafter checkpoints: heads published by the EAGLE and Medusa reference repositories, loaded onto specdec's
drafters from a local folder (or a Hugging Face id already in the local cache; nothing is downloaded).

Layouts (as the reference loaders read them; no conversion command is needed):

* **EAGLE-1/2** (SafeAILab/EAGLE ``cnets1.Model``): ``pytorch_model.bin`` or ``model.safetensors`` with ``fc.weight``
  ``[H, 2H]`` (+ ``fc.bias`` unless ``config.json`` says ``"bias": false``), one Llama decoder layer
  ``layers.0.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, post_attention_layernorm}.weight`` WITHOUT an input
  norm (EAGLE's layer 0 skips it), optionally ``embed_tokens.weight`` ``[V, H]``; ``config.json`` is a Llama config
  with ``num_hidden_layers: 1``. Loaded as an :class:`~specdec.drafters.eagle.EagleHead` (same pairing of features
  and tokens, same positions, target LM head on the predicted feature).
* **EAGLE-3** (``cnets.Model``): ``fc.weight`` ``[H, 3H]`` over three fused target layers, ``midlayer.*``, ``norm``,
  ``lm_head`` ``[N, H]`` and the vocabulary maps ``d2t`` ``[N]`` / ``t2d`` ``[V]``; config adds ``draft_vocab_size``.
  Loaded as an :class:`~specdec.drafters.eagle3.Eagle3Head` (see there for what the engine must supply).
* **Medusa-1** (FasterDecoding/Medusa): ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` with
  ``{k}.{i}.linear.weight/bias`` (``i < medusa_num_layers`` residual blocks) and ``{k}.{medusa_num_layers}.weight``
  ``[V, H]`` per head ``k``; ``config.json`` has ``medusa_num_heads`` / ``medusa_num_layers``. Loaded as
  :class:`~specdec.drafters.medusa.MedusaHeads` with their own LM heads. The heads present in the weights count
  (Medusa's own loader ignores ``medusa_num_heads``, which some uploaded configs get wrong).

Every problem is a ``ValueError`` naming the file or both mismatched sizes (hidden size, vocabulary).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from specdec.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
from specdec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads

if TYPE_CHECKING:
    from specdec.drafters.eagle3 import Eagle3Head
    from specdec.target import TargetModel

FORMATS = ("eagle", "eagle3", "medusa")
EAGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_EAGLE_LAYER = re.compile(r"layers\.0\.(self_attn\.[qkvo]_proj\.weight|mlp\.(gate|up|down)_proj\.weight|"
                          r"post_attention_layernorm\.weight)")
_MEDUSA_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")
# config.json keys of the reference repositories that are not Llama-layer settings
_NOT_LAYER_KEYS = ("architectures", "bias", "draft_vocab_size", "target_hidden_size", "torch_dtype", "dtype",
                   "transformers_version", "_name_or_path")


def resolve_folder(path_or_id: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder: ``path_or_id`` itself, or the snapshot of that Hugging Face id in the local cache
    (``cache_dir``: default HF cache). Never downloads: a missing id fails at once, saying how to fetch it."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; give the checkpoint's folder")
    name = str(path_or_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) is None:
        raise ValueError(f"checkpoint folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, or an unusable cache entry
        raise ValueError(f"{name!r} is neither a local folder nor in the local Hugging Face cache "
                         f"({type(err).__name__}); specdec loads heads offline: run `huggingface-cli download "
                         f"{name}` first") from None


def detect_format(folder: Path) -> str:
    """``"medusa"``, ``"eagle3"`` or ``"eagle"`` from the files and ``config.json`` of a published checkpoint."""
    if any((folder / f).is_file() for f in MEDUSA_FILES):
        return "medusa"
    config = _json(folder / "config.json")
    if "kind" in config:  # specdec's own checkpoints (specdec.checkpoint) declare their kind
        raise ValueError(f"{folder} is a specdec {config['kind']} checkpoint, not a published one: use "
                         f"{config['kind']}:path={folder}")
    if "medusa_num_heads" in config:
        return "medusa"
    if "draft_vocab_size" in config:
        return "eagle3"
    if any((folder / f).is_file() for f in EAGLE_FILES):
        keys = _read_weights(folder, EAGLE_FILES)
        return "eagle3" if any(k.startswith("midlayer.") for k in keys) else "eagle"
    raise ValueError(f"{folder} holds no EAGLE ({' or '.join(EAGLE_FILES)}) or Medusa ({' or '.join(MEDUSA_FILES)}) "
                     "weights")


def load_drafter(path_or_id: str | Path, target: TargetModel, fmt: str = "auto", **options: Any):
    """A drafter on ``target`` from a published checkpoint (``fmt``: ``auto``, ``eagle``, ``eagle3`` or
    ``medusa``); ``options`` go to the drafter's constructor (tree shape, budget, depth, topk ...)."""
    folder = resolve_folder(path_or_id)
    fmt = detect_format(folder) if fmt == "auto" else fmt
    if fmt == "eagle":
        options.setdefault("backend", target.backend)
        return EagleDrafter(load_eagle_head(folder, target), **options)
    if fmt == "eagle3":
        from specdec.drafters.eagle3 import Eagle3Drafter

        options.setdefault("backend", target.backend)
        return Eagle3Drafter(load_eagle3_head(folder, target), **options)
    if fmt == "medusa":
        return MedusaDrafter(load_medusa_heads(folder, target), **options)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose auto or one of {list(FORMATS)}")


# ---------------------------------------------------------------------------------------------------- EAGLE-1/2
def load_eagle_head(path_or_id: str | Path, target: TargetModel) -> EagleHead:
    """An EAGLE-1/2 head (layout in the module docstring) as an :class:`EagleHead` on ``target``'s device/dtype."""
    folder = resolve_folder(path_or_id)
    raw = _json(folder / "config.json")
    state = _read_weights(folder, EAGLE_FILES)
    if any(k.startswith("midlayer.") for k in state):
        raise ValueError(f"{folder} is an EAGLE-3 head (midlayer.* keys): load it with format eagle3")
    layers = raw.get("num_hidden_layers", 1)
    if layers != 1:
        raise ValueError(f"{folder}: EAGLE heads with {layers} decoder layers are not supported (specdec's EAGLE "
                         "drafter runs exactly 1)")
    if raw.get("qkv_bias") or raw.get("attention_bias"):
        raise ValueError(f"{folder}: attention biases (Qwen-style EAGLE heads) are not supported; Llama heads only")
    hidden, vocab = _target_sizes(target)
    _check_size(folder, "hidden size", raw.get("hidden_size"), hidden)
    _check_size(folder, "vocabulary", raw.get("vocab_size"), vocab)
    if "fc.weight" not in state:
        raise ValueError(f"{folder}: no fc.weight, not an EAGLE head")
    _check_size(folder, "hidden size (fc.weight [H, 2H])", state["fc.weight"].shape[0], hidden)
    with_bias = bool(raw.get("bias", True))
    layer_config = _layer_config(raw)
    head = EagleHead(EagleConfig(hidden, vocab, layer_config), target)
    factory = {"dtype": head.fc.weight.dtype, "device": head.fc.weight.device}
    if not with_bias:
        head.fc = nn.Linear(2 * hidden, hidden, bias=False, **factory)
    head.layer.input_layernorm = nn.Identity()  # EAGLE's only layer has index 0: no input norm
    mapped = {"fc.weight": state["fc.weight"]}
    if with_bias:
        mapped["fc.bias"] = _require(state, "fc.bias", folder, '(or "bias": false in config.json)')
    for key, value in state.items():
        if _EAGLE_LAYER.fullmatch(key):
            mapped["layer." + key.removeprefix("layers.0.")] = value
        elif key not in ("fc.weight", "fc.bias", "embed_tokens.weight") and not key.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"{folder}: unexpected key {key!r} for an EAGLE-1/2 head")
    _load_strict(head, mapped, folder)
    _own_embedding(head, state, folder, vocab, hidden, factory)
    return head.eval()


def _layer_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The head layer's transformers config (as the JSON dict :class:`EagleConfig` keeps) from an EAGLE
    ``config.json``; ``head_dim`` is EAGLE's ``hidden_size // num_attention_heads``."""
    from transformers import AutoConfig

    values = {k: v for k, v in raw.items() if k not in _NOT_LAYER_KEYS}
    values["model_type"] = "llama"  # the reference heads are Llama layers whatever the target
    values["num_hidden_layers"] = 1
    values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return json.loads(config.to_json_string(use_diff=False))


def _own_embedding(head: nn.Module, state: dict[str, torch.Tensor], folder: Path, vocab: int, hidden: int,
                   factory: dict[str, Any]) -> None:
    """Use the checkpoint's ``embed_tokens.weight`` (the embedding the head was trained with) when it has one."""
    weight = state.get("embed_tokens.weight")
    if weight is None:
        return
    if tuple(weight.shape) != (vocab, hidden):
        raise ValueError(f"{folder}: embed_tokens.weight is {tuple(weight.shape)}, the target needs "
                         f"{(vocab, hidden)} (vocabulary {vocab}, hidden size {hidden})")
    embedding = nn.Embedding.from_pretrained(weight.to(**factory), freeze=True)
    object.__setattr__(head, "embed_tokens", embedding)  # like the target's: used, not saved


# ---------------------------------------------------------------------------------------------------- EAGLE-3
def load_eagle3_head(path_or_id: str | Path, target: TargetModel) -> Eagle3Head:
    """An EAGLE-3 head (layout in the module docstring) as an :class:`Eagle3Head` on ``target``."""
    from specdec.drafters.eagle3 import Eagle3Config, Eagle3Head, fused_layers

    folder = resolve_folder(path_or_id)
    raw = _json(folder / "config.json")
    state = _read_weights(folder, EAGLE_FILES)
    hidden_t, vocab = _target_sizes(target)
    _check_size(folder, "vocabulary", raw.get("vocab_size"), vocab)
    _check_size(folder, "target hidden size", raw.get("target_hidden_size", raw.get("hidden_size")), hidden_t)
    fc = _require(state, "fc.weight", folder, "(not an EAGLE-3 head)")
    layers = fused_layers(target.num_layers)
    _check_size(folder, f"fused feature size (fc.weight [H, {len(layers)}*H_target])", fc.shape[1],
                len(layers) * hidden_t)
    draft_vocab = int(raw.get("draft_vocab_size", vocab))
    config = Eagle3Config(hidden_size=raw["hidden_size"], target_hidden_size=hidden_t, vocab_size=vocab,
                          draft_vocab_size=draft_vocab, layer_config=_layer_config(raw))
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    vocab_ids = _draft_vocabulary(folder, d2t, t2d, draft_vocab, vocab)
    order = torch.argsort(vocab_ids)  # specdec keeps draft vocabularies sorted: permute the LM-head rows to match
    lm_head = _require(state, "lm_head.weight", folder, "[draft_vocab_size, H]")
    _check_size(folder, "draft vocabulary (lm_head.weight rows)", lm_head.shape[0], draft_vocab)
    state["lm_head.weight"] = lm_head[order]
    embed = state.pop("embed_tokens.weight", None)
    head = Eagle3Head(config, target, vocab_ids[order], embed)
    _load_strict(head, state, folder)
    return head.eval()


def _draft_vocabulary(folder: Path, d2t: torch.Tensor | None, t2d: torch.Tensor | None, size: int,
                      vocab: int) -> torch.Tensor:
    """Target id of each draft index (``i + d2t[i]``, EAGLE-3's map), checked against ``t2d``."""
    if d2t is None:
        if size != vocab:
            raise ValueError(f"{folder}: draft_vocab_size {size} < vocabulary {vocab} needs the d2t map")
        return torch.arange(vocab)
    _check_size(folder, "draft vocabulary (d2t)", d2t.numel(), size)
    ids = torch.arange(size) + d2t.long().flatten()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != size:
        raise ValueError(f"{folder}: d2t maps draft ids outside [0, {vocab}) or twice onto one token")
    if t2d is not None:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[ids] = True
        if t2d.numel() != vocab or not torch.equal(t2d.bool().flatten(), mask):
            raise ValueError(f"{folder}: t2d [{t2d.numel()}] does not mark exactly the {size} tokens d2t maps to")
    return ids


# ---------------------------------------------------------------------------------------------------- Medusa
def load_medusa_heads(path_or_id: str | Path, target: TargetModel) -> MedusaHeads:
    """Medusa-1 heads (layout in the module docstring) on ``target``'s device and dtype."""
    folder = resolve_folder(path_or_id)
    config_file = folder / "config.json"
    raw = _json(config_file) if config_file.is_file() else {}
    state = {k.removeprefix("medusa_head."): v for k, v in _read_weights(folder, MEDUSA_FILES).items()}
    parsed = [_MEDUSA_KEY.fullmatch(k) for k in state]
    bad = [k for k, m in zip(state, parsed, strict=True) if m is None]
    if bad or not state:
        raise ValueError(f"{folder}: unexpected Medusa key(s) {bad[:3]}; expected '{{k}}.{{i}}.linear.weight/bias' "
                         "and '{k}.{num_layers}.weight'")
    heads = sorted({int(m.group(1)) for m in parsed})
    if heads != list(range(len(heads))):
        raise ValueError(f"{folder}: Medusa heads {heads} are not numbered 0..{len(heads) - 1}")
    num_layers = int(raw.get("medusa_num_layers", max(int(m.group(2)) for m in parsed)))
    hidden, vocab = _target_sizes(target)
    for k in heads:
        note = f"(head {k}'s LM head, medusa_num_layers={num_layers})"
        lm = _require(state, f"{k}.{num_layers}.weight", folder, note)
        _check_size(folder, f"hidden size (head {k})", lm.shape[1], hidden)
        _check_size(folder, f"vocabulary (head {k})", lm.shape[0], vocab)
    config = MedusaConfig(hidden, vocab, len(heads), num_layers, share_lm_head=False)
    module = MedusaHeads(config).to(target.device, target.dtype)  # loading casts the published dtype to the target's
    _load_strict(module, {f"heads.{k}": v for k, v in state.items()}, folder)
    return module.eval()


# ---------------------------------------------------------------------------------------------------- plumbing
def _target_sizes(target: TargetModel) -> tuple[int, int]:
    weight = target.model.get_output_embeddings().weight
    return int(weight.shape[1]), int(weight.shape[0])


def _check_size(folder: Path, what: str, theirs: Any, ours: int) -> None:
    if theirs is not None and int(theirs) != ours:
        raise ValueError(f"{folder}: the checkpoint's {what} is {int(theirs)}, the target's is {ours}; "
                         "this head was trained for another model")


def _require(state: dict[str, torch.Tensor], key: str, folder: Path, note: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{folder}: missing weight {key!r} {note}")
    return state[key]


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the published layout: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches inside the layer (heads, intermediate size)
        raise ValueError(f"{folder}: weights do not fit config.json: {str(err).splitlines()[-1].strip()}") from None


def _json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"not a drafter checkpoint: {file} is missing")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first of ``names`` in ``folder`` (safetensors, or a torch pickle read with ``weights_only``)."""
    for name in names:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return dict(load_file(str(file)))
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
            raise ValueError(f"corrupt drafter weights: {file} is not readable ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{file} must hold a state dict of tensors")
        return dict(state)
    raise ValueError(f"no weights in {folder}: expected one of {list(names)}")
