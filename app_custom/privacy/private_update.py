"""The path of one slow delta through the privacy layer, from the device's tensors to the cohort mean.

Device: flatten (parameter names sorted) -> clip to ``clip_norm`` -> rotate (the cohort's shared
random rotation, ``rotation``) -> scale into levels and round, the rounded norm kept within the
sensitivity (``quantization.conditional_round``) -> add its discrete Gaussian noise share
-> reduce into the ring sized for the cohort and its noise. Aggregator: the securely aggregated
ring sum -> decoded real sum -> rotated back -> the cohort's mean -> tensors.

Weighting (``weighting``): ``samples`` (the default) weighs a device by ``w = min(n / weight_cap,
1)``, at least ``min_weight``, for its ``n`` training samples, as the plain job weighs by samples,
without revealing ``n``:
the device clips its delta to ``clip_norm / sqrt 2``, scales it by ``w`` and appends
``w * clip_norm / sqrt 2`` as one more value, so its whole contribution stays within
``clip_norm`` (the sensitivity the accountant charges) and only the cohort's sums of ``w * delta``
and of ``w`` are ever decoded. ``uniform`` weighs every device 1 (DP-FedAvg's choice).

Influence (``cohort_bound``): under secure aggregation nobody sees that a device clipped, so a
crafted device may send any ring element. A released sum of ``n`` devices must be no longer than
``n`` clipped devices with their noise and rounding can make it, and its summed weight is
floored at ``n * min_weight``; the cohort's mean therefore lies within ``cohort_bound(n).radius``
(about ``clip_norm / min_weight``) whatever one device sends, so one device moves it by at most
twice that. The leaf refuses a sum past the bound and the cluster checks it again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from app_custom.nested.slow_delta import Tensors

from . import discrete_gaussian
from .discrete_gaussian import MIN_SIGMA, rounded_l2_bound
from .dp import MECHANISM_LOCAL, MECHANISM_SECAGG, DPConfig, PrivacyConfigError, clip_l2
from .quantization import NOISE_SIGMAS, QuantizationError, Ring, quantize
from .rotation import coordinate_bound, rotate, unrotate
from .secagg import SecAggParams
from .secagg_crypto import SessionContext
from .wire import WireError

# wire size per value: 0.375 of fp32 for the masked vector (keys and shares come on top)
DEFAULT_RING_BITS = 12
CLAMP_SIGMAS = 8.0  # a rotated value's range, in its sub-Gaussian scale: it passes it with probability 2e-14
# how far past its typical length an honest sum's noise (and rounding) may reach: a Gaussian
# vector's norm passes sqrt(d) + t with probability below exp(-t^2 / 2), 2e-8 at 6
TAIL_SIGMAS = 6.0


@dataclass(frozen=True)
class PrivacySettings:
    """``{"dp": {...}, "secure_aggregation": true, "ring_bits": 14, "neighbours": null, "max_dropout": 0.3,
    "device_metrics": false}``."""

    dp: DPConfig
    secure_aggregation: bool = True
    ring_bits: int = DEFAULT_RING_BITS
    neighbours: int | None = None
    max_dropout: float = 0.3
    weighting: str = "samples"
    weight_cap: int = 256  # training samples at which a device counts fully
    min_weight: float = 0.5  # the least a device weighs: floors a cohort's summed weight (influence bound)
    # False: a device sends only its privacy spending. True: it also reports accuracy and loss on its
    # own data, as simulations' reports need; those are outside the DP guarantee (no noise, no accounting).
    device_metrics: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping) -> PrivacySettings:
        if not isinstance(raw, Mapping):
            raise PrivacyConfigError(f"privacy must be a mapping, got {type(raw).__name__}")
        known = {
            "dp",
            "secure_aggregation",
            "ring_bits",
            "neighbours",
            "max_dropout",
            "device_metrics",
            "weighting",
            "weight_cap",
            "min_weight",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyConfigError(f"privacy: unknown keys {unknown} (known: {sorted(known)})")
        if "dp" not in raw:
            raise PrivacyConfigError("privacy: missing key 'dp' (noise_multiplier 0 for clipping only)")
        dp = dict(raw["dp"]) if isinstance(raw["dp"], Mapping) else raw["dp"]
        if isinstance(dp, dict) and dp.get("min_cohort") is None and isinstance(dp.get("cohort_size"), int):
            # noise shares sized for the fewest survivors a round may release with: a round that
            # loses up to max_dropout of its cohort still carries the full noise
            max_dropout = raw.get("max_dropout", 0.3)
            if isinstance(max_dropout, (int, float)) and 0 <= max_dropout < 1:
                dp["min_cohort"] = max(1, math.ceil(dp["cohort_size"] * (1 - max_dropout)))
        values = dict(raw) | {"dp": DPConfig.from_dict(dp)}
        settings = cls(**values)
        if isinstance(settings.ring_bits, bool) or not isinstance(settings.ring_bits, int):
            raise PrivacyConfigError(f"privacy.ring_bits must be an integer, got {settings.ring_bits!r}")
        try:
            settings.ring(settings.dp.cohort_size, 1)
        except QuantizationError as err:
            raise PrivacyConfigError(f"privacy.ring_bits: {err}") from err
        if settings.weighting not in ("samples", "uniform"):
            raise PrivacyConfigError(f"privacy.weighting must be 'samples' or 'uniform', got {settings.weighting!r}")
        if isinstance(settings.weight_cap, bool) or not isinstance(settings.weight_cap, int) or settings.weight_cap < 1:
            raise PrivacyConfigError(f"privacy.weight_cap must be a positive integer, got {settings.weight_cap!r}")
        if isinstance(settings.min_weight, bool) or not (
            isinstance(settings.min_weight, (int, float)) and 0 < settings.min_weight <= 1
        ):
            raise PrivacyConfigError(f"privacy.min_weight must be in (0, 1], got {settings.min_weight!r}")
        if not isinstance(settings.device_metrics, bool):
            raise PrivacyConfigError(f"privacy.device_metrics must be true or false, got {raw['device_metrics']!r}")
        if not isinstance(settings.secure_aggregation, bool):
            raise PrivacyConfigError(
                f"privacy.secure_aggregation must be true or false, got {raw['secure_aggregation']!r}"
            )
        if not settings.secure_aggregation and settings.dp.mode != "local":
            raise PrivacyConfigError(
                "privacy.secure_aggregation false needs dp.mode 'local': without secure aggregation the aggregator"
                " sees each device's delta, so each must carry the full noise"
            )
        if not settings.secure_aggregation and settings.dp.noise_multiplier == 0:
            raise PrivacyConfigError("privacy.secure_aggregation false with dp.noise_multiplier 0 protects nothing")
        return settings

    def ring(self, cohort: int, length: int) -> Ring:
        """The ring for a cohort's rotated vectors of ``length`` values. A rotated value of a clipped
        delta is sub-Gaussian with scale ``sqrt(2/length) clip_norm`` (``rotation``): values clamp at
        ``CLAMP_SIGMAS`` times it (the clamp practically never binds, and only ever shortens a
        vector). Each device gets the most levels that leave room for the cohort's summed noise
        (``NOISE_SIGMAS`` standard deviations of ``sqrt(cohort)`` noise shares)."""
        clip = self.dp.clip_norm
        clamp = min(clip, CLAMP_SIGMAS * coordinate_bound(clip, length))
        top = (1 << (self.ring_bits - 1)) - 1
        if self.dp.noise_multiplier == 0 or not self.secure_aggregation:
            return Ring(self.ring_bits, cohort, float(clamp))

        def noise_room(levels: int) -> int:
            return math.ceil(NOISE_SIGMAS * math.sqrt(cohort) * self.noise_sigma(levels / clamp, length))

        low, high = 0, top // cohort  # the largest level count whose noise still fits: bisection
        while low < high:
            middle = (low + high + 1) // 2
            if cohort * middle + noise_room(middle) <= top:
                low = middle
            else:
                high = middle - 1
        if low < 1:
            raise QuantizationError(
                f"a {self.ring_bits}-bit ring cannot hold the noise of {cohort} devices at noise multiplier"
                f" {self.dp.noise_multiplier}: use more bits"
            )
        return Ring(self.ring_bits, cohort, float(clamp), top - cohort * low)

    def noise_sigma(self, scale: float, length: int) -> float:
        """One device's discrete Gaussian noise (levels) at ``scale`` levels per unit: the sum of
        ``min_cohort`` shares (one in local mode) has ``noise_multiplier`` times the sensitivity."""
        if self.dp.noise_multiplier == 0:
            return 0.0
        sensitivity = rounded_l2_bound(self.dp.clip_norm * scale, length)
        contributors = 1 if self.dp.mode == "local" else self.dp.contributors_assumed
        return max(self.dp.noise_multiplier * sensitivity / math.sqrt(contributors), MIN_SIGMA)

    def noise_std(self, ring: Ring, length: int) -> float:
        """One device's noise per value in the delta's own units, quantized in ``ring`` (for the
        bounds on a sum)."""
        if not self.secure_aggregation:
            return self.dp.device_noise_std
        return self.noise_sigma(ring.scale, length) / ring.scale

    @property
    def mechanism(self) -> str:
        return MECHANISM_SECAGG if self.secure_aggregation else MECHANISM_LOCAL

    @property
    def weighted(self) -> bool:
        """Whether a device's sample weight travels (masked) with its delta; only under secure aggregation."""
        return self.secure_aggregation and self.weighting == "samples"

    def update_length(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Values in one device's masked vector: the slow delta, and its weight when weighted."""
        return vector_length(shapes) + (1 if self.weighted else 0)


def flatten(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[name], dtype=np.float64).ravel() for name in sorted(shapes)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
    out, start = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = vector[start : start + size].reshape(shapes[name]).astype(np.float32)
        start += size
    if start != vector.size:
        raise ValueError(f"{vector.size} values for tensors of {start}")
    return out


def vector_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def prepare_update(
    delta: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    settings: PrivacySettings,
    cohort: int,
    rng: np.random.Generator,
    context: SessionContext,
    samples: int | None = None,
) -> tuple[np.ndarray, float]:
    """The device's clipped, noised, rotated, quantized update (ring elements) and its delta's norm
    before clipping. ``context``: the round's session, which fixes the cohort's rotation."""
    vector = flatten(delta, shapes)
    norm = float(np.linalg.norm(vector))
    if settings.weighted:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"sample weighting needs the device's training sample count, got {samples!r}")
        weight = max(min(samples / settings.weight_cap, 1.0), settings.min_weight)
        bound = settings.dp.clip_norm / math.sqrt(2)
        clipped, _ = clip_l2(vector, bound)
        vector = np.append(weight * clipped, weight * bound)
    clipped, _ = clip_l2(vector, settings.dp.clip_norm)  # under weighting, within it already
    ring = settings.ring(cohort, clipped.size)
    sensitivity = rounded_l2_bound(settings.dp.clip_norm * ring.scale, clipped.size)
    sigma = settings.noise_sigma(ring.scale, clipped.size)
    noise = discrete_gaussian.sample(sigma, clipped.size) if sigma > 0 else None
    return quantize(rotate(clipped, context), ring, rng, sensitivity, noise), norm


