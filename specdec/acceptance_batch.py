"""Whole-batch acceptance: fixed-shape outputs for ``B`` trees with tensor ops, no host sync, no per-node Python.

:func:`greedy_accept_batch` is :func:`specdec.acceptance.greedy_accept` for a batch; :func:`rejection_sample_batch`
is :func:`specdec.acceptance.tree_rejection_sample` for a batch, walking all trees one level (and one sibling rank)
at a time. Its randomness is drawn per request up front (one uniform per tree node, each node being tested at most
once, and one exponential-race noise vector for the final token), so a request consumes the same random numbers
whatever else is in the batch, and the result equals the sequential rule fed the same noise (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.tree import TokenTree


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
        """Pad on the host, then two transfers (the integer fields together, the ancestor masks): on CUDA every
        blocking copy waits for the stream, so one copy per field would cost a round trip each."""
        n = max(t.num_nodes for t in trees)
        ints = torch.zeros(4, len(trees), n, dtype=torch.long)  # tokens, parents, depth, valid
        ints[1] = -1
        anc = torch.zeros(len(trees), n, n, dtype=torch.bool)
        for b, t in enumerate(trees):
            m = t.num_nodes
            ints[0, b, :m], ints[1, b, :m], ints[2, b, :m], ints[3, b, :m] = t.tokens, t.parents, t.depth, 1
            anc[b, :m, :m] = t.ancestor_mask
        ints, anc = ints.to(device), anc.to(device)
        return cls(tokens=ints[0], parents=ints[1], depth=ints[2], ancestors=anc, valid=ints[3].bool())


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


def child_table(trees: PaddedTrees, max_children: int) -> torch.Tensor:
    """``[B, N, K]`` int64 (``K = max_children``, a host value): ``[b, u, k]`` = the ``k``-th child of node ``u``
    in node order, -1 if none."""
    parents, valid = trees.parents, trees.valid
    b, n = parents.shape
    earlier = torch.ones(n, n, dtype=torch.bool, device=parents.device).tril_(-1)
    siblings = (parents[:, :, None] == parents[:, None, :]) & earlier & valid[:, None, :]
    rank = siblings.sum(-1)  # [B, N], a node's rank among its siblings
    table = torch.full((b, n + 1, n), -1, dtype=torch.long, device=parents.device)
    is_child = valid & (parents >= 0)
    rows = torch.where(is_child, parents, n)  # non-children land in the spare row n
    nodes = torch.arange(n, device=parents.device).expand(b, n)
    table[torch.arange(b, device=parents.device)[:, None], rows, rank] = torch.where(is_child, nodes, -1)
    return table[:, :n, :max_children]


def rejection_sample_batch(trees: PaddedTrees, target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                           uniforms: torch.Tensor, race: torch.Tensor, without_replacement: torch.Tensor,
                           max_depth: int, max_children: int) -> BatchVerdict:
    """Lossless tree rejection sampling for ``B`` trees at once.

    Args:
        trees: the padded trees (``N`` nodes).
        target_probs: ``[B, N, V]`` processed target distribution after each node.
        draft_probs: ``[B, N, V]`` distribution each node was drawn from, or ``None`` (one-hot proposals).
        uniforms: ``[B, N]`` U(0, 1), node ``c``'s acceptance test uses ``uniforms[:, c]``.
        race: ``[B, V]`` Exp(1) noise; the bonus token is ``argmax(p / race)`` of the final distribution ``p``.
        without_replacement: ``[B]`` bool, siblings were drawn without replacement (see the sequential rule).
        max_depth: deepest tree's depth ``D`` (host value).
        max_children: most children of any node (host value).

    At each level the current node's children are tried in node order (one sibling rank per tensor step); a child
    ``x`` is accepted iff ``u * q(x) < p(x)``; a rejection replaces ``p`` by ``normalize(max(p - q, 0))``.
    """
    b, n, v = target_probs.shape
    dev = target_probs.device
    rows = torch.arange(b, device=dev)
    kids = child_table(trees, max(1, max_children))  # [B, N, K]
    max_kids = kids.shape[2]
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    final = target_probs[:, 0].clone()
    path = torch.full((b, max_depth + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    for level in range(max_depth + 1):
        p = torch.where(done[:, None], final, target_probs[rows, cur])
        drawn = torch.zeros(b, v, dtype=torch.bool, device=dev)
        accepted = torch.zeros(b, dtype=torch.bool, device=dev)
        nxt = cur.clone()
        for k in range(max_kids):
            child = kids[rows, cur, k]  # [B]
            active = ~done & ~accepted & (child >= 0)
            c = child.clamp(min=0)
            x = trees.tokens[rows, c]  # [B]
            if draft_probs is None:
                q = torch.nn.functional.one_hot(x, v).to(p.dtype)
            else:
                q = draft_probs[rows, c].to(p.dtype)
                masked = q.masked_fill(drawn, 0.0)
                q = torch.where(without_replacement[:, None] & drawn.any(-1, keepdim=True),
                                masked / masked.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny), q)
            px, qx = p.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]
            ok = active & (uniforms[rows, c] * qx < px)
            rejected = active & ~ok
            residual = (p - q).clamp(min=0.0)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)
            p = torch.where(rejected[:, None], residual, p)
            drawn[rows, x] |= rejected & without_replacement
            accepted |= ok
            nxt = torch.where(ok, child, nxt)
        stop = ~done & ~accepted
        final = torch.where(stop[:, None], p, final)
        done |= stop
        cur = torch.where(accepted, nxt, cur)
        if level + 1 <= max_depth:
            path[:, level + 1] = torch.where(accepted, nxt, -1)
    accept_len = (path >= 0).sum(-1) - 1
    bonus = (final / race.clamp(min=torch.finfo(final.dtype).tiny)).argmax(-1)
    drafted = trees.tokens.gather(1, path.clamp(min=0))
    pos = torch.arange(max_depth + 1, device=dev)[None]
    shifted = torch.nn.functional.pad(drafted[:, 1:], (0, 1), value=-1)
    out = torch.where(pos < accept_len[:, None], shifted,
                      torch.where(pos == accept_len[:, None], bonus[:, None], -1))
    return BatchVerdict(accept_len, out, path)
