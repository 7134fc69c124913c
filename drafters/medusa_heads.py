"""Medusa heads (Cai et al., 2024): ``num_layers`` residual blocks ``h + SiLU(W h + b)`` per head, then an LM
head (its own, or the target's shared one); head ``k`` guesses the token ``k`` places after the root. Also the
Medusa-style static choices list. :mod:`specdec.drafters.medusa` drafts with them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specdec.checkpoint import read_checkpoint, save_checkpoint
from specdec.draft_vocab import check_vocab_ids, expand_logits
from specdec.packed_linear import PackedWeight


@dataclass(frozen=True)
class MedusaConfig:
    """Shape of a set of Medusa heads.

    Attributes:
        hidden_size: ``H``, the target's hidden size.
        vocab_size: ``V``, the target's vocabulary size.
        num_heads: ``K``, heads (= maximum draft depth).
        num_layers: residual blocks per head (Medusa uses 1).
        share_lm_head: every head ends in the target's own LM head instead of its own ``Linear(H, V)``. Default
            ``False``, as in Medusa-1 and its released checkpoints: a per-head LM head (initialised from the
            target's) lets each head specialise and gives better acceptance; sharing saves ``K * V * H``
            parameters (for SmolLM2-135M, 28M per head), at the cost of expressiveness.
        draft_vocab_size: ``N``, the heads score only ``N`` target tokens (:mod:`specdec.draft_vocab`; the ids
            are the saved ``vocab_ids`` buffer); 0 = the full vocabulary.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    share_lm_head: bool = False
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.vocab_size, self.num_heads) < 1 or self.num_layers < 0:
            raise ValueError(f"bad Medusa config: need positive sizes and num_layers >= 0, got {self}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [0, {self.vocab_size}], got {self.draft_vocab_size}")


