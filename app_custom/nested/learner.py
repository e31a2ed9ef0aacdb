"""The device-side nested learner: merge a global slow version, train, hand back the slow delta.

Device-local state (fast layers, the slow layers' local progress, every level's optimiser
state) lives here, between rounds, and is saved atomically so that a restart loses nothing.
Only ``RoundResult.slow_delta`` is meant to leave the device.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app_custom.durable import write_bytes_atomic

from .config import NestedConfig
from .device_data import DeviceData, Inputs, LabelledSet
from .levels import partition_parameters
from .models import build_model, input_spec
from .schedule import MultiFrequencySchedule
from .slow_delta import Tensors, install, merge_slow, slow_delta, state_of

# A device serves its own fast layers when the shared model alone is worse on its own data with
# one-sided McNemar p below this. Lenient on purpose: the fast layers were fit to that data (the
# comparison favours them), and devices with real skew show gains at p << 0.2; at 0.05 devices
# of label-skewed fleets with 40 correlated windows lost 1-2 points of mean accuracy, at 0.5
# scarce-data devices kept adapters fit to noise (benchmarks, 6 seeds).
PERSONAL_ALPHA = 0.2


class IncompatibleState(ValueError):
    """A saved device state belongs to another model architecture or level layout."""


@dataclass
class MergeReport:
    """Test accuracy of the device's model around one merge of a new global slow version."""

    acc_before: float | None  # the model the device served before the merge
    acc_after: float  # new slow layers + the device's own fast layers (after the configured refit)
    acc_naive: float | None  # new slow layers over freshly initialised fast layers (a naive overwrite)


@dataclass
class RoundResult:
    slow_delta: Tensors
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _to_torch(x: Inputs) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(x, dict):
        return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in x.items()}
    return torch.from_numpy(np.ascontiguousarray(x))


def _take(x: torch.Tensor | dict[str, torch.Tensor], index: torch.Tensor):
    if isinstance(x, dict):
        return {name: v[index] for name, v in x.items()}
    return x[index]


def per_sample(model: torch.nn.Module, data: LabelledSet, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``data``: whether ``model`` classifies it correctly, and its cross-entropy."""
    x, y = _to_torch(data.x), torch.from_numpy(data.y)
    correct, loss = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            index = torch.arange(start, min(start + batch_size, len(y)))
            logits = model(_take(x, index))
            loss.append(F.cross_entropy(logits, y[index], reduction="none").numpy())
            correct.append((logits.argmax(dim=1) == y[index]).numpy())
    return np.concatenate(correct), np.concatenate(loss).astype(np.float64)


def evaluate(model: torch.nn.Module, data: LabelledSet, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``data``, weighted by ``data.weight`` if set."""
    correct, loss = per_sample(model, data, batch_size)
    return float(np.average(correct, weights=data.weight)), float(np.average(loss, weights=data.weight))


def mcnemar_worse_p(before: np.ndarray, after: np.ndarray) -> float:
    """One-sided exact McNemar p-value that ``after`` (per-sample correctness) is worse than
    ``before`` on the same samples: is losing ``lost`` of the disagreements chance?"""
    from scipy.stats import binomtest

    lost = int(np.sum(before & ~after))
    gained = int(np.sum(~before & after))
    return float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue) if lost else 1.0


def significantly_worse(before: np.ndarray, after: np.ndarray, alpha: float = 0.05) -> bool:
    """Whether ``after`` (per-sample correctness) is worse than ``before`` on the same samples by more
    than chance explains: an exact one-sided McNemar test on the samples they disagree on.

    The device's merge check: a merged version is served unless it is significantly worse on the
    device's own data. Requiring it to be at least as accurate there instead left devices with 16
    samples on a stale version for good (the served model fits its 16 samples; a better new
    version, refit for a few steps, often misses one of them)."""
    return mcnemar_worse_p(before, after) < alpha


