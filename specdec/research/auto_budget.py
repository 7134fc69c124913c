"""``--tree-budget auto``: a drafter adapter that sizes every step's tree with the cost model, and the online
per-depth calibration tracker it learns from.

:class:`AcceptanceTracker` keeps, per (depth, sibling rank), how often a TRIED draft node was accepted (Beta prior,
exponential forgetting), so a node's value = product of those conditional rates along its path = its predicted
probability of being accepted. Every tried node's prediction is logged with its outcome: :meth:`reliability` and
:meth:`plot` give the reliability curve per depth (predicted vs observed acceptance; a calibrated tracker lies on the
diagonal). Drafters report no confidence through the protocol for deterministic trees, so the tracker's prediction
IS the confidence being calibrated; sampled drafts' ``q(x)`` would be another (not used: see below).

:class:`AutoBudgetDrafter` wraps any drafter (configured with its LARGEST budget) through the protocol. Before
drafting it plans each sequence's budget (``DraftInput.budget``) on the tracker's virtual best-first tree
(:meth:`AcceptanceTracker.plan_values`) with the draft cost of the levels that budget needs (calibrated, or fitted
online to the measured ``propose`` times), so a best-first drafter pays only for what is likely kept. The plan
depends on the history only, never on the draft. Then:

* deterministic drafts (``probs is None``): keep the root plus the ``N - 1`` nodes of highest value, ``N`` from
  :func:`specdec.research.cost_model.choose_size` with this step's context length and measured draft time.
  Any function of
  the history is a valid deterministic proposal, so the pruned tree is verified exactly as any other;
* sampled drafts (``probs`` given): only a depth cut, chosen from the tracker BEFORE looking at the draft (a chain
  model), so the cut never depends on the sampled tokens and exactness is kept.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Sequence

import torch

from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.research.cost_model import CostModel, choose_size
from specdec.tree import TokenTree


class AcceptanceTracker:
    """Online conditional acceptance rates per (depth, rank): ``rate = (a + k m) / (n + k)``, prior mean
    ``m = prior_top1 * prior_decay ** rank`` with weight ``k = prior_weight``; counts decay by ``forget`` per
    observation of that cell (a running window of ~``1 / (1 - forget)`` observations)."""

    def __init__(self, prior_top1: float = 0.6, prior_decay: float = 0.5, prior_weight: float = 2.0,
                 forget: float = 0.995, max_log: int = 200_000) -> None:
        self.prior_top1, self.prior_decay = prior_top1, prior_decay
        self.prior_weight, self.forget = prior_weight, forget
        self._acc: dict[tuple[int, int], float] = {}
        self._tried: dict[tuple[int, int], float] = {}
        self.log: list[tuple[int, float, bool]] = []  # (depth, predicted rate, accepted)
        self.max_log = max_log

    def rate(self, depth: int, rank: int) -> float:
        """Predicted P(accepted | tried) of a depth-``depth`` node that is its parent's rank-``rank`` child."""
        m = self.prior_top1 * self.prior_decay**rank
        key = (depth, rank)
        return (self._acc.get(key, 0.0) + self.prior_weight * m) / (self._tried.get(key, 0.0) + self.prior_weight)

    def observe(self, depth: int, rank: int, accepted: bool) -> None:
        if len(self.log) < self.max_log:
            self.log.append((depth, self.rate(depth, rank), accepted))
        key = (depth, rank)
        self._acc[key] = self.forget * self._acc.get(key, 0.0) + float(accepted)
        self._tried[key] = self.forget * self._tried.get(key, 0.0) + 1.0

    def node_values(self, tree: TokenTree) -> torch.Tensor:
        """``[N]`` predicted probability that each node is accepted (root 1)."""
        values = torch.ones(tree.num_nodes, dtype=torch.float64)
        for u, kids in enumerate(tree.children()):
            for rank, c in enumerate(kids):
                values[c] = values[u] * self.rate(int(tree.depth[c]), rank)
        return values

    def plan_values(self, nodes: int, fanout: int, max_depth: int) -> list[float]:
        """Values of the ``nodes`` best nodes of a virtual tree in which every node up to ``max_depth``
        has ``fanout`` ranked children, best first: the tree a best-first drafter would build if the tracked rates
        were its confidences. Plans a step's size before drafting."""
        heap = [(-self.rate(1, r), 1) for r in range(fanout)]
        heapq.heapify(heap)
        out: list[float] = []
        while heap and len(out) < nodes:
            v, d = heapq.heappop(heap)
            out.append(-v)
            if d < max_depth:
                for r in range(fanout):
                    heapq.heappush(heap, (v * self.rate(d + 1, r), d + 1))
        return out

    def chain_values(self, depth: int) -> list[float]:
        """Predicted acceptance of the rank-0 chain's nodes at depths 1..``depth``."""
        out, v = [], 1.0
        for d in range(1, depth + 1):
            v *= self.rate(d, 0)
            out.append(v)
        return out

    def update(self, tree: TokenTree, tokens: Sequence[int]) -> None:
        """One verified step: ``tokens`` = accepted draft tokens then the bonus. Children of every accepted node
        were tried in order up to the accepted one (all of them after the last accepted node)."""
        kids, tree_tokens, node = tree.children(), tree.tokens.tolist(), 0
        for d, tok in enumerate(tokens):
            last = d == len(tokens) - 1
            for rank, c in enumerate(kids[node]):
                hit = not last and tree_tokens[c] == tok
                self.observe(d + 1, rank, hit)
                if hit:
                    node = c
                    break

    def reliability(self, bins: int = 10) -> dict[int, list[tuple[float, float, int]]]:
        """Per depth: ``(mean predicted, observed rate, count)`` per predicted-probability bin (empty bins left out)."""
        out: dict[int, list[tuple[float, float, int]]] = {}
        for depth in sorted({d for d, _, _ in self.log}):
            rows = [(p, a) for d, p, a in self.log if d == depth]
            cells = []
            for b in range(bins):
                sel = [(p, a) for p, a in rows if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1.0)]
                if sel:
                    cells.append((sum(p for p, _ in sel) / len(sel), sum(a for _, a in sel) / len(sel), len(sel)))
            out[depth] = cells
        return out

    def plot(self, path: str, bins: int = 10, max_depth: int = 6) -> None:
        """Reliability curves (predicted vs observed acceptance), one line per depth, to a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for depth, cells in self.reliability(bins).items():
            if depth <= max_depth and cells:
                ax.plot([c[0] for c in cells], [c[1] for c in cells], "o-", ms=3,
                        label=f"depth {depth} (n={sum(c[2] for c in cells)})")
        ax.set_xlabel("predicted acceptance (tracker)")
        ax.set_ylabel("observed acceptance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def prune(draft: Draft, keep: torch.Tensor) -> Draft:
    """The draft restricted to nodes ``keep`` (sorted, ancestor-closed, root included), node order preserved."""
    tree = draft.tree
    remap = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    parents = torch.where(tree.parents[keep] >= 0, remap[tree.parents[keep].clamp(min=0)], -1)
    probs = None if draft.probs is None else draft.probs[keep]
    return Draft(TokenTree(tree.tokens[keep], parents), probs, draft.without_replacement)


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
    """

    def __init__(self, inner: Drafter, cost: CostModel, tracker: AcceptanceTracker | None = None,
                 drafter_name: str | None = None, max_nodes: int = 64, plan: bool = True) -> None:
        self.inner, self.cost, self.tracker = inner, cost, tracker or AcceptanceTracker()
        self.vocab_size, self.needs_hidden = inner.vocab_size, inner.needs_hidden
        self.feature_layers = getattr(inner, "feature_layers", None)  # EAGLE-3 inside: the engine fuses them
        self.drafter_name, self.max_nodes, self.plan = drafter_name, max_nodes, plan
        self._trees: dict[int, TokenTree] = {}
        self.chosen: list[int] = []  # tree size (root included) of every step
        self.planned: list[int] = []  # budget asked of the inner drafter at every step (with ``plan``)
        own = getattr(inner, "budget", None) or getattr(inner, "max_nodes", None) or max_nodes
        self._own = min(int(own), max_nodes)
        self._fanout = int(getattr(inner, "topk", None) or 4)
        self._depth = int(getattr(inner, "depth", None) or getattr(inner, "max_depth", None) or 8)
        self._fit = [0.0] * 5  # decayed sums of 1, x, x^2, y, x y: per-sequence draft seconds y vs levels x

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        if self.plan:  # the tracker is shared: one virtual tree for the batch, a budget per context length
            values = self.tracker.plan_values(self._own - 1, self._fanout, self._depth)
            budgets = [self._plan(values, item.history.numel()) for item in batch]
            batch = [dataclasses.replace(item, budget=b if item.budget is None else min(b, item.budget))
                     for item, b in zip(batch, budgets, strict=True)]
            self.planned += budgets
        t0 = time.perf_counter()
        drafts = self.inner.propose(batch)
        each = (time.perf_counter() - t0) / max(len(drafts), 1)
        if batch:
            self._observe_draft(self._levels(max(item.budget or self._own for item in batch)), each)
        out = []
        for item, draft in zip(batch, drafts, strict=True):
            ctx = item.history.numel()
            draft_s = self.cost.draft_time(draft.tree.max_depth, None if self.drafter_name else each,
                                           self.drafter_name)
            draft = self._size(draft, ctx, draft_s)
            self._trees[item.seq_id] = draft.tree
            self.chosen.append(draft.tree.num_nodes)
            out.append(draft)
        return out

    def _levels(self, budget: int) -> int:
        """Tree levels a best-first drafter expands for ``budget`` nodes (see :class:`BestFirstBatch`)."""
        return min(self._depth, budget - 1)

    def _observe_draft(self, levels: int, seconds: float, forget: float = 0.98) -> None:
        for i, v in enumerate((1.0, levels, levels * levels, seconds, levels * seconds)):
            self._fit[i] = forget * self._fit[i] + v

    def draft_estimate(self, levels: int) -> float:
        """Predicted draft seconds per sequence for a tree of ``levels`` levels: the calibrated fit of
        ``drafter_name`` if the cost model has one, else a line fitted online to this drafter's measured
        ``propose`` times (proportional to the levels while only one level count was seen; 0 before any)."""
        if self.drafter_name is not None:
            return self.cost.draft_time(levels, drafter=self.drafter_name)
        n, sx, sxx, sy, sxy = self._fit
        if n <= 0:
            return 0.0
        var = sxx / n - (sx / n) ** 2
        if var < 1e-9:
            return max(sy / n * (levels / (sx / n) if sx > 0 else 1.0), 0.0)
        slope = (sxy / n - sx / n * sy / n) / var
        return max(sy / n + slope * (levels - sx / n), 0.0)

    def _plan(self, values: list[float], ctx: int) -> int:
        """The budget to ask for: maximises expected tokens per second on the tracker's virtual tree ``values``."""
        return choose_size(values, lambda n: self.draft_estimate(self._levels(n)) + self.cost.verify_time(n, ctx),
                           self._own)

    def _size(self, draft: Draft, ctx: int, draft_s: float) -> Draft:
        tree = draft.tree
        if tree.num_nodes == 1:
            return draft
        if draft.probs is not None:  # sampled: depth cut from the tracker alone (chain model)
            values = self.tracker.chain_values(tree.max_depth)
            depth = choose_size(values, lambda n: draft_s + self.cost.verify_time(n, ctx), self.max_nodes) - 1
            keep = (tree.depth <= depth).nonzero().flatten()
            return draft if keep.numel() == tree.num_nodes else prune(draft, keep)
        values = self.tracker.node_values(tree)
        n = choose_size(values[1:].tolist(), lambda k: draft_s + self.cost.verify_time(k, ctx), self.max_nodes)
        order = sorted(range(1, tree.num_nodes), key=lambda i: (-float(values[i]), int(tree.depth[i]), i))
        keep = torch.tensor(sorted([0, *order[: n - 1]]))
        return draft if keep.numel() == tree.num_nodes else prune(draft, keep)

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        tree = self._trees.pop(seq_id, None)
        if tree is not None:
            self.tracker.update(tree, tokens.tolist())
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self._trees.pop(seq_id, None)
        self.inner.release(seq_id)


def wrap_auto_budget(drafter: Drafter | None, cost_path: str, name: str | None = None,
                     max_nodes: int = 64) -> AutoBudgetDrafter | None:
    """``--tree-budget auto``: ``drafter`` (built with its largest budget) under the chooser, with the cost model
    at ``cost_path`` (``ValueError`` naming the file if it is missing or not a cost model). ``name``: the drafter's
    spec, used for its calibrated draft cost if the file has one (else each step's measured ``propose`` time).
    No drafter (plain decoding) stays ``None``. One tracker per wrapped drafter, shared by its sequences: the
    calibration is per (depth, sibling rank), so it needs no per-request state."""
    if drafter is None:
        return None
    cost = CostModel.load(cost_path)
    return AutoBudgetDrafter(drafter, cost, drafter_name=name if name in cost.draft_coef else None,
                             max_nodes=max_nodes)
