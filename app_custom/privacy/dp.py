"""User-level differential privacy for slow deltas (DP-FedAvg, McMahan et al. 2018).

A device clips its slow delta to L2 norm ``clip_norm`` and adds noise. Under secure aggregation the
noise is the distributed discrete Gaussian (``discrete_gaussian``): in ``distributed`` mode each
device adds a share sized so that the sum of any ``min_cohort`` contributions carries noise of
``z`` times the sensitivity, which holds when the sum is all anyone sees and at least
``min_cohort`` honest devices contribute (devices colluding with the aggregator can remove their
own shares, so ``min_cohort`` should count only devices trusted not to). In ``local`` mode each
device adds the full noise itself (no trust needed, far more noise in the sum); without secure
aggregation that is the continuous Gaussian of ``z * clip_norm`` on the real-valued delta.

Accounting is per device with dp-accounting's RDP accountant: every round the device contributed
to is charged ``discrete_gaussian.round_rho(z)`` as a zCDP event (``1 / (2 z^2)`` and a term below
1e-27), composed over those rounds. There is no amplification by sampling: no cohort is drawn at
random in a way its aggregator cannot steer (the flat job asks every device every round, a leaf
fills its cohort first come), so a device is charged in full for each round it took part in.
A device whose next contribution would take its epsilon past its budget contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .discrete_gaussian import round_rho

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


MECHANISM_SECAGG = "distributed discrete Gaussian (Kairouz, Liu and Steinke 2021) over secure aggregation"
MECHANISM_LOCAL = "Gaussian on each device's delta (local mode, no secure aggregation)"
ACCOUNTING = "zCDP per contributed round, composed by dp-accounting's RDP accountant; no amplification by sampling"


def _epsilon(history: list[tuple[float, int]], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    if not history:
        return 0.0
    if any(math.isinf(rho) for rho, _ in history):
        return math.inf
    accountant = rdp_privacy_accountant.RdpAccountant()
    for rho, rounds in history:
        accountant.compose(dp_event.ZCDpEvent(rho), rounds)
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """One device's privacy spending: the rounds it contributed to, each a zCDP event of ``rho``.

    ``history``: ``[rho, rounds]`` pairs. A pair's ``rho`` is what those rounds were charged, so a
    changed noise setting never rewrites what was spent. Entries ``[z, q, steps]`` of an older
    ledger (charged at sampling rate ``q``) are re-charged without amplification: never less."""

    def __init__(self, config: DPConfig, history: list | None = None) -> None:
        self.config = config
        self._history: list[tuple[float, int]] = []
        for entry in history or []:
            if isinstance(entry, (list, tuple)) and len(entry) == 3:
                z, _, steps = entry
                entry = (round_rho(float(z)), steps)
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise PrivacyConfigError(f"privacy history entries are [rho, rounds], got {entry!r}")
            rho, rounds = entry
            if (
                not (isinstance(rho, (int, float)) and rho >= 0)
                or isinstance(rounds, bool)
                or not isinstance(rounds, int)
            ):
                raise PrivacyConfigError(f"privacy history entries are [rho >= 0, rounds], got {entry!r}")
            self._history.append((float(rho), int(rounds)))

    @property
    def history(self) -> list[list]:
        return [[rho, rounds] for rho, rounds in self._history]

    @property
    def rounds(self) -> int:
        return sum(rounds for _, rounds in self._history)

    def _next_rho(self) -> float:
        return round_rho(self.config.noise_multiplier)

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before any contribution)."""
        return _epsilon(self._history, self.config.delta)

    def epsilon_after_next(self) -> float:
        return _epsilon([*self._history, (self._next_rho(), 1)], self.config.delta)

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
        rho = self._next_rho()
        if self._history and self._history[-1][0] == rho:
            self._history[-1] = (rho, self._history[-1][1] + 1)
        else:
            self._history.append((rho, 1))


def noise_for_epsilon(epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier that keeps a device contributing to all ``rounds`` within
    ``epsilon`` at ``delta`` (dp-accounting's calibration of the charge above); 0 for epsilon = inf."""
    from dp_accounting import dp_event, mechanism_calibration
    from dp_accounting.rdp import rdp_privacy_accountant

    if math.isinf(epsilon):
        return 0.0
    if not epsilon > 0:
        raise PrivacyConfigError(f"target epsilon must be > 0, got {epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyConfigError(f"rounds must be a positive integer, got {rounds!r}")
    return float(
        mechanism_calibration.calibrate_dp_mechanism(
            rdp_privacy_accountant.RdpAccountant,
            lambda z: dp_event.SelfComposedDpEvent(dp_event.ZCDpEvent(round_rho(z)), rounds),
            epsilon,
            delta,
            mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
