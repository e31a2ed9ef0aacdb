"""The nested method and its baselines, as configurations of the same machinery.

Every method shares the model, optimiser, learning rate, batch size, local epochs and rounds
(one setting, the best of a small grid for FedAvg on digits label skew); they differ only in
which parameters are shared and how the levels are scheduled:

- ``nested``: three levels. ``fast`` = per-owner sensor adapters (channel mixing and offset;
  for cameras also column mixing, a mirrored mount; trunk FiLM) and ``fast_head`` = a
  residual head, both private and stepping every local step, each with a prior toward the
  identity worth ``SENSOR_PRIOR`` / ``HEAD_PRIOR`` samples (a device with little data stays
  close to the shared model); ``slow`` = encoders, trunk and head, shared,
  every ``SLOW_PERIOD`` steps. After a merge the private levels refit for ``MERGE_ADAPT_STEPS``
  steps and the device serves only merged versions (local training runs in a working copy),
  unless the merged version is significantly less accurate on its own data than the one it
  serves (``merge_check``, an exact McNemar test: then it keeps serving the previous one). The
  refit happens in the served copy only; training goes on from the device's fast layers as they
  were. The device serves its own fast layers only while they beat the shared model alone on its
  own data (``personalization_check``); else the shared model with identity fast layers.
- ``local``: every parameter private (local-only training).
- ``fedavg``: every parameter shared (FedAvg).
- ``fedrep``: head private, body shared; alternating schedule, head epochs first (FedRep,
  Collins et al. 2021).
"""

from __future__ import annotations

import copy
from typing import Any

METHODS = ("nested", "local", "fedavg", "fedrep")
LR = 0.01
LOCAL_EPOCHS = 3
BATCH_SIZE = 16
SLOW_PERIOD = 1
FEDREP_HEAD_EPOCHS = 2
MERGE_ADAPT_STEPS = 10
SENSOR_PRIOR = 16.0
HEAD_PRIOR = 480.0

_TRAINING = {"optimizer": "adam", "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH_SIZE}


def method_config(method: str, seed: int = 0) -> dict[str, Any]:
    """The nested-learning configuration (a plain dict, as in a YAML file) of one method."""
    if method == "nested":
        levels = [
            {
                "name": "fast",
                "patterns": ["adapters.*.mix*", "adapters.*.shift", "adapters.*.scale"],
                "period": 1,
                "lr": LR,
                "prox": SENSOR_PRIOR,
            },
            {"name": "fast_head", "patterns": ["adapters.head.*"], "period": 1, "lr": LR, "prox": HEAD_PRIOR},
            {
                "name": "slow",
                "patterns": ["encoders.*", "trunk.*", "head.*"],
                "period": SLOW_PERIOD,
                "lr": LR,
                "shared": True,
            },
        ]
        training = _TRAINING | {
            "schedule": "nested",
            "merge_adapt_steps": MERGE_ADAPT_STEPS,
            "serve_trained": False,
            "merge_check": True,
            "personalization_check": True,
        }
    elif method == "local":
        levels = [{"name": "fast", "patterns": ["*"], "period": 1, "lr": LR, "shared": False}]
        training = _TRAINING | {"schedule": "nested"}
    elif method == "fedavg":
        levels = [{"name": "slow", "patterns": ["*"], "period": 1, "lr": LR, "shared": True}]
        training = _TRAINING | {"schedule": "nested"}
    elif method == "fedrep":
        levels = [
            {"name": "fast", "patterns": ["head.*"], "lr": LR, "shared": False, "epochs": FEDREP_HEAD_EPOCHS},
            {
                "name": "slow",
                "patterns": ["encoders.*", "trunk.*", "adapters.*"],
                "lr": LR,
                "shared": True,
                "epochs": LOCAL_EPOCHS,
            },
        ]
        training = _TRAINING | {"schedule": "alternating"}
    else:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    return copy.deepcopy({"levels": levels, "training": training, "seed": seed})
