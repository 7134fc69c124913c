"""The online acceptance tracker behind ``--tree-budget auto``: per-(depth, rank) conditional acceptance rates and the
calibration of drafters' own confidence (``Draft.scores``) against observed acceptance, with reliability curves."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from specdec.tree import TokenTree

CONF_BINS = 10  # confidence bins of q in [0, 1]
CONF_DEPTHS = 6  # deeper nodes share the depth-6 cells


def _conf_key(depth: int, q: float) -> tuple[int, int]:
    return min(depth, CONF_DEPTHS), min(int(q * CONF_BINS), CONF_BINS - 1)


def _conditional(tree: TokenTree, scores: torch.Tensor) -> list[float]:
    """Each node's draft probability given its parent, ``exp(score - parent score)`` in [0, 1] (root 1)."""
    if scores.shape != (tree.num_nodes,):
        raise ValueError(f"Draft.scores must have one value per tree node: shape ({tree.num_nodes},), got "
                         f"{tuple(scores.shape)}")
    s, parents = scores.tolist(), tree.parents.tolist()
    return [1.0] + [min(1.0, math.exp(min(s[i] - s[parents[i]], 0.0))) for i in range(1, len(s))]


class AcceptanceTracker:
    """Online acceptance rates per (depth, rank), each conditional on the parent's acceptance only (not on the elder
    siblings', :meth:`update`): ``rate = (a + k m) / (n + k)``, prior mean
    ``m = prior_top1 * prior_decay ** rank`` at depth 1 and, with ``depth_prior``, the same rank's rate one level up
    below it (a depth rarely tried is assumed no better than the one above: a flat prior there made the planner
    buy deep trees on rates it had never seen), or with a ``parent`` the parent's own rate for that cell; weight
    ``k = prior_weight``; counts decay by ``forget`` per observation of that cell (a running window of
    ``~1 / (1 - forget)`` observations).

    A tracker with a ``parent`` is one sequence's view: it starts at the parent's rates and moves toward its own
    sequence's outcomes (``prior_weight`` observations of the parent are worth as much as its own), passes every
    observation on to the parent (which pools all sequences) and logs its own predictions in the parent's log, so
    the reliability curve is that of the predictions actually used.

    Drafters that report their confidence (``Draft.scores``: best-first EAGLE, Medusa and draft-model trees) are
    valued by it instead: each node's conditional draft probability ``q`` is calibrated per (depth, ``q`` bin)
    against the observed acceptance (:meth:`conf_rate`), the reliability curve of the drafter's own confidence."""

    def __init__(self, prior_top1: float = 0.6, prior_decay: float = 0.5, prior_weight: float = 2.0,
                 forget: float = 0.995, max_log: int = 200_000, parent: AcceptanceTracker | None = None,
                 depth_prior: bool = True) -> None:
        self.prior_top1, self.prior_decay, self.depth_prior = prior_top1, prior_decay, depth_prior
        self.prior_weight, self.forget, self.parent = prior_weight, forget, parent
        self._acc: dict[tuple[int, int], float] = {}
        self._tried: dict[tuple[int, int], float] = {}
        self._conf: dict[tuple[int, int], tuple[float, float]] = {}  # (depth, q bin) -> (hits, expected hits)
        self.log: list[tuple[int, float, bool]] = parent.log if parent is not None else []  # (depth, predicted, hit)
        self.max_log = parent.max_log if parent is not None else max_log

    def rate(self, depth: int, rank: int) -> float:
        """Predicted P(accepted | parent accepted) of a depth-``depth`` node that is its parent's rank-``rank``
        child: one cell of :meth:`rates`."""
        return self.rates(depth, rank + 1)[depth - 1][rank]

    def rates(self, depth: int, width: int) -> list[list[float]]:
        """``[depth][width]`` table of rates (row ``d - 1`` holds depth ``d``, column ``k`` rank ``k``), built in one
        pass: each cell's prior mean is the parent tracker's cell, else (``depth_prior``) the cell one level up, else
        ``prior_top1 * prior_decay ** k``. The chooser reads a whole table per step (a recursive rate per cell took
        about 300 calls a step, 0.3 ms of a 45 ms SmolLM2 step)."""
        base = self.parent.rates(depth, width) if self.parent is not None else None
        acc, tried, w = self._acc, self._tried, self.prior_weight
        out: list[list[float]] = []
        for d in range(1, depth + 1):
            row = []
            for k in range(width):
                if base is not None:
                    m = base[d - 1][k]
                elif d > 1 and self.depth_prior:
                    m = out[d - 2][k]
                else:
                    m = self.prior_top1 * self.prior_decay**k
                row.append((acc.get((d, k), 0.0) + w * m) / (tried.get((d, k), 0.0) + w))
            out.append(row)
        return out

    def observe(self, depth: int, rank: int, accepted: bool, predicted: float | None = None) -> None:
        """One outcome of a (depth, rank) cell; ``predicted`` (default: the cell's rate now) goes to the log."""
        if len(self.log) < self.max_log:
            self.log.append((depth, self.rate(depth, rank) if predicted is None else predicted, accepted))
        self._count(depth, rank, accepted)

    def _count(self, depth: int, rank: int, accepted: bool) -> None:
        key = (depth, rank)
        self._acc[key] = self.forget * self._acc.get(key, 0.0) + float(accepted)
        self._tried[key] = self.forget * self._tried.get(key, 0.0) + 1.0
        if self.parent is not None:
            self.parent._count(depth, rank, accepted)

    def conf_rate(self, depth: int, q: float) -> float:
        """Predicted P(accepted | tried) of a depth-``depth`` node the drafter gave conditional probability ``q``
        (its path's over its parent's): ``q`` times the observed / expected hits of its (depth, ``q``-bin) cell
        (prior ratio 1 with weight ``prior_weight`` expected hits). Pooled: a sequence's tracker asks its parent."""
        if self.parent is not None:
            return self.parent.conf_rate(depth, q)
        acc, expected = self._conf.get(_conf_key(depth, q), (0.0, 0.0))
        return min(1.0, q * (acc + self.prior_weight) / (expected + self.prior_weight))

    def _conf_count(self, depth: int, q: float, accepted: bool) -> None:
        if self.parent is not None:
            self.parent._conf_count(depth, q, accepted)
            return
        key = _conf_key(depth, q)
        acc, expected = self._conf.get(key, (0.0, 0.0))
        self._conf[key] = (self.forget * acc + float(accepted), self.forget * expected + q)

    def node_values(self, tree: TokenTree, scores: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` predicted probability that each node is accepted (root 1): from the (depth, rank) rates, or with
        the drafter's ``scores`` (``Draft.scores``) from its calibrated confidence (:meth:`conf_rate`)."""
        values = [1.0] * tree.num_nodes
        cond = None if scores is None else _conditional(tree, scores)
        children, depths = tree.children(), tree.depth.tolist()
        table = self.rates(max(depths), max(map(len, children))) if cond is None and tree.num_nodes > 1 else None
        for u, kids in enumerate(children):
            for rank, c in enumerate(kids):
                depth = depths[c]
                values[c] = values[u] * (table[depth - 1][rank] if cond is None else self.conf_rate(depth, cond[c]))
        return torch.tensor(values, dtype=torch.float64)

    def plan_values(self, nodes: int, fanout: int, max_depth: int) -> list[float]:
        """Values of the ``nodes`` best nodes of a virtual tree in which every node up to ``max_depth``
        has ``fanout`` ranked children, best first: the tree a best-first drafter would build if the tracked rates
        were its confidences. Plans a step's size before drafting."""
        table = self.rates(max(max_depth, 1), fanout)
        heap = [(-table[0][r], 1) for r in range(fanout)]
        heapq.heapify(heap)
        out: list[float] = []
        while heap and len(out) < nodes:
            v, d = heapq.heappop(heap)
            out.append(-v)
            if d < max_depth:
                for r in range(fanout):
                    heapq.heappush(heap, (v * table[d][r], d + 1))
        return out

    def chain_values(self, depth: int) -> list[float]:
        """Predicted acceptance of the rank-0 chain's nodes at depths 1..``depth``."""
        out, v = [], 1.0
        for row in self.rates(depth, 1):
            v *= row[0]
            out.append(v)
        return out

    def update(self, tree: TokenTree, tokens: Sequence[int], scores: torch.Tensor | None = None) -> None:
        """One verified step: ``tokens`` = accepted draft tokens then the bonus. Every child of an accepted node is
        an observation, accepted or not (the first whose token was emitted there; none under the last accepted
        node): a rate is P(accepted | parent accepted), so a node's value is the product along its path. (Counting
        only the children tried before the accepted one made a low-ranked child's rate P(accepted | its elder
        siblings rejected): 0.3 / (1 - 0.6) = 0.75 for a second child the target picks 30 % of the time, and the
        chooser bought wide trees on it.) With the draft's ``scores`` the confidence cells learn too and the log
        records the confidence-based predictions."""
        kids, tree_tokens, node = tree.children(), tree.tokens.tolist(), 0
        cond = None if scores is None else _conditional(tree, scores)
        table = self.rates(len(tokens), max(map(len, kids))) if cond is None else None  # the step's predictions
        for d, tok in enumerate(tokens):
            last, accepted = d == len(tokens) - 1, None
            for rank, c in enumerate(kids[node]):
                hit = accepted is None and not last and tree_tokens[c] == tok
                if cond is None:
                    self.observe(d + 1, rank, hit, table[d][rank])
                else:
                    if len(self.log) < self.max_log:
                        self.log.append((d + 1, self.conf_rate(d + 1, cond[c]), hit))
                    self._conf_count(d + 1, cond[c], hit)
                    self._count(d + 1, rank, hit)  # the (depth, rank) rates still plan the budget
                if hit:
                    accepted = c
            if accepted is None:
                break
            node = accepted

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
