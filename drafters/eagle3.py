"""EAGLE-3 heads as published (SafeAILab/EAGLE ``cnets.Model``), run by specdec's EAGLE tree machinery.

The head reads a FUSION of three target layers: the inputs of decoder layers ``2``, ``L // 2`` and ``L - 3`` (HF
``hidden_states[i]`` for those ``i``), concatenated ``[3 H_t]`` and projected by ``fc`` to ``[H]``. Its one layer
(``midlayer``) normalises the token embedding (``input_layernorm``) and the feature (``hidden_norm``) separately,
attends over their concatenation ``[2H]`` (``q/k/v_proj`` take ``2H``), adds the attention output to the
un-normalised feature, then the usual MLP block. Next-token logits are ``lm_head(norm(out))`` over the draft
vocabulary, draft index ``i`` being target token ``i + d2t[i]``. Deeper draft nodes take their parent's ``out``
(before ``norm``) as their feature, with no ``fc``.

:class:`Eagle3Drafter` reuses :class:`~specdec.drafters.eagle.EagleDrafter` (catch-up of real pairs, paged
one-layer cache, chain / best-first trees); its ``accept`` needs the FUSED features ``[S, 3 H_t]`` (see
:func:`fused_features`). The engine passes only the last hidden state today, so with the engine it fails in its
first ``accept`` with an error that says so; it runs wherever the fused features are passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from specdec.attention import ATTENTION_NAME, ForwardContext
from specdec.draft_vocab import check_vocab_ids, expand_logits
from specdec.drafters import formats
from specdec.drafters.eagle import EagleDrafter, tree_shape
from specdec.drafters.registry import Option, register, resolve_path
from specdec.packed_linear import PackedLinear

if TYPE_CHECKING:
    from specdec.target import TargetModel


def fused_layers(num_layers: int) -> tuple[int, int, int]:
    """Indices into HF ``hidden_states`` that EAGLE-3 fuses (low, middle, high) for a ``num_layers``-layer target."""
    layers = sorted({2, num_layers // 2, num_layers - 3})
    if len(layers) != 3 or layers[0] != 2:
        raise ValueError(f"EAGLE-3 fuses the inputs of target layers 2, L//2 and L-3, three distinct layers only "
                         f"for L >= 7; the target has {num_layers} layers")
    return layers[0], layers[1], layers[2]


def fused_features(hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """``[..., T, 3 H_t]`` from the ``L + 1`` hidden states an HF forward returns with ``output_hidden_states``."""
    return torch.cat([hidden_states[i] for i in fused_layers(len(hidden_states) - 1)], dim=-1)


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of an EAGLE-3 head: head width ``H``, target width ``H_t``, vocabulary ``V``, draft vocabulary ``N``
    and the Llama-layer config (JSON dict) of its ``midlayer``."""

    hidden_size: int
    target_hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    layer_config: dict[str, Any] = field(default_factory=dict)

    def text_config(self):
        d = dict(self.layer_config)
        d.pop("transformers_version", None)
        return AutoConfig.for_model(d.pop("model_type"), **d)


class _MidLayer(nn.Module):
    """EAGLE-3's ``LlamaDecoderLayeremb`` (parameter names as published)."""

    def __init__(self, config) -> None:
        super().__init__()
        h = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx=0)
        for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads),
                            ("v_proj", config.num_key_value_heads)):
            setattr(self.self_attn, name, nn.Linear(2 * h, heads * self.self_attn.head_dim, bias=False))
        self.mlp = LlamaMLP(config)
        self.hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)


