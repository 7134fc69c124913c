"""The three roles: a :class:`Drafter` proposes a token tree, the target verifies it, an acceptance rule decides.

Glossary (vLLM's words): **accepted** tokens are draft tokens the rule keeps; the **bonus** token is the target's
own token after the last accepted node (always produced, so every verification step yields at least one token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specdec.sampling import GREEDY, SamplingParams
from specdec.tree import TokenTree


@dataclass(frozen=True)
class Draft:
    """A drafter's proposal for one sequence.

    Attributes:
        tree: the token tree; ``tree.tokens[0]`` must be the sequence's last token (the root).
        probs: ``[N, V]`` float or ``None``. Row ``i`` is the distribution node ``i``'s token was drawn from (the
            drafter's distribution at ``i``'s parent, processed with the request's ``SamplingParams``); row 0 is
            unused. ``None`` for deterministic drafters (n-gram, top-k trees), verified as one-hot proposals.
        without_replacement: siblings were drawn from their parent's distribution without replacement.
        scores: ``[N]`` float or ``None``: the drafter's own confidence, the cumulative log-probability of each
            node's path under its draft distribution (0 at the root), as best-first trees rank their nodes.
            Informational only (verification never reads it): ``--tree-budget auto`` calibrates it against
            observed acceptance to size and prune trees.
    """

    tree: TokenTree
    probs: torch.Tensor | None = None
    without_replacement: bool = False
    scores: torch.Tensor | None = None


@dataclass(frozen=True)
class DraftInput:
    """What a drafter sees of one running sequence in a step.

    Attributes:
        seq_id: the engine's sequence id (stable while the request runs; a preempted request comes back under a
            new id after :meth:`Drafter.release` of the old one).
        history: ``[L]`` int64 on the CPU, prompt + generated tokens; the last one is the root (sampled by the
            target, not yet verified).
        sampling: the request's :class:`SamplingParams`; drafters that report probabilities process their
            logits with it (:func:`specdec.sampling.process_logits`).
        generator: the request's own stream for draft samples (on the target's device; independent of the
            verification stream), or ``None`` at temperature 0.
        budget: the most tree nodes (root included) the caller wants for this sequence in this step (a per-call
            cap, e.g. chosen by ``--tree-budget auto`` before drafting), or ``None`` for the drafter's own. Drafters
            that build to a node budget draft at most ``min(own, budget)`` nodes, and so pay less drafting; others
            may return a larger tree, which the caller prunes.
    """

    seq_id: int
    history: torch.Tensor
    sampling: SamplingParams = GREEDY
    generator: torch.Generator | None = None
    budget: int | None = None


@runtime_checkable
class Drafter(Protocol):
    """Proposes token trees for a batch of sequences and is told what the target accepted.

    The engine calls :meth:`propose` once per step with every running sequence. ``vocab_size`` is the size of
    the drafter's vocabulary, or ``None`` for model-free drafters; the engine refuses a drafter whose vocabulary
    differs from the target's. ``needs_hidden`` asks the engine for the target's last hidden states (Medusa /
    EAGLE-style heads), taken from the verification pass itself; an optional ``feature_layers`` attribute (indices
    into HF ``hidden_states``) asks for those layers concatenated instead of the last one; an optional
    ``acceptance_by_sequence = True`` says its acceptance is mostly a property of the text (copying drafters), so
    ``--tree-budget auto`` tracks it per sequence (:mod:`specdec.research.auto_budget`). A drafter that raises
    fails only the requests of that call (the engine retries them one by one to find the culprit), never the
    engine.
    """

    vocab_size: int | None
    needs_hidden: bool

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        """One draft per input, in order."""
        ...

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """New tokens were appended to the history: ``tokens [A + 1]`` int64 (the first token after prefill; after
        a step, the accepted draft tokens then the bonus token).

        ``hidden [S, H]`` (only if ``needs_hidden``): the target's last hidden states of the span whose KV was
        just committed — the prompt after prefill, the root plus the accepted draft tokens after a step. Row ``j``
        is the state that predicted the token after span token ``j``; its last row predicted ``tokens[-1]``.
        """
        ...

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (request finished, failed, cancelled or preempted)."""
        ...
