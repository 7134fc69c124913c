"""Medusa heads: extra decoding heads on the target's last hidden state, one per draft depth.

Head ``k`` (1-indexed) reads the hidden state that predicted the root and guesses the token ``k`` places after the
root (Cai et al., 2024, "Medusa"). A head is ``num_layers`` residual blocks ``h + SiLU(W h + b)`` followed by an LM
head. Heads never see the draft path, so every node at one depth gets the same distribution; trees are built from
each head's top-k, either from a static Medusa-style choices list or best-first under a node budget.

Proposals are deterministic top-k picks (``Draft.probs is None``): the engine verifies them as one-hot drafts, which
is exact (greedy-identical at temperature 0, target-distributed above) for any heads, trained or not.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from specdec.checkpoint import read_checkpoint, save_checkpoint
from specdec.draft_vocab import check_vocab_ids, expand_logits
from specdec.drafters.registry import Option, register, resolve_path
from specdec.interfaces import Draft, DraftInput
from specdec.tree_builders import best_first_tree, static_tree

if TYPE_CHECKING:
    from specdec.target import TargetModel



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
            h = head(hidden if first is None else hidden.to(first.dtype))
            if self.shared_weight is not None:
                h = nn.functional.linear(h.to(self.shared_weight.dtype), self.shared_weight)
            out.append(h)
        return torch.stack(out, dim=-2)

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


class MedusaDrafter:
    """Drafts token trees from Medusa heads on the target's hidden state (``needs_hidden = True``).

    Parameters
    ----------
    heads : MedusaHeads
        The heads (same device as the target; hidden states are cast to their dtype).
    choices : list of tuple of int, optional
        Static-tree mode: Medusa-style rank paths (``(0, 1)`` = rank-1 token of head 2 under the rank-0 token of
        head 1); default :func:`medusa_choices` for the heads' count. Not allowed together with ``budget``.
    budget : int, optional
        Dynamic-tree mode: nodes per tree, root included (:func:`specdec.tree_builders.best_first_tree`, scored
        by the heads' cumulative log-probabilities).
    depth : int, optional
        Dynamic mode: maximum draft depth, ``<= num_heads`` (default ``num_heads``).
    topk : int
        Dynamic mode: children per expanded node and frontier width.

    Tokens are top-k picks, so every draft has ``probs=None`` and is verified as a one-hot proposal: exact at
    any temperature. Per sequence the drafter keeps only the last hidden row passed to :meth:`accept`.
    """

    needs_hidden = True

    def __init__(self, heads: MedusaHeads, choices: Sequence[Sequence[int]] | None = None, budget: int | None = None,
                 depth: int | None = None, topk: int = 4) -> None:
        k = heads.config.num_heads
        if budget is not None and choices is not None:
            raise ValueError("give either choices (static tree) or budget (dynamic tree), not both")
        if budget is not None and (budget < 1 or topk < 1 or not 1 <= (depth or k) <= k):
            raise ValueError(f"need budget >= 1, topk >= 1, 1 <= depth <= {k} heads; got {budget}, {topk}, {depth}")
        self.heads = heads.eval()
        self.vocab_size: int | None = heads.config.vocab_size
        self.budget, self.depth, self.topk = budget, depth or k, topk
        if budget is None:
            choices = medusa_choices(k) if choices is None else choices
        self.choices = None if choices is None else [tuple(int(r) for r in c) for c in choices]
        self._ranks = 1 + max((r for c in self.choices or [] for r in c), default=0)
        deepest = max(map(len, self.choices or [()]))
        if deepest > k or self._ranks > self.vocab_size:
            raise ValueError(f"choices need {deepest} heads x {self._ranks} ranks; have {k} heads, {self.vocab_size}")
        self._hidden: dict[int, torch.Tensor] = {}

    @classmethod
    def untrained(cls, target: TargetModel, num_heads: int = 3, share_lm_head: bool = False, num_layers: int = 1,
                  **kwargs) -> MedusaDrafter:
        """Fresh heads sized from ``target`` (zero residual blocks; own LM heads copied from the target's), on
        the target's device and dtype. ``kwargs`` go to the constructor (``choices``, ``budget``, ...)."""
        lm_head = target.model.get_output_embeddings()
        config = MedusaConfig(lm_head.weight.shape[1], target.vocab_size, num_heads, num_layers, share_lm_head)
        return cls(MedusaHeads(config, lm_head).to(target.device, target.dtype), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, target: TargetModel, **kwargs) -> MedusaDrafter:
        """Heads saved with :meth:`MedusaHeads.save_pretrained`, moved to the target's device and dtype."""
        lm_head = target.model.get_output_embeddings()
        heads = MedusaHeads.from_pretrained(path, lm_head)
        if heads.config.hidden_size != lm_head.weight.shape[1]:
            raise ValueError(f"Medusa heads at {path} expect hidden size {heads.config.hidden_size}, "
                             f"the target has {lm_head.weight.shape[1]}")
        return cls(heads.to(target.device, target.dtype), **kwargs)

    @torch.inference_mode()
    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One tree per sequence (sampling settings are not needed: proposals are deterministic). All heads run
        once for the whole batch.

        Parameters
        ----------
        batch : sequence of DraftInput
            Sequences, each already told about its last token through :meth:`accept`; ``history[-1]`` is the
            root.

        Returns
        -------
        list of Draft
            ``Draft(tree, probs=None)`` per sequence.
        """
        seq_ids = [item.seq_id for item in batch]
        missing = [s for s in seq_ids if s not in self._hidden]
        if missing:
            raise ValueError(f"MedusaDrafter has no hidden state for sequence(s) {missing}: call accept(seq_id, "
                             "tokens, hidden) with the target's hidden states after prefill first")
        logits = self.heads.full_logits(torch.stack([self._hidden[s] for s in seq_ids]))  # [B, K, V]
        drafts = []
        for head_logits, item in zip(logits, batch, strict=True):
            root = int(item.history[-1])
            if self.budget is None:
                tree = static_tree(root, self.choices, head_logits.topk(self._ranks, dim=-1).indices)
            else:
                logprobs = head_logits.log_softmax(-1)  # [K, V]
                expand = lambda paths, lp=logprobs: lp[[len(p) for p in paths]]  # noqa: E731
                tree, _ = best_first_tree(root, expand, self.budget, self.depth, self.topk)
            drafts.append(Draft(tree))
        return drafts

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Keep ``hidden[-1]``, the state that predicted ``tokens[-1]`` (the next root).

        Parameters
        ----------
        seq_id : int
            The sequence.
        tokens : torch.Tensor
            Shape ``[A + 1]``, int64: accepted draft tokens then the bonus token (unused).
        hidden : torch.Tensor
            Shape ``[S, H]``, float: the target's last hidden states of the committed span (required).
        """
        if hidden is None or hidden.ndim != 2 or hidden.shape[0] == 0:
            raise ValueError("MedusaDrafter.accept needs the target's hidden states [S, H] (needs_hidden is True)")
        self._hidden[seq_id] = hidden[-1].detach().clone()

    def release(self, seq_id: int) -> None:
        self._hidden.pop(seq_id, None)


@register("medusa", help="Medusa heads on the target's last hidden state", options=(
    Option("path", str, None, "trained heads (a folder; 'shipped' = trained for the embedded SmolLM2)"),
    Option("heads", int, 3, "untrained heads (without path)"),
    Option("tree", str, "chain", "draft tree shape", ("chain", "dynamic", "static")),
    Option("depth", int, None, "draft depth"),
    Option("budget", int, None, "dynamic tree nodes, root included"),
    Option("topk", int, None, "children per expanded node (dynamic tree)"),
))
def _build(target, path=None, heads=3, tree="chain", depth=None, budget=None, topk=None) -> MedusaDrafter:
    """Trained heads from ``path``, else untrained heads (they run, with low acceptance)."""
    from specdec.tree_builders import chain_choices

    if tree == "dynamic":
        shape = {"budget": budget or 16, "depth": depth, "topk": topk or 4}
    elif tree == "chain":
        shape = {"choices": chain_choices(depth or heads)}
    else:
        shape = {}  # the heads' own static tree (medusa_choices)
    shape = {k: v for k, v in shape.items() if v is not None}
    path = resolve_path("medusa", path)
    if path is not None:
        return MedusaDrafter.from_pretrained(path, target, **shape)
    return MedusaDrafter.untrained(target, num_heads=heads, share_lm_head=True, **shape)
