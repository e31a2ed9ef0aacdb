"""The path of one slow delta through the privacy layer, from the device's tensors to the cohort mean.

Device: flatten (parameter names sorted) -> clip to ``clip_norm`` -> add its noise share ->
quantize into the ring sized for the cohort. Aggregator: the securely aggregated ring sum ->
decoded real sum -> divided by the number of survivors (uniform weights: per-device sample counts
would leak through weights, and DP-FedAvg bounds each device's influence the same way) -> tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from app_custom.nested.slow_delta import Tensors

from .dp import DPConfig, PrivacyConfigError, privatize
from .quantization import QuantizationError, Ring, quantize

DEFAULT_RING_BITS = 14  # wire size per value: under half of fp32 with the protocol's own messages
CLAMP_SIGMAS = 8.0  # quantization range past the clip bound, in noise standard deviations


@dataclass(frozen=True)
class PrivacySettings:
    """``{"dp": {...}, "secure_aggregation": true, "ring_bits": 14, "neighbours": null, "max_dropout": 0.3,
    "device_metrics": true}``."""

    dp: DPConfig
    secure_aggregation: bool = True
    ring_bits: int = DEFAULT_RING_BITS
    neighbours: int | None = None
    max_dropout: float = 0.3
    # True: devices also report their evaluation metrics (accuracy and loss on their own data), as
    # simulations need; these are outside the DP guarantee. Deployments that promise DP set false.
    device_metrics: bool = True

    @classmethod
    def from_dict(cls, raw: Mapping) -> PrivacySettings:
        if not isinstance(raw, Mapping):
            raise PrivacyConfigError(f"privacy must be a mapping, got {type(raw).__name__}")
        known = {"dp", "secure_aggregation", "ring_bits", "neighbours", "max_dropout", "device_metrics"}
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
            settings.ring(settings.dp.cohort_size)
        except QuantizationError as err:
            raise PrivacyConfigError(f"privacy.ring_bits: {err}") from err
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

    def ring(self, cohort: int) -> Ring:
        """The ring for a cohort: values clamp at the clip bound plus ``CLAMP_SIGMAS`` noise stds
        (a clipped delta has no coordinate beyond the clip bound; the Gaussian tail past 8 sigma
        is below 1e-15 per value, so the clamp practically never binds)."""
        clamp = self.dp.clip_norm + CLAMP_SIGMAS * self.dp.device_noise_std
        return Ring(self.ring_bits, cohort, float(clamp))

    def upload_ratio_vs_fp32(self) -> float:
        """Masked-vector bits per value against fp32 (the protocol's key and share messages come on top)."""
        return self.ring_bits / 32


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
) -> tuple[np.ndarray, float]:
    """The device's clipped, noised, quantized delta (ring elements) and its norm before clipping."""
    noised, norm = privatize(flatten(delta, shapes), settings.dp, rng)
    return quantize(noised, settings.ring(cohort), rng), norm


def mean_from_sum(total: np.ndarray, survivors: int, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
    if survivors < 1:
        raise ValueError("no survivors to average over")
    return unflatten(total / survivors, shapes)