def cohort_sum(
    total: np.ndarray,
    survivors: int,
    shapes: Mapping[str, tuple[int, ...]],
    settings: PrivacySettings,
    context: SessionContext,
) -> tuple[Tensors, float]:
    """The cohort's summed slow delta and its summed weight (the survivors, or under sample
    weighting their decoded weights) from the decoded (rotated) sum of their updates."""
    if survivors < 1:
        raise ValueError("no survivors to sum over")
    total = unrotate(total, context)
    if not settings.weighted:
        return unflatten(total, shapes), float(survivors)
    # the summed weight carries noise, and one device may have crafted it: never below the cohort's floor
    weight = max(float(total[-1]) * math.sqrt(2) / settings.dp.clip_norm, survivors * settings.min_weight)
    return unflatten(total[:-1], shapes), weight


@dataclass(frozen=True)
class CohortBound:
    """What the released sum of ``survivors`` honest devices can be, all but negligibly often."""

    survivors: int
    norm: float  # of the decoded sum: every device clipped, plus the noise and the rounding
    min_weight: float  # the summed weight is floored here
    max_weight: float  # and no honest cohort's passes this

    @property
    def radius(self) -> float:
        """The cohort's mean lies within this of zero, whatever one of its devices sends."""
        return self.norm / self.min_weight


