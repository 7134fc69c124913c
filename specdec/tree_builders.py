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
