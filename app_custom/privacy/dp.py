"""User-level differential privacy for slow deltas (DP-FedAvg, McMahan et al. 2018).

A device clips its slow delta to L2 norm ``clip_norm`` and adds Gaussian noise. In ``distributed``
mode each device adds only its share, ``sigma = z * clip_norm / sqrt(min_cohort)``, so that the sum
of any ``min_cohort`` contributions carries noise of std ``z * clip_norm``: the mechanism the
accountant charges. That holds when the sum is all anyone sees (secure aggregation) and at least
``min_cohort`` honest devices contribute; devices colluding with the aggregator can remove their
own shares, so ``min_cohort`` should count only devices trusted not to. In ``local`` mode each
device adds the full ``z * clip_norm`` (no trust needed, far more noise in the sum).

Accounting is per device with Opacus' RDP accountant: one Gaussian step of multiplier ``z`` per
contributed round, at sampling rate ``cohort_size / fleet_size`` (the job's cohort sampling,
treated as Poisson sampling). A device whose next contribution would take its epsilon past its
budget contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("distributed", "local")


class PrivacyConfigError(ValueError):
    """A DP setting that is missing, out of range or inconsistent."""


@dataclass(frozen=True)
class DPConfig:
    clip_norm: float
    noise_multiplier: float  # z; 0 disables noise (clipping stays)
    delta: float
    fleet_size: int
    cohort_size: int
    mode: str = "distributed"
    min_cohort: int | None = None  # distributed mode: noise shares assume this many contributors
    epsilon_budget: float = math.inf

    def __post_init__(self) -> None:
        def positive(name: str, value: object, allow_zero: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise PrivacyConfigError(f"dp.{name} must be a number, got {value!r}")
            if value < 0 or (value == 0 and not allow_zero):
                raise PrivacyConfigError(f"dp.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        positive("clip_norm", self.clip_norm)
        if math.isinf(self.clip_norm):
            raise PrivacyConfigError("dp.clip_norm must be finite")
        positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        positive("epsilon_budget", self.epsilon_budget)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise PrivacyConfigError(f"dp.delta must be a float in (0, 1), got {self.delta!r}")
        for name in ("fleet_size", "cohort_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivacyConfigError(f"dp.{name} must be a positive integer, got {value!r}")
        if self.cohort_size > self.fleet_size:
            raise PrivacyConfigError(f"dp.cohort_size {self.cohort_size} exceeds dp.fleet_size {self.fleet_size}")
        if self.mode not in MODES:
            raise PrivacyConfigError(f"dp.mode must be one of {MODES}, got {self.mode!r}")
        if self.min_cohort is not None and (
            isinstance(self.min_cohort, bool) or not isinstance(self.min_cohort, int) or self.min_cohort < 1
        ):
            raise PrivacyConfigError(f"dp.min_cohort must be a positive integer, got {self.min_cohort!r}")
        if self.min_cohort is not None and self.min_cohort > self.cohort_size:
            raise PrivacyConfigError(f"dp.min_cohort {self.min_cohort} exceeds dp.cohort_size {self.cohort_size}")

    @classmethod
    def from_dict(cls, raw: dict) -> DPConfig:
        if not isinstance(raw, dict):
            raise PrivacyConfigError(f"dp must be a mapping, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyConfigError(f"dp: unknown keys {unknown} (known: {sorted(known)})")
        missing = sorted(
            k for k in ("clip_norm", "noise_multiplier", "delta", "fleet_size", "cohort_size") if k not in raw
        )
        if missing:
            raise PrivacyConfigError(f"dp: missing keys {missing}")
        values = dict(raw)
        if values.get("epsilon_budget") is None:
            values["epsilon_budget"] = math.inf
        return cls(**values)

    @property
    def sample_rate(self) -> float:
        return self.cohort_size / self.fleet_size

    @property
    def contributors_assumed(self) -> int:
        return self.min_cohort or self.cohort_size

    @property
    def device_noise_std(self) -> float:
        """Per-coordinate std of the noise one device adds."""
        if self.mode == "local":
            return self.noise_multiplier * self.clip_norm
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.contributors_assumed)


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled down to L2 norm ``bound`` if longer, and its norm before clipping."""
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm):
        raise ValueError("cannot clip a vector with NaN or inf")
    return (vector * (bound / norm) if norm > bound else vector), norm


def privatize(vector: np.ndarray, config: DPConfig, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Clip and add this device's noise; returns the noised vector (float64) and the pre-clip norm."""
    clipped, norm = clip_l2(np.asarray(vector, dtype=np.float64).ravel(), config.clip_norm)
    if config.device_noise_std > 0:
        clipped = clipped + rng.normal(0.0, config.device_noise_std, size=clipped.shape)
    return clipped, norm


class PrivacyLedger:
    """One device's privacy spending: the rounds it contributed to, as Opacus' RDP accountant sees them."""

    def __init__(self, config: DPConfig, history: list | None = None) -> None:
        self.config = config
        from opacus.accountants import RDPAccountant  # imported when a ledger is made: it takes a second

        self._accountant = RDPAccountant()
        for entry in history or []:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise PrivacyConfigError(f"privacy history entries are (z, q, steps), got {entry!r}")
            z, q, steps = entry
            self._accountant.history.append((float(z), float(q), int(steps)))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(entry) for entry in self._accountant.history]

    @property
    def rounds(self) -> int:
        return sum(steps for _, _, steps in self._accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before any contribution)."""
        if not self._accountant.history:
            return 0.0
        if self.config.noise_multiplier == 0:
            return math.inf
        return float(self._accountant.get_epsilon(delta=self.config.delta))

    def epsilon_after_next(self) -> float:
        if self.config.noise_multiplier == 0:
            return math.inf
        from opacus.accountants import RDPAccountant

        trial = RDPAccountant()
        trial.history = self.history
        trial.step(noise_multiplier=self.config.noise_multiplier, sample_rate=self.config.sample_rate)
        return float(trial.get_epsilon(delta=self.config.delta))

    def over_budget_reason(self) -> str | None:
        """Why the next contribution may not be made, or None if it fits the budget."""
        if math.isinf(self.config.epsilon_budget):
            return None
        after = self.epsilon_after_next()
        if after > self.config.epsilon_budget:
            return (
                f"contributing would raise epsilon from {self.epsilon():.3f} to {after:.3f},"
                f" past the budget {self.config.epsilon_budget} (delta {self.config.delta})"
            )
        return None

    def record_contribution(self) -> None:
        if self.config.noise_multiplier > 0:
            self._accountant.step(noise_multiplier=self.config.noise_multiplier, sample_rate=self.config.sample_rate)
        else:
            self._accountant.history.append((0.0, self.config.sample_rate, 1))


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest noise multiplier (Opacus' search, RDP accountant) that keeps a device that
    contributes to all ``rounds`` within ``epsilon`` at ``delta``; 0 for epsilon = inf."""
    from opacus.accountants.utils import get_noise_multiplier

    if math.isinf(epsilon):
        return 0.0
    if not epsilon > 0:
        raise PrivacyConfigError(f"target epsilon must be > 0, got {epsilon!r}")
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds, accountant="rdp"
        )
    )
