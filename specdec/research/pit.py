"""Randomized probability integral transforms (PIT) and uniformity tests, for :mod:`specdec.research.certify`.

For a token ``x`` drawn from a distribution ``p`` over a finite vocabulary, ranked by decreasing ``p`` (ties by id),

    ``u = F(x-) + v * p(x)``, ``v ~ U(0, 1)`` independent, ``F(x-)`` = mass ranked before ``x``,

is exactly U(0, 1) iff ``x ~ p``; PITs of successive tokens, each under its distribution given the past, are
independent (Rosenblatt 1952; Brockwell 2007), so a whole generated text gives an i.i.d. uniform sample. Ranking by
probability makes a sampler that favours likely tokens put mass near 0. A Bernoulli outcome ``B`` of probability
``a`` has the PIT ``v * a`` if ``B`` else ``a + v * (1 - a)``: the same check for acceptance decisions.

Uniformity: Kolmogorov-Smirnov (:func:`scipy.stats.kstest`) and Anderson-Darling against the fully specified
U(0, 1) (p-value from Marsaglia & Marsaglia 2004's asymptotic formula: within ~1e-3 of the exact one for n >= 100).
Power: KS rejects at level ``a`` once ``sup |F_n - F| > c_a / sqrt(n)`` (``c_0.01 = 1.63``, ``c_0.001 = 1.95``):
20,000 tokens detect a CDF deviation of 0.014 at p < 0.001; AD weighs the tails (near 0: over-likely tokens) more.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as sps


def token_pit(probs: torch.Tensor, tokens: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PITs ``[R]`` float64 of ``tokens [R]`` int64 under ``probs [R, V]`` with uniforms ``v [R]``; also
    ``p(x) [R]`` (0 marks an impossible token)."""
    order = torch.argsort(-probs, dim=-1, stable=True)
    sorted_p = probs.gather(-1, order)
    rank = torch.argsort(order, dim=-1).gather(-1, tokens[:, None])
    before = (sorted_p.cumsum(-1) - sorted_p).gather(-1, rank)[:, 0]
    px = probs.gather(-1, tokens[:, None])[:, 0]
    return (before + v * px).clamp(0.0, 1.0), px


def bernoulli_pit(a: float, outcome: bool, v: float) -> float:
    """PIT of a Bernoulli(``a``) ``outcome`` with uniform ``v``."""
    return v * a if outcome else a + v * (1.0 - a)


def uniformity(u: np.ndarray | list[float]) -> dict:
    """``{"n", "ks", "ks_p", "ad", "ad_p"}`` for H0: ``u`` i.i.d. U(0, 1)."""
    u = np.asarray(u, dtype=np.float64)
    n = len(u)
    if n == 0:
        return {"n": 0, "ks": 0.0, "ks_p": 1.0, "ad": 0.0, "ad_p": 1.0}
    ks = sps.kstest(u, "uniform")
    ad = anderson_darling_uniform(u)
    return {"n": n, "ks": float(ks.statistic), "ks_p": float(ks.pvalue), "ad": ad, "ad_p": 1.0 - ad_inf_cdf(ad)}


def anderson_darling_uniform(u: np.ndarray) -> float:
    """``A^2`` of ``u`` against U(0, 1) (fully specified; no estimated parameters)."""
    x = np.sort(np.clip(np.asarray(u, dtype=np.float64), 1e-15, 1 - 1e-15))
    n = len(x)
    i = np.arange(1, n + 1)
    return float(-n - np.mean((2 * i - 1) * (np.log(x) + np.log1p(-x[::-1]))))


def ad_inf_cdf(z: float) -> float:
    """Asymptotic CDF of ``A^2`` (Marsaglia & Marsaglia 2004, "Evaluating the Anderson-Darling distribution")."""
    if z <= 0:
        return 0.0
    if z < 2:
        poly = 2.00012 + (.247105 - (.0649821 - (.0347962 - (.011672 - .00168691 * z) * z) * z) * z) * z
        return math.exp(-1.2337141 / z) / math.sqrt(z) * poly
    return math.exp(-math.exp(1.0776 - (2.30695 - (.43424 - (.082433 - (.008056 - .0003146 * z) * z) * z) * z) * z))
