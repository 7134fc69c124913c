"""Tree builders shared by drafters: static trees from a choices list, and dynamic best-first trees.

Both produce deterministic proposals (top-k picks), which the engine verifies as one-hot drafts: exact at any
temperature. Drafters that sample their tokens instead report probabilities in ``Draft.probs``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from specdec.tree import TokenTree

Expand = Callable[[list[tuple[int, ...]]], torch.Tensor]
# A tree builder as a generator: it yields the paths it wants expanded (one level at a time), receives their
# log-probabilities ``[len(paths), V]``, and returns its result. Many builders can then share one batched forward.
Steps = Generator[list[tuple[int, ...]], torch.Tensor, Any]


def drive(steps: Steps, expand: Expand) -> Any:
    """Run one builder with ``expand`` answering each request; returns the builder's result."""
    try:
        paths = next(steps)
        while True:
            paths = steps.send(expand(paths))
    except StopIteration as stop:
        return stop.value


def drive_batch(builders: Sequence[Steps], expand_batch: Callable[[list[list[tuple[int, ...]] | None]],
                                                                   list[torch.Tensor | None]]) -> list[Any]:
    """Run many builders level by level in lockstep: ``expand_batch(requests)`` gets each builder's paths (``None``
    for a finished builder) and answers all of them at once (one batched forward per level)."""
    results: list[Any] = [None] * len(builders)
    requests: list[list[tuple[int, ...]] | None] = []
    for i, b in enumerate(builders):
        try:
            requests.append(next(b))
        except StopIteration as stop:
            results[i] = stop.value
            requests.append(None)
    while any(r is not None for r in requests):
        answers = expand_batch(requests)
        for i, (b, r) in enumerate(zip(builders, requests, strict=True)):
            if r is None:
                continue
            try:
                requests[i] = b.send(answers[i])
            except StopIteration as stop:
                results[i], requests[i] = stop.value, None
    return results


def static_tree(root: int, choices: Sequence[Sequence[int]], topk_tokens: torch.Tensor) -> TokenTree:
    """Medusa-style static tree: ``topk_tokens [depth, K]`` = candidates per depth (e.g. each head's top-k)."""
    return TokenTree.from_choices(root, choices, topk_tokens)


def chain_choices(depth: int) -> list[tuple[int, ...]]:
    """The choices list of a top-1 chain of ``depth`` draft tokens."""
    return [(0,) * d for d in range(1, depth + 1)]


def best_first_tree(root: int, expand: Expand, budget: int, depth: int, topk: int) -> tuple[TokenTree, torch.Tensor]:
    """:func:`best_first_steps` driven by ``expand`` (one call per level)."""
    return drive(best_first_steps(root, budget, depth, topk), expand)


