"""The EAGLE-1/2 head: ``fc(cat(embed(x_{t+1}), h_t))`` through ONE decoder layer of the target's own architecture
predicts the next feature ``h_{t+1}``; the target's LM head (its draft-vocabulary rows, if the head has one) turns
it into next-token logits. See :mod:`specdec.drafters.eagle` for the drafter that runs it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig

from specdec.attention import ATTENTION_NAME, ForwardContext
from specdec.checkpoint import read_checkpoint, save_checkpoint
from specdec.draft_vocab import check_vocab_ids, expand_logits
from specdec.packed_linear import PackedWeight

if TYPE_CHECKING:
    from specdec.target import TargetModel


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE head.

    Attributes:
        hidden_size: ``H``, the target's hidden size.
        vocab_size: ``V``, the target's vocabulary size.
        layer_config: the target's text config as a JSON dict (``model_type`` included): rebuilds the decoder layer.
        draft_vocab_size: ``N``, the head scores only ``N`` target tokens (:mod:`specdec.draft_vocab`, rows
            ``vocab_ids`` of the target's LM head; the ids are saved as the ``vocab_ids`` buffer); 0 = all.
    """

    hidden_size: int
    vocab_size: int
    layer_config: dict[str, Any] = field(default_factory=dict)
    draft_vocab_size: int = 0

    @classmethod
    def from_target(cls, target: TargetModel) -> EagleConfig:
        cfg = target.model.config.get_text_config()
        return cls(cfg.hidden_size, cfg.vocab_size, json.loads(cfg.to_json_string(use_diff=False)))

    def text_config(self):
        """A fresh transformers config object for the layer (its own object: the head switches its attention)."""
        d = dict(self.layer_config)
        d.pop("transformers_version", None)
        return AutoConfig.for_model(d.pop("model_type"), **d)


class EagleHead(nn.Module):
    """``fc = Linear(2H, H)`` then one decoder layer; predicts the next feature.

    Args:
        config: sizes and the layer's config.
        target: supplies the input embeddings and LM head (used, never registered or saved) and the decoder-layer
            and rotary-embedding classes; the head is built on the target's device and dtype.
        vocab_ids: ``[N]`` int64, the draft vocabulary; required iff ``config.draft_vocab_size`` (``N``).
    """

    def __init__(self, config: EagleConfig, target: TargetModel, vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        embed, lm_head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
        if tuple(lm_head.weight.shape) != (config.vocab_size, config.hidden_size):
            raise ValueError(f"EAGLE head needs an LM head of shape {(config.vocab_size, config.hidden_size)}, "
                             f"the target's is {tuple(lm_head.weight.shape)}")
        if (vocab_ids is None) != (config.draft_vocab_size == 0) or (
                vocab_ids is not None and vocab_ids.numel() != config.draft_vocab_size):
            raise ValueError(f"draft_vocab_size={config.draft_vocab_size} needs exactly that many vocab_ids")
        decoder = target.model.get_decoder()
        layer_cls, rotary_cls = type(decoder.layers[0]), type(decoder.rotary_emb)
        self.config = config
        self.layer_config = config.text_config()
        factory = {"dtype": lm_head.weight.dtype, "device": lm_head.weight.device}
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, **factory)
        self.layer = layer_cls(self.layer_config, layer_idx=0).to(**factory)
        self.rotary = rotary_cls(config=self.layer_config).to(lm_head.weight.device)  # inv_freq keeps float32
        if vocab_ids is not None:
            vocab_ids = check_vocab_ids(vocab_ids.to(lm_head.weight.device), config.vocab_size)
        self.register_buffer("vocab_ids", vocab_ids)
        # Shared with the target, so not submodules: the embedding and the LM head's (draft-vocabulary) rows.
        object.__setattr__(self, "embed_tokens", embed)
        weight = lm_head.weight.detach()
        object.__setattr__(self, "proj_weight", weight if vocab_ids is None else weight[vocab_ids])
        object.__setattr__(self, "_proj", PackedWeight(self.proj_weight, approximate=True))  # float32 CPU

    @contextlib.contextmanager
    def _attention(self, name: str) -> Iterator[None]:
        cfg = self.layer.self_attn.config  # the attention module reads its own config object
        previous = cfg._attn_implementation
        cfg._attn_implementation = name
        try:
            yield
        finally:
            cfg._attn_implementation = previous

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                specdec: ForwardContext) -> torch.Tensor:
        """Predicted features ``[T, H]`` (head dtype) for pairs ``features [T, H]`` float, ``tokens [T]`` int64
        (the token after each feature's), at RoPE ``positions [T]`` int64; K/V go to ``specdec``'s cache."""
        return self.forward_with(features[None], tokens[None], positions[None], ATTENTION_NAME, specdec=specdec)[0]

    def forward_with(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, attention: str,
                     **attention_kwargs: Any) -> torch.Tensor:
        """Batched form of :meth:`forward` through any function registered with transformers'
        ``AttentionInterface`` (the trainer's multi-step mask, for one): ``features [B, T, H]``, ``tokens`` and
        ``positions [B, T]`` int64 -> ``[B, T, H]``; ``attention_kwargs`` reach the attention function."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([self.embed_tokens(tokens).to(dtype), features.to(dtype)], dim=-1))
        with self._attention(attention):
            out = self.layer(x, attention_mask=None, position_ids=positions,
                             position_embeddings=self.rotary(x, positions), use_cache=False, **attention_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` next-token logits over the draft vocabulary (``N = V`` without one) from ``features
        [..., H]`` via the target's LM head rows. Target features give the target's own logits on those rows."""
        return self._proj(features.to(self.proj_weight.dtype))

    def full_logits(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` over the whole vocabulary ``[..., V]`` (``-inf`` outside the draft vocabulary)."""
        return expand_logits(self.logits(features), self.vocab_ids, self.config.vocab_size)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fc + layer; no embedding, no LM head) to ``path``."""
        save_checkpoint(self, self.config, path, kind="eagle")

    @classmethod
    def from_pretrained(cls, path: str | Path, target: TargetModel) -> EagleHead:
        """Load a head saved by :meth:`save_pretrained` onto ``target`` (cast to its dtype; strict key check)."""
        config, state = read_checkpoint(path, kind="eagle")
        head = cls(EagleConfig(**config), target, state.get("vocab_ids"))
        head.load_state_dict(state, strict=True)
        return head.eval()
