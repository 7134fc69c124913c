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
from specdec.drafters.registry import Option, register

if TYPE_CHECKING:
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
    config = read_json(folder / "config.json")
    if "kind" in config:  # specdec's own checkpoints (specdec.checkpoint) declare their kind
        raise ValueError(f"{folder} is a specdec {config['kind']} checkpoint, not a published one: use "
                         f"{config['kind']}:path={folder}")
    if "medusa_num_heads" in config:
        return "medusa"
    if "draft_vocab_size" in config:
        return "eagle3"
    if any((folder / f).is_file() for f in EAGLE_FILES):
        keys = read_weights(folder, EAGLE_FILES)
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
        from specdec.drafters.eagle3 import Eagle3Drafter, fused_layers, load_eagle3_head

        options.setdefault("backend", target.backend)
        drafter = Eagle3Drafter(load_eagle3_head(folder, target), **options)
        drafter.feature_layers = fused_layers(target.num_layers)  # the engine passes these layers, concatenated
        return drafter
    if fmt == "medusa":
        return MedusaDrafter(load_medusa_heads(folder, target), **options)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose auto or one of {list(FORMATS)}")


# ---------------------------------------------------------------------------------------------------- EAGLE-1/2
def load_eagle_head(path_or_id: str | Path, target: TargetModel) -> EagleHead:
    """An EAGLE-1/2 head (layout in the module docstring) as an :class:`EagleHead` on ``target``'s device/dtype."""
    folder = resolve_folder(path_or_id)
    raw = read_json(folder / "config.json")
    state = read_weights(folder, EAGLE_FILES)
    if any(k.startswith("midlayer.") for k in state):
        raise ValueError(f"{folder} is an EAGLE-3 head (midlayer.* keys): load it with format eagle3")
    layers = raw.get("num_hidden_layers", 1)
    if layers != 1:
        raise ValueError(f"{folder}: EAGLE heads with {layers} decoder layers are not supported (specdec's EAGLE "
                         "drafter runs exactly 1)")
    if raw.get("qkv_bias") or raw.get("attention_bias"):
        raise ValueError(f"{folder}: attention biases (Qwen-style EAGLE heads) are not supported; Llama heads only")
    hidden, vocab = target_sizes(target)
    check_size(folder, "hidden size", raw.get("hidden_size"), hidden)
    check_size(folder, "vocabulary", raw.get("vocab_size"), vocab)
    if "fc.weight" not in state:
        raise ValueError(f"{folder}: no fc.weight, not an EAGLE head")
    check_size(folder, "hidden size (fc.weight [H, 2H])", state["fc.weight"].shape[0], hidden)
    with_bias = bool(raw.get("bias", True))
    layer_config = llama_layer_config(raw)
    head = EagleHead(EagleConfig(hidden, vocab, layer_config), target)
    factory = {"dtype": head.fc.weight.dtype, "device": head.fc.weight.device}
    if not with_bias:
        head.fc = nn.Linear(2 * hidden, hidden, bias=False, **factory)
    head.layer.input_layernorm = nn.Identity()  # EAGLE's only layer has index 0: no input norm
    mapped = {"fc.weight": state["fc.weight"]}
    if with_bias:
        mapped["fc.bias"] = require(state, "fc.bias", folder, '(or "bias": false in config.json)')
    for key, value in state.items():
        if _EAGLE_LAYER.fullmatch(key):
            mapped["layer." + key.removeprefix("layers.0.")] = value
        elif key not in ("fc.weight", "fc.bias", "embed_tokens.weight") and not key.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"{folder}: unexpected key {key!r} for an EAGLE-1/2 head")
    load_strict(head, mapped, folder)
    _own_embedding(head, state, folder, vocab, hidden, factory)
    return head.eval()