class Eagle3Head(nn.Module):
    """``fc``, ``midlayer``, ``norm``, ``lm_head`` as in the published checkpoints.

    Args:
        config: sizes and the layer config.
        target: supplies the token embedding (unless ``embed`` is given) and device / dtype.
        vocab_ids: ``[N]`` int64 sorted target ids of the draft vocabulary (row order of ``lm_head``).
        embed: ``[V, H]`` the checkpoint's own embedding (heads narrower than the target ship one), or ``None``.
    """

    def __init__(self, config: Eagle3Config, target: TargetModel, vocab_ids: torch.Tensor,
                 embed: torch.Tensor | None = None) -> None:
        super().__init__()
        h, ht = config.hidden_size, config.target_hidden_size
        factory = {"dtype": target.dtype, "device": target.device}
        self.config = config
        self.layer_config = config.text_config()
        self.layer_config._attn_implementation = ATTENTION_NAME  # the head's own config object
        self.fc = nn.Linear(3 * ht, h, bias=False, **factory)
        self.midlayer = _MidLayer(self.layer_config).to(**factory)
        self.norm = LlamaRMSNorm(h, eps=self.layer_config.rms_norm_eps).to(**factory)
        # packed for float32 CPU drafting (bfloat16 where faster); the same ``lm_head.weight`` parameter, trained and
        # saved as a Linear's
        self.lm_head = PackedLinear(nn.Linear(h, config.draft_vocab_size, bias=False, **factory), approximate=True)
        self.rotary = LlamaRotaryEmbedding(config=self.layer_config).to(target.device)
        ids = check_vocab_ids(vocab_ids.to(target.device), config.vocab_size)
        self.register_buffer("vocab_ids", None if ids.numel() == config.vocab_size else ids, persistent=False)
        if embed is None:
            embedding = target.model.get_input_embeddings()
            if embedding.weight.shape[1] != h:
                raise ValueError(f"the EAGLE-3 head is {h} wide and ships no embed_tokens.weight; the target's "
                                 f"embedding is {embedding.weight.shape[1]} wide")
        else:
            if tuple(embed.shape) != (config.vocab_size, h):
                raise ValueError(f"embed_tokens.weight is {tuple(embed.shape)}, the head needs "
                                 f"{(config.vocab_size, h)}")
            embedding = nn.Embedding.from_pretrained(embed.to(**factory), freeze=True)
        object.__setattr__(self, "embed_tokens", embedding)  # used, never saved

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                specdec: ForwardContext) -> torch.Tensor:
        """``out [T, H]`` for pairs ``features [T, H]`` (``fc`` of fused target features, or a parent's ``out``) and
        ``tokens [T]`` int64 at RoPE ``positions [T]``; K/V go to ``specdec``'s one-layer cache."""
        return self.forward_with(features[None], tokens[None], positions[None], ATTENTION_NAME, specdec=specdec)[0]

    def forward_with(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, attention: str,
                     **attention_kwargs: Any) -> torch.Tensor:
        """Batched :meth:`forward` through any function registered with transformers' ``AttentionInterface`` (the
        trainer's training-time-test mask): ``features [B, T, H]``, ``tokens``/``positions [B, T]`` -> ``[B, T, H]``."""
        layer = self.midlayer
        x = features.to(self.fc.weight.dtype)
        emb = self.embed_tokens(tokens).to(x.dtype)
        both = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(x)], dim=-1)
        previous, self.layer_config._attn_implementation = self.layer_config._attn_implementation, attention
        try:
            attn = layer.self_attn(both, position_embeddings=self.rotary(x, positions), attention_mask=None,
                                   **attention_kwargs)[0]
        finally:
            self.layer_config._attn_implementation = previous
        h = x + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` draft-vocabulary logits of ``out [..., H]``."""
        return self.lm_head(self.norm(out.to(self.fc.weight.dtype)))

    def full_logits(self, out: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits over the target vocabulary (``-inf`` outside the draft vocabulary)."""
        return expand_logits(self.logits(out), self.vocab_ids, self.config.vocab_size)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the head in EAGLE-3's published layout (``config.json`` + ``model.safetensors`` with ``d2t``/``t2d``),
        which :func:`load_eagle3_head` reads: what specdec trains is what the reference code would load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.config
        raw = {k: v for k, v in c.layer_config.items() if k not in ("_name_or_path", "transformers_version")}
        raw.update({"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
                    "hidden_size": c.hidden_size, "target_hidden_size": c.target_hidden_size,
                    "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size,
                    "torch_dtype": str(self.fc.weight.dtype).removeprefix("torch."),
                    "kind": "eagle3"})  # specdec's checkpoint kind; the reference loader ignores unknown keys
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        ids = torch.arange(c.vocab_size) if self.vocab_ids is None else self.vocab_ids.cpu()
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        state.update({"d2t": ids - torch.arange(ids.numel()), "t2d": t2d})
        save_file(state, str(path / "model.safetensors"))

    @classmethod
    def untrained(cls, target: TargetModel, vocab_ids: torch.Tensor | None = None) -> Eagle3Head:
        """A randomly initialised head as wide as ``target`` (its embedding shared) over ``vocab_ids`` (sorted target
        ids; ``None`` = the whole vocabulary)."""
        cfg = target.model.config.get_text_config()
        hidden, vocab = cfg.hidden_size, cfg.vocab_size
        ids = torch.arange(vocab) if vocab_ids is None else vocab_ids
        raw = json.loads(cfg.to_json_string(use_diff=False))
        config = Eagle3Config(hidden, hidden, vocab, ids.numel(), formats.llama_layer_config(raw))
        return cls(config, target, ids)


class Eagle3Drafter(EagleDrafter):
    """:class:`EagleDrafter` over an :class:`Eagle3Head`: ``accept`` takes the fused features ``[S, 3 H_t]`` (rows
    as the protocol's ``hidden``; :func:`fused_features`), projects them with ``fc`` and queues them as the pairs'
    features. Trees, catch-up and cache are :class:`EagleDrafter`'s (the head has the same duck-typed interface)."""

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        fused = 3 * self.head.config.target_hidden_size
        if hidden is None or hidden.ndim != 2 or hidden.shape[-1] != fused:
            got = None if hidden is None else list(hidden.shape)
            raise ValueError(f"EAGLE-3 heads need fused low/mid/high target features [S, {fused}] (the inputs of "
                             f"target layers 2, L//2, L-3 concatenated; the engine passes them when the drafter's "
                             f"feature_layers is set, as load_drafter does); got {got}")
        with torch.inference_mode():
            super().accept(seq_id, tokens, self.head.fc(hidden.to(self.head.fc.weight.dtype)))


def load_eagle3_head(path_or_id: str | Path, target: TargetModel) -> Eagle3Head:
    """An EAGLE-3 head (layout in the module docstring) as an :class:`Eagle3Head` on ``target``."""
    folder = formats.resolve_folder(path_or_id)
    raw = formats.read_json(folder / "config.json")
    state = formats.read_weights(folder, formats.EAGLE_FILES)
    hidden_t, vocab = formats.target_sizes(target)
    formats.check_size(folder, "vocabulary", raw.get("vocab_size"), vocab)
    formats.check_size(folder, "target hidden size", raw.get("target_hidden_size", raw.get("hidden_size")), hidden_t)
    fc = formats.require(state, "fc.weight", folder, "(not an EAGLE-3 head)")
    layers = fused_layers(target.num_layers)
    formats.check_size(folder, f"fused feature size (fc.weight [H, {len(layers)}*H_target])", fc.shape[1],
                       len(layers) * hidden_t)
    draft_vocab = int(raw.get("draft_vocab_size", vocab))
    config = Eagle3Config(hidden_size=raw["hidden_size"], target_hidden_size=hidden_t, vocab_size=vocab,
                          draft_vocab_size=draft_vocab, layer_config=formats.llama_layer_config(raw))
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    vocab_ids = _draft_vocabulary(folder, d2t, t2d, draft_vocab, vocab)
    order = torch.argsort(vocab_ids)  # specdec keeps draft vocabularies sorted: permute the LM-head rows to match
    lm_head = formats.require(state, "lm_head.weight", folder, "[draft_vocab_size, H]")
    formats.check_size(folder, "draft vocabulary (lm_head.weight rows)", lm_head.shape[0], draft_vocab)
    state["lm_head.weight"] = lm_head[order]
    embed = state.pop("embed_tokens.weight", None)
    head = Eagle3Head(config, target, vocab_ids[order], embed)
    formats.load_strict(head, state, folder)
    return head.eval()


def _draft_vocabulary(folder: Path, d2t: torch.Tensor | None, t2d: torch.Tensor | None, size: int,
                      vocab: int) -> torch.Tensor:
    """Target id of each draft index (``i + d2t[i]``, EAGLE-3's map), checked against ``t2d``."""
    if d2t is None:
        if size != vocab:
            raise ValueError(f"{folder}: draft_vocab_size {size} < vocabulary {vocab} needs the d2t map")
        return torch.arange(vocab)
    formats.check_size(folder, "draft vocabulary (d2t)", d2t.numel(), size)
    ids = torch.arange(size) + d2t.long().flatten()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != size:
        raise ValueError(f"{folder}: d2t maps draft ids outside [0, {vocab}) or twice onto one token")
    if t2d is not None:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[ids] = True
        if t2d.numel() != vocab or not torch.equal(t2d.bool().flatten(), mask):
            raise ValueError(f"{folder}: t2d [{t2d.numel()}] does not mark exactly the {size} tokens d2t maps to")
    return ids


@register("eagle3", help="EAGLE-3 head (fused low/mid/high target features, draft vocabulary)", options=(
    Option("path", str, None, "a head in EAGLE-3's layout (a folder; 'shipped' = trained for the embedded SmolLM2)"),
    Option("tree", str, "dynamic", "draft tree shape", ("chain", "dynamic")),
    Option("depth", int, None, "draft depth (default 4; a dynamic tree with path=shipped: 3)"),
    Option("budget", int, None, "dynamic tree nodes, root included (default 16; 6 with path=shipped)"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, tree="dynamic", depth=None, budget=None, topk=None) -> Eagle3Drafter:
    shape = tree_shape(path, tree, depth, budget, topk)
    path = resolve_path("eagle3", path)
    head = Eagle3Head.untrained(target).eval() if path is None else load_eagle3_head(path, target)
    drafter = Eagle3Drafter(head, backend=target.backend, **shape)
    drafter.feature_layers = fused_layers(target.num_layers)  # the engine passes these layers, concatenated
    return drafter
