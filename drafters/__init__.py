"""Drafters: each proposes token trees through the :class:`specdec.interfaces.Drafter` protocol.

One drafting method per module. :func:`build_drafter` is the explicit registry the CLI and experiments use; a
drafter is named by a spec string ``NAME[:key=value,...]``, e.g. ``ngram``, ``self:layers=8,tree=dynamic``,
``draft-model:path=/models/small,tree=chain,depth=5``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from transformers import AutoModelForCausalLM

from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.self_spec import SelfSpeculativeDrafter
from specdec.interfaces import Drafter
from specdec.target import TargetModel
from specdec.tree_builders import chain_choices, default_choices

DRAFTER_NAMES = ("none", "ngram", "draft-model", "self", "medusa", "eagle")
SHIPPED = "shipped"  # ``path=shipped``: the weights trained for the embedded SmolLM2-135M-Instruct


def shipped_weights(name: str) -> Path:
    """Folder of the trained ``name`` (``eagle`` or ``medusa``) heads shipped for SmolLM2-135M-Instruct."""
    path = Path(str(resources.files("specdec") / "weights" / "smollm2-135m-instruct" / name))
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"no shipped {name} weights (looked in {path})")
    return path


def _resolve(spec: DrafterSpec) -> str | None:
    return str(shipped_weights(spec.name)) if spec.path == SHIPPED else spec.path


@dataclass(frozen=True)
class DrafterSpec:
    """Options of one drafter (the edge-level config; library classes take plain arguments).

    ``tree``: ``chain``, ``dynamic`` (best-first, ``budget`` nodes, ``depth`` levels, ``topk`` per node) or
    ``static`` (the default choices list). ``path``: draft model (``draft-model``) or trained heads
    (``shipped`` = the heads trained for the embedded SmolLM2-135M-Instruct). ``None`` keeps the drafter's own
    default.
    """

    name: str
    path: str | None = None
    layers: int = 6
    heads: int = 3
    tree: str = "chain"
    depth: int | None = None
    budget: int | None = None
    topk: int | None = None

    @classmethod
    def parse(cls, text: str, **defaults: object) -> DrafterSpec:
        """``NAME[:key=value,...]``; ``defaults`` fill keys the string does not set."""
        name, _, rest = text.partition(":")
        if name not in DRAFTER_NAMES:
            raise ValueError(f"unknown drafter {name!r}; choose one of {list(DRAFTER_NAMES)}")
        types = {f.name: f.type for f in fields(cls)}
        values = {k: v for k, v in defaults.items() if v is not None}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in types or key == "name":
                raise ValueError(f"bad drafter option {item!r} in {text!r}; keys: {sorted(set(types) - {'name'})}")
            values[key] = int(value) if str(types[key]).startswith("int") else value
        spec = cls(name, **values)
        if spec.tree not in ("chain", "dynamic", "static"):
            raise ValueError(f"unknown tree shape {spec.tree!r}; choose chain, dynamic or static")
        return spec


def build_drafter(spec: DrafterSpec, target: TargetModel) -> Drafter | None:
    """The drafter for ``spec`` on top of ``target``; ``none`` means autoregressive decoding (``None``)."""
    tree = default_choices() if spec.tree == "static" else spec.tree
    sizes = {"depth": spec.depth, "budget": spec.budget, "topk": spec.topk}
    shape = {"tree": tree, **{k: v for k, v in sizes.items() if v is not None}}
    if spec.name == "none":
        return None
    if spec.name == "ngram":
        ngram = {"max_depth": spec.depth, "max_nodes": spec.budget}
        return NgramDrafter(**{k: v for k, v in ngram.items() if v is not None})
    if spec.name == "self":
        return SelfSpeculativeDrafter(target.model, spec.layers, backend=target.backend, **shape)
    if spec.name == "draft-model":
        if spec.path is None:
            raise ValueError("the draft-model drafter needs a model: --draft-model PATH (or draft-model:path=...)")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=target.dtype).to(target.device).eval()
        except OSError as err:
            raise ValueError(f"unknown draft model {spec.path!r}: {err}") from None
        return DraftModelDrafter(model, backend=target.backend, **shape)
    if spec.name == "medusa":
        return _medusa(spec, target)
    if spec.name == "eagle":
        if spec.tree == "static":
            raise ValueError("the eagle drafter builds chain or dynamic trees, not static ones")
        if spec.path is not None:
            return EagleDrafter.from_pretrained(_resolve(spec), target, backend=target.backend, **shape)
        return EagleDrafter.untrained(target, backend=target.backend, **shape)
    raise ValueError(f"unknown drafter {spec.name!r}; choose one of {list(DRAFTER_NAMES)}")


def _medusa(spec: DrafterSpec, target: TargetModel) -> MedusaDrafter:
    """Trained heads from ``spec.path``, else untrained heads (they run, with low acceptance)."""
    if spec.tree == "dynamic":
        shape = {"budget": spec.budget or 16, "depth": spec.depth, "topk": spec.topk or 4}
    elif spec.tree == "chain":
        shape = {"choices": chain_choices(spec.depth or spec.heads)}
    else:
        shape = {}  # the heads' own static tree (medusa_choices)
    shape = {k: v for k, v in shape.items() if v is not None}
    if spec.path is not None:
        return MedusaDrafter.from_pretrained(_resolve(spec), target, **shape)
    return MedusaDrafter.untrained(target, num_heads=spec.heads, share_lm_head=True, **shape)


__all__ = [
    "DRAFTER_NAMES", "DraftModelDrafter", "DrafterSpec", "EagleDrafter", "MedusaDrafter", "NgramDrafter",
    "SelfSpeculativeDrafter",
    "build_drafter",
]
