"""Shamir t-of-n secret sharing of 16-byte secrets over the prime field GF(2^130 - 5).

Written here rather than taken from ``pycryptodome`` (``Crypto.Protocol.SecretSharing.Shamir``):
that one multiplies in GF(2^128) bit by bit in Python (about 12 us per multiplication), so a leaf
recovering a cohort of 200 on the complete graph spends minutes per round in Shamir alone
(``O(n t^2)``). Here shares sit at fixed public points (a holder's place in the round's roster),
so the Lagrange coefficients of one set of responding holders serve every secret they
reconstruct, and Python's integers do the field arithmetic.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**130 - 5  # prime (Poly1305's modulus); above 2^128, so every 16-byte secret is a field element
SECRET_BYTES = 16
SHARE_BYTES = 17  # a field element
Share = tuple[int, int]  # (public point x >= 1, value y)


class ShamirError(ValueError):
    """Too few shares, repeated points, or shares that do not encode a 16-byte secret."""


def split(secret: bytes, threshold: int, points: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at ``points``; any ``threshold`` of them recover it, fewer reveal nothing."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ShamirError(f"the secret must be {SECRET_BYTES} bytes")
    if len(set(points)) != len(points) or not all(isinstance(x, int) and 0 < x < PRIME for x in points):
        raise ShamirError(f"points must be distinct field elements other than 0, got {list(points)}")
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold must be in [1, {len(points)}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def lagrange_at_zero(points: Sequence[int]) -> list[int]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for every polynomial of degree < len(points)."""
    coefficients = []
    for i, xi in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


class Combiner:
    """Recovers secrets, reusing the Lagrange coefficients of each set of points it has seen."""

    def __init__(self) -> None:
        self._coefficients: dict[tuple[int, ...], list[int]] = {}

    def combine(self, shares: Sequence[Share], threshold: int) -> bytes:
        chosen = sorted(shares)[:threshold]
        points = tuple(x for x, _ in chosen)
        if len(chosen) < threshold or len(set(points)) != len(points):
            raise ShamirError(f"need {threshold} shares at distinct points, got {len(shares)} ({sorted(points)})")
        if points not in self._coefficients:
            self._coefficients[points] = lagrange_at_zero(points)
        value = sum(c * y for c, (_, y) in zip(self._coefficients[points], chosen)) % PRIME
        if value >= 1 << (8 * SECRET_BYTES):
            raise ShamirError("the shares do not encode a 16-byte secret (inconsistent or forged shares)")
        return value.to_bytes(SECRET_BYTES, "big")


def encode(share: Share) -> bytes:
    return share[0].to_bytes(4, "big") + share[1].to_bytes(SHARE_BYTES, "big")


def decode(raw: bytes) -> Share:
    if len(raw) != 4 + SHARE_BYTES:
        raise ShamirError(f"a share is {4 + SHARE_BYTES} bytes, got {len(raw)}")
    x, y = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")
    if not x > 0 or y >= PRIME:
        raise ShamirError("share outside the field")
    return x, y


def encode_value(share: Share) -> bytes:
    """The share's value alone, for a holder that knows its own point."""
    return share[1].to_bytes(SHARE_BYTES, "big")


def decode_value(raw: bytes, point: int) -> Share:
    """The share at ``point`` whose value ``encode_value`` wrote."""
    if len(raw) != SHARE_BYTES:
        raise ShamirError(f"a share value is {SHARE_BYTES} bytes, got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ShamirError("share outside the field")
    return point, y
