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
on that 2-core CPU a real engine step with 1 / 2 / 3 draft nodes cost about 7-12 / 10-21 / 31-36 % more than plain
decoding, and a store proposal continuing under 30 % of the matches is accepted 0-17 % of the time.

What a node costs depends on the machine (on the 2-core AMD EPYC of sessions 11-13 a step with 3-6 nodes costs no
more than a lone root). Given a measured step cost (``step_cost``; ``ngram:steps=auto`` measures this machine's
once, :mod:`specdec.research.machine_cost`), the store's tree is sized by it instead: of its continuations (at
most ``store_nodes``, default 4, each continuing at least ``store_min_p``, default 0.05, of the matches) it keeps
the most frequent ``k`` that maximise ``(1 + sum of their values) / step_cost(k + 1)``, a continuation's value
being its frequency times a running calibration pooled over sequences (accepted store tokens per unit of proposed
frequency; prior ``STORE_CALIBRATION``): a frequent continuation is accepted less often than its frequency says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.drafters.common import GrowingTree, PerSequence, row_budgets
from specdec.drafters.registry import SHIPPED, Option, register, shipped_folder
from specdec.drafters.store import TokenStore
from specdec.interfaces import Draft, DraftInput
from specdec.research.machine_cost import step_cost_option
from specdec.tree import TokenTree

STORE_CALIBRATION = 0.5  # prior accepted store tokens per unit of proposed frequency (pooled running ratio after)
STORE_WEIGHT = 0.05  # weight of the newest store step in the pooled running sums
STORE_DEFAULTS = {False: (2, 0.3), True: (4, 0.05)}  # (store_nodes, store_min_p) without / with a step cost


@dataclass
class _SeqState:
    alpha: float  # running per-token acceptance estimate
    drafted_depth: int = 0  # depth of the last proposed tree
    store_value: float = 0.0  # summed store frequency of the last tree if it came from the store (else 0)


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
        store_nodes: most tree nodes (below the root) proposed from the store (default 2; 4 with ``step_cost``).
        store_min_p: least fraction of the store's matches a proposed continuation must have (default 0.3; 0.05
            with ``step_cost``).
        step_cost: measured verification cost ``step_cost(n, context)`` of an ``n``-node tree relative to a lone
            root: the store's tree is sized by it (module docstring).
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
        store_nodes: int | None = None,
        store_min_p: float | None = None,
        step_cost: Callable[[int, int], float] | None = None,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_nodes < 1 or max_depth < 1:
            raise ValueError(f"max_nodes and max_depth must be positive, got {max_nodes}, {max_depth}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.max_nodes, self.max_matches = max_depth, max_nodes, max_matches
        self.node_cost, self.prior_alpha = node_cost, prior_alpha
        default_nodes, default_p = STORE_DEFAULTS[step_cost is not None]
        store_nodes = default_nodes if store_nodes is None else store_nodes
        store_min_p = default_p if store_min_p is None else store_min_p
        if store_nodes < 0 or not 0.0 <= store_min_p <= 1.0:
            raise ValueError(f"need store_nodes >= 0 and 0 <= store_min_p <= 1, got {store_nodes}, {store_min_p}")
        self.store, self.store_nodes, self.store_min_p = store, store_nodes, store_min_p
        self.step_cost = step_cost
        self._store_value, self._store_accepted = 1.0, STORE_CALIBRATION  # pooled running sums (their ratio)
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
        state = self._state[seq_id]
        state.drafted_depth = 0
        tree = GrowingTree(root)
        if self.store is not None:
            paths, state.store_value = self.store_paths(history, budget - 1)
            tree.add(paths)
        return Draft(tree.tree())

    @property
    def store_calibration(self) -> float:
        """Accepted store tokens per unit of proposed store frequency (pooled running ratio, within [0.05, 1])."""
        return min(1.0, max(0.05, self._store_accepted / max(self._store_value, 1e-9)))

    def store_paths(self, history: torch.Tensor, nodes: int) -> tuple[list[tuple[int, ...]], float]:
        """The store's continuations to propose for ``history`` (at most ``nodes``; sized by ``step_cost`` where
        given, module docstring) and their summed frequency."""
        if self.store is None:
            return [], 0.0
        found = self.store.tree_candidates(history, min(self.store_nodes, nodes), self.store_min_p, self.min_ngram,
                                           self.max_depth)  # most frequent first: every prefix before its extensions
        if self.step_cost is not None and found:
            from specdec.research.cost_model import choose_size

            context, scale = history.numel(), self.store_calibration
            keep = choose_size([p * scale for _, p in found], lambda n: self.step_cost(n, context)) - 1
            found = found[:keep]
        return [path for path, _ in found], sum(p for _, p in found)

    def worthwhile_depth(self, alpha: float) -> int:
        """Deepest ``d <= max_depth`` with ``alpha ** d > node_cost`` (at least 1)."""
        if alpha >= 1.0:
            return self.max_depth
        if alpha <= 0.0:
            return 1
        return max(1, min(self.max_depth, int(math.log(self.node_cost) / math.log(alpha))))

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        state = self._state.get(seq_id)
        if state is not None and state.store_value > 0:  # a store tree: calibrate its frequencies
            w = STORE_WEIGHT
            self._store_value += w * (state.store_value - self._store_value)
            self._store_accepted += w * (tokens.numel() - 1 - self._store_accepted)
            state.store_value = 0.0
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
    Option("store_nodes", int, None, "most nodes proposed from the store (default 2; 4 with steps)"),
    Option("store_min_p", float, None, "least share of the store's matches a proposal needs (default 0.3; 0.05 "
                                       "with steps)"),
    Option("steps", str, None, "size the store's tree by a measured step cost: 'auto' (this machine's, measured "
                               "once and cached) or a cost-model JSON (specdec calibrate); default none"),
))
def _build(target, depth=None, budget=None, min_ngram=None, max_ngram=None, store=None, store_nodes=None,
           store_min_p=None, steps=None) -> NgramDrafter:
    kwargs = {"max_depth": depth, "max_nodes": budget, "min_ngram": min_ngram, "max_ngram": max_ngram,
              "store_nodes": store_nodes, "store_min_p": store_min_p}
    if steps is not None and store is None:
        raise ValueError("option 'steps' of drafter 'ngram' sizes the store's tree: give a store too (store=shipped)")
    return NgramDrafter(store=None if store is None else load_store(store, target),
                        step_cost=step_cost_option(steps, target),
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
