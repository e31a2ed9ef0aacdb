"""The distributed discrete Gaussian (DDGauss; Kairouz, Liu and Steinke, ICML 2021): DP noise that
survives quantization and modular sums, because it is added to integers and its guarantee is
proved for the sum of the devices' integer noise.

A device scales its clipped, rotated delta into levels, rounds each value stochastically and
keeps the rounding only when the rounded vector's L2 norm is within ``rounded_l2_bound`` (the
paper's conditional randomized rounding: the sensitivity is then known in levels), and adds
``N_Z(0, sigma^2)`` to every value, drawn by OpenDP's exact sampler. The sum of ``n``
devices' vectors carries the sum of ``n`` discrete Gaussians, which is not itself a discrete
Gaussian; the paper bounds what it gives (Theorem 1, Proposition 14): with sensitivity
``Delta`` (levels) and ``d`` values the sum is ``rho``-zCDP with

    rho = (Delta / (sqrt(n) sigma) + sqrt(d) tau)^2 / 2,   tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)).

Reducing the sum modulo the ring is post-processing and costs nothing more. ``sigma`` is never
below ``MIN_SIGMA``, so ``sqrt(d) tau`` stays below ``TAU_SLACK`` for every length and cohort the
wire allows: a round is charged ``round_rho(z) = (1 / z + TAU_SLACK)^2 / 2`` whatever its shape,
which also covers the continuous Gaussian of local mode (``1 / (2 z^2)``).
"""

from __future__ import annotations

import math

import numpy as np

BETA = math.exp(-0.5)  # conditional rounding: a rounding is redrawn with probability at most BETA
MIN_SIGMA = 3.0  # levels: keeps tau negligible (Proposition 14 itself asks for sigma >= 1/2)
MAX_VALUES = 50_000_000  # no update on the wire has more values (edge_messages.MAX_WEIGHT_VALUES)
MAX_CONTRIBUTORS = 1 << 20  # nor a cohort more devices (wire.MAX_NEIGHBOURS)
# k / (k + 1) >= 1/2, so tau <= 10 (n - 1) exp(-pi^2 sigma^2) for sigma >= MIN_SIGMA, any n
TAU_SLACK = math.sqrt(MAX_VALUES) * 10 * MAX_CONTRIBUTORS * math.exp(-(math.pi**2) * MIN_SIGMA**2)


def rounded_l2_bound(norm: float, length: int, beta: float = BETA) -> float:
    """The L2 norm (levels) that conditional randomized rounding keeps a vector of ``norm`` levels
    within: the smaller of ``norm + sqrt(d)`` and the paper's high-probability bound at ``beta``."""
    worst = (norm + math.sqrt(length)) ** 2
    likely = norm**2 + length / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(length) / 2)
    return math.sqrt(min(worst, likely))


def sample(sigma: float, length: int) -> np.ndarray:
    """``length`` draws of the discrete Gaussian ``N_Z(0, sigma^2)`` (int64), from OpenDP's exact sampler."""
    import opendp.prelude as dp  # imported when noise is drawn: it loads a native library

    dp.enable_features("contrib")
    noise = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64"), scale=sigma)
    return np.asarray(noise([0] * length), dtype=np.int64)


def tau(sigma: float, contributors: int) -> float:
    """The paper's inflation term for the sum of ``contributors`` discrete Gaussians of ``sigma``."""
    k = np.arange(1, contributors, dtype=np.float64)
    return float(10 * np.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)).sum())


def sum_rho(sensitivity: float, sigma: float, contributors: int, length: int) -> float:
    """zCDP of the sum of ``contributors`` devices' noise of ``sigma`` levels, for sensitivity ``sensitivity``."""
    return (sensitivity / (math.sqrt(contributors) * sigma) + math.sqrt(length) * tau(sigma, contributors)) ** 2 / 2


def round_rho(noise_multiplier: float) -> float:
    """What one contributed round is charged: the discrete Gaussian's bound at the sum's noise
    multiplier ``z`` (sigma sized so that ``sqrt(contributors) sigma >= z Delta``), any shape."""
    if noise_multiplier <= 0:
        return math.inf
    return (1 / noise_multiplier + TAU_SLACK) ** 2 / 2
