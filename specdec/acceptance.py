"""Acceptance rules: given a tree and the target's outputs, which nodes are kept and what the bonus token is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one tree.

    Attributes:
        path: accepted node indices from the root, ``[A + 1]`` (``path[0] == 0``; ``A`` accepted draft tokens).
        tokens: ``[A + 1]`` int64, the accepted draft tokens followed by the bonus token.
    """

    path: list[int]
    tokens: torch.Tensor

    @property
    def num_accepted(self) -> int:
        """Accepted draft tokens (the bonus token not included)."""
        return len(self.path) - 1


def greedy_accept(tree: TokenTree, target_tokens: torch.Tensor) -> Verdict:
    """Longest root-to-leaf prefix whose draft tokens equal the target's argmax, plus the bonus token.

    Args:
        tree: the verified tree.
        target_tokens: ``[N]`` int64, the target's argmax after each node.

    Walks from the root: at node ``u`` the target's next token is ``target_tokens[u]``; if a child of ``u`` carries
    that token, move to it (the first such child), else stop. The bonus token is ``target_tokens[last]``.
    """
    target = target_tokens.tolist()
    tokens = tree.tokens.tolist()
    children = tree.children()
    path = [0]
    while True:
        want = target[path[-1]]
        nxt = next((c for c in children[path[-1]] if tokens[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
    accepted = [tokens[i] for i in path[1:]] + [target[path[-1]]]
    return Verdict(path, torch.tensor(accepted, dtype=torch.long))
