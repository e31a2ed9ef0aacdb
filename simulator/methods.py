"""The nested method and its baselines, as configurations of the same machinery.

Every method shares the model, optimiser, learning rate, batch size, local epochs and rounds
(one setting, the best of a small grid for FedAvg on digits label skew); they differ only in
which parameters are shared and how the levels are scheduled:

- ``nested``: three levels. ``fast`` = per-owner sensor adapters (channel mixing and offset,
  starting as the standardization of the owner's own samples; for cameras also column mixing, a
  mirrored mount; trunk FiLM) and ``fast_head`` = a residual head, both private and stepping
  every local step, each with a prior toward its start worth ``SENSOR_PRIOR`` / ``HEAD_PRIOR``
  samples; ``slow`` = encoders, trunk and head, shared, every ``SLOW_PERIOD`` steps. Beside it
  the device keeps a personal model (Ditto, ``DITTO_PROX``). After each merge it decides on
  ``HOLDOUT`` of its own samples, never trained on, what to serve: the shared model alone, the
  merged model with its fast layers (refit ``MERGE_ADAPT_STEPS`` steps), its personal model, or
  a mix of personal and merged weights; and it keeps what it serves unless the held-out samples
  say the new choice is at least as good (``personalize: select``). Fine-tuning the merged model
  as a further candidate changed its choices from round to round (a fresh fine-tune each version).
- ``local``: every parameter private (local-only training).
- ``fedavg``: every parameter shared (FedAvg).
- ``fedavg_ft``: FedAvg, each device serving the global model fine-tuned ``FINETUNE_EPOCHS``
  epochs on its own data.
- ``fedrep``: head private, body shared; alternating schedule, head epochs first (FedRep,
  Collins et al. 2021).
- ``ditto``: FedAvg for the global model; each device serves a personal model trained beside it
  with a pull of ``DITTO_PROX`` toward the global one (Ditto, Li et al. 2021).
"""

from __future__ import annotations

import copy
from typing import Any

METHODS = ("nested", "local", "fedavg", "fedavg_ft", "fedrep", "ditto")
# How a simulation runs them: each a FLARE SimEnv job, or the same learners and cluster code in
# one process (``simulator.inprocess``)
ENGINES = ("flare", "inprocess")
LR = 0.01
LOCAL_EPOCHS = 3
BATCH_SIZE = 16
SLOW_PERIOD = 1
FEDREP_HEAD_EPOCHS = 2
MERGE_ADAPT_STEPS = 10
SENSOR_PRIOR = 16.0
HEAD_PRIOR = 480.0
HOLDOUT = 0.2
FINETUNE_EPOCHS = 3
DITTO_PROX = 0.1

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
            "personalize": "select",
            "holdout": HOLDOUT,
            "personal_epochs": LOCAL_EPOCHS,
            "personal_prox": DITTO_PROX,
        }
    elif method == "local":
        levels = [{"name": "fast", "patterns": ["*"], "period": 1, "lr": LR, "shared": False}]
        training = _TRAINING | {"schedule": "nested"}
    elif method in ("fedavg", "fedavg_ft", "ditto"):
        levels = [{"name": "slow", "patterns": ["*"], "period": 1, "lr": LR, "shared": True}]
        training = _TRAINING | {"schedule": "nested"}
        if method == "fedavg_ft":
            training |= {"serve_trained": False, "personalize": "finetune", "finetune_epochs": FINETUNE_EPOCHS}
        elif method == "ditto":
            training |= {
                "serve_trained": False,
                "personalize": "ditto",
                "personal_epochs": LOCAL_EPOCHS,
                "personal_prox": DITTO_PROX,
            }
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
