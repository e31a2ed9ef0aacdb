"""Device data sets and the ``package.module:function`` plug-in that provides them.

A fleet function is called with keyword arguments from the job (none for a user plug-in) and
returns either a ``FleetData`` or a list with one dict per device holding numpy arrays
``x_train``, ``y_train``, ``x_test``, ``y_test`` (x float32, (n, d) or (n, C, H, W), or a dict
of such arrays, one per modality; y int64 class labels) and optionally ``groups_train`` (one
recording id per training sample: the device's held-out split keeps a recording's windows
together). Everything is checked here, at the trust boundary, with errors that name the device
and the array.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

Array = np.ndarray
Inputs = Array | dict[str, Array]
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The cluster's validation set, when a plug-in gives none: this share of each device's training
# samples is held out for the cluster (and removed from the device) with a fixed seed.
CLUSTER_HOLDOUT = 0.1


class DataError(ValueError):
    """A data set is malformed: the message names the device and the array."""


@dataclass(frozen=True)
class LabelledSet:
    """Samples and labels; ``weight`` (optional, >= 0 per sample) makes accuracy a weighted mean, as
    for a test set that stands for a device's label mix drawn from a pool with another mix;
    ``groups`` (optional, one id per sample) names the recording each sample was cut from, so that
    a statistical test treats a recording's correlated windows as one unit, not as many."""

    x: Inputs
    y: Array
    weight: Array | None = None
    groups: Array | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Array) -> LabelledSet:
        return LabelledSet(
            take(self.x, index),
            self.y[index],
            None if self.weight is None else self.weight[index],
            None if self.groups is None else self.groups[index],
        )

    @property
    def effective_size(self) -> float:
        """Kish's effective sample size: how many unweighted samples would measure as precisely."""
        if self.weight is None:
            return float(len(self))
        return float(self.weight.sum() ** 2 / np.square(self.weight).sum())


@dataclass(frozen=True)
class DeviceData:
    train: LabelledSet
    test: LabelledSet
    # The device's own held-out samples for its decisions (never trained on); None: the learner
    # holds out its configured share of ``train``. The edge runtime passes its rolling buffer.
    holdout: LabelledSet | None = None


@dataclass(frozen=True)
class FleetData:
    devices: tuple[DeviceData, ...]
    cluster_validation: LabelledSet
    num_classes: int


def take(x: Inputs, index: Array) -> Inputs:
    if isinstance(x, dict):
        return {name: value[index] for name, value in x.items()}
    return x[index]


def concat(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], dict):
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}  # type: ignore[index]
    return np.concatenate(parts)  # type: ignore[arg-type]


def _check_x(x: Any, where: str) -> Inputs:
    if isinstance(x, Mapping):
        if not x:
            raise DataError(f"{where}: empty dict of modalities")
        return {str(name): _check_x(value, f"{where}[{name!r}]") for name, value in x.items()}  # type: ignore[misc]
    if not isinstance(x, np.ndarray):
        raise DataError(f"{where}: expected a numpy array, got {type(x).__name__}")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{where}: expected shape (n, d), (n, C, T) or (n, C, H, W), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: expected float32, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: contains NaN or inf")
    return x


def _count(x: Inputs) -> int:
    counts = {v.shape[0] for v in x.values()} if isinstance(x, dict) else {x.shape[0]}
    if len(counts) != 1:
        raise DataError(f"modalities have different sample counts: {sorted(counts)}")
    return counts.pop()


def _check_set(x: Any, y: Any, where: str, weight: Any = None, groups: Any = None) -> LabelledSet:
    x = _check_x(x, f"{where}.x")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}.y: expected a 1-D int64 array, got {getattr(y, 'shape', type(y).__name__)}")
    if (y < 0).any():
        raise DataError(f"{where}.y: labels must be >= 0")
    if _count(x) != y.shape[0]:
        raise DataError(f"{where}: {_count(x)} samples in x but {y.shape[0]} labels in y")
    if y.shape[0] == 0:
        raise DataError(f"{where}: no samples")
    if weight is not None:
        if not isinstance(weight, np.ndarray) or weight.shape != y.shape:
            raise DataError(f"{where}.weight: expected one weight per sample, shape {y.shape}")
        weight = weight.astype(np.float64)
        if not np.isfinite(weight).all() or (weight < 0).any() or weight.sum() <= 0:
            raise DataError(f"{where}.weight: weights must be finite, >= 0 and not all 0")
    if groups is not None and (not isinstance(groups, np.ndarray) or groups.shape != y.shape):
        raise DataError(f"{where}.groups: expected one group id per sample, shape {y.shape}")
    return LabelledSet(x, y.astype(np.int64), weight, groups)