class ResBlock(nn.Module):
    """``h + SiLU(Linear(H, H)(h))``, zero-initialised (weight and bias): starts as the identity."""

    def __init__(self, hidden_size: int, **factory) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, **factory)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MedusaHeads(nn.Module):
    """``K`` Medusa heads; ``heads[k]`` = residual blocks (then the head's own LM head unless shared).

    The layout (``heads.{k}.{i}.linear.*``, ``heads.{k}.{num_layers}.weight``) matches Medusa's ``medusa_head``.
    Untrained heads reproduce the target LM head's prediction (the residual blocks start as the identity).

    Parameters
    ----------
    config : MedusaConfig
        Sizes and whether the LM head is shared.
    lm_head : nn.Module, optional
        The target's LM head (``Linear(H, V)``, ``weight [V, H]``). Required when ``config.share_lm_head``: it is
        then used as is, never registered, saved, moved or cast here (the target owns it). Otherwise it only
        initialises each head's own LM head (copied); ``None`` leaves them randomly initialised.
    vocab_ids : torch.Tensor, optional
        Shape ``[N]``, int64, sorted: the draft vocabulary, required iff ``config.draft_vocab_size`` (``N``). The
        heads' LM heads then have ``N`` rows (initialised from / sliced out of the target's rows ``vocab_ids``).
    """

    def __init__(self, config: MedusaConfig, lm_head: nn.Module | None = None,
                 vocab_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        if lm_head is not None and tuple(lm_head.weight.shape) != (v, h):
            raise ValueError(f"LM head weight has shape {tuple(lm_head.weight.shape)}, the heads need {(v, h)}")
        if config.share_lm_head and lm_head is None:
            raise ValueError("share_lm_head=True needs the target's LM head (lm_head=...)")
        if (vocab_ids is None) != (config.draft_vocab_size == 0) or (
                vocab_ids is not None and vocab_ids.numel() != config.draft_vocab_size):
            raise ValueError(f"draft_vocab_size={config.draft_vocab_size} needs exactly that many vocab_ids")
        self.register_buffer("vocab_ids", None if vocab_ids is None else check_vocab_ids(vocab_ids.clone(), v))
        factory = {} if lm_head is None else {"dtype": lm_head.weight.dtype, "device": lm_head.weight.device}
        rows = None
        if lm_head is not None:
            rows = lm_head.weight.detach() if vocab_ids is None else lm_head.weight.detach()[vocab_ids]
        heads = []
        for _ in range(config.num_heads):
            layers: list[nn.Module] = [ResBlock(h, **factory) for _ in range(config.num_layers)]
            if not config.share_lm_head:
                own = nn.Linear(h, config.draft_vocab_size or v, bias=False, **factory)
                if rows is not None:
                    own.weight.data.copy_(rows)
                layers.append(own)
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)
        # The shared projection (the target's LM head, or its draft-vocabulary rows) is not a submodule: the target
        # owns it, so it is never saved, moved or cast here.
        object.__setattr__(self, "shared_weight", rows if config.share_lm_head else None)
        object.__setattr__(self, "_shared", None if self.shared_weight is None else PackedWeight(rows))  # float32 CPU

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every head's logits.

        Parameters
        ----------
        hidden : torch.Tensor
            Shape ``[..., H]``, float: the target's last hidden states (after the final norm).

        Returns
        -------
        torch.Tensor
            Shape ``[..., K, N]``, float (the LM heads' dtype): ``[..., k, :]`` are head ``k + 1``'s logits, for
            the token ``k + 1`` places after the one ``hidden`` predicts, over the draft vocabulary (``N = V``
            without one; see :meth:`full_logits`).
        """
        out = []
        for head in self.heads:
            first = next(head.parameters(), None)
            out.append(head(hidden if first is None else hidden.to(first.dtype)))
        out = torch.stack(out, dim=-2)
        if self.shared_weight is not None:  # one matmul for every head: the shared rows are read once, not K times
            out = self._shared(out.to(self.shared_weight.dtype))
        return out

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` over the target's whole vocabulary: ``[..., K, V]``, ``-inf`` outside the draft vocab."""
        return expand_logits(self(hidden), self.vocab_ids, self.config.vocab_size)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` to folder ``path`` (a shared LM head is not saved)."""
        save_checkpoint(self, self.config, path, kind="medusa")

    @classmethod
    def from_pretrained(cls, path: str | Path, lm_head: nn.Module | None = None) -> MedusaHeads:
        """Load heads saved by :meth:`save_pretrained` (weights keep their saved dtype; strict key check).
        ``lm_head`` is the target's LM head, required if the heads share it, else unused."""
        raw_config, state = read_checkpoint(path, kind="medusa")
        config = MedusaConfig(**raw_config)
        heads = cls(config, lm_head if config.share_lm_head else None, state.get("vocab_ids"))
        dtypes = [t.dtype for t in state.values() if t.is_floating_point()]
        if dtypes:
            heads.to(dtypes[0])
        heads.load_state_dict(state, strict=True)  # copies into fresh (aligned) parameters
        return heads.eval()


def medusa_choices(num_heads: int = 3, num_nodes: int = 16, top1: float = 0.6, head_decay: float = 0.8,
                   rank_decay: float = 0.4) -> list[tuple[int, ...]]:
    """A Medusa-style static choices list: the ``num_nodes`` draft nodes most likely to be accepted under a prior.

    The prior says head ``d``'s rank-``r`` token is right with probability ``top1 * head_decay**(d-1) *
    rank_decay**r``, independently; a path's value is the product along it (Medusa builds its trees the same
    way from measured accuracies). Ancestor-closed; sorted by ``(depth, choice)``. The default (3 heads, 16
    nodes) gives ``[(0,), (1,), (2,), (3,), (0, 0), ..., (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]``.
    """
    def q(depth: int, rank: int) -> float:
        return top1 * head_decay ** (depth - 1) * rank_decay**rank

    heap = [(-q(1, r), (r,)) for r in range(num_nodes)]
    out: list[tuple[int, ...]] = []
    while heap and len(out) < num_nodes:
        neg, choice = heapq.heappop(heap)
        out.append(choice)
        if len(choice) < num_heads:
            for r in range(num_nodes):
                heapq.heappush(heap, (neg * q(len(choice) + 1, r), choice + (r,)))
    return sorted(out, key=lambda c: (len(c), c))
