"""Sensors for the edge daemon that need nothing beyond a device install.

``replay`` plays recorded samples back (``sensor.fn: edge_runtime.sensors:replay``, ``kwargs:
{path: /var/lib/fleetnest/recorded.npz}``): a device maker can run the daemon on a bench with data
recorded on the robot before its own sensor function exists, and the full-loop demo's daemons
run from a device install on samples recorded from the simulated fleet.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from app_custom.nested.device_data import LabelledSet, load_labelled
from app_custom.nested.models import input_spec


def replay(path: str, seed: int = 0) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """The samples of ``path`` (an ``.npz`` of ``x.<modality>`` arrays and ``y`` labels, as
    ``app_custom.nested.device_data.save_labelled`` writes), played back. A malformed file fails at
    once, naming it."""
    return play(load_labelled(path), np.random.default_rng(seed))


def play(samples: LabelledSet, rng: np.random.Generator) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``samples`` one ``({modality: sample}, label)`` at a time, in a fresh random order each pass,
    for ever (a bare array is the modality ``input_spec`` names)."""
    x = samples.x if isinstance(samples.x, dict) else {next(iter(input_spec(samples.x))): samples.x}
    while True:
        for i in rng.permutation(len(samples.y)):
            yield {name: value[i] for name, value in x.items()}, int(samples.y[i])
