"""The cluster's intake of leaf sums: checked, weighted for staleness, robust to an outlying leaf.

A leaf reports one decoded secure sum of its cohort: ``total = sum of w_i * delta_i`` over ``count``
devices with summed weight ``weight = sum of w_i`` (each ``w_i`` in [min_weight, 1]: a device's
sample weight, 1 under uniform weighting), and the global version its cohort trained from. The cluster
cannot see a device, so what it can check is the leaf's sum:

- **shape and sanity**: the expected tensors, finite values, ``count`` within the leaf's
  registered cohort size, a base version the cluster has made;
- **the bound no honest sum can pass** (``private_update.cohort_bound``, the same one the leaf
  enforces): every device clips ``delta_i``, so a sum of ``count`` devices is no longer than
  ``count`` clipped deltas with their noise and rounding, and its weight lies between ``count``
  devices' floor and their most; a sum past either is refused. The mean ``total / weight`` of
  what passes lies within ``cohort_bound(count).radius`` of zero, whatever one device (or the
  leaf) sent;
- **an outlier among leaves** (three or more in a buffer): a mean far longer than the median
  (``norm_ratio``) or pointing away from the coordinate-wise median (cosine below ``min_cosine``)
  is refused: one poisoned leaf cannot steer the version, and the validation gate still judges
  what is left;
- **staleness** (buffered asynchronous mode, FedBuff, Nguyen et al. 2022): a sum trained from a
  version ``s`` behind the current one counts ``1 / sqrt(1 + s)`` of its weight; past
  ``max_staleness`` it is refused;
- **a cap on one leaf's share** (``max_share``): no leaf weighs more than that share of a version
  (or ``1 / leaves`` when there are fewer leaves), so a leaf that lies within its bound moves a
  version by at most ``max_share`` times twice its radius.

What passes goes into the same ``SlowDeltaAggregator`` (sample-weighted mean, server optimiser) as
every other path. Under secure aggregation nothing finer than a leaf's cohort can be judged: a
device poisoning within the bound is invisible here, and only the validation gate can catch its
effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from app_custom.nested.slow_delta import UpdateError, check_tensors
from app_custom.privacy.private_update import PrivacySettings, cohort_bound, flatten

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
    privacy: PrivacySettings  # the job's: clip bound, noise, ring and weighting every device used
    length: int  # values in one device's update (its slow delta, and its weight when weighted)
    norm_ratio: float = 3.0
    min_cosine: float = -0.2
    max_staleness: int = 4
    max_cohort: int = 1024  # the leaves' registered cohort size: no sum counts more devices
    max_share: float = 0.5  # of a version's weight, at most, for one leaf

    def __post_init__(self) -> None:
        if not isinstance(self.privacy, PrivacySettings):
            raise ValueError(f"privacy must be the job's PrivacySettings, got {type(self.privacy).__name__}")
        for name in ("length", "max_cohort"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.norm_ratio, (int, float)) and math.isfinite(self.norm_ratio) and self.norm_ratio > 0):
            raise ValueError(f"norm_ratio must be a positive number, got {self.norm_ratio!r}")
        if not (isinstance(self.min_cosine, (int, float)) and -1 <= self.min_cosine <= 1):
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(f"max_staleness must be a non-negative integer, got {self.max_staleness!r}")
        if not (isinstance(self.max_share, (int, float)) and 0 < self.max_share <= 1):
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share!r}")


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
        if count > policy.max_cohort:
            raise UpdateError(f"count {count} exceeds the registered cohort size of a leaf ({policy.max_cohort})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UpdateError(f"weight must be a finite number, got {weight!r}")
        # quantized in the ring of its cohort: the registered size's is the coarsest that may be
        bound = cohort_bound(policy.privacy, count, policy.length, policy.max_cohort)
        if not bound.min_weight * (1 - 1e-6) <= weight <= bound.max_weight:
            raise UpdateError(
                f"weight {weight} is outside [{bound.min_weight:.4g}, {bound.max_weight:.4g}], the weights"
                f" {count} devices can carry"
            )
        base = item.base_version
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= current_version:
            raise UpdateError(f"base version {base!r}: the current version is {current_version}")
        staleness = current_version - base
        if staleness > policy.max_staleness:
            raise UpdateError(f"trained from version {base}, {staleness} behind (at most {policy.max_staleness})")
        check_tensors(item.total, self.expected, f"sum from leaf {item.leaf}")
        norm = float(np.linalg.norm(flatten(item.total, self.expected)))
        if norm > bound.norm:
            raise UpdateError(
                f"its sum has norm {norm:.4g}, past the {bound.norm:.4g} that {count} clipped devices reach"
            )
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
        weights = capped_shares({leaf: item.weight * factor for leaf, (item, factor) in checked.items()}, self.policy)
        for leaf, (item, _) in checked.items():
            mean = {name: np.asarray(value, dtype=np.float64) / item.weight for name, value in item.total.items()}
            rejection = aggregator.add(f"leaf {leaf}", mean, weights[leaf], self.expected)
            if rejection is not None:
                out.rejections.append(rejection)
                continue
            out.accepted[leaf] = weights[leaf]
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


def capped_shares(weights: dict[str, float], policy: LeafPolicy) -> dict[str, float]:
    """``weights`` with no leaf above ``max_share`` of their total (``1 / leaves`` if that is more):
    the heaviest are lowered to the cap, which is recomputed until none is above it."""
    cap_share = max(policy.max_share, 1.0 / len(weights)) if weights else 1.0
    out = dict(weights)
    capped: set[str] = set()
    while True:
        free = sum(w for leaf, w in out.items() if leaf not in capped)
        # the capped leaves each hold cap_share of the total: total = free + len(capped) * cap_share * total
        rest = 1.0 - len(capped) * cap_share
        total = free / rest if rest > 0 else sum(out.values())
        over = [leaf for leaf, w in out.items() if leaf not in capped and w > cap_share * total * (1 + 1e-12)]
        if not over:
            return {leaf: (cap_share * total if leaf in capped else w) for leaf, w in out.items()}
        capped.update(over)
