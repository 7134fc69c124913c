"""``--tree-budget auto``: a drafter adapter that sizes every step's tree with the cost model and the online
acceptance tracker (:mod:`specdec.research.acceptance_tracker`).

The tracker keeps, per (depth, sibling rank), how often a draft node whose parent was accepted was accepted itself
(Beta prior, exponential forgetting), and, for drafters that report their confidence (``Draft.scores``), the
calibration of that confidence against observed acceptance per depth. A node's value = the product of these
conditional rates along its path = its predicted probability of being accepted. Every such node's prediction is
logged with its outcome: ``reliability`` and ``plot`` give the reliability curve per depth (a calibrated tracker
lies on the diagonal).

:class:`AutoBudgetDrafter` wraps any drafter (configured with its LARGEST budget) through the protocol. Before
drafting it plans each sequence's budget (``DraftInput.budget``) on the tracker's virtual best-first tree
(:meth:`AcceptanceTracker.plan_values`) with the draft cost of the levels that budget needs (calibrated, or fitted
online to the measured ``propose`` times), so a best-first drafter pays only for what is likely kept. The plan
depends on the history only, never on the draft. Rates are pooled over all sequences (optionally tracked per
sequence from the pooled ones: ``per_sequence``). Then:

* deterministic drafts (``probs is None``): keep the root plus the ``N - 1`` nodes of highest value (by the
  calibrated confidence where the draft has ``scores``), ``N`` from :func:`specdec.research.cost_model.choose_size`
  with this step's context length and the estimated draft time of the levels drafted (the estimate, not this
  call's own reading: one slow call must not buy a bigger tree). Any function of the history is a valid
  deterministic proposal, so the pruned tree is verified exactly as any other;
* sampled drafts (``probs`` given): only a depth cut, chosen from the tracker BEFORE looking at the draft (a chain
  model), so the cut never depends on the sampled tokens and exactness is kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from specdec.drafters.common import PerSequence
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.research.acceptance_tracker import AcceptanceTracker
from specdec.research.cost_model import CostModel, choose_size, draft_levels, drafter_depth
from specdec.research.machine_cost import AUTO, load_cost_model
from specdec.target import TargetModel
from specdec.tree import TokenTree


def prune(draft: Draft, keep: torch.Tensor) -> Draft:
    """The draft restricted to nodes ``keep`` (sorted, ancestor-closed, root included), node order preserved."""
    tree = draft.tree
    remap = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    parents = torch.where(tree.parents[keep] >= 0, remap[tree.parents[keep].clamp(min=0)], -1)
    probs = None if draft.probs is None else draft.probs[keep]
    scores = None if draft.scores is None else draft.scores[keep]
    return Draft(TokenTree(tree.tokens[keep], parents), probs, draft.without_replacement, scores)


MIN_SEEN = 3.0  # decayed observations of a level count before its measured draft time is trusted
DRAFT_CLIP = 2.0  # a trusted level count's measured draft time counts at most this many times its running mean
SEQUENCE_TRACKER = (4.0, 0.95)  # per_sequence=: 4 of a sequence's own observations weigh as much as the pooled rate


class AutoBudgetDrafter:
    """Chooses every step's tree size with ``cost`` and ``tracker`` (see the module docstring).

    Args:
        inner: the drafter, set up with its largest budget.
        cost: a calibrated :class:`CostModel` (verify time by tree size and context).
        tracker: the acceptance tracker (a fresh one by default); shared across sequences.
        drafter_name: key of ``cost.draft_coef`` (otherwise the measured ``propose`` time of this step is used).
        max_nodes: hard cap on the tree size (root included).
        plan: choose each sequence's budget BEFORE drafting (``DraftInput.budget``, from the tracker's rates on
            the virtual tree of :meth:`AcceptanceTracker.plan_values` and the draft cost of the levels that budget
            needs), so a best-first drafter drafts only that much; the drafted tree is then pruned as without it.
            ``False``: draft the inner budget and prune only.
        per_sequence: ``(prior_weight, forget)`` of each sequence's own tracker, a child of ``tracker`` (see
            :class:`AcceptanceTracker`), e.g. ``SEQUENCE_TRACKER``: a prompt that copies its context earns bigger
            trees than one that does not, where one pooled rate gives both the average. ``None`` (default): the
            pooled tracker decides alone. :func:`auto_budget` (``--tree-budget auto``) sets ``SEQUENCE_TRACKER`` for
            drafters that declare ``acceptance_by_sequence`` (n-gram). Replayed on the 24-prompt held-out trace
            (interleaved, draft time levelled; ``docs/results/session8``), per-sequence against pooled: n-gram
            1.418x vs 1.405x, worst category -6.3 % vs -8.6 % of the best fixed budget (with the session-7 cost
            grid: 20 vs 17 of 21 categories within 3 %); shipped EAGLE 1.044x vs 1.053x / 1.076x for two pooled
            copies; shipped Medusa 1.024x vs 1.036x. A model head's acceptance varies less between prompts than its
            per-sequence estimate does between steps.
        confidence: value drafted nodes by the drafter's own calibrated confidence (``Draft.scores``) instead of
            their (depth, rank) rates where the draft has scores. Off by default: on the same replay the calibrated
            confidence was well calibrated at depth 1 and raised tau from 1.48 to 1.68, but predicted 1.137x
            against 1.218x, since the budget is still planned from (depth, rank) rates, which then learn from
            confidence-picked nodes, look better than they are, and buy deep drafts that pruning throws away.
    """

    def __init__(self, inner: Drafter, cost: CostModel, tracker: AcceptanceTracker | None = None,
                 drafter_name: str | None = None, max_nodes: int = 64, plan: bool = True,
                 per_sequence: tuple[float, float] | None = None, confidence: bool = False) -> None:
        self.inner, self.cost, self.tracker = inner, cost, tracker or AcceptanceTracker()
        self.per_sequence, self.confidence = per_sequence, confidence
        self._seq: PerSequence[AcceptanceTracker] = PerSequence(lambda: AcceptanceTracker(
            prior_weight=per_sequence[0], forget=per_sequence[1], parent=self.tracker))
        self.vocab_size, self.needs_hidden = inner.vocab_size, inner.needs_hidden
        self.feature_layers = getattr(inner, "feature_layers", None)  # EAGLE-3 inside: the engine fuses them
        self.drafter_name, self.max_nodes, self.plan = drafter_name, max_nodes, plan
        self._trees: dict[int, Draft] = {}
        self.chosen: list[int] = []  # tree size (root included) of every step
        self.planned: list[int] = []  # budget asked of the inner drafter at every step (with ``plan``)
        own = getattr(inner, "budget", None) or getattr(inner, "max_nodes", None) or max_nodes
        self._own = min(int(own), max_nodes)
        self._fanout = int(getattr(inner, "topk", None) or 4)
        self._depth = drafter_depth(inner)
        self._draft: dict[int, list[float]] = {}  # levels -> [decayed count, decayed seconds] per sequence
        self._started: set[int] = set()  # sequences past their first call (which includes the prompt catch-up)
        self._level_of: dict[int, int] = {}  # budget -> levels drafted (the inner drafter's depth and budget are fixed)

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        if self.plan:  # a virtual tree per sequence (one for the batch when pooled), a budget per context length
            shared = None if self.per_sequence else self.tracker.plan_values(self._own - 1, self._fanout, self._depth)
            budgets = [self._plan(shared or self._tracker(item.seq_id).plan_values(self._own - 1, self._fanout,
                                                                                   self._depth), item.history.numel())
                       for item in batch]
            batch = [dataclasses.replace(item, budget=b if item.budget is None else min(b, item.budget))
                     for item, b in zip(batch, budgets, strict=True)]
            self.planned += budgets
        fresh = any(item.seq_id not in self._started for item in batch)
        self._started.update(item.seq_id for item in batch)
        t0 = time.perf_counter()
        drafts = self.inner.propose(batch)
        each = (time.perf_counter() - t0) / max(len(drafts), 1)
        if batch and not fresh:  # a sequence's first call also catches the drafter up on its whole prompt
            self._observe_draft(self._levels(max(item.budget or self._own for item in batch)), each)
        out = []
        for item, draft in zip(batch, drafts, strict=True):
            ctx = item.history.numel()
            draft_s = self.draft_estimate(self._levels(item.budget or self._own))  # not this call's own reading
            draft = self._size(draft, ctx, draft_s, self._tracker(item.seq_id))
            self._trees[item.seq_id] = draft
            self.chosen.append(draft.tree.num_nodes)
            out.append(draft)
        return out

    def _levels(self, budget: int) -> int:
        """Tree levels a best-first drafter expands for ``budget`` nodes (see :class:`BestFirstBatch`)."""
        levels = self._level_of.get(budget)
        if levels is None:
            levels = self._level_of[budget] = draft_levels(self.inner, budget)
        return levels

    def _observe_draft(self, levels: int, seconds: float, forget: float = 0.98) -> None:
        """One measured ``propose`` (seconds per sequence) of ``levels`` levels. Once the level count is trusted
        (``MIN_SEEN``), a reading is capped at ``DRAFT_CLIP`` times its running mean: on the replayed EAGLE trace
        1 % of the calls took 3-8x the median, which moved the decayed mean by 10 %, enough to flip the chooser
        between two- and three-node trees."""
        for cell in self._draft.values():
            cell[0] *= forget
            cell[1] *= forget
        cell = self._draft.setdefault(levels, [0.0, 0.0])
        if cell[0] >= MIN_SEEN:
            seconds = min(seconds, DRAFT_CLIP * cell[1] / cell[0])
        cell[0] += 1.0
        cell[1] += seconds

    def draft_estimate(self, levels: int) -> float:
        """Predicted draft seconds per sequence for a tree of ``levels`` levels: the calibrated fit of
        ``drafter_name`` if the cost model has one, else from this drafter's measured ``propose`` times (decayed
        means per level count): the mean itself for a level count seen ``MIN_SEEN`` times, else the line through
        the well-seen level counts (proportional to the levels while there is only one; 0 before any). A level
        count seen once does not set a slope: one slow call must not make every deeper tree look dear."""
        if self.drafter_name is not None:
            return self.cost.draft_time(levels, drafter=self.drafter_name)
        seen = {lv: total / n for lv, (n, total) in self._draft.items() if n >= MIN_SEEN}
        if levels in seen:
            return seen[levels]
        if not seen:
            n = sum(c[0] * lv for lv, c in self._draft.items())
            return sum(c[1] for c in self._draft.values()) / n * levels if n > 0 else 0.0
        if len(seen) == 1:
            (lv, mean), = seen.items()
            return mean * levels / max(lv, 1)
        xs, ys = list(seen), list(seen.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        return max(my + slope * (levels - mx), 0.0)

    def _plan(self, values: list[float], ctx: int) -> int:
        """The budget to ask for: maximises expected tokens per second on the tracker's virtual tree ``values``."""
        levels = [self._levels(n) for n in range(1, self._own + 1)]
        draft = {lv: self.draft_estimate(lv) for lv in set(levels)}
        times = [draft[lv] + v for lv, v in zip(levels, self.cost.verify_times(self._own, ctx), strict=True)]
        return choose_size(values, lambda n: times[n - 1], self._own)

    def _scores(self, draft: Draft) -> torch.Tensor | None:
        return draft.scores if self.confidence else None

    def _tracker(self, seq_id: int) -> AcceptanceTracker:
        return self._seq[seq_id] if self.per_sequence else self.tracker

    def _size(self, draft: Draft, ctx: int, draft_s: float, tracker: AcceptanceTracker) -> Draft:
        tree = draft.tree
        if tree.num_nodes == 1:
            return draft
        if draft.probs is not None:  # sampled: depth cut from the tracker alone (chain model)
            values = tracker.chain_values(tree.max_depth)
            verify = self.cost.verify_times(min(len(values) + 1, self.max_nodes), ctx)
            depth = choose_size(values, lambda n: draft_s + verify[n - 1], self.max_nodes) - 1
            keep = (tree.depth <= depth).nonzero().flatten()
            return draft if keep.numel() == tree.num_nodes else prune(draft, keep)
        values = tracker.node_values(tree, self._scores(draft))
        verify = self.cost.verify_times(min(tree.num_nodes, self.max_nodes), ctx)
        n = choose_size(values[1:].tolist(), lambda k: draft_s + verify[k - 1], self.max_nodes)
        order = sorted(range(1, tree.num_nodes), key=lambda i: (-float(values[i]), int(tree.depth[i]), i))
        keep = torch.tensor(sorted([0, *order[: n - 1]]))
        return draft if keep.numel() == tree.num_nodes else prune(draft, keep)

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        draft = self._trees.pop(seq_id, None)
        if draft is not None:
            self._tracker(seq_id).update(draft.tree, tokens.tolist(), self._scores(draft))
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self._trees.pop(seq_id, None)
        self._started.discard(seq_id)
        self._seq.release(seq_id)
        self.inner.release(seq_id)