class NestedLearner:
    """Trains one device's nested model on its own data."""

    def __init__(self, config: NestedConfig, data: DeviceData, num_classes: int, device_seed: int = 0) -> None:
        self.config = config
        self.data = data
        torch.manual_seed(config.seed)  # every device starts from the same architecture and initial weights
        self.model = build_model(config.model, input_spec(data.train.x), num_classes)
        self.partition = partition_parameters(self.model, config.levels)
        self.shared_names = self.partition.shared_names
        self.private_names = self.partition.private_names
        self.schedule = MultiFrequencySchedule(self.model, self.partition, config.training, len(data.train))
        self._initial_private = state_of(self.model, self.private_names)
        self._received: Tensors | None = None
        self.global_version: int | None = None
        self._rng = torch.Generator().manual_seed(config.seed * 100_003 + device_seed)
        self._x = _to_torch(data.train.x)
        self._y = torch.from_numpy(data.train.y)
        # What the device answers with: the training model itself, or a copy taken at each merge.
        self.served = self.model

    def initial_slow(self) -> Tensors:
        return state_of(self.model, self.shared_names)

    def use_data(self, data: DeviceData) -> None:
        """Train and evaluate on ``data`` from now on (a device's sample store changes as it goes)."""
        if input_spec(data.train.x) != input_spec(self.data.train.x):
            raise ValueError(
                f"new data has inputs {input_spec(data.train.x)}, the model takes {input_spec(self.data.train.x)}"
            )
        self.data = data
        self._x = _to_torch(data.train.x)
        self._y = torch.from_numpy(data.train.y)

    def fast_layers(self) -> Tensors:
        """The private (fast) layers of the model the device serves: what inference installs."""
        return state_of(self.served, self.private_names)

    # ---- merge ---------------------------------------------------------------------------
    def receive_global(self, global_slow: Mapping[str, np.ndarray], version: int | None) -> MergeReport:
        """Merge a new global slow version with this device's fast layers, then refit the fast levels."""
        first = self._received is None
        acc_before = None if first else self.test_accuracy()
        acc_naive = None
        if not first and self.private_names and self.shared_names:
            naive = copy.deepcopy(self.model)
            merge_slow(naive, global_slow, self.shared_names)
            install(naive, self._initial_private)
            acc_naive = evaluate(naive, self.data.test)[0]
        merge_slow(self.model, global_slow, self.shared_names)
        # Momentum and Adam moments of the shared levels describe the weights just replaced.
        self.schedule.reset({level.name for level in self.config.shared_levels})
        self._received = {name: np.array(global_slow[name], dtype=np.float32) for name in self.shared_names}
        self.global_version = version
        steps = 0 if first else self.config.training.merge_adapt_steps
        if self.config.training.serve_trained:
            self._refit_fast(steps)
        else:
            merged = self._refit_copy(steps)
            if self.config.training.personalization_check and not first:
                merged = self._personal_or_shared(merged)
            if self._passes_merge_check(first, merged):
                self.served = merged
        return MergeReport(acc_before=acc_before, acc_after=self.test_accuracy(), acc_naive=acc_naive)

    def _refit_copy(self, steps: int) -> torch.nn.Module:
        """The merged model with its fast levels refit, as a copy: the training model keeps its fast
        layers as they were. Refit fast layers fed into the next round's training let the slow
        layers learn around adapters overfit to a few samples (with 16 samples per device the
        global model lost 10-40 points against training without the refit)."""
        if steps == 0 or not self.private_names:
            return copy.deepcopy(self.model)
        private = state_of(self.model, self.private_names)
        schedule = copy.deepcopy(self.schedule.state_dict())
        self._refit_fast(steps)
        merged = copy.deepcopy(self.model)
        install(self.model, private)
        self.schedule.load_state_dict(schedule)
        return merged

    def _personal_or_shared(self, merged: torch.nn.Module) -> torch.nn.Module:
        """``merged`` if its fast layers earn their place: significantly more accurate on the device's
        own data than the shared model alone (identity fast layers). They were fit to that data, so
        the comparison favours them; a device with 16 samples of the fleet's distribution rarely
        shows a significant gain and serves the shared model instead of adapters fit to noise."""
        shared_only = copy.deepcopy(merged)
        install(shared_only, self._initial_private)
        own = self.data.train
        if significantly_worse(per_sample(merged, own)[0], per_sample(shared_only, own)[0], PERSONAL_ALPHA):
            return merged
        return shared_only

    def _passes_merge_check(self, first: bool, merged: torch.nn.Module) -> bool:
        if first or not self.config.training.merge_check:
            return True
        own = self.data.train
        return not significantly_worse(per_sample(self.served, own)[0], per_sample(merged, own)[0])

    def _refit_fast(self, steps: int) -> None:
        """A few steps on the fast levels only, so they follow the new slow layers before serving."""
        private_levels = {level.name for level in self.config.private_levels}
        if steps == 0 or not private_levels:
            return
        for _ in range(steps):
            self._step(self._batch_index(), active=private_levels)
        self.schedule.flush()

    # ---- training ------------------------------------------------------------------------
    def _batch_index(self) -> torch.Tensor:
        n = len(self._y)
        size = min(self.config.training.batch_size, n)
        return torch.randperm(n, generator=self._rng)[:size]

    def _epoch_batches(self) -> list[torch.Tensor]:
        n = len(self._y)
        order = torch.randperm(n, generator=self._rng)
        size = self.config.training.batch_size
        return [order[i : i + size] for i in range(0, n, size)]

    def _step(self, index: torch.Tensor, active: set[str] | None) -> float:
        self.model.train()
        loss = F.cross_entropy(self.model(_take(self._x, index)), self._y[index])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; refusing to continue the round")
        loss.backward()
        self.schedule.after_backward(active)
        return float(loss.detach())

    def train_round(self, should_stop: Callable[[], bool] = lambda: False) -> RoundResult:
        """Train on local data per the configured schedule; return the slow delta and metrics."""
        if self._received is None:
            raise RuntimeError("train_round before any global slow version was received")
        training = self.config.training
        losses = []
        if training.schedule == "nested":
            # every level trains together, each stepping at its own period
            for _ in range(training.local_epochs):
                for index in self._epoch_batches():
                    if should_stop():
                        break
                    losses.append(self._step(index, active=None))
        else:
            # alternating (FedRep-style): one level at a time, in configuration order, for its epochs
            for level in self.config.levels:
                for _ in range(level.epochs):
                    for index in self._epoch_batches():
                        if should_stop():
                            break
                        losses.append(self._step(index, active={level.name}))
                self.schedule.flush()
        self.schedule.flush()
        delta = slow_delta(self._received, state_of(self.model, self.shared_names))
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "test_acc": self.test_accuracy()}
        return RoundResult(slow_delta=delta, num_samples=len(self._y), metrics=metrics)

    def micro_update(self, steps: int, should_stop: Callable[[], str | None]) -> tuple[int, str | None]:
        """Up to ``steps`` local steps of the nested schedule (fast levels every step, slow levels at
        their period) on the current data; (steps done, why it stopped early or None). The caller
        discards an interrupted update by restoring its last checkpoint."""
        done = 0
        for _ in range(steps):
            reason = should_stop()
            if reason:
                return done, reason
            self._step(self._batch_index(), active=None)
            done += 1
        self.schedule.flush()
        if self.served is not self.model:
            # the served copy takes the new fast layers; its slow layers stay the merged global ones
            install(self.served, state_of(self.model, self.private_names))
        return done, None

    def sample_losses(self) -> np.ndarray:
        """Per training sample, the served model's cross-entropy (how much it still has to learn)."""
        return per_sample(self.served, self.data.train)[1]

    def test_accuracy(self) -> float:
        """Test accuracy of the model the device serves."""
        return evaluate(self.served, self.data.test)[0]

    # ---- persistence ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Identifies the architecture and level layout a saved state belongs to."""
        layout = {name: [list(p.shape), self.partition.level_of[name]] for name, p in self.model.named_parameters()}
        layout["<optimizer>"] = self.config.training.optimizer  # its saved state has that optimiser's form
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]

    def state_bytes(self) -> bytes:
        """The whole device-local state, serialized (what ``save`` writes)."""
        buffer = io.BytesIO()
        torch.save(self._state(), buffer)
        return buffer.getvalue()

    def restore_bytes(self, data: bytes, where: str = "state") -> None:
        self._restore(torch.load(io.BytesIO(data), weights_only=True), where)

    def _state(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "schedule": self.schedule.state_dict(),
            "received": None if self._received is None else {k: torch.from_numpy(v) for k, v in self._received.items()},
            "global_version": self.global_version,
            "rng": self._rng.get_state(),
            "served": None if self.served is self.model else self.served.state_dict(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole device-local state atomically (a crash leaves the previous file), readable
        by its owner only: the fast layers are the owner's own."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, self.state_bytes(), 0o600)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a saved state; ``IncompatibleState`` if it belongs to another architecture or layout."""
        self._restore(torch.load(path, weights_only=True), str(path))  # tensors and containers: no pickled code

    def _restore(self, state: dict, where: str) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise IncompatibleState(
                f"{where}: saved for model layout {state.get('fingerprint')}, this learner is {self.fingerprint}"
            )
        self.model.load_state_dict(state["model"])
        self.schedule.load_state_dict(state["schedule"])
        received = state["received"]
        self._received = None if received is None else {k: v.numpy() for k, v in received.items()}
        self.global_version = state["global_version"]
        self._rng.set_state(state["rng"])
        if state["served"] is not None:
            self.served = copy.deepcopy(self.model)
            self.served.load_state_dict(state["served"])
        else:
            self.served = self.model
