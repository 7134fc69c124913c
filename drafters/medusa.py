"""Medusa heads: extra decoding heads on the target's last hidden state, one per draft depth.

Head ``k`` (1-indexed) reads the hidden state that predicted the root and guesses the token ``k`` places after the
root (Cai et al., 2024, "Medusa"). A head is ``num_layers`` residual blocks ``h + SiLU(W h + b)`` followed by an LM
head. Heads never see the draft path, so every node at one depth gets the same distribution; trees are built from
each head's top-k, either from a static Medusa-style choices list or best-first under a node budget.

Proposals are deterministic top-k picks (``Draft.probs is None``): the engine verifies them as one-hot drafts, which
is exact (greedy-identical at temperature 0, target-distributed above) for any heads, trained or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specdec.drafters.common import row_budgets
from specdec.drafters.medusa_heads import MedusaConfig, MedusaHeads, ResBlock, medusa_choices
from specdec.drafters.registry import Option, register, resolve_path
from specdec.interfaces import Draft, DraftInput
from specdec.packed_linear import pack_linears
from specdec.tree_builders import BestFirstBatch, level_topk, static_tree

if TYPE_CHECKING:
    from specdec.target import TargetModel

__all__ = ["MedusaConfig", "MedusaDrafter", "MedusaHeads", "ResBlock", "medusa_choices"]  # heads: medusa_heads.py


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
        # float32 CPU: the fastest exact kernel. Not bfloat16: the heads' top-k for tokens 2-5 ahead sit close together
        # and bfloat16 rounding reorders them (tau 1.362 -> 1.333 on tuning prompts, for 0.6 ms of a 55 ms step)
        pack_linears(heads)
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
        logits = self.heads(torch.stack([self._hidden[s] for s in seq_ids]))  # [B, K, N] (N: draft vocabulary)
        vocab_ids = getattr(self.heads, "vocab_ids", None)
        roots = [int(item.history[-1]) for item in batch]
        if self.budget is None:  # static tree: each head's top ranks, one top-k for the batch
            _, ranked = level_topk(logits, self._ranks, vocab_ids)
            return [Draft(static_tree(r, self.choices, top)) for r, top in zip(roots, ranked, strict=True)]
        # best-first by tensor ops: every node at depth d gets head d's top-k, so one top-k serves all levels
        values, tokens = level_topk(logits[:, : self.depth].log_softmax(-1), self.topk, vocab_ids)  # [B, D, k]
        builder = BestFirstBatch(torch.tensor(roots), row_budgets(batch, self.budget), self.depth, self.topk)
        d = 0
        while builder.more:
            width = builder.frontier_tokens.shape[1]
            builder.step(values[:, d, None].expand(-1, width, -1), tokens[:, d, None].expand(-1, width, -1))
            d += 1
        return [Draft(tree, scores=scores) for tree, scores in zip(*builder.result(), strict=True)]

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
