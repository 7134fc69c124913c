"""The tiny test models are position-sensitive, so end-to-end equality tests can see RoPE position bugs.

A position bug puts a token at the wrong RoPE offset from its context (e.g. a tree node at ``committed + index``
instead of ``committed + depth``). Shifting every position by the same amount changes nothing (RoPE is relative),
so the check moves the LAST token's position only and compares the change of its logits with the target's own
top-2 margin: a change much larger than the typical margin flips the argmax, so greedy equality tests fail.
"""

import pytest
import torch

from .conftest import tiny_llama


def _shift_effect(model, vocab, shift=5, rows=64, length=30):
    """(median over random sequences of max |logit change| when the last token moves by ``shift`` positions,
    median top-2 margin of the unshifted logits, fraction of argmaxes that change)."""
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length).expand(rows, -1).clone()
    moved = pos.clone()
    moved[:, -1] += shift
    with torch.inference_mode():
        a = model(ids, position_ids=pos).logits[:, -1]
        b = model(ids, position_ids=moved).logits[:, -1]
    top2 = a.topk(2, -1).values
    margin = (top2[:, 0] - top2[:, 1]).median()
    return (a - b).abs().amax(-1).median(), margin, (a.argmax(-1) != b.argmax(-1)).double().mean()


@pytest.mark.parametrize(("seed", "layers"), [(0, 2), (3, 2), (5, 2), (21, 4)])  # the greedy tests' models
def test_moving_a_token_by_five_positions_moves_logits_far_more_than_the_top2_margin(seed, layers):
    change, margin, flipped = _shift_effect(tiny_llama(seed=seed, layers=layers), 64)
    assert change > 4 * margin, (float(change), float(margin))  # measured 6-13x; 0.02x with the HF defaults
    assert flipped > 0.3  # the greedy token changes at a third of the positions or more (measured 0.5-0.95)


def test_a_uniform_shift_of_all_positions_changes_nothing(tiny_model):
    """RoPE is relative: the check above must move one token against its context, not all of them (HF computes
    the rotation in float32, hence the tolerance, 1e-5 of the effect measured above)."""
    ids = torch.randint(0, 64, (4, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = tiny_model(ids).logits
        b = tiny_model(ids, position_ids=torch.arange(5, 25).expand(4, -1)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=5e-6)
