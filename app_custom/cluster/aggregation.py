"""Server-side combination of slow deltas: a sample-weighted mean, then a server optimiser step.

``new = current + server_lr * v`` with ``v = momentum * v + mean_delta`` (FedAvgM, Hsu et al.
2019; ``server_lr=1, momentum=0`` is FedAvg). A malformed update (unknown keys, wrong shapes,
NaN/inf, a bad weight) is rejected with a reason and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from app_custom.nested.slow_delta import Tensors, UpdateError, check_tensors


@dataclass(frozen=True)
class Rejection:
    contributor: str
    reason: str


class SlowDeltaAggregator:
    """Accumulates one round's slow deltas; ``apply()`` returns the candidate global slow weights."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0) -> None:
        if not (isinstance(server_lr, (int, float)) and server_lr > 0):
            raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self._velocity: Tensors | None = None
        self.reset()

    @property
    def velocity(self) -> Tensors | None:
        """The committed server momentum buffer (archived with each accepted version)."""
        return self._velocity

    def restore_velocity(self, velocity: Tensors | None) -> None:
        self._velocity = velocity

    def reset(self) -> None:
        self._sum: Tensors = {}
        self._weight = 0.0
        self.contributors: list[str] = []
        self.rejections: list[Rejection] = []
        self._pending_velocity: Tensors | None = None

    def add(
        self, contributor: str, delta: Mapping[str, np.ndarray], weight: float, expected: Mapping[str, tuple]
    ) -> Rejection | None:
        """Add one device's slow delta; return a ``Rejection`` (and keep nothing of it) if malformed."""
        try:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise UpdateError(f"weight must be a finite number, got {weight!r}")
            if weight <= 0:
                raise UpdateError(f"weight must be > 0, got {weight!r}")
            check_tensors(delta, expected, f"slow delta from {contributor}")
        except UpdateError as e:
            rejection = Rejection(contributor, str(e))
            self.rejections.append(rejection)
            return rejection
        for name, value in delta.items():
            scaled = value.astype(np.float64) * weight
            self._sum[name] = self._sum[name] + scaled if name in self._sum else scaled
        self._weight += float(weight)
        self.contributors.append(contributor)
        return None

    def add_cohort_mean(
        self, contributors: list[str], mean: Mapping[str, np.ndarray], expected: Mapping[str, tuple]
    ) -> Rejection | None:
        """Add a cohort's mean slow delta (a secure aggregate), counted as one device per contributor."""
        label = f"mean of {len(contributors)} devices"
        try:
            if not contributors or len(set(contributors)) != len(contributors):
                raise UpdateError(f"{label}: contributors must be distinct and non-empty, got {contributors!r}")
            if set(contributors) & set(self.contributors):
                raise UpdateError(f"{label}: {sorted(set(contributors) & set(self.contributors))} already counted")
            check_tensors(mean, expected, label)
        except UpdateError as e:
            rejection = Rejection(label, str(e))
            self.rejections.append(rejection)
            return rejection
        for name, value in mean.items():
            value = value.astype(np.float64) * len(contributors)
            self._sum[name] = self._sum[name] + value if name in self._sum else value
        self._weight += float(len(contributors))
        self.contributors.extend(contributors)
        return None

    @property
    def count(self) -> int:
        return len(self.contributors)

    def mean_delta(self) -> Tensors:
        if not self.contributors:
            raise ValueError("no accepted slow delta to aggregate")
        return {name: (value / self._weight).astype(np.float32) for name, value in self._sum.items()}

    def apply(self, current: Mapping[str, np.ndarray]) -> Tensors:
        """Candidate global slow weights; the momentum buffer advances only on ``commit()``."""
        mean = self.mean_delta()
        velocity = {
            name: mean[name] + (self.momentum * self._velocity[name] if self._velocity else 0.0) for name in mean
        }
        self._pending_velocity = velocity
        return {name: (current[name] + self.server_lr * velocity[name]).astype(np.float32) for name in current}

    @property
    def pending_velocity(self) -> Tensors | None:
        """The momentum buffer the current candidate would commit."""
        return self._pending_velocity

    def reject(self, contributor: str, reason: str) -> Rejection:
        """Record an update refused before it reached ``add`` (e.g. of the wrong kind)."""
        rejection = Rejection(contributor, reason)
        self.rejections.append(rejection)
        return rejection

    def commit(self) -> None:
        """The candidate of this round was accepted: keep its momentum."""
        if self._pending_velocity is None:
            raise RuntimeError("commit() without a candidate from apply() in this round")
        self._velocity = self._pending_velocity
