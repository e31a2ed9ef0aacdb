"""The cluster's intake of leaf sums: checked, weighted for staleness, robust to an outlying leaf.

A leaf reports one decoded secure sum of its cohort: ``total = sum of w_i * delta_i`` over ``count``
devices with summed weight ``weight = sum of w_i`` (each ``w_i`` in (0, 1]: a device's sample
weight, 1 under uniform weighting), and the global version its cohort trained from. The cluster
cannot see a device, so what it can check is the leaf's sum:

- **shape and sanity**: the expected tensors, finite values, ``0 < weight <= count``, ``count``
  within the leaf's registered cohort, a base version the cluster has made;
- **a bound no honest sum can pass**: every device clips ``delta_i`` to ``clip_bound``, so the
  leaf's mean ``total / weight`` has norm at most ``clip_bound`` plus the norms of the noise and of
  the stochastic rounding on the sum (``noise_norm``, ``rounding_norm`` per device; 10 % to spare:
  such norms concentrate) over ``weight``; a sum past it is refused;
- **an outlier among leaves** (three or more in a buffer): a mean far longer than the median
  (``norm_ratio``) or pointing away from the coordinate-wise median (cosine below ``min_cosine``)
  is refused: one poisoned leaf cannot steer the version, and the validation gate still judges
  what is left;
- **staleness** (buffered asynchronous mode, FedBuff, Nguyen et al. 2022): a sum trained from a
  version ``s`` behind the current one counts ``1 / sqrt(1 + s)`` of its weight; past
  ``max_staleness`` it is refused.

What passes goes into the same ``SlowDeltaAggregator`` (sample-weighted mean, server optimiser) as
every other path. Under secure aggregation nothing finer than a leaf's cohort can be judged: a
device poisoning within the clip bound is invisible here, and only the validation gate can
catch its effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from app_custom.nested.slow_delta import UpdateError, check_tensors
from app_custom.privacy.private_update import flatten

from .aggregation import Rejection, SlowDeltaAggregator


@dataclass(frozen=True)
class LeafSum:
    leaf: str
    base_version: int  # the global version the cohort trained from
    count: int  # devices whose updates are in the sum
    weight: float  # their summed weight, in (0, count]
    total: Mapping[str, np.ndarray]  # sum of weight_i * delta_i


@dataclass(frozen=True)
class LeafPolicy:
    clip_bound: float  # a device's weighted delta never exceeds it (after clipping)
    # the norm of the DP noise on a leaf's sum: about z * clip * sqrt(values) * sqrt(cohort / min_cohort)
    # (noise shares are sized for the fewest survivors a round may release with)
    noise_norm: float = 0.0
    rounding_norm: float = 0.0  # the norm of one device's stochastic-rounding error: about sqrt(values) * step / 2
    weight_noise: float = 0.0  # the std of the noise on the decoded weight (samples weighting under DP)
    norm_ratio: float = 3.0
    min_cosine: float = -0.2
    max_staleness: int = 4
    max_cohort: int | None = None

    def __post_init__(self) -> None:
        for name in ("clip_bound", "norm_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.noise_norm, (int, float)) and math.isfinite(self.noise_norm) and self.noise_norm >= 0):
            raise ValueError(f"noise_norm must be a non-negative number, got {self.noise_norm!r}")
        if not (isinstance(self.min_cosine, (int, float)) and -1 <= self.min_cosine <= 1):
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(f"max_staleness must be a non-negative integer, got {self.max_staleness!r}")
        for name in ("rounding_norm", "weight_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.max_cohort is not None and (
            isinstance(self.max_cohort, bool) or not isinstance(self.max_cohort, int) or self.max_cohort < 1
        ):
            raise ValueError(f"max_cohort must be None or a positive integer, got {self.max_cohort!r}")


@dataclass
class Combined:
    """What ``LeafSumCombiner.combine`` did with one buffer of leaf sums."""

    accepted: dict[str, float] = field(default_factory=dict)  # leaf -> the weight it counted with
    rejections: list[Rejection] = field(default_factory=list)
    devices: int = 0


class LeafSumCombiner:
    """Checks and weighs a buffer of leaf sums, then feeds ``aggregator``."""

    def __init__(self, policy: LeafPolicy, expected: Mapping[str, tuple[int, ...]]) -> None:
        self.policy = policy
        self.expected = dict(expected)

    def _check(self, item: LeafSum, current_version: int) -> float:
        """The staleness factor of a well-formed sum, or ``UpdateError`` saying what is wrong."""
        policy = self.policy
        count, weight = item.count, item.weight
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UpdateError(f"count must be a positive integer, got {count!r}")
        if policy.max_cohort is not None and count > policy.max_cohort:
            raise UpdateError(f"count {count} exceeds the largest cohort a leaf may sum ({policy.max_cohort})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UpdateError(f"weight must be a finite number, got {weight!r}")
        ceiling = count * (1 + 1e-6) + 4 * policy.weight_noise  # the decoded weight carries noise under DP
        if not 0 < weight <= ceiling:
            raise UpdateError(f"weight {weight} is outside (0, {ceiling:.4g}]: each device weighs at most 1")
        base = item.base_version
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= current_version:
            raise UpdateError(f"base version {base!r}: the current version is {current_version}")
        staleness = current_version - base
        if staleness > policy.max_staleness:
            raise UpdateError(f"trained from version {base}, {staleness} behind (at most {policy.max_staleness})")
        check_tensors(item.total, self.expected, f"sum from leaf {item.leaf}")
        # the clip bound, plus the noise and the rounding of the sum (norms concentrate: 10 % to spare)
        spread = policy.noise_norm + math.sqrt(count) * policy.rounding_norm
        bound = (policy.clip_bound + 1.1 * spread / weight) * 1.01
        norm = float(np.linalg.norm(flatten(item.total, self.expected))) / weight
        if norm > bound:
            raise UpdateError(f"its mean has norm {norm:.4g}, past the {bound:.4g} no clipped cohort can reach")
        return 1.0 / math.sqrt(1.0 + staleness)

    def combine(self, items: list[LeafSum], current_version: int, aggregator: SlowDeltaAggregator) -> Combined:
        """Feed the acceptable sums of ``items`` to ``aggregator``; every refusal is named."""
        out = Combined()
        checked: dict[str, tuple[LeafSum, float]] = {}
        for item in items:
            leaf = str(getattr(item, "leaf", "?"))
            try:
                if not isinstance(item, LeafSum):
                    raise UpdateError(f"expected a LeafSum, got {type(item).__name__}")
                if leaf in checked:
                    raise UpdateError("a second sum in the same buffer")
                checked[leaf] = (item, self._check(item, current_version))
            except UpdateError as err:
                out.rejections.append(aggregator.reject(f"leaf {leaf}", str(err)))
        means = {leaf: flatten(item.total, self.expected) / item.weight for leaf, (item, _) in checked.items()}
        for leaf, reason in self._outliers(means).items():
            del checked[leaf]
            out.rejections.append(aggregator.reject(f"leaf {leaf}", reason))
        for leaf, (item, factor) in checked.items():
            mean = {name: np.asarray(value, dtype=np.float64) / item.weight for name, value in item.total.items()}
            rejection = aggregator.add(f"leaf {leaf}", mean, item.weight * factor, self.expected)
            if rejection is not None:
                out.rejections.append(rejection)
                continue
            out.accepted[leaf] = item.weight * factor
            out.devices += item.count
        return out

    def _outliers(self, means: dict[str, np.ndarray]) -> dict[str, str]:
        """Leaves whose mean is far from the buffer's medians (three or more tell who is odd): longer
        than ``norm_ratio`` times the median norm, or at a cosine below ``min_cosine`` to the
        coordinate-wise median. Medians, so that a minority of odd leaves cannot move the yardstick;
        one pass over the buffer, so the cost grows linearly with the leaves."""
        if len(means) < 3:
            return {}
        policy, found = self.policy, {}
        norms = {leaf: float(np.linalg.norm(mean)) for leaf, mean in means.items()}
        typical = float(np.median(list(norms.values())))
        centre = np.median(np.stack(list(means.values())), axis=0)
        centre_norm = float(np.linalg.norm(centre))
        for leaf, mean in means.items():
            if typical > 0 and norms[leaf] > policy.norm_ratio * typical:
                found[leaf] = f"outlying sum: its mean is {norms[leaf] / typical:.1f}x as long as the median"
                continue
            denominator = norms[leaf] * centre_norm
            cosine = float(mean @ centre) / denominator if denominator > 0 else 1.0
            if cosine < policy.min_cosine:
                found[leaf] = f"outlying sum: cosine {cosine:.2f} to the leaves' median (below {policy.min_cosine})"
        return found