def best_first_steps(root: int, budget: int, depth: int, topk: int) -> Steps:
    """EAGLE-2-style dynamic tree: grow by draft confidence, then keep the best nodes.

    Args:
        root: root token.
        expand: ``expand(paths) -> logprobs [len(paths), V]``: the drafter's next-token log-probabilities after
            each path (a tuple of draft tokens below the root; ``()`` is the root itself). Called once per level
            with the whole frontier, so a model drafter runs one forward per level.
        budget: nodes in the final tree, root included (``>= 1``).
        depth: maximum draft depth.
        topk: children per expanded node, and frontier width per level.

    Each level expands the ``topk`` frontier nodes with the highest cumulative log-probability; every candidate
    child joins a pool; finally the ``budget - 1`` best pool nodes by cumulative log-probability are kept. A
    child's score never exceeds its parent's, and ties are broken parent-first, so the kept set is closed under
    ancestors. Returns the tree (nodes ordered by depth, then score) and the kept nodes' cumulative
    log-probabilities ``[N]`` (0 for the root).
    """
    if budget < 1 or depth < 0 or topk < 1:
        raise ValueError(f"need budget >= 1, depth >= 0, topk >= 1; got {budget}, {depth}, {topk}")
    pool: list[tuple[float, tuple[int, ...]]] = []  # (cumulative log-prob, path)
    frontier: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for _ in range(depth if budget > 1 else 0):
        logprobs = yield [path for _, path in frontier]
        top = logprobs.topk(topk, dim=-1)
        children = [
            (score + float(lp), path + (int(tok),))
            for (score, path), lps, toks in zip(frontier, top.values, top.indices, strict=True)
            for lp, tok in zip(lps, toks, strict=True)
        ]
        pool += children
        frontier = sorted(children, key=lambda c: -c[0])[:topk]
    kept = sorted(pool, key=lambda c: (-c[0], len(c[1])))[: budget - 1]
    kept_paths = {p for _, p in kept}
    kept = [c for c in kept if all(c[1][:d] in kept_paths for d in range(1, len(c[1])))]  # ancestor-closed
    kept.sort(key=lambda c: (len(c[1]), -c[0]))
    index = {(): 0}
    tokens, parents, scores = [root], [-1], [0.0]
    for score, path in kept:
        index[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(index[path[:-1]])
        scores.append(score)
    return TokenTree(torch.tensor(tokens), torch.tensor(parents)), torch.tensor(scores)


def choices_tree(root: int, choices: Sequence[Sequence[int]], expand: Expand) -> TokenTree:
    """:func:`choices_steps` driven by ``expand``."""
    return drive(choices_steps(root, choices), expand)


def choices_steps(root: int, choices: Sequence[Sequence[int]]) -> Steps:
    """A static-shape tree whose node ``(c_1, ..., c_d)`` is the rank-``c_d`` child of node ``(c_1, ..., c_{d-1})``
    under the drafter's own distribution at that node (``expand`` as in :func:`best_first_tree`, called once per
    level with the nodes that have children in ``choices``)."""
    shape = sorted({tuple(int(x) for x in c) for c in choices}, key=lambda c: (len(c), c))
    token_of: dict[tuple[int, ...], tuple[int, ...]] = {(): ()}  # choice -> token path
    for d in range(1, max((len(c) for c in shape), default=0) + 1):
        level = [c for c in shape if len(c) == d]
        parents = sorted({c[:-1] for c in level})
        missing = [p for p in parents if p not in token_of]
        if missing:
            raise ValueError(f"bad tree: choice {missing[0] + (0,)} has no parent choice {missing[0]}")
        logprobs = yield [token_of[p] for p in parents]
        ranked = {p: logprobs[i].topk(1 + max(c[-1] for c in level if c[:-1] == p)).indices.tolist()
                  for i, p in enumerate(parents)}
        for c in level:
            token_of[c] = token_of[c[:-1]] + (ranked[c[:-1]][c[-1]],)
    index = {(): 0}
    tokens, parents_out = [root], [-1]
    for c in shape:
        index[c] = len(tokens)
        tokens.append(token_of[c][-1])
        parents_out.append(index[c[:-1]])
    return TokenTree(torch.tensor(tokens), torch.tensor(parents_out))


def default_choices() -> list[tuple[int, ...]]:
    """A 15-node static tree (Medusa-style, sorted): wide near the root, a top-1 spine to depth 4."""
    return [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
            (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0)]


def union_tree(root: int, paths: Sequence[tuple[int, ...]]) -> tuple[TokenTree, dict[tuple[int, ...], int]]:
    """The smallest tree under ``root`` containing every path (token tuples below the root), nodes ordered by
    ``(depth, path)``, and the node index of every path prefix (``()`` -> 0)."""
    nodes = sorted({p[:d] for p in paths for d in range(1, len(p) + 1)}, key=lambda p: (len(p), p))
    index = {(): 0}
    tokens, parents = [root], [-1]
    for p in nodes:
        index[p] = len(tokens)
        tokens.append(p[-1])
        parents.append(index[p[:-1]])
    return TokenTree(torch.tensor(tokens), torch.tensor(parents)), index


def level_topk(logprobs: torch.Tensor, k: int,
               vocab_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``logprobs [..., N]`` (a draft vocabulary's, or the full one's when ``vocab_ids`` is ``None``)
    as ``(values, target token ids)``, both ``[..., min(k, N)]``, values descending."""
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return top.values, top.indices if vocab_ids is None else vocab_ids.to(top.indices.device)[top.indices]


class BestFirstBatch:
    """:func:`best_first_steps` for a whole batch as tensor ops (no Python per node): same trees, same scores.

    Each level the drafter gives the top-``k`` children of every frontier node (:meth:`step`, e.g. from
    :func:`level_topk`): ``values [B, F, k]`` descending log-probabilities and ``tokens [B, F, k]``. All candidates
    join the pool (cumulative log-probability = the parent's + the child's); the new frontier is the ``topk``
    best candidates (ties: pool order, i.e. frontier order then rank, as the per-node builder's stable sort). At the
    end the ``budget - 1`` best pool nodes are kept (ties: pool order, so shallower first). A child never scores
    above its parent and comes later in the pool, so the kept set is ancestor-closed without a check.

    Attributes after each :meth:`step` (for drafters that forward the new frontier): ``frontier_tokens [B, F]``,
    ``frontier_parent [B, F]`` (index of each new frontier node's parent in the previous frontier).
    """

    def __init__(self, roots: torch.Tensor, budget: int | Sequence[int] | torch.Tensor, depth: int, topk: int) -> None:
        self.roots = torch.as_tensor(roots, dtype=torch.long).flatten()
        b = self.roots.numel()
        self.budgets = torch.as_tensor(budget, dtype=torch.long).flatten().expand(b).clone() if b else \
            torch.zeros(0, dtype=torch.long)
        most = int(self.budgets.max()) if b else 1
        if (b and int(self.budgets.min()) < 1) or depth < 0 or topk < 1:
            raise ValueError(f"need budget >= 1, depth >= 0, topk >= 1; got {budget}, {depth}, {topk}")
        self.budget, self.depth, self.topk = most, depth, topk
        # a node ranked >= budget - 1 among its level (or its siblings) has that many better-or-equal, earlier
        # nodes, so neither it nor its descendants are kept: the frontier and the children per node need no more
        # than budget - 1, and the tree no more than budget - 1 levels (the same trees, fewer nodes forwarded)
        self.width = min(topk, most - 1)
        self.levels = min(depth, most - 1)  # levels still to expand
        self._scores: list[torch.Tensor] = []  # per level [B, C]
        self._tokens: list[torch.Tensor] = []
        self._parents: list[torch.Tensor] = []  # pool index of each candidate's parent (-1: the root)
        self._frontier_pool = torch.full((b, 1), -1, dtype=torch.long)  # pool index of each frontier node
        self._frontier_score: torch.Tensor | None = None  # [B, F]; None = the root (score 0)
        self._size = 0  # pool size
        self.frontier_tokens = self.roots[:, None]
        self.frontier_parent = torch.zeros(b, 1, dtype=torch.long)

    @property
    def more(self) -> bool:
        """Whether :meth:`step` wants another level."""
        return self.levels > 0

    def step(self, values: torch.Tensor, tokens: torch.Tensor) -> None:
        """One level: ``values``, ``tokens [B, F, k]`` for the current frontier (``F`` = its width)."""
        if not self.more:
            raise RuntimeError("the tree is complete")
        values, tokens = values[..., : self.width], tokens[..., : self.width]  # sorted: the best ``width``
        b, f, k = values.shape
        values = values.detach().cpu().double()  # float64 sums, as the per-node builder's Python floats
        parent_score = values.new_zeros(b, f) if self._frontier_score is None else self._frontier_score
        scores = (parent_score[:, :, None] + values).reshape(b, f * k)
        self._scores.append(scores)
        self._tokens.append(tokens.detach().cpu().reshape(b, f * k))
        self._parents.append(self._frontier_pool.to(torch.long).repeat_interleave(k, dim=1))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.width]
        self._frontier_pool = self._size + order
        self._frontier_score = scores.gather(1, order)
        self.frontier_tokens = self._tokens[-1].gather(1, order)
        self.frontier_parent = order // k
        self._size += f * k
        self.levels -= 1

    def result(self) -> tuple[list[TokenTree], list[torch.Tensor]]:
        """Each sequence's tree (nodes ordered by depth, then score, then pool order) and the kept nodes'
        cumulative log-probabilities ``[N]`` (0 for the root), as :func:`best_first_steps` returns them."""
        b = self.roots.numel()
        if not self._scores:
            return [TokenTree(r[None], torch.tensor([-1])) for r in self.roots], [torch.zeros(1) for _ in range(b)]
        scores, tokens, parents = (torch.cat(x, dim=1) for x in (self._scores, self._tokens, self._parents))
        depth = torch.cat([torch.full((s.shape[1],), d + 1) for d, s in enumerate(self._scores)])
        keep = min(self.budget - 1, self._size)
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]  # [B, keep] pool ids
        # a row with a smaller budget keeps a prefix of its ranking (ancestor-closed too); the rest sorts last
        kept = torch.arange(keep)[None, :] < (self.budgets[:, None] - 1)  # [B, keep]
        # output order: depth, then rank (rank = score descending, ties pool order)
        key = torch.where(kept, depth[ranked] * keep + torch.arange(keep), (len(self._scores) + 1) * keep)
        order = ranked.gather(1, torch.sort(key, dim=1, stable=True).indices)
        node_of = torch.zeros(b, self._size + 1, dtype=torch.long)  # pool index + 1 -> node index (root 0)
        node_of.scatter_(1, order + 1, torch.arange(1, keep + 1).expand(b, keep))
        out_parents = node_of.gather(1, parents.gather(1, order) + 1)
        out_tokens, out_scores = tokens.gather(1, order), scores.gather(1, order)
        trees, kept_scores = [], []
        for i, n in enumerate(kept.sum(1).tolist()):
            trees.append(TokenTree(torch.cat([self.roots[i : i + 1], out_tokens[i, :n]]),
                                   torch.cat([torch.tensor([-1]), out_parents[i, :n]])))
            kept_scores.append(torch.cat([out_scores.new_zeros(1), out_scores[i, :n]]).float())
        return trees, kept_scores
