"""Acceptance rules: given a tree and the target's outputs, which nodes are kept and what the bonus token is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.sampling import sample
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


def tree_rejection_sample(
    tree: TokenTree,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
    without_replacement: bool = False,
) -> Verdict:
    """Lossless multi-draft speculative sampling over a token tree (recursive rejection sampling).

    Args:
        tree: the verified tree; siblings are tried in node order, which must be the order they were drafted in.
        target_probs: ``[N, V]`` processed target distribution after each node (see ``process_logits``).
        draft_probs: ``[N, V]`` or ``None``. Row ``i`` is the distribution node ``i``'s token was drawn from (the
            drafter's distribution at ``i``'s parent, processed the same way). ``None`` = deterministic proposals,
            verified as one-hot ``q_i = e(x_i)``, which is exact for any drafter whose proposals depend only on
            the history.
        without_replacement: the siblings were drawn from their parent's ``q`` without replacement (e.g. the
            Gumbel-top-k trick); each later sibling's proposal is then ``q`` restricted to the tokens not yet
            drawn, renormalised.

    At node ``u`` with target ``p``: for each child ``c_i`` (token ``x_i``, proposal ``q_i``) accept with probability
    ``min(1, p(x_i) / q_i(x_i))``; on rejection ``p <- normalize(max(p - q_i, 0))`` and try the next sibling; if all
    are rejected, the bonus token is drawn from the residual ``p``. After the last accepted node the bonus is drawn
    from its ``p``. Each step is a standard rejection sampler for the current ``p`` (Leviathan et al. 2023, Thm 1),
    so every emitted token follows the target (SpecInfer's multi-step speculative sampling, Miao et al. 2024,
    Alg. 2; with sampling without replacement: recursive rejection sampling, Jeon et al. 2024, "Recursive
    Speculative Decoding", Sec. 3). Without replacement, a rejected ``x_i`` has ``p(x_i) < q_i(x_i)`` so the
    residual is 0 there, and ``q_{i+1}`` (which excludes ``x_1..x_i``) still covers the residual's support.
    """
    tokens = tree.tokens.tolist()
    children = tree.children()
    path = [0]
    while True:
        node = path[-1]
        p = target_probs[node]
        drawn = torch.zeros_like(p, dtype=torch.bool) if without_replacement else None
        accepted = None
        for child in children[node]:
            x = tokens[child]
            q = _proposal(draft_probs, child, x, p, drawn)
            u = torch.rand((), generator=generator, dtype=p.dtype, device=p.device)
            if u * q[x] < p[x]:  # u < p/q, without dividing
                accepted = child
                break
            p = _residual(p, q)
            if drawn is not None:
                drawn[x] = True
        if accepted is None:
            bonus = int(sample(p, generator))
            break
        path.append(accepted)
    accepted_tokens = [tokens[i] for i in path[1:]] + [bonus]
    return Verdict(path, torch.tensor(accepted_tokens, dtype=torch.long))


def _proposal(
    draft_probs: torch.Tensor | None, child: int, x: int, p: torch.Tensor, drawn: torch.Tensor | None
) -> torch.Tensor:
    if draft_probs is None:
        q = torch.zeros_like(p)
        q[x] = 1.0
        return q
    q = draft_probs[child].to(p.dtype)
    if drawn is not None and bool(drawn.any()):
        q = q.masked_fill(drawn, 0.0)
        q = q / q.sum()
    return q


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p - q).clamp_(min=0.0)
    total = r.sum()
    return r / total if total > 0 else p  # total == 0 only if p == q, where nothing is ever rejected


def typical_accept_lossy(
    tree: TokenTree,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> Verdict:
    """LOSSY typical acceptance (Medusa, Cai et al. 2024, Sec. 2.3.1): NOT distribution-preserving; opt-in only.

    A child ``x`` of ``u`` is accepted if ``p_u(x) >= min(posterior_threshold, posterior_alpha * exp(-H(p_u)))``
    (the first such child in node order); the bonus token is sampled from the last accepted node's ``p``.
    ``target_probs [N, V]`` as in :func:`tree_rejection_sample`.
    """
    tokens = tree.tokens.tolist()
    children = tree.children()
    entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)  # [N]
    cutoff = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * (-entropy).exp())
    path = [0]
    while True:
        node = path[-1]
        nxt = next((c for c in children[node] if target_probs[node, tokens[c]] >= cutoff[node]), None)
        if nxt is None:
            break
        path.append(nxt)
    bonus = int(sample(target_probs[path[-1]], generator))
    return Verdict(path, torch.tensor([tokens[i] for i in path[1:]] + [bonus], dtype=torch.long))


@dataclass(frozen=True)
class PaddedTrees:
    """A batch of trees padded to ``N`` nodes, for whole-batch tensor ops (all on one device).

    Attributes:
        tokens: ``[B, N]`` int64 (padding 0).
        parents: ``[B, N]`` int64 (root and padding -1).
        depth: ``[B, N]`` int64 (padding 0).
        ancestors: ``[B, N, N]`` bool, each tree's ancestor mask (padding rows and columns false).
        valid: ``[B, N]`` bool, real nodes.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    ancestors: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def stack(cls, trees: list[TokenTree], device: torch.device | str = "cpu") -> PaddedTrees:
        n = max(t.num_nodes for t in trees)

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, n - x.shape[-1]), value=value)

        anc = torch.stack([torch.nn.functional.pad(t.ancestor_mask, (0, n - t.num_nodes, 0, n - t.num_nodes))
                           for t in trees])
        return cls(
            tokens=torch.stack([pad(t.tokens, 0) for t in trees]).to(device),
            parents=torch.stack([pad(t.parents, -1) for t in trees]).to(device),
            depth=torch.stack([pad(t.depth, 0) for t in trees]).to(device),
            ancestors=anc.to(device),
            valid=torch.stack([pad(torch.ones(t.num_nodes, dtype=torch.long), 0) for t in trees]).bool().to(device),
        )


