"""Token paths of draft trees (tuples of tokens below the root) and their estimated acceptance values: what the
hybrid drafter merges its sources by."""

from __future__ import annotations

import torch

from specdec.interfaces import Draft
from specdec.tree import TokenTree

Path = tuple[int, ...]
RANKS = 4  # sibling ranks with their own rate (rank >= RANKS - 1 shares the last)


def sibling_ranks(paths: list[Path]) -> dict[Path, int]:
    """Each path's rank among its siblings, in list order (parents before children)."""
    seen: dict[Path, int] = {}
    ranks: dict[Path, int] = {}
    for p in paths:
        ranks[p] = seen.get(p[:-1], 0)
        seen[p[:-1]] = ranks[p] + 1
    return ranks


def path_values(paths: list[Path], rates: list[list[float]]) -> dict[Path, float]:
    """Estimated acceptance probability of every path (prefix-closed, parents first): the product of the rates of
    its nodes' depths and sibling ranks."""
    ranks, values = sibling_ranks(paths), {(): 1.0}
    for p in paths:
        values[p] = values[p[:-1]] * rates[len(p) - 1][min(ranks[p], RANKS - 1)]
    del values[()]
    return values


def longest_match(history: torch.Tensor, max_ngram: int, min_ngram: int) -> int:
    """Length of the longest suffix of ``history`` (``min_ngram`` to ``max_ngram`` tokens) that also occurs
    earlier in it (the n-gram drafter's match); ``min_ngram`` when there is none (that source then proposes
    nothing)."""
    history = history.flatten()
    for n in range(min(max_ngram, history.numel() - 1), min_ngram, -1):
        windows = history[: history.numel() - 1].unfold(0, n, 1)
        if bool((windows == history[-n:]).all(dim=1).any()):
            return n
    return min_ngram


def tree_paths(tree: TokenTree) -> list[Path]:
    """Token path below the root of every non-root node, in node order: ``[N - 1]`` tuples."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    paths: list[Path] = [()]
    for i in range(1, len(tokens)):
        paths.append(paths[parents[i]] + (tokens[i],))
    return paths[1:]


def held(paths: set[Path] | list[Path], accepted: list[int]) -> int:
    """How many of the ``accepted`` tokens (bonus included) a proposal of these ``paths`` held: the longest prefix
    of them that is one of its paths."""
    found = paths if isinstance(paths, set) else set(paths)
    return next((d for d in range(len(accepted), 0, -1) if tuple(accepted[:d]) in found), 0)


def observe_rates(rates: list[list[float]], paths: list[Path], accepted: list[int], weight: float) -> None:
    """One step's evidence for one source's running rates ``rates[depth - 1][rank]`` (moving average, ``weight``
    of the newest): at each depth ``d`` whose accepted prefix lies in the source's proposal ``paths``, was the
    accepted token (the bonus at the last depth) its rank-``r`` child there, for each rank ``r`` the proposal had?"""
    children: dict[Path, list[int]] = {}
    for path in paths:
        children.setdefault(path[:-1], []).append(path[-1])
    for d in range(1, min(len(accepted), len(rates)) + 1):
        options = children.get(tuple(accepted[: d - 1]))
        if not options:
            return
        for rank, tok in enumerate(options):
            r = rates[d - 1][min(rank, RANKS - 1)]
            rates[d - 1][min(rank, RANKS - 1)] = r + weight * (float(tok == accepted[d - 1]) - r)
        if accepted[d - 1] not in options:
            return


def pass_through(draft: Draft, paths: list[Path], kept: set[Path]) -> Draft | None:
    """The model's own draft (probabilities included) when ``kept`` is all of it or a prefix of its chain, else
    ``None`` (the merged tree is then verified as one-hot proposals)."""
    if kept == set(paths) and len(paths) == draft.tree.num_nodes - 1:
        return draft
    n = len(kept) + 1
    if draft.tree.max_depth == draft.tree.num_nodes - 1 and kept == set(paths[: n - 1]):  # chain prefix
        probs = None if draft.probs is None else draft.probs[:n]
        return Draft(TokenTree.chain(draft.tree.tokens[:n]), probs, draft.without_replacement)
    return None
