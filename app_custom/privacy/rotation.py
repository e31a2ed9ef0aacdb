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

The signs come from the round's session context (SHAKE-256): fresh every round, the same for every
member of the cohort on any platform, and not secret (the rotation protects nothing; it only
spreads the values). Because they are public, a device could choose a delta that the rotation
does not spread; the clamp then binds on it and only on it: its levels stay within the ring's
range, so neither the no-wrap guarantee nor the clip bound moves.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import fft

from .secagg_crypto import SessionContext


def rotation_signs(context: SessionContext, length: int) -> np.ndarray:
    """One sign per value, the bits of SHAKE-256 over the context: the same on every device and at
    the aggregator whatever their NumPy (a ``Generator`` stream is only promised on one build)."""
    stream = hashlib.shake_256(b"fleetnest-rotation|" + context.encoded).digest((length + 7) // 8)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:length]
    return bits.astype(np.float64) * 2.0 - 1.0


def rotate(vector: np.ndarray, context: SessionContext) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return fft.dct(vector * rotation_signs(context, vector.size), type=2, norm="ortho")


def unrotate(vector: np.ndarray, context: SessionContext) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return fft.idct(vector, type=2, norm="ortho") * rotation_signs(context, vector.size)


def coordinate_bound(norm: float, length: int) -> float:
    """The sub-Gaussian scale of one rotated value of a vector of L2 norm ``norm``: ``sqrt(2/d) norm``."""
    return float(np.sqrt(2.0 / length)) * norm