@dataclass(frozen=True)
class BatchVerdict:
    """Fixed-shape outcome of verifying ``B`` trees (``D`` = the deepest tree's depth).

    Attributes:
        accept_len: ``[B]`` int64, accepted draft tokens per tree (the bonus token not counted).
        tokens: ``[B, D + 1]`` int64, the accepted draft tokens then the bonus token, padded with -1.
        path: ``[B, D + 1]`` int64, accepted node indices from the root (``path[:, 0] == 0``), padded with -1.
    """

    accept_len: torch.Tensor
    tokens: torch.Tensor
    path: torch.Tensor


def greedy_accept_batch(trees: PaddedTrees, target_tokens: torch.Tensor, max_depth: int) -> BatchVerdict:
    """:func:`greedy_accept` for a whole batch with tensor ops only (no host sync, no per-node Python).

    ``target_tokens [B, N]`` int64: the target's argmax after each node (padding: anything); ``max_depth`` = ``D``
    (host value, bounds the output width). A node is **ok** when its token equals the target's argmax at its
    parent and it is the first child of that parent carrying that token (the walk of :func:`greedy_accept`
    takes the first match); its path is ok when every ancestor is. At most one child per parent is ok, so the ok
    paths form one chain; the deepest ok node is where the walk ends, its ancestor row is the accepted path.
    """
    tokens, parents, valid, anc = trees.tokens, trees.parents, trees.valid, trees.ancestors
    b, n = tokens.shape
    want = target_tokens.gather(1, parents.clamp(min=0))  # [B, N], the argmax at each node's parent
    ok = (tokens == want) & valid & (parents >= 0)
    same = (parents[:, :, None] == parents[:, None, :]) & (tokens[:, :, None] == tokens[:, None, :])
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril_(-1)  # j < i
    ok &= ~(same & earlier & valid[:, None, :]).any(-1)
    ok[:, 0] = True  # the root
    path_ok = ~(anc & ~ok[:, None, :]).any(-1) & valid  # [B, N]
    deepest = torch.where(path_ok, trees.depth, -1).argmax(-1, keepdim=True)  # [B, 1]
    accept_len = trees.depth.gather(1, deepest)[:, 0]
    cols = torch.arange(n, device=tokens.device)
    on_path = anc.gather(1, deepest[:, :, None].expand(b, 1, n))[:, 0]  # [B, N]
    path = torch.where(on_path, cols, n).sort(-1).values[:, : max_depth + 1]
    width = path.shape[1]
    pos = torch.arange(width, device=tokens.device)[None]
    path = torch.where(pos <= accept_len[:, None], path, -1)
    drafted = tokens.gather(1, path.clamp(min=0))  # [B, D + 1], token of each path node
    bonus = target_tokens.gather(1, deepest)  # [B, 1]
    shifted = torch.nn.functional.pad(drafted[:, 1:], (0, 1), value=-1)
    out = torch.where(pos < accept_len[:, None], shifted, torch.where(pos == accept_len[:, None], bonus, -1))
    return BatchVerdict(accept_len, out, path)
