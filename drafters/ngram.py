"""N-gram (prompt-lookup) drafter: continue the text the way it continued before.

For each sequence, the longest suffix of the history (``max_ngram`` down to ``min_ngram`` tokens) is looked up in
the earlier history; the tokens that followed each match are proposed. Continuations that disagree become
branches of one tree, most recent match first, until ``max_nodes`` nodes. No model, no training.

Cost control ("stop drafting where it does not pay"): each extra tree node makes the verification forward dearer
(``node_cost``, as a fraction of a one-token forward; ~0.05 for SmolLM2 on 2 CPU cores), while a node at depth ``d``
of a chain is worth ``alpha ** d`` expected tokens, ``alpha`` being the per-token acceptance rate. Each sequence
keeps a running estimate of ``alpha`` and drafts only as deep as ``alpha ** d > node_cost`` (at least one token,
so the estimate can recover); with no match the tree is the root alone, a plain decoding step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.drafters.common import PerSequence, row_budgets
from specdec.drafters.registry import Option, register
from specdec.interfaces import Draft, DraftInput
from specdec.tree import TokenTree


@dataclass
class _SeqState:
    alpha: float  # running per-token acceptance estimate
    drafted_depth: int = 0  # depth of the last proposed tree


class NgramDrafter:
    """Prompt-lookup drafting with tree merging.

    Args:
        max_ngram: longest suffix to match.
        min_ngram: shortest suffix to match (1 matches single tokens; noisy).
        max_depth: tokens per continuation.
        max_nodes: tree budget, root included.
        max_matches: distinct earlier matches merged into the tree.
        node_cost: cost of one extra tree node relative to a one-token verification forward.
        prior_alpha: initial per-token acceptance estimate.
    """

    vocab_size: int | None = None
    needs_hidden = False
    acceptance_by_sequence = True  # a prompt that repeats itself is accepted deep, one that does not is not

    def __init__(
        self,
        max_ngram: int = 4,
        min_ngram: int = 2,
        max_depth: int = 8,
        max_nodes: int = 16,
        max_matches: int = 4,
        node_cost: float = 0.05,
        prior_alpha: float = 0.7,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_nodes < 1 or max_depth < 1:
            raise ValueError(f"max_nodes and max_depth must be positive, got {max_nodes}, {max_depth}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.max_nodes, self.max_matches = max_depth, max_nodes, max_matches
        self.node_cost, self.prior_alpha = node_cost, prior_alpha
        self._state: PerSequence[_SeqState] = PerSequence(lambda: _SeqState(alpha=self.prior_alpha))

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """Deterministic proposals (no probabilities): verified as one-hot drafts, exact at any temperature."""
        return [self.draft_from(item.seq_id, int(item.history[-1]), self.continuations(item.history, self.max_matches),
                                budget) for item, budget in zip(batch, row_budgets(batch, self.max_nodes), strict=True)]

    def draft_from(self, seq_id: int, root: int, continuations: list[list[int]], budget: int) -> Draft:
        """This sequence's tree from already found ``continuations`` (:meth:`continuations`), cut to the depth its
        running acceptance makes worthwhile and to ``budget`` nodes (the hybrid reuses the matches it found)."""
        state = self._state[seq_id]
        depth = self.worthwhile_depth(state.alpha)
        tree = merge_continuations(root, [c[:depth] for c in continuations], budget)
        state.drafted_depth = tree.max_depth
        return Draft(tree)

    def worthwhile_depth(self, alpha: float) -> int:
        """Deepest ``d <= max_depth`` with ``alpha ** d > node_cost`` (at least 1)."""
        if alpha >= 1.0:
            return self.max_depth
        if alpha <= 0.0:
            return 1
        return max(1, min(self.max_depth, int(math.log(self.node_cost) / math.log(alpha))))

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        state = self._state.get(seq_id)
        if state is None or state.drafted_depth == 0:
            return
        accepted = tokens.numel() - 1
        rejected = int(accepted < state.drafted_depth)
        state.alpha = 0.8 * state.alpha + 0.2 * (accepted / (accepted + rejected))
        state.drafted_depth = 0  # consumed: an accept after a step it did not draft (e.g. in the hybrid) is no evidence

    def release(self, seq_id: int) -> None:
        self._state.release(seq_id)

    def continuations(self, history: torch.Tensor, max_matches: int) -> list[list[int]]:
        """Up to ``max_matches`` continuations (each up to ``max_depth`` tokens) of the longest matching suffix,
        most recent first; shorter suffixes are tried only while fewer than ``max_matches`` were found."""
        history = history.flatten()
        length = history.numel()
        found: list[list[int]] = []
        seen: set[int] = set()
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            windows = history[: length - 1].unfold(0, n, 1)  # windows ending before the last token
            hits = (windows == history[length - n :]).all(dim=1).nonzero().flatten() + n  # continuation starts
            for start in hits.flip(0).tolist():
                if start in seen:
                    continue
                seen.add(start)
                found.append(history[start : start + self.max_depth].tolist())
                if len(found) >= max_matches:
                    return found
        return found


def merge_continuations(root: int, continuations: Sequence[Sequence[int]], max_nodes: int) -> TokenTree:
    """A tree rooted at ``root`` holding the given token sequences as branches (shared prefixes merged), in
    priority order, with at most ``max_nodes`` nodes (root included). Node order is insertion order, so parents
    always precede children."""
    tokens, parents = [root], [-1]
    child: dict[tuple[int, int], int] = {}
    for cont in continuations:
        node = 0
        for tok in cont:
            nxt = child.get((node, tok))
            if nxt is None:
                if len(tokens) >= max_nodes:
                    break
                nxt = len(tokens)
                child[(node, tok)] = nxt
                tokens.append(tok)
                parents.append(node)
            node = nxt
    return TokenTree(torch.tensor(tokens), torch.tensor(parents))


@register("ngram", help="prompt lookup: continue the text the way it continued before (no model)", options=(
    Option("depth", int, None, "tokens per continuation (default 8)"),
    Option("budget", int, None, "tree nodes, root included (default 16)"),
    Option("min_ngram", int, None, "shortest suffix matched (default 2)"),
    Option("max_ngram", int, None, "longest suffix matched (default 4)"),
))
def _build(target, depth=None, budget=None, min_ngram=None, max_ngram=None) -> NgramDrafter:
    kwargs = {"max_depth": depth, "max_nodes": budget, "min_ngram": min_ngram, "max_ngram": max_ngram}
    return NgramDrafter(**{k: v for k, v in kwargs.items() if v is not None})
