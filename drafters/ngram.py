"""N-gram (prompt-lookup) drafter: continue the text the way it continued before.

For each sequence, the longest suffix of the history (``max_ngram`` down to ``min_ngram`` tokens) is looked up in
the earlier history; the tokens that followed each match are proposed. Continuations that disagree become
branches of one tree, most recent match first, until ``max_nodes`` nodes. No model, no training.

Cost control ("stop drafting where it does not pay"): each extra tree node makes the verification forward dearer
(``node_cost``, as a fraction of a one-token forward; ~0.05 for SmolLM2 on 2 CPU cores), while a node at depth ``d``
of a chain is worth ``alpha ** d`` expected tokens, ``alpha`` being the per-token acceptance rate. Each sequence
keeps a running estimate of ``alpha`` and drafts only as deep as ``alpha ** d > node_cost`` (at least one token,
so the estimate can recover); with no match the tree is the root alone, a plain decoding step, unless a retrieval
store is given (:mod:`specdec.drafters.store`, ``ngram:store=shipped``): then a step with no match in the history
proposes the store's most frequent continuations of the history's suffix (at most ``store_nodes`` nodes, each
continuing at least ``store_min_p`` of the store's matches). The defaults, two nodes and 0.3, were chosen by
replaying 32 instructions the target wrote itself against a store without their answers (docs/results/session9):
on this 2-core CPU a real engine step with 1 / 2 / 3 draft nodes costs about 7-12 / 10-21 / 31-36 % more than plain
decoding, and a store proposal continuing under 30 % of the matches is accepted 0-17 % of the time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.drafters.common import GrowingTree, PerSequence, row_budgets
from specdec.drafters.registry import SHIPPED, Option, register, shipped_folder
from specdec.drafters.store import TokenStore
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
        store: a :class:`~specdec.drafters.store.TokenStore` consulted when the history has no match.
        store_nodes: most tree nodes (below the root) proposed from the store.
        store_min_p: least fraction of the store's matches a proposed continuation must have.
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
        store: TokenStore | None = None,
        store_nodes: int = 2,
        store_min_p: float = 0.3,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_nodes < 1 or max_depth < 1:
            raise ValueError(f"max_nodes and max_depth must be positive, got {max_nodes}, {max_depth}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.max_nodes, self.max_matches = max_depth, max_nodes, max_matches
        self.node_cost, self.prior_alpha = node_cost, prior_alpha
        if store_nodes < 0 or not 0.0 <= store_min_p <= 1.0:
            raise ValueError(f"need store_nodes >= 0 and 0 <= store_min_p <= 1, got {store_nodes}, {store_min_p}")
        self.store, self.store_nodes, self.store_min_p = store, store_nodes, store_min_p
        self._state: PerSequence[_SeqState] = PerSequence(lambda: _SeqState(alpha=self.prior_alpha))

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """Deterministic proposals (no probabilities): verified as one-hot drafts, exact at any temperature."""
        drafts = []
        for item, budget in zip(batch, row_budgets(batch, self.max_nodes), strict=True):
            found = self.continuations(item.history, self.max_matches)
            root = int(item.history[-1])
            drafts.append(self.draft_from(item.seq_id, root, found, budget) if found or self.store is None
                          else self.draft_from_store(item.seq_id, root, item.history, budget))
        return drafts

    def draft_from(self, seq_id: int, root: int, continuations: list[list[int]], budget: int) -> Draft:
        """This sequence's tree from already found ``continuations`` (:meth:`continuations`), cut to the depth its
        running acceptance makes worthwhile and to ``budget`` nodes (the hybrid reuses the matches it found)."""
        state = self._state[seq_id]
        depth = self.worthwhile_depth(state.alpha)
        tree = merge_continuations(root, [c[:depth] for c in continuations], budget)
        state.drafted_depth = tree.max_depth
        return Draft(tree)

    def draft_from_store(self, seq_id: int, root: int, history: torch.Tensor, budget: int) -> Draft:
        """The store's tree for a history with no match of its own (the root alone without a store); its
        acceptance does not move the sequence's running ``alpha``, which measures the history's matches."""
        state = self._state.get(seq_id)
        if state is not None:
            state.drafted_depth = 0
        tree = GrowingTree(root)
        if self.store is not None:
            tree.add(self.store.tree_paths(history, min(self.store_nodes, budget - 1), self.store_min_p,
                                           self.min_ngram, self.max_depth))
        return Draft(tree.tree())

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
    Option("store", str, None, "retrieval store for steps with no match (a folder from 'python -m specdec.train "
                               "store'; 'shipped' = the embedded SmolLM2's own answers); default none"),
    Option("store_nodes", int, None, "most nodes proposed from the store (default 2)"),
    Option("store_min_p", float, None, "least share of the store's matches a proposal needs (default 0.3)"),
))
def _build(target, depth=None, budget=None, min_ngram=None, max_ngram=None, store=None, store_nodes=None,
           store_min_p=None) -> NgramDrafter:
    kwargs = {"max_depth": depth, "max_nodes": budget, "min_ngram": min_ngram, "max_ngram": max_ngram,
              "store_nodes": store_nodes, "store_min_p": store_min_p}
    return NgramDrafter(store=None if store is None else load_store(store, target),
                        **{k: v for k, v in kwargs.items() if v is not None})


def load_store(path: str, target) -> TokenStore:
    """The store at ``path`` (``shipped``: the embedded SmolLM2's), checked against ``target``'s vocabulary."""
    folder = shipped_folder("store", "tokens.safetensors") if path == SHIPPED else Path(path).expanduser()
    try:
        store = TokenStore.load(folder)
    except ValueError as err:
        raise ValueError(f"ngram:store={path}: {err}") from None
    vocab = getattr(target, "vocab_size", None) if target is not None else None
    if vocab is not None and int(vocab) != store.vocab_size:
        raise ValueError(f"ngram:store={path} was built for a vocabulary of {store.vocab_size} tokens, the target "
                         f"has {vocab}: build a store from this target's own answers (python -m specdec.train store)")
    return store
