"""Per-device non-IID partitions of the shipped data sets.

Regimes:
- ``label_skew``: each class is spread over the devices with Dirichlet(alpha) proportions,
  so a device sees a few classes mostly.
- ``env_shift``: labels IID, but every owner's sensors differ: a per-device gain and offset
  per input channel (lighting, sensor calibration), and for cameras a mirrored mount on some
  devices, for IMUs flipped axes on some devices.
- ``scarce``: labels IID, only ``scarce_train`` training samples per device.
- ``natural``: one person per device, for data sets that say who recorded each sample
  (``watch``): the person's own recordings, split into training and test recordings.

A device's test set is a sample of its own distribution: every held-out recording of the fleet
(30 % of each device's recordings, never trained on by anyone), through the device's own sensors
and, under label skew, weighted to its own label mix (accuracy is then a weighted mean; the
report gives each device's effective test size). Tested on its own held-out share alone, a
device had 6 to 61 test samples, so one sample moved its accuracy by 2 to 17 points.

The cluster's validation set is a held-out share of the data set (10 % of the recordings),
never given to a device. In ``env_shift`` it comes from ``REFERENCE_ROBOTS`` reference robots
with sensor shifts of their own (drawn like the fleet's, none of them a fleet device's), as
an operator's validation set recorded on a few of its own robots would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from app_custom.nested.device_data import DeviceData, FleetData, Inputs, LabelledSet, concat, take

from .datasets import Dataset, load

REGIMES = ("label_skew", "env_shift", "scarce", "natural")
CLUSTER_SHARE = 0.1
TEST_SHARE = 0.3
REFERENCE_ROBOTS = 4


def _split_groups(groups: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices split so that whole groups land on one side: (rest, held)."""
    unique = rng.permutation(np.unique(groups))
    held_groups = unique[: max(1, int(round(len(unique) * share)))]
    held = np.isin(groups, held_groups)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _assign_label_skew(y: np.ndarray, groups: np.ndarray, n: int, alpha: float, rng) -> list[np.ndarray]:
    for _ in range(100):
        owners: list[list[int]] = [[] for _ in range(n)]
        for label in np.unique(y):
            label_groups = rng.permutation(np.unique(groups[y == label]))
            shares = rng.dirichlet([alpha] * n)
            cuts = (np.cumsum(shares)[:-1] * len(label_groups)).astype(int)
            for device, part in enumerate(np.split(label_groups, cuts)):
                owners[device].extend(part.tolist())
        if min(len(o) for o in owners) >= 4:
            break
    return [np.array(o, dtype=np.int64) for o in owners]


def _assign_iid(groups: np.ndarray, n: int, rng) -> list[np.ndarray]:
    return [np.asarray(part) for part in np.array_split(rng.permutation(np.unique(groups)), n)]


def _owned_splits(data: Dataset, rest: np.ndarray, owned_groups: list[np.ndarray], rng):
    """(train, test, all) indices per device, each split from the recordings it owns."""
    for owned in owned_groups:
        index = rest[np.isin(data.groups[rest], owned)]
        if len(np.unique(data.groups[index])) < 2:
            raise ValueError(
                f"{data.name}: too many devices ({len(owned_groups)}) for the data; a device got < 2 samples"
            )
        train_pos, test_pos = _split_groups(data.groups[index], TEST_SHARE, rng)
        yield index[train_pos], index[test_pos], index


def _drawn_splits(data: Dataset, rest: np.ndarray, n: int, records: int, regime: str, rng) -> list[tuple]:
    """(train, test, all) indices per device: training recordings drawn from a shared pool."""
    if regime == "label_skew":
        raise ValueError("records_per_device draws IID recordings; use the env_shift or scarce regime")
    train_pos, test_pos = _split_groups(data.groups[rest], TEST_SHARE, rng)
    pool_groups = np.unique(data.groups[rest[train_pos]])
    if records > len(pool_groups):
        raise ValueError(f"records_per_device {records} exceeds the {len(pool_groups)} training recordings")
    test = rest[test_pos]
    splits = []
    for _ in range(n):
        owned = rng.choice(pool_groups, size=records, replace=False)
        train = rest[train_pos][np.isin(data.groups[rest[train_pos]], owned)]
        splits.append((train, test, np.concatenate([train, test])))
    return splits


