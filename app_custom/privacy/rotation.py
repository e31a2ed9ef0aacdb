"""A random rotation the whole cohort shares, so that few bits per value quantize a delta well.

A clipped delta may put its whole norm on a few values; quantizing into ``[-clamp, clamp]`` then
needs ``clamp`` at the clip bound, and most values fall between two levels. Rotated first, every
value is about as large as any other: the randomized DCT flips each value's sign by a public,
per-round pseudo-random sign and applies the orthonormal DCT-II (``scipy.fft``). Each rotated
value is then a sum of independent terms ``+- x_i c_ji`` with ``|c_ji| <= sqrt(2/d)``, so it is
sub-Gaussian with variance proxy at most ``2 |x|^2 / d`` (Hoeffding), whatever the delta's shape.
The rotation is orthogonal: it keeps norms (the clip bound DP charges) and Gaussian noise as
they are, and the sum of rotated vectors is the rotated sum, so the aggregator rotates the
decoded sum back. (Suresh et al. 2017 and Bonawitz et al. 2019 rotate by a randomized Hadamard
transform; the DCT takes any length without padding to a power of two.)

The signs come from the round's session context: fresh every round, the same for every member of
the cohort, and not secret (the rotation protects nothing; it only spreads the values).
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import fft

from .secagg_crypto import SessionContext


def _signs(context: SessionContext, length: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(context.encoded + b"|rotation").digest()[:8], "big")
    return np.random.default_rng(seed).integers(0, 2, size=length) * 2.0 - 1.0


def rotate(vector: np.ndarray, context: SessionContext) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return fft.dct(vector * _signs(context, vector.size), type=2, norm="ortho")


def unrotate(vector: np.ndarray, context: SessionContext) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return fft.idct(vector, type=2, norm="ortho") * _signs(context, vector.size)


def coordinate_bound(norm: float, length: int) -> float:
    """The sub-Gaussian scale of one rotated value of a vector of L2 norm ``norm``: ``sqrt(2/d) norm``."""
    return float(np.sqrt(2.0 / length)) * norm
