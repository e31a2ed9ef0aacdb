"""The nested method and its baselines, as configurations of the same machinery.

Every method shares the model, optimiser, learning rate, batch size and local epochs; they
differ only in which parameters are shared and how the levels are scheduled:

- ``nested``: fast = head + per-owner adapters (every step), slow = encoders + trunk
  (accumulated, every ``SLOW_PERIOD`` steps); after a merge the fast levels refit briefly.
- ``local``: every parameter fast, nothing shared (local-only training).
- ``fedavg``: every parameter slow and shared, one period (FedAvg).
- ``fedrep``: head fast, body shared; alternating schedule, head epochs first (FedRep, Collins et al. 2021).
"""

from __future__ import annotations

import copy
from typing import Any

METHODS = ("nested", "local", "fedavg", "fedrep")
LR = 0.005
LOCAL_EPOCHS = 2
BATCH_SIZE = 32
SLOW_PERIOD = 2
FEDREP_HEAD_EPOCHS = 2
MERGE_ADAPT_STEPS = 10

_TRAINING = {"optimizer": "adam", "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH_SIZE}


def method_config(method: str, seed: int = 0) -> dict[str, Any]:
    """The nested-learning configuration (a plain dict, as in a YAML file) of one method."""
    if method == "nested":
        levels = [
            {"name": "fast", "patterns": ["head.*", "adapters.*"], "period": 1, "lr": LR, "shared": False},
            {"name": "slow", "patterns": ["encoders.*", "trunk.*"], "period": SLOW_PERIOD, "lr": LR, "shared": True},
        ]
        training = _TRAINING | {"schedule": "nested", "merge_adapt_steps": MERGE_ADAPT_STEPS}
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