class Sensors:
    """One owner's sensors, drawn once: per-channel gain/offset; a mirrored camera or flipped IMU
    axes. Applied to every sample the owner records (its training data and its test samples)."""

    def __init__(self, x: Inputs, rng: np.random.Generator) -> None:
        if isinstance(x, dict):
            self.per_modality = {name: self._draw(value, name, rng) for name, value in x.items()}
        else:
            kind = "vision" if x.ndim == 4 else "imu" if x.ndim == 3 else "features"
            self.per_modality = {"": self._draw(x, kind, rng)}

    @staticmethod
    def _draw(x: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
        channels = x.shape[1]
        gain = rng.uniform(0.4, 1.6, size=channels)
        offset = rng.uniform(-0.5, 0.5, size=channels)
        if kind == "imu":
            gain *= np.where(rng.random(channels) < 0.3, -1.0, 1.0)
        mirrored = kind in ("vision", "audio") and bool(rng.random() < 0.5)
        return gain, offset, mirrored

    def __call__(self, x: Inputs) -> Inputs:
        if isinstance(x, dict):
            return {name: self._apply(value, *self.per_modality[name]) for name, value in x.items()}
        return self._apply(x, *self.per_modality[""])

    @staticmethod
    def _apply(x: np.ndarray, gain: np.ndarray, offset: np.ndarray, mirrored: bool) -> np.ndarray:
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        out = x * gain.reshape(shape) + offset.reshape(shape)
        if mirrored:
            out = out[..., ::-1]
        return np.ascontiguousarray(out, dtype=np.float32)


def make_fleet(
    dataset: str = "digits",
    regime: str = "label_skew",
    num_devices: int = 8,
    seed: int = 0,
    alpha: float = 0.3,
    scarce_train: int = 16,
    records_per_device: int | None = None,
    unscaled: bool = False,
) -> FleetData:
    """A fleet of ``num_devices`` devices over a shipped data set, deterministic in ``seed``.

    ``records_per_device``: for fleets larger than the data set can split (IID regimes only), each
    device records this many training recordings drawn from a shared training pool, so devices'
    recordings overlap (each through its own sensors under ``env_shift``); every device is tested
    on the disjoint pool of held-out recordings, which no device trains on.

    ``unscaled``: the inputs as the package delivers them (raw pixel counts, raw sensor units),
    as a device's sensors would, instead of the shipped data set's standardized form.
    """
    if records_per_device is not None and (
        isinstance(records_per_device, bool) or not isinstance(records_per_device, int) or records_per_device < 2
    ):
        raise ValueError(f"records_per_device must be an integer >= 2, got {records_per_device!r}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {list(REGIMES)}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    data: Dataset = load(dataset, unscaled=unscaled)
    rng = np.random.default_rng(seed)
    rest, held = _split_groups(data.groups, CLUSTER_SHARE, rng)
    cluster = LabelledSet(take(data.x, held), data.y[held], groups=data.groups[held])
    if regime == "env_shift":
        parts = np.array_split(np.arange(len(held)), REFERENCE_ROBOTS)
        shifted = concat([Sensors(cluster.x, rng)(take(cluster.x, part)) for part in parts])
        cluster = LabelledSet(shifted, cluster.y, groups=cluster.groups)
    if regime == "natural":
        return _natural_fleet(data, rest, cluster, num_devices, rng)
    y_rest, g_rest = data.y[rest], data.groups[rest]
    if records_per_device is not None:
        splits = _drawn_splits(data, rest, num_devices, records_per_device, regime, rng)
    else:
        if regime == "label_skew":
            owned_groups = _assign_label_skew(y_rest, g_rest, num_devices, alpha, rng)
        else:
            owned_groups = _assign_iid(g_rest, num_devices, rng)
        splits = _owned_splits(data, rest, owned_groups, rng)  # lazily: draws interleave with the sensors'
    trains, test_index, sensors, label_mix = [], [], [], []
    for train_idx, test_idx, index in splits:
        if regime == "scarce":
            train_idx = rng.permutation(train_idx)[:scarce_train]
        device_sensors = Sensors(data.x, rng) if regime == "env_shift" else None
        x_train = take(data.x, train_idx)
        x_train = x_train if device_sensors is None else device_sensors(x_train)
        trains.append(LabelledSet(x_train, data.y[train_idx], groups=data.groups[train_idx]))
        test_index.append(test_idx)
        sensors.append(device_sensors)
        label_mix.append(np.bincount(data.y[index], minlength=data.num_classes) / len(index))
    # Every device is tested on the whole pool of held-out recordings (no device trains on any of
    # them), seen through its own sensors and weighted to its own label mix: a sample of its own
    # distribution about as many times larger than its own held-out share as there are devices.
    pool = np.concatenate(test_index) if records_per_device is None else test_index[0]
    x_pool, y_pool = take(data.x, pool), data.y[pool]
    pool_mix = np.bincount(y_pool, minlength=data.num_classes) / len(pool)
    devices = []
    for train, device_sensors, mix in zip(trains, sensors, label_mix):
        weight = mix[y_pool] / pool_mix[y_pool] if regime == "label_skew" else None
        x_test = x_pool if device_sensors is None else device_sensors(x_pool)
        devices.append(DeviceData(train, LabelledSet(x_test, y_pool, weight)))
    return FleetData(devices=tuple(devices), cluster_validation=cluster, num_classes=data.num_classes)


def _natural_fleet(data: Dataset, rest: np.ndarray, cluster: LabelledSet, num_devices: int, rng) -> FleetData:
    """One person per device: each trains on some of its own recordings and is tested on the rest."""
    if data.persons is None:
        raise ValueError(f"{data.name}: the natural regime needs who recorded each sample; {data.name} does not say")
    people = rng.permutation(np.unique(data.persons[rest]))
    if num_devices > len(people):
        raise ValueError(f"{data.name}: {num_devices} devices, but only {len(people)} people recorded the data")
    devices = []
    for person in people[:num_devices]:
        index = rest[data.persons[rest] == person]
        train_pos, test_pos = _split_groups(data.groups[index], TEST_SHARE, rng)
        train, test = index[train_pos], index[test_pos]
        devices.append(
            DeviceData(
                LabelledSet(take(data.x, train), data.y[train], groups=data.groups[train]),
                LabelledSet(take(data.x, test), data.y[test]),
            )
        )
    return FleetData(devices=tuple(devices), cluster_validation=cluster, num_classes=data.num_classes)


def sensor_stream(index: int, seed: int = 0, **fleet: object) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """A simulated robot's sensors for the edge daemon (``sensor.fn: simulator.fleets:sensor_stream``):
    device ``index`` of ``make_fleet(**fleet)``, its training samples in a fresh random order each
    pass, one ``({modality: sample}, label)`` at a time, for ever."""
    from edge_runtime.sensors import play

    return play(make_fleet(**fleet).devices[index].train, np.random.default_rng([seed, index]))  # type: ignore[arg-type]


def synthetic_stream(
    spec: dict[str, list[int]], num_classes: int, seed: int = 0
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Sensors of any shape (``{modality: shape}``), for benchmarks of a model with no shipped data:
    each class a fixed random pattern per modality plus unit noise, labels uniform, for ever."""
    rng = np.random.default_rng(seed)
    patterns = {name: rng.standard_normal((num_classes, *shape)).astype(np.float32) for name, shape in spec.items()}
    while True:
        label = int(rng.integers(num_classes))
        noise = {name: rng.standard_normal(tuple(shape)).astype(np.float32) for name, shape in spec.items()}
        yield {name: patterns[name][label] + noise[name] for name in spec}, label
