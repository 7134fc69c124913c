"""Test drafters and heads that know part of the answer, so end-to-end tests exercise acceptance, not only rejection.

Each wraps the real drafting code (heads, trees, KV) and plants the true continuation (the reference: prompt +
the target's greedy output) at random depths; where nothing is planted the real, untrained outputs stay, so
drafts are also rejected at random depths.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import nn

from specdec.drafters.ngram import NgramDrafter
from specdec.interfaces import Draft
from specdec.tree import TokenTree


def reference_hidden(model, reference: list[int]) -> torch.Tensor:
    """``[L, H]`` the model's last (post-norm) hidden states along ``reference``: row ``t`` predicted token
    ``t + 1``; what the LM head reads, and what the engine hands to drafters that need hidden states."""
    with torch.inference_mode():
        return model(torch.tensor([reference]), output_hidden_states=True).hidden_states[-1][0].clone()


class PlantedMedusaHeads(nn.Module):
    """Medusa heads (``inner``) that, on each call, know the next ``g`` tokens after the root for a random
    ``g`` (``K`` half the time, else uniform in ``[0, K)``): head ``k < g`` gets its top logit on the true
    token ``k + 1`` places after the root (if the head's draft vocabulary has it). The root's position is
    found by matching the hidden state (the one that predicted the root) against the reference's. Other heads
    keep their own logits."""

    def __init__(self, inner, model, reference: list[int], seed: int = 0) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.ref_hidden = reference_hidden(model, reference)
        self.reference, self.rng = list(reference), random.Random(seed)
        self.planted: list[int] = []  # g of each call (row)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.full_logits(hidden)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.inner.full_logits(hidden).clone()  # [B, K, V]
        pos = torch.cdist(hidden.reshape(-1, hidden.shape[-1]).to(self.ref_hidden.dtype), self.ref_hidden).argmin(-1)
        for b, p in enumerate(pos.tolist()):  # hidden[b] predicted reference[p + 1], the root
            k_max = self.config.num_heads
            g = k_max if self.rng.random() < 0.5 else self.rng.randrange(k_max)  # all heads know, half the time
            self.planted.append(g)
            for k in range(g):
                if p + 2 + k < len(self.reference):
                    tok = self.reference[p + 2 + k]
                    if torch.isfinite(logits[b, k, tok]):
                        logits[b, k, tok] = logits[b, k].max() + 5.0  # ~70 % of the head's mass
        return logits


def plant_eagle(head, model, reference: list[int], know: float = 0.75, seed: int = 0) -> None:
    """Make an EAGLE head know the answer part of the time: wherever a pair ``(feature, token)`` at position
    ``t`` carries the true token ``reference[t + 1]``, its predicted feature is replaced, with probability
    ``know`` per row and call, by the target's true feature at ``t + 1`` (whose LM-head argmax is the true next
    token). The head's real forward still runs (its KV is written as usual) and its output is kept elsewhere."""
    ref_hidden = reference_hidden(model, reference)
    real, rng = head.forward, random.Random(seed)

    def forward(features, tokens, positions, specdec):
        out = real(features, tokens, positions, specdec).clone()
        for j, (t, x) in enumerate(zip(positions.tolist(), tokens.tolist(), strict=True)):
            if t + 1 < len(reference) and x == reference[t + 1] and rng.random() < know:
                out[j] = ref_hidden[t + 1].to(out.dtype)
        return out

    head.forward = forward


class KnownDepthDrafter:
    """Chains whose acceptance is known in advance: step ``i`` drafts ``lengths[i]`` tokens whose first
    ``goods[i]`` are the true continuation and whose next one is wrong; sometimes a wrong sibling is added at
    the root (before the true child, so the walk must skip it). Under greedy verification the target accepts
    exactly ``goods[i]`` tokens; :meth:`expected_counters` gives the statistics the engine must report."""

    vocab_size = None
    needs_hidden = False

    def __init__(self, reference: list[int], seed: int, max_depth: int = 5) -> None:
        self.reference, self.rng, self.max_depth = reference, random.Random(seed), max_depth
        self.log: list[tuple[int, int]] = []  # (drafted length, planted good prefix) per proposal

    def propose(self, batch):
        drafts = []
        for item in batch:
            history = item.history.tolist()
            truth = self.reference[len(history) : len(history) + self.max_depth]
            length = self.rng.randint(0, min(self.max_depth, len(truth)))
            good = self.rng.randint(0, length)
            chain = truth[:good] + [(t + 1 + self.rng.randrange(63)) % 64 for t in truth[good:length]]
            tokens, parents = [history[-1]], [-1]
            if chain and self.rng.random() < 0.3 and good > 0:  # a wrong first child at the root
                tokens.append((truth[0] + 1) % 64)
                parents.append(0)
            for i, tok in enumerate(chain):
                parents.append(0 if i == 0 else len(tokens) - 1)
                tokens.append(tok)
            self.log.append((length, good))
            drafts.append(Draft(TokenTree(torch.tensor(tokens), torch.tensor(parents))))
        return drafts

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass

    def expected_counters(self) -> dict[str, list[int]]:
        """``depth_tried``, ``depth_accepted`` and ``accepted_hist`` as the definitions in
        :mod:`specdec.stats` give them for the logged steps (a rejected token at depth ``good + 1`` was tried)."""
        tried, accepted, hist = [0] * self.max_depth, [0] * self.max_depth, [0] * (self.max_depth + 1)
        for length, good in self.log:
            reach = good + int(length > good)
            for d in range(reach):
                tried[d] += 1
                accepted[d] += int(d < good)
            hist[good] += 1
        deepest = max((g + int(n > g) for n, g in self.log), default=0)
        return {"depth_tried": tried[:deepest], "depth_accepted": accepted[:deepest],
                "accepted_hist": hist[: max((g for _, g in self.log), default=0) + 1]}


class NgramWithNotes(NgramDrafter):
    """An n-gram drafter that has read a noisy copy of the text to come: its lookups run on ``notes + history``
    (the real search and tree merging), so its longest matches continue the way the target will, up to the
    corrupted notes, which make drafts fail at random depths."""

    def __init__(self, notes, **kwargs) -> None:
        super().__init__(**kwargs)
        self.notes = torch.as_tensor(notes)

    def propose(self, batch):
        return super().propose([replace(item, history=torch.cat([self.notes, item.history])) for item in batch])