def llama_layer_config(raw: dict[str, Any]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------------- Medusa
def load_medusa_heads(path_or_id: str | Path, target: TargetModel) -> MedusaHeads:
    """Medusa-1 heads (layout in the module docstring) on ``target``'s device and dtype."""
    folder = resolve_folder(path_or_id)
    config_file = folder / "config.json"
    raw = read_json(config_file) if config_file.is_file() else {}
    state = {k.removeprefix("medusa_head."): v for k, v in read_weights(folder, MEDUSA_FILES).items()}
    parsed = [_MEDUSA_KEY.fullmatch(k) for k in state]
    bad = [k for k, m in zip(state, parsed, strict=True) if m is None]
    if bad or not state:
        raise ValueError(f"{folder}: unexpected Medusa key(s) {bad[:3]}; expected '{{k}}.{{i}}.linear.weight/bias' "
                         "and '{k}.{num_layers}.weight'")
    heads = sorted({int(m.group(1)) for m in parsed})
    if heads != list(range(len(heads))):
        raise ValueError(f"{folder}: Medusa heads {heads} are not numbered 0..{len(heads) - 1}")
    num_layers = int(raw.get("medusa_num_layers", max(int(m.group(2)) for m in parsed)))
    hidden, vocab = target_sizes(target)
    for k in heads:
        note = f"(head {k}'s LM head, medusa_num_layers={num_layers})"
        lm = require(state, f"{k}.{num_layers}.weight", folder, note)
        check_size(folder, f"hidden size (head {k})", lm.shape[1], hidden)
        check_size(folder, f"vocabulary (head {k})", lm.shape[0], vocab)
    config = MedusaConfig(hidden, vocab, len(heads), num_layers, share_lm_head=False)
    module = MedusaHeads(config).to(target.device, target.dtype)  # loading casts the published dtype to the target's
    load_strict(module, {f"heads.{k}": v for k, v in state.items()}, folder)
    return module.eval()


# ---------------------------------------------------------------------------------------------------- plumbing
def target_sizes(target: TargetModel) -> tuple[int, int]:
    weight = target.model.get_output_embeddings().weight
    return int(weight.shape[1]), int(weight.shape[0])


def check_size(folder: Path, what: str, theirs: Any, ours: int) -> None:
    if theirs is not None and int(theirs) != ours:
        raise ValueError(f"{folder}: the checkpoint's {what} is {int(theirs)}, the target's is {ours}; "
                         "this head was trained for another model")


def require(state: dict[str, torch.Tensor], key: str, folder: Path, note: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{folder}: missing weight {key!r} {note}")
    return state[key]


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the published layout: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches inside the layer (heads, intermediate size)
        raise ValueError(f"{folder}: weights do not fit config.json: {str(err).splitlines()[-1].strip()}") from None


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"not a drafter checkpoint: {file} is missing")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def read_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
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


@register("published", help="EAGLE-1/2 or Medusa heads in their reference repositories' layouts (local folder or "
                            "cached HF id)", options=(
    Option("path", str, None, "the checkpoint folder, or a Hugging Face id already in the local cache"),
    Option("format", str, "auto", "checkpoint layout", ("auto", *FORMATS)),
    Option("tree", str, None, "draft tree shape (EAGLE: chain, dynamic; Medusa: chain, dynamic, static)"),
    Option("depth", int, None, "draft depth"),
    Option("budget", int, None, "dynamic tree nodes, root included"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, format="auto", tree=None, depth=None, budget=None, topk=None):  # noqa: A002
    if path is None:
        raise ValueError("the published drafter needs a checkpoint: published:path=FOLDER_OR_HF_ID")
    folder = resolve_folder(path)
    fmt = detect_format(folder) if format == "auto" else format
    if fmt == "eagle3":
        shape = {"tree": tree or "chain", "depth": depth, "budget": budget, "topk": topk}
        return load_drafter(folder, target, "eagle3", **{k: v for k, v in shape.items() if v is not None})
    if fmt == "medusa":
        from specdec.tree_builders import chain_choices

        heads = load_medusa_heads(folder, target)
        if tree == "dynamic":
            return MedusaDrafter(heads, budget=budget or 16, depth=depth, topk=topk or 4)
        if tree in (None, "static"):
            return MedusaDrafter(heads)  # Medusa's own static tree for the heads' count
        return MedusaDrafter(heads, choices=chain_choices(depth or heads.config.num_heads))
    if tree == "static":
        raise ValueError("EAGLE heads build chain or dynamic trees, not static ones")
    sizes = {"depth": depth, "budget": budget, "topk": topk}
    shape = {"tree": tree or "dynamic", **{k: v for k, v in sizes.items() if v is not None}}
    return load_drafter(folder, target, fmt, **shape)