def save_labelled(path: str | Path, x: Mapping[str, Array], y: Array) -> None:
    """Write labelled samples as an ``.npz`` file: ``x.<modality>`` arrays and ``y`` (what
    ``load_labelled`` reads: a device's validation set for ``ota update``, recorded sensor samples)."""
    from app_custom.durable import write_bytes_atomic

    buffer = io.BytesIO()
    np.savez(buffer, **{f"x.{name}": value for name, value in x.items()}, y=y)
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_labelled(path: str | Path) -> LabelledSet:
    """Labelled samples from an ``.npz`` file of ``x.<modality>`` arrays and ``y`` labels, checked
    (float inputs, finite, one int label >= 0 per sample); ``DataError`` names what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x = {name[2:]: arrays[name] for name in arrays.files if name.startswith("x.")}
            y = arrays["y"] if "y" in arrays.files else None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    if not x or y is None:
        raise DataError(f"{path}: expected arrays x.<modality> and y")
    return _check_set(x, y, str(path))


def check_device(raw: Any, index: int) -> DeviceData:
    where = f"device {index}"
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a dict with {list(ARRAY_KEYS)}, got {type(raw).__name__}")
    missing = [key for key in ARRAY_KEYS if key not in raw]
    if missing:
        raise DataError(f"{where}: missing {missing}")
    unknown = sorted(set(raw) - set(ARRAY_KEYS) - {"groups_train"})
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known: {list(ARRAY_KEYS)} and optional 'groups_train'")
    return DeviceData(
        train=_check_set(raw["x_train"], raw["y_train"], f"{where} train", groups=raw.get("groups_train")),
        test=_check_set(raw["x_test"], raw["y_test"], f"{where} test"),
    )


def _shapes(x: Inputs) -> dict[str, tuple[int, ...]]:
    if isinstance(x, dict):
        return {name: tuple(v.shape[1:]) for name, v in x.items()}
    return {"": tuple(x.shape[1:])}


def _check_same_shapes(devices: list[DeviceData]) -> None:
    reference = _shapes(devices[0].train.x)
    for i, device in enumerate(devices):
        for part in (device.train, device.test):
            if _shapes(part.x) != reference:
                raise DataError(f"device {i}: sample shape {_shapes(part.x)} differs from device 0's {reference}")


def check_fleet(fleet: Any) -> FleetData:
    """Validate a ``FleetData`` a fleet function built itself: every set as for a plug-in's dicts,
    one sample shape throughout, and every label below ``num_classes``."""
    if not isinstance(fleet.num_classes, int) or isinstance(fleet.num_classes, bool) or fleet.num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, got {fleet.num_classes!r}")
    if not fleet.devices:
        raise DataError("the fleet has no devices")
    devices = [
        DeviceData(
            _check_set(d.train.x, d.train.y, f"device {i} train", groups=d.train.groups),
            _check_set(d.test.x, d.test.y, f"device {i} test", d.test.weight),
        )
        for i, d in enumerate(fleet.devices)
    ]
    _check_same_shapes(devices)
    validation = fleet.cluster_validation
    cluster = _check_set(validation.x, validation.y, "cluster validation", groups=validation.groups)
    if _shapes(cluster.x) != _shapes(devices[0].train.x):
        raise DataError(f"cluster validation: sample shape {_shapes(cluster.x)} differs from the devices'")
    named = [(f"device {i} {part}", getattr(d, part)) for i, d in enumerate(devices) for part in ("train", "test")]
    for where, labelled in named + [("cluster validation", cluster)]:
        if int(labelled.y.max()) >= fleet.num_classes:
            raise DataError(f"{where}.y: label {int(labelled.y.max())} >= num_classes {fleet.num_classes}")
    return FleetData(devices=tuple(devices), cluster_validation=cluster, num_classes=fleet.num_classes)


def fleet_from_devices(raw_devices: Any, seed: int = 0) -> FleetData:
    """Validate a plug-in's per-device list and hold out the cluster's validation share."""
    if not isinstance(raw_devices, (list, tuple)) or not raw_devices:
        raise DataError(f"a fleet function must return a non-empty list of per-device dicts, got {type(raw_devices)}")
    devices = [check_device(raw, i) for i, raw in enumerate(raw_devices)]
    _check_same_shapes(devices)
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for device in devices:
        order = rng.permutation(len(device.train))
        n_held = int(len(order) * CLUSTER_HOLDOUT)
        if len(order) - n_held < 1:
            n_held = 0
        held.append(device.train.subset(order[:n_held]))
        kept.append(DeviceData(device.train.subset(order[n_held:]), device.test))
    held = [h for h in held if len(h)] or [devices[0].train]
    cluster = LabelledSet(concat([h.x for h in held]), np.concatenate([h.y for h in held]))
    num_classes = int(max(max(d.train.y.max(), d.test.y.max()) for d in devices)) + 1
    return FleetData(devices=tuple(kept), cluster_validation=cluster, num_classes=max(num_classes, 2))


def import_function(spec: str) -> Any:
    """Resolve ``package.module:function`` (or ``path/to/file.py:function``) to a callable."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise DataError(f"expected 'package.module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise DataError(f"{spec}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise DataError(f"{spec}: cannot import {module_name!r}: {e}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"{spec}: {module_name!r} has no callable {function_name!r}")
    return function


@lru_cache(maxsize=4)
def _load_fleet_cached(spec: str, kwargs_json: str) -> FleetData:
    result = import_function(spec)(**json.loads(kwargs_json))
    return check_fleet(result) if isinstance(result, FleetData) else fleet_from_devices(result)


def load_fleet(spec: str, kwargs: Mapping[str, Any] | None = None) -> FleetData:
    """Call the fleet function once per process (cached) and validate what it returns."""
    return _load_fleet_cached(spec, json.dumps(dict(kwargs or {}), sort_keys=True))