def cohort_bound(settings: PrivacySettings, survivors: int, length: int, ring_cohort: int | None = None) -> CohortBound:
    """The bound a leaf (and the cluster again) enforces on the sum of ``survivors`` updates of
    ``length`` values quantized in the ring of a cohort of ``ring_cohort`` (default: the
    survivors; the coarser ring of a larger cohort only widens the bound): ``survivors *
    clip_norm`` plus the tail of the devices' noise and their stochastic rounding (each value's
    error is within one step, so sub-Gaussian), 1 % to spare."""
    if isinstance(survivors, bool) or not isinstance(survivors, int) or survivors < 1:
        raise ValueError(f"survivors must be a positive integer, got {survivors!r}")
    ring = settings.ring(ring_cohort or survivors, length)
    spread = math.sqrt(survivors) * math.hypot(settings.noise_std(ring, length), 1.0 / ring.scale)
    norm = (survivors * settings.dp.clip_norm + spread * (math.sqrt(length) + TAIL_SIGMAS)) * 1.01
    if not settings.weighted:
        return CohortBound(survivors, norm, float(survivors), float(survivors))
    weight_noise = spread * math.sqrt(2) / settings.dp.clip_norm
    return CohortBound(
        survivors, norm, survivors * settings.min_weight, (survivors + TAIL_SIGMAS * weight_noise) * 1.01
    )


