"""Fixed-point stochastic quantization of a (clipped, rotated) delta into the ring Z_{2^bits}.

A device maps each value ``x`` (clamped to ``[-c, c]``) to the integer ``floor(x * scale + u)``,
``u ~ U[0, 1)``: unbiased, ``|q| <= M`` (``max_level``). The cohort's sum of ``n`` such integers
lies in ``[-n M, n M]``, and the ring keeps ``noise_levels`` more on each side for the cohort's
summed DP noise (``discrete_gaussian``), so the modular sum of the masked vectors decodes to the
exact integer sum unless that noise passes its room (sized at ``NOISE_SIGMAS`` standard
deviations). ``bits`` is the wire size of one value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BITS = 32  # ring elements are drawn from 32-bit keystream words
NOISE_SIGMAS = 6.0  # room for the summed noise: a value wraps with probability below 2e-9
MAX_ROUNDING_TRIES = 1000  # conditional rounding gives up (an error) after this many draws


class QuantizationError(ValueError):
    """A ring that cannot hold the cohort's sum, or a vector that does not belong to the ring."""


@dataclass(frozen=True)
class Ring:
    """Z_{2^bits} sized for a cohort of up to ``cohort`` devices whose values lie in ``[-clamp, clamp]``,
    with ``noise_levels`` kept free on each side of the sum for its noise."""

    bits: int
    cohort: int
    clamp: float
    noise_levels: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise QuantizationError(f"ring bits must be an integer in [1, {MAX_BITS}], got {self.bits!r}")
        if not isinstance(self.cohort, int) or self.cohort < 1:
            raise QuantizationError(f"cohort must be a positive integer, got {self.cohort!r}")
        if not (isinstance(self.clamp, (int, float)) and math.isfinite(self.clamp) and self.clamp > 0):
            raise QuantizationError(f"clamp must be a positive finite number, got {self.clamp!r}")
        if isinstance(self.noise_levels, bool) or not isinstance(self.noise_levels, int) or self.noise_levels < 0:
            raise QuantizationError(f"noise_levels must be a non-negative integer, got {self.noise_levels!r}")
        if self.max_level < 1:
            raise QuantizationError(
                f"a {self.bits}-bit ring leaves no level per value for a cohort of {self.cohort}"
                f" ({self.noise_levels} kept for noise); use more bits, a smaller cohort or less noise"
            )

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def max_level(self) -> int:
        """The largest magnitude one device's quantized value can take."""
        return ((1 << (self.bits - 1)) - 1 - self.noise_levels) // self.cohort

    @property
    def scale(self) -> float:
        return self.max_level / self.clamp

    def wire_bytes(self, length: int) -> int:
        """Bytes of one packed vector of ``length`` ring elements."""
        return (length * self.bits + 7) // 8


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of ``scaled`` (unbiased per value), redrawn until its L2 norm is within ``bound``."""
    for _ in range(MAX_ROUNDING_TRIES):
        levels = np.floor(scaled + rng.random(scaled.shape))
        if float(np.linalg.norm(levels)) <= bound:
            return levels.astype(np.int64)
    raise QuantizationError(f"no rounding within norm {bound:.4g} in {MAX_ROUNDING_TRIES} tries")


def quantize(
    values: np.ndarray,
    ring: Ring,
    rng: np.random.Generator,
    norm_bound: float | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Stochastically round ``values`` (clamped to the ring's range) into ring elements (uint64).
    ``norm_bound``: redraw the rounding until its L2 norm in levels is within it (conditional
    randomized rounding); ``noise``: integers added before the reduction into the ring."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise QuantizationError("cannot quantize NaN or inf")
    scaled = np.clip(values, -ring.clamp, ring.clamp) * ring.scale
    if norm_bound is None:
        levels = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
    else:
        levels = conditional_round(scaled, norm_bound, rng)
    levels = np.clip(levels, -ring.max_level, ring.max_level)  # floor(M + u) is M; guards rounding at the edge
    if noise is not None:
        levels = levels + np.asarray(noise, dtype=np.int64)
    return np.mod(levels, ring.modulus).astype(np.uint64)


def check_ring_vector(vector: object, ring: Ring, length: int, what: str) -> np.ndarray:
    """``vector`` as uint64 ring elements, or ``QuantizationError`` naming what is wrong with it."""
    if not isinstance(vector, np.ndarray):
        raise QuantizationError(f"{what}: expected a numpy array, got {type(vector).__name__}")
    if vector.ndim != 1 or vector.shape[0] != length:
        raise QuantizationError(f"{what}: expected {length} ring elements, got shape {vector.shape}")
    if not np.issubdtype(vector.dtype, np.integer):
        raise QuantizationError(f"{what}: expected integer ring elements, got dtype {vector.dtype}")
    if vector.size and (int(vector.min()) < 0 or int(vector.max()) >= ring.modulus):
        raise QuantizationError(f"{what}: values outside Z_2^{ring.bits}")
    return vector.astype(np.uint64)


def decode_sum(total: np.ndarray, ring: Ring) -> np.ndarray:
    """The real-valued sum from the modular sum of quantized vectors (float64)."""
    signed = total.astype(np.int64)
    signed = np.where(signed >= ring.modulus // 2, signed - ring.modulus, signed)
    return signed.astype(np.float64) / ring.scale


def pack(vector: np.ndarray, ring: Ring) -> bytes:
    """Ring elements packed at ``ring.bits`` bits each (big-endian bit order)."""
    as_bits = ((vector[:, None] >> np.arange(ring.bits - 1, -1, -1, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(as_bits.ravel()).tobytes()


def unpack(payload: bytes, ring: Ring, length: int) -> np.ndarray:
    if not isinstance(payload, (bytes, bytearray)) or len(payload) != ring.wire_bytes(length):
        got = len(payload) if isinstance(payload, (bytes, bytearray)) else type(payload).__name__
        raise QuantizationError(f"expected {ring.wire_bytes(length)} bytes for {length} values, got {got}")
    bits = np.unpackbits(np.frombuffer(bytes(payload), dtype=np.uint8))[: length * ring.bits]
    weights = np.uint64(1) << np.arange(ring.bits - 1, -1, -1, dtype=np.uint64)
    return (bits.reshape(length, ring.bits).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
