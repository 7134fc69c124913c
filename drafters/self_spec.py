"""Self-speculative drafter (LayerSkip / Draft & Verify idea): the target's first ``L`` layers, its final norm and
its LM head draft; no extra weights.

The draft model is a *view* of the target: new outer module objects whose layer list is the first ``L`` decoder
layers of the target; embeddings, layers, norm and LM head are the target's own modules (no copy; tested). The
view shares the target's config object, and Llama-style models run ``layers[:num_hidden_layers]``, so the shorter
layer list is what runs. Drafting then goes through :class:`DraftModelDrafter` with its own ``L``-layer cache.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from specdec.drafters.draft_model import DraftModelDrafter, tree_shape
from specdec.drafters.registry import Option, register


def truncated_view(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A causal LM running the first ``num_layers`` decoder layers of ``model``; shares every parameter."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"self-speculation needs a decoder with a 'layers' list; {type(decoder).__name__} has none")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"draft layers must be in [1, {len(layers)}], got {num_layers}")
    inner = copy.copy(decoder)
    inner._modules = dict(decoder._modules)  # our own module table: changing it leaves the target untouched
    inner.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    outer = copy.copy(model)
    outer._modules = dict(model._modules)
    for name, module in model.named_children():
        if module is decoder:
            setattr(outer, name, inner)
    return outer


class SelfSpeculativeDrafter(DraftModelDrafter):
    """Draft with the target's first ``num_layers`` layers (same options as :class:`DraftModelDrafter`)."""

    def __init__(self, target_model: PreTrainedModel, num_layers: int, **kwargs) -> None:
        super().__init__(truncated_view(target_model, num_layers), **kwargs)
        self.num_layers = num_layers


@register("self", help="the target's first layers draft (no extra weights)", options=(
    Option("layers", int, 6, "target layers the draft runs"),
    Option("tree", str, "chain", "draft tree shape", ("chain", "dynamic", "static")),
    Option("depth", int, None, "draft depth"),
    Option("budget", int, None, "dynamic tree nodes, root included"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, layers=6, tree="chain", depth=None, budget=None, topk=None) -> SelfSpeculativeDrafter:
    return SelfSpeculativeDrafter(target.model, layers, backend=target.backend,
                                  **tree_shape(tree, depth, budget, topk))