def cohort_mean(
    total: np.ndarray,
    survivors: int,
    shapes: Mapping[str, tuple[int, ...]],
    settings: PrivacySettings,
    context: SessionContext,
) -> Tensors:
    """The cohort's mean slow delta from the decoded (rotated) sum of its survivors' updates."""
    summed, weight = cohort_sum(total, survivors, shapes, settings, context)
    return {name: value / weight for name, value in summed.items()}


def session_params(settings: PrivacySettings, spec: Mapping, length: int) -> SecAggParams:
    """The protocol parameters every party derives from a session's description (``job_id``,
    ``round``, ``cohort_id``, ``cohort``, ``authenticated``), sent by the aggregator with the global
    slow layers."""
    if not isinstance(spec, Mapping):
        raise WireError("the task carries no secagg session description")
    cohort = spec.get("cohort")
    if not isinstance(cohort, list) or not cohort or not all(isinstance(d, str) for d in cohort):
        raise WireError(f"secagg cohort must be a list of device ids, got {cohort!r}")
    if len(set(cohort)) != len(cohort):
        raise WireError("secagg cohort names a device twice")
    authenticated = spec.get("authenticated", False)
    if not isinstance(authenticated, bool):
        raise WireError(f"secagg authenticated must be true or false, got {authenticated!r}")
    context = SessionContext(spec.get("job_id"), spec.get("round"), spec.get("cohort_id"))
    return SecAggParams(
        context,
        settings.ring(len(cohort), length),
        length,
        neighbours=settings.neighbours,
        max_dropout=settings.max_dropout,
        min_survivors=min_survivors(settings, len(cohort)),
        authenticated=authenticated,
        cohort=tuple(sorted(cohort)),
    )


def min_survivors(settings: PrivacySettings, cohort: int) -> int:
    """A sum is released only over at least this many devices: the DP noise shares assume them
    (a cohort smaller than that releases nothing)."""
    if settings.dp.mode == "distributed" and settings.dp.noise_multiplier > 0:
        return max(2, settings.dp.contributors_assumed)
    return min(2, cohort)


class SumPastBound(ValueError):
    """A decoded sum no cohort of honest devices could have made: nothing is released."""


def bounded_cohort_sum(
    total: np.ndarray,
    survivors: int,
    shapes: Mapping[str, tuple[int, ...]],
    settings: PrivacySettings,
    context: SessionContext,
    ring_cohort: int,
) -> tuple[Tensors, float]:
    """``cohort_sum`` of a securely aggregated sum, once it is checked against ``cohort_bound``:
    ``SumPastBound`` names what a crafted vector or weight pushed past it. Every aggregator (a leaf,
    the flat job's server) releases sums through here."""
    bound = cohort_bound(settings, survivors, total.size, ring_cohort)
    norm = float(np.linalg.norm(total))  # the rotation keeps norms
    if norm > bound.norm:
        raise SumPastBound(
            f"the decoded sum of {survivors} devices has norm {norm:.4g}, past the {bound.norm:.4g} that"
            f" {survivors} clipped devices reach: a device sent a crafted vector; nothing is released"
        )
    summed, weight = cohort_sum(total, survivors, shapes, settings, context)
    if weight > bound.max_weight:
        raise SumPastBound(
            f"the decoded weight of {survivors} devices is {weight:.4g}, past the {bound.max_weight:.4g} they"
            " can carry: a device sent a crafted weight; nothing is released"
        )
    return summed, weight
