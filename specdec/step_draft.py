"""One step's drafting phase: one ``propose`` for the whole batch, each tree checked, faults isolated per request.

Used by :class:`specdec.engine.SpeculativeEngine` (and :func:`check_draft` by the trace simulator, so both refuse
the same trees with the same messages).
"""

from __future__ import annotations

from collections.abc import Callable

from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.request import Request, StepOutput
from specdec.tree import TokenTree

Fail = Callable[[Request, Exception], StepOutput]


def check_draft(draft: Draft, root: int, max_tree_nodes: int, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the problem if ``draft`` cannot be verified: its root must be the request's last
    token, it must fit ``max_tree_nodes`` and its tokens must lie in the target's vocabulary."""
    if int(draft.tree.tokens[0]) != root:
        raise ValueError(f"bad tree: root token {int(draft.tree.tokens[0])} is not the last token {root}")
    draft.tree.check_fits(max_tree_nodes)
    if bool((draft.tree.tokens < 0).any()) or bool((draft.tree.tokens >= vocab_size).any()):
        raise ValueError(f"bad tree: draft token ids must lie in [0, {vocab_size})")


def draft_all(drafter: Drafter | None, decoding: list[Request], max_tree_nodes: int, vocab_size: int,
              fail: Fail, outputs: list[StepOutput]) -> dict[int, Draft]:
    """Drafts of ``decoding`` by request id. ``drafter=None`` proposes each request's last token alone
    (autoregressive decoding). If the batched ``propose`` raises, each request is proposed alone so only the
    culprit fails; a failing or malformed draft ends its request through ``fail`` (its output joins
    ``outputs``)."""
    if not decoding:
        return {}
    if drafter is None:
        return {r.request_id: Draft(TokenTree.chain(r.history[r.length - 1 : r.length])) for r in decoding}
    inputs = [DraftInput(r.seq_id, r.history[: r.length], r.params, r.draft_generator) for r in decoding]
    try:
        proposed = dict(zip((r.request_id for r in decoding), drafter.propose(inputs), strict=True))
    except Exception:
        proposed = {}
        for req, one in zip(decoding, inputs, strict=True):
            try:
                [proposed[req.request_id]] = drafter.propose([one])
            except Exception as err:
                outputs.append(fail(req, err))
    for req in decoding:
        draft = proposed.get(req.request_id)
        if draft is None:
            continue
        try:
            check_draft(draft, int(req.history[req.length - 1]), max_tree_nodes, vocab_size)
        except ValueError as err:
            del proposed[req.request_id]
            outputs.append(fail(req, err))
    return proposed
