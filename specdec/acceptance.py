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
    uniforms: torch.Tensor | None = None,
    race: torch.Tensor | None = None,
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
        uniforms, race: pre-drawn noise instead of ``generator``: ``uniforms [N]`` (node ``c``'s test uses
            ``uniforms[c]``) and ``race [V]`` Exp(1) (the bonus is ``argmax(p / race)``), as
            :func:`specdec.acceptance_batch.rejection_sample_batch` uses them.

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
            u = uniforms[child] if uniforms is not None else torch.rand(
                (), generator=generator, dtype=p.dtype, device=p.device)
            if u * q[x] < p[x]:  # u < p/q, without dividing
                accepted = child
                break
            p = _residual(p, q)
            if drawn is not None:
                drawn[x] = True
        if accepted is None:
            bonus = int((p / race).argmax()) if race is not None else int(sample(p, generator))
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