def auto_budget(drafter: Drafter, cost: CostModel, name: str | None = None, max_nodes: int = 64,
                **options) -> AutoBudgetDrafter:
    """``drafter`` under the chooser as ``--tree-budget auto`` sets it up: ``name`` (its spec) selects its calibrated
    draft cost if ``cost`` has one; a tracker per sequence (``SEQUENCE_TRACKER``) if it declares
    ``acceptance_by_sequence``, else the pooled one alone. ``options`` override :class:`AutoBudgetDrafter`'s."""
    per_sequence = SEQUENCE_TRACKER if getattr(drafter, "acceptance_by_sequence", False) else None
    return AutoBudgetDrafter(drafter, cost, drafter_name=name if name in cost.draft_coef else None,
                             max_nodes=max_nodes, **{"per_sequence": per_sequence, **options})


def wrap_auto_budget(drafter: Drafter | None, cost: str, name: str | None = None, max_nodes: int = 64,
                     target: TargetModel | None = None) -> AutoBudgetDrafter | None:
    """``--tree-budget auto``: ``drafter`` (built with its largest budget) under the chooser, with the cost model
    ``cost``: a JSON path (``ValueError`` naming the file if it is missing or not a cost model) or ``auto``, this
    machine's measured step cost of ``target`` (see :mod:`specdec.research.machine_cost`). ``name``: the drafter's
    spec, used for its calibrated draft cost if the file has one (else each step's measured ``propose`` time).
    No drafter (plain decoding) stays ``None``. Set up as :func:`auto_budget` does."""
    if drafter is None:
        return None
    if cost == AUTO and target is None:
        raise ValueError("wrap_auto_budget: cost='auto' measures the step cost of a target; pass target=")
    return auto_budget(drafter, load_cost_model(cost, target), name, max_nodes)
