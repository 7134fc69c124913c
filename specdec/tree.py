"""Token trees: what a drafter proposes and the target verifies in one forward pass.

Glossary (used across the project):

* node 0 is the **root**: the last token the target sampled, not yet in the KV cache;
* every other node is a **draft** token; ``parents[i] < i`` (topological order);
* **depth** of the root is 0; a node's RoPE position is ``committed_len + depth``;
* a node's KV slot is ``committed_len + index`` (siblings share a depth, never a slot);
* the **ancestor mask** row ``i`` is true at ``j`` iff ``j == i`` or ``j`` is an ancestor of ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenTree:
    """A token tree in topological order (node 0 = root).

    Attributes:
        tokens: ``[N]`` int64, token id of each node (``tokens[0]`` is the root token).
        parents: ``[N]`` int64, parent index of each node; ``parents[0] == -1`` and ``0 <= parents[i] < i``.
        depth: ``[N]`` int64, derived; distance from the root.
        ancestor_mask: ``[N, N]`` bool, derived; lower triangular with a true diagonal.

    Raises ``ValueError`` naming the problem for an empty tree, a parent that does not come before its child,
    a shape mismatch, or a tree deeper than ``max_depth`` when one is given to :meth:`check_fits`.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor = field(init=False, repr=False, compare=False)
    ancestor_mask: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.tokens, dtype=torch.long).flatten()
        parents = torch.as_tensor(self.parents, dtype=torch.long).flatten()
        n = tokens.numel()
        if n == 0:
            raise ValueError("bad tree: a token tree needs at least the root node (got 0 nodes)")
        if parents.numel() != n:
            raise ValueError(f"bad tree: {n} tokens but {parents.numel()} parents")
        if int(parents[0]) != -1:
            raise ValueError(f"bad tree: node 0 must be the root with parent -1, got parent {int(parents[0])}")
        if n > 1:
            idx = torch.arange(1, n)
            bad = (parents[1:] < 0) | (parents[1:] >= idx)
            if bool(bad.any()):
                i = int(idx[bad][0])
                raise ValueError(
                    f"bad tree: node {i} has parent {int(parents[i])}; parents must come before their children "
                    f"(0 <= parent < index)"
                )
        if torch.equal(parents, torch.arange(-1, n - 1)):  # chain (also every prefill): closed form
            depth = torch.arange(n)
            mask = depth[:, None] >= depth[None, :]  # (tril_ wakes the thread pool even for a 2 x 2 mask)
        else:
            depth, mask = _depth_and_mask(parents.tolist())
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "ancestor_mask", mask)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def chain(cls, tokens: Sequence[int] | torch.Tensor) -> TokenTree:
        """A chain ``root -> t1 -> t2 ...``; ``tokens[0]`` is the root."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        return cls(tokens, torch.arange(-1, tokens.numel() - 1))

    @classmethod
    def from_choices(
        cls, root: int, choices: Sequence[Sequence[int]], candidates: torch.Tensor | Sequence[Sequence[int]]
    ) -> TokenTree:
        """A static tree from a Medusa-style choices list.

        Args:
            root: the root token id.
            choices: paths of candidate ranks, e.g. ``[(0,), (1,), (0, 0)]``: node ``(0, 0)`` is the top-1
                candidate at depth 2 under the top-1 candidate at depth 1. Every prefix of a choice must be a
                choice itself. Nodes are ordered by ``(len, choice)`` as in Medusa.
            candidates: ``[max_depth, K]`` int64, ``candidates[d][k]`` = the rank-``k`` token proposed for depth
                ``d + 1`` (e.g. the top-k of Medusa head ``d``).
        """
        candidates = torch.as_tensor(candidates, dtype=torch.long)
        parents, ranks, depths = choices_to_parents(choices)
        if len(parents) > 1 and (max(depths) > candidates.shape[0] or max(ranks) >= candidates.shape[1]):
            raise ValueError(
                f"bad tree: choices need {max(depths)} depths x {max(ranks) + 1} ranks, "
                f"candidates has shape {tuple(candidates.shape)}"
            )
        tokens = [root] + [int(candidates[d - 1, r]) for d, r in zip(depths[1:], ranks[1:], strict=True)]
        return cls(torch.tensor(tokens), torch.tensor(parents))

    # ------------------------------------------------------------------ derived views
    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def children(self) -> list[list[int]]:
        """``children()[i]`` = indices of node ``i``'s children, in node order."""
        out: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            out[p].append(i)
        return out

    def leaf_paths(self) -> list[list[int]]:
        """Root-to-leaf paths as lists of node indices (each starts with 0)."""
        kids = self.children()
        return [torch.nonzero(self.ancestor_mask[i]).flatten().tolist() for i in range(self.num_nodes) if not kids[i]]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node`` inclusive."""
        return torch.nonzero(self.ancestor_mask[node]).flatten().tolist()

    def check_fits(self, max_nodes: int, max_depth: int | None = None) -> None:
        """Raise ``ValueError`` if the tree has more than ``max_nodes`` nodes or is deeper than ``max_depth``."""
        if self.num_nodes > max_nodes:
            raise ValueError(f"bad tree: {self.num_nodes} nodes exceed the per-step limit of {max_nodes}")
        if max_depth is not None and self.max_depth > max_depth:
            raise ValueError(f"bad tree: depth {self.max_depth} exceeds the limit of {max_depth}")


def _depth_and_mask(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(parents)
    depth = [0] * n
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[0, 0] = True
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
        mask[i] = mask[parents[i]]
        mask[i, i] = True
    return torch.tensor(depth, dtype=torch.long), mask


def choices_to_parents(choices: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Parent array, per-node candidate rank and depth for a Medusa-style choices list.

    The root is included as node 0 (parent -1, rank -1, depth 0).
    Nodes are sorted by ``(depth, choice)``. Raises ``ValueError`` if a choice's prefix is missing or a rank is
    negative.
    """
    uniq = sorted({tuple(int(x) for x in c) for c in choices}, key=lambda c: (len(c), c))
    index = {(): 0}
    parents, ranks, depths = [-1], [-1], [0]
    for c in uniq:
        if len(c) == 0:
            raise ValueError("bad tree: an empty choice; the root is implicit")
        if min(c) < 0:
            raise ValueError(f"bad tree: negative rank in choice {c}")
        if c[:-1] not in index:
            raise ValueError(f"bad tree: choice {c} has no parent choice {c[:-1]}")
        index[c] = len(parents)
        parents.append(index[c[:-1]])
        ranks.append(c[-1])
        depths.append(len(c))
    return parents, ranks, depths
