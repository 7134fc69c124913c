"""Draft vocabularies: drafter heads that score only the target's most frequent tokens.

A head's LM projection over the full vocabulary (49,152 x 576 for SmolLM2-135M, 113 MB in fp32) dominates a
small drafter's cost on CPU and in training. Restricting the *draft* to the ``N`` tokens the target actually emits
most often (FR-Spec, Zhao et al., 2025; EAGLE-3's ``d2t`` table) keeps most of the acceptance at a fraction of the
cost. Verification is untouched, so decoding stays exact: a token outside the draft vocabulary is simply never
proposed (its draft probability is 0), and the target still emits it as a residual or bonus token.

``vocab_ids`` (int64 ``[N]``, sorted, unique) maps draft index ``i`` to target token id ``vocab_ids[i]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch


def frequent_tokens(sequences: Iterable[Sequence[int]], size: int, vocab_size: int,
                    always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``sequences`` (ties: lower id first) plus every id of ``always``
    (e.g. EOS), as a sorted int64 tensor ``[<= size + len(always)]``.

    Raises ``ValueError`` for ``size < 1`` or ids outside ``[0, vocab_size)``."""
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
    counts = Counter(int(t) for seq in sequences for t in seq)
    bad = [t for t in [*counts, *always] if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token ids {sorted(set(bad))[:5]} are outside the vocabulary [0, {vocab_size})")
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(set(ranked) | {int(t) for t in always}), dtype=torch.long)


def check_vocab_ids(vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``vocab_ids`` validated (1-D int64, sorted, unique, in range); returned unchanged."""
    if vocab_ids.ndim != 1 or vocab_ids.dtype != torch.long or vocab_ids.numel() == 0:
        raise ValueError(f"vocab_ids must be a non-empty 1-D int64 tensor, got {tuple(vocab_ids.shape)} "
                         f"{vocab_ids.dtype}")
    if int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size or bool((vocab_ids.diff() <= 0).any()):
        raise ValueError(f"vocab_ids must be sorted, unique ids in [0, {vocab_size})")
    return vocab_ids


def expand_logits(logits: torch.Tensor, vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits ``[..., N]`` as full-vocabulary logits ``[..., V]`` (``-inf`` elsewhere);
    unchanged when ``vocab_ids`` is ``None``."""
    if vocab_ids is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.index_copy_(-1, vocab_ids.to(logits.device), logits)


def draft_index(tokens: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Position of each target token id of ``tokens`` (int64, any shape) in ``vocab_ids``, ``-1`` when absent."""
    table = torch.full((vocab_size,), -1, dtype=torch.long, device=tokens.device)
    table[vocab_ids.to(tokens.device)] = torch.arange(vocab_ids.numel(), device=tokens.device)
    return table[tokens]
