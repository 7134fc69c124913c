"""``process_logits`` on its own: hand-computed temperature + top-k + top-p cases, and HF's logits warpers.

Both sides of every distribution test go through ``process_logits``, so a bug in it would cancel out there; these
tests pin it to values computed by hand and to Hugging Face's ``TemperatureLogitsWarper``, ``TopKLogitsWarper``
and ``TopPLogitsWarper`` (applied in that order, as ``generate`` does).
"""

import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec.sampling import SamplingParams, process_logits

P = [0.5, 0.2, 0.15, 0.1, 0.05]
LOGITS = torch.tensor(P, dtype=torch.float64).log()


def _norm(weights):
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # T = 0.5 squares the probabilities: [.25, .04, .0225, .01, .0025] / .325
        (SamplingParams(0.5), _norm([p * p for p in P])),
        # T = 0.5 then top-3: [.25, .04, .0225] / .3125
        (SamplingParams(0.5, top_k=3), _norm([0.25, 0.04, 0.0225, 0, 0])),
        # T = 2 takes square roots: [.7071, .4472, .3873, .3162, .2236] / 2.0814 = [.340, .215, .186, .152, .107];
        # top-p 0.6: mass before the 3rd token is .555 < .6 (kept), before the 4th .741 (dropped)
        (SamplingParams(2.0, top_p=0.6), _norm([math.sqrt(p) for p in P[:3]] + [0, 0])),
        # T = 2, top-3 then top-p 0.9: renormalised [.459, .290, .251], mass before the 3rd .749 < .9 (kept);
        # without the top-k, top-p 0.9 would keep all five tokens (mass before the 5th .893 < .9)
        (SamplingParams(2.0, top_k=3, top_p=0.9), _norm([math.sqrt(p) for p in P[:3]] + [0, 0])),
        # T = 0.5, top-2 renormalised [.862, .138]: mass before the 2nd .862 >= .85, dropped -> token 0 only.
        # Top-p on the un-renormalised top-2 (.769 < .85) or at T = 1 ([5/7, 2/7]: .714 < .85) would keep both.
        (SamplingParams(0.5, top_k=2, top_p=0.85), _norm([1, 0, 0, 0, 0])),
        (SamplingParams(1.0, top_k=2, top_p=0.85), _norm([5, 2, 0, 0, 0])),
        # T = 0.5, top-4 [.7752, .1240, .0698, .0310], top-p 0.8: mass before the 2nd .775 (kept), 3rd .899 (dropped)
        (SamplingParams(0.5, top_k=4, top_p=0.8), _norm([0.25, 0.04, 0, 0, 0])),
    ],
    ids=["T0.5", "T0.5-k3", "T2-p0.6", "T2-k3-p0.9", "T0.5-k2-p0.85", "T1-k2-p0.85", "T0.5-k4-p0.8"],
)
def test_temperature_top_k_and_top_p_by_hand(params, expected):
    got = process_logits(LOGITS, params)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the processing is row-wise and independent of a constant shift of the logits
    torch.testing.assert_close(process_logits(torch.stack([LOGITS + 3.0, LOGITS]), params)[0], expected,
                               rtol=1e-12, atol=1e-12)


def _hf(logits, params):
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.9), (0, 0.5), (8, 0.8), (3, 0.95),
                                              (20, 0.3)])
def test_matches_hugging_face_logits_warpers_on_random_logits(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(int(temperature * 10) + 100 * top_k + int(1000 * top_p))
    logits = 3.0 * torch.randn(64, 32, generator=gen, dtype=torch.float64)  # 64 rows, 32 tokens
    params = SamplingParams(temperature, top_k=top_k, top_p=top_p)
    ours, theirs = process_logits(logits, params), _hf(logits, params)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens survive
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    if top_k or top_p < 1.0:
        assert bool((ours == 0).any())  # the filters really cut something in these cases
