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
from .device_data import DeviceData, Inputs, LabelledSet, concat
from .levels import partition_parameters
from .models import build_model, input_spec
from .schedule import MultiFrequencySchedule
from .slow_delta import Tensors, install, merge_slow, slow_delta, state_of

# What a device can serve: the model it trains ("trained"), the merged model ("merged"), and with
# ``personalize: select`` the shared model alone, the merged model with its fast layers
# ("nested"), the fine-tuned merged model, its personal model or a mix of personal and merged.
SERVING_KINDS = ("initial", "trained", "merged", "shared", "nested", "finetune", "personal", "mix")


def serving_kind(name: str) -> tuple[str, float]:
    """(kind, the personal model's weight in it) of a serving choice name such as ``mix50``."""
    if name.startswith("mix"):
        return "mix", int(name[3:]) / 100
    if name not in SERVING_KINDS:
        raise ValueError(f"unknown serving choice {name!r}")
    return name, 1.0 if name == "personal" else 0.0


class IncompatibleState(ValueError):
    """A saved device state belongs to another model architecture or level layout."""


@dataclass
class MergeReport:
    """Test accuracy of the device's model around one merge of a new global slow version."""

    acc_before: float | None  # the model the device served before the merge
    acc_after: float  # new slow layers + the device's own fast layers (after the configured refit)
    acc_naive: float | None  # new slow layers over freshly initialised fast layers (a naive overwrite)
    choice: str | None = None  # what the device serves after the merge (``NestedLearner.serving``)
    decision: dict = field(default_factory=dict)  # with ``personalize: select``: why (``NestedLearner.decision``)

    def metrics(self) -> dict[str, float]:
        """The merge as scalar metrics (what a device may report): accuracies around it and what it
        serves, as an index into ``SERVING_KINDS`` and, for a mix, the personal model's weight."""
        metrics = {"acc_after_merge": self.acc_after}
        if self.acc_before is not None:
            metrics["acc_before_merge"] = self.acc_before
        if self.acc_naive is not None:
            metrics["acc_naive_overwrite"] = self.acc_naive
        if self.choice is not None:
            kind, weight = serving_kind(self.choice)
            metrics["serving_kind"] = float(SERVING_KINDS.index(kind))
            metrics["serving_personal_weight"] = weight
        if self.decision:
            metrics["serving_kept"] = float(self.decision["kept"])
            metrics["holdout_samples"] = float(self.decision["holdout_samples"])
            metrics |= {f"holdout_acc_{name}": acc for name, acc in self.decision["holdout_acc"].items()}
        return metrics


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


def outcomes(logits: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: whether ``logits`` classify it correctly, and its cross-entropy (a torch model's
    outputs or an inference engine's)."""
    logits, y = torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    loss = F.cross_entropy(logits, y, reduction="none").numpy().astype(np.float64)
    return (logits.argmax(dim=1) == y).numpy(), loss


def per_sample(model: torch.nn.Module, data: LabelledSet, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``data``: whether ``model`` classifies it correctly, and its cross-entropy."""
    x, y = _to_torch(data.x), torch.from_numpy(data.y)
    correct, loss = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            index = torch.arange(start, min(start + batch_size, len(y)))
            right, losses = outcomes(model(_take(x, index)), y[index])
            correct.append(right)
            loss.append(losses)
    return np.concatenate(correct), np.concatenate(loss)


def supported(kept: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether held-out outcomes (``per_sample``'s) support a new version of the served kind of
    model over the one kept: at least as many samples right, or one fewer with a lower mean loss."""
    (kept_correct, kept_loss), (correct, loss) = kept, new
    return int(correct.sum()) >= int(kept_correct.sum()) or (
        int(correct.sum()) == int(kept_correct.sum()) - 1 and float(loss.mean()) < float(kept_loss.mean())
    )


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


# A device switches to another kind of model only when that kind's lower held-out loss is this
# unlikely under chance (one-sided paired t-test over its held-out recordings), and only with at
# least SWITCH_MIN_UNITS held-out recordings: with 1 to 3 (digits, 16 samples a device) the test
# "found" kinds better that were 20 to 50 points worse on the device's test data.
SWITCH_ALPHA = 0.1
SWITCH_MIN_UNITS = 10


def lower_loss_p(current: np.ndarray, other: np.ndarray, groups: np.ndarray | None = None) -> float:
    """One-sided paired p-value that ``other``'s per-sample losses are lower than ``current``'s. With
    ``groups`` the unit is a group (a recording's windows are not independent): its mean difference.
    Fewer than ``SWITCH_MIN_UNITS`` units are no evidence (p = 1)."""
    from scipy.stats import ttest_1samp

    diff = other - current
    if groups is not None:
        diff = np.array([diff[groups == g].mean() for g in np.unique(groups)])
    if len(diff) < SWITCH_MIN_UNITS or not np.any(diff):
        return 1.0
    if np.all(diff == diff[0]):
        return 0.0 if diff[0] < 0 else 1.0
    return float(ttest_1samp(diff, 0.0, alternative="less").pvalue)


def better_kind(
    current: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], groups: np.ndarray | None = None
) -> bool:
    """Whether held-out outcomes (``per_sample``'s) say to serve another kind of model than the
    current one: at least as many samples right, and a lower loss that a paired test over at least
    ``SWITCH_MIN_UNITS`` units finds significant (``SWITCH_ALPHA``)."""
    return int(other[0].sum()) >= int(current[0].sum()) and lower_loss_p(current[1], other[1], groups) < SWITCH_ALPHA


def split_holdout(data: DeviceData, share: float, seed: int) -> tuple[LabelledSet, LabelledSet | None]:
    """(what the device trains on, its held-out samples). ``data.holdout`` when given (the edge
    runtime's rolling buffer); else about ``share`` of the training recordings of every class
    (whole groups: windows of one recording are not independent; a class with too few recordings
    keeps them all), drawn with ``seed``; None when nothing can be spared."""
    if data.holdout is not None:
        return data.train, data.holdout
    if share <= 0.0:
        return data.train, None
    train = data.train
    groups = train.groups if train.groups is not None else np.arange(len(train))
    unique = np.unique(groups)
    label_of = {g: int(np.bincount(train.y[groups == g]).argmax()) for g in unique}
    rng = np.random.default_rng(seed)
    held_groups = []
    for label in sorted(set(label_of.values())):
        of_class = rng.permutation([g for g in unique if label_of[g] == label])
        held_groups.extend(of_class[: int(round(len(of_class) * share))])
    if not held_groups or len(held_groups) == len(unique):
        return train, None
    in_held = np.isin(groups, held_groups)
    return train.subset(np.flatnonzero(~in_held)), train.subset(np.flatnonzero(in_held))


def interpolate(a: torch.nn.Module, b: torch.nn.Module, weight_b: float) -> torch.nn.Module:
    """A copy of ``a`` whose every parameter is ``(1 - weight_b) * a + weight_b * b``."""
    mixed = copy.deepcopy(a)
    other = dict(b.named_parameters())
    with torch.no_grad():
        for name, param in mixed.named_parameters():
            param.mul_(1.0 - weight_b).add_(other[name], alpha=weight_b)
    return mixed


class NestedLearner:
    """Trains one device's nested model on its own data."""

    def __init__(self, config: NestedConfig, data: DeviceData, num_classes: int, device_seed: int = 0) -> None:
        self.config = config
        self.device_seed = device_seed
        torch.manual_seed(config.seed)  # every device starts from the same architecture and initial weights
        self.model = build_model(config.model, input_spec(data.train.x), num_classes)
        self.partition = partition_parameters(self.model, config.levels)
        self.shared_names = self.partition.shared_names
        self.private_names = self.partition.private_names
        self._received: Tensors | None = None
        self.global_version: int | None = None
        self._rng = torch.Generator().manual_seed(config.seed * 100_003 + device_seed)
        self.use_data(data)
        self.schedule = MultiFrequencySchedule(self.model, self.partition, config.training, len(self._y))
        # What the device answers with: the training model itself, or a copy taken at each merge.
        self.served = self.model
        self.serving = "trained" if config.training.serve_trained else "initial"
        # Ditto's personal model: every layer the device's own (built at the first merge).
        self.personal: torch.nn.Module | None = None
        self._personal_opt: torch.optim.Optimizer | None = None
        # With held-out samples, decisions are made on models that never saw them (``personal``) and
        # what is served uses their twin trained on every sample (``personal_full``): the held-out
        # share costs the served model no data. ``served_shadow`` is what the served model is to
        # the decisions.
        self.personal_full: torch.nn.Module | None = None
        self._personal_full_opt: torch.optim.Optimizer | None = None
        self.served_shadow = self.served
        self.decision: dict = {}  # the last serving decision: what was chosen and why

    def initial_slow(self) -> Tensors:
        return state_of(self.model, self.shared_names)

    def use_data(self, data: DeviceData) -> None:
        """Train and decide on ``data`` from now on (a device's sample store changes as it goes).
        Before the first merge the sensor adapters start as the standardization of the device's own
        training samples (and the private levels' prior pulls toward that start)."""
        self.model_inputs(data)
        self.data = data
        self.train_set, self.holdout = split_holdout(
            data, self.config.training.holdout, self.config.seed * 7_919 + self.device_seed
        )
        self._x = _to_torch(self.train_set.x)
        self._y = torch.from_numpy(self.train_set.y)
        if self._received is None:
            self.model.standardize_inputs(self._x)
            self._initial_private = state_of(self.model, self.private_names)

    def model_inputs(self, data: DeviceData) -> Inputs:
        """``data``'s inputs, checked against the model's modalities and shapes."""
        spec = input_spec(data.train.x)
        model_spec = {name: tuple(shape) for name, shape in self.model.modalities.items()}
        if set(spec) != set(model_spec) or any(tuple(spec[k]) != model_spec[k] for k in spec):
            raise ValueError(f"new data has inputs {spec}, the model takes {model_spec}")
        return data.train.x

    def fast_layers(self) -> Tensors:
        """The private (fast) layers of the model the device serves: what inference installs."""
        return state_of(self.served, self.private_names)

    # ---- merge ---------------------------------------------------------------------------
    def receive_global(self, global_slow: Mapping[str, np.ndarray], version: int | None) -> MergeReport:
        """Merge a new global slow version with this device's fast layers, refit the fast levels,
        and decide what to serve (``training.personalize``)."""
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
            if self.personal is None and self.config.training.personal_epochs:
                self.personal = copy.deepcopy(self.model)
                if self.holdout is not None:
                    self.personal_full = copy.deepcopy(self.model)
            self._serve(self._refit_copy(steps), first)
        return MergeReport(
            acc_before=acc_before,
            acc_after=self.test_accuracy(),
            acc_naive=acc_naive,
            choice=self.serving,
            decision=dict(self.decision) if self.config.training.personalize == "select" else {},
        )

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

    def _serve(self, merged: torch.nn.Module, first: bool) -> None:
        """Decide what the device serves from now on, per ``training.personalize``."""
        mode = self.config.training.personalize
        if mode == "select":
            self._select(merged, first)
            return
        if mode == "none":
            self.served, self.serving = merged, "merged"
        elif mode == "finetune":
            self.served, self.serving = self._finetuned(merged), "finetune"
        else:  # ditto
            self.served, self.serving = copy.deepcopy(self.personal), "personal"
        self.served_shadow = self.served

    def candidates(self, merged: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """What the device could serve after a merge: the shared model alone (the new slow layers,
        fast layers at their start), the merged model (with its own fast layers), the merged model
        fine-tuned on its own data, its personal model and mixes of personal and merged weights."""
        shared = copy.deepcopy(merged)
        install(shared, self._initial_private)
        found = {"shared": shared, "nested": merged}
        if self.config.training.finetune_epochs:
            found["finetune"] = self._finetuned(merged)
        if self.personal is not None:
            found["personal"] = self.personal
            for weight in self.config.training.mix_grid:
                found[f"mix{round(weight * 100)}"] = interpolate(merged, self.personal, weight)
        return found

    def _serving_twin(self, name: str, merged: torch.nn.Module, shadow: torch.nn.Module) -> torch.nn.Module:
        """What the device serves for candidate ``name``: the candidate itself, or for the personal
        model and its mixes the same built from the twin trained on every sample."""
        if self.personal_full is None or not (name == "personal" or name.startswith("mix")):
            return shadow if shadow is not self.personal else copy.deepcopy(self.personal)
        if name == "personal":
            return copy.deepcopy(self.personal_full)
        return interpolate(merged, self.personal_full, serving_kind(name)[1])

    def _select(self, merged: torch.nn.Module, first: bool) -> None:
        """Decide on the device's own held-out samples what to serve after a merge.

        The device keeps the kind of model it serves (the merged model, its personal model, a mix of
        the two...) and takes that kind's new version, unless another kind is better on its held-out
        samples: at least as accurate, with a lower loss that a paired test over at least
        ``SWITCH_MIN_UNITS`` recordings finds significant (``SWITCH_ALPHA``). Switching on a bare
        comparison of a few dozen samples swapped in models up to 11 points worse on the device's
        test data (digits, label skew). The new version is taken half-way from the served model
        unless the held-out samples prefer the whole step, and only if it gets at least as many of
        them right (or one fewer, with a lower loss); else the served model stays."""
        if self.holdout is None:
            # nothing to decide on: the merged model, reached half-way from the served one at each
            # version after the first (a device with no data to check a version against moves slowly)
            if not first and self.serving == "nested":
                merged = interpolate(self.served, merged, 0.5)
            self.served, self.served_shadow, self.serving = merged, merged, "nested"
            self.decision = {"serves": "nested", "kept": False, "version": self.global_version, "holdout_samples": 0}
            self.decision["holdout_acc"] = {}
            return
        found = self.candidates(merged)
        scored = {name: per_sample(model, self.holdout) for name, model in found.items()}
        acc = {name: float(correct.mean()) for name, (correct, _) in scored.items()}
        loss = {name: float(losses.mean()) for name, (_, losses) in scored.items()}
        current = self.serving if self.serving in found else "nested"
        best = max(found, key=lambda name: (acc[name], -loss[name]))
        target = current  # at the first merge: the merged model (nothing is trained yet)
        if not first and best != current and better_kind(scored[current], scored[best], self.holdout.groups):
            target = best
        shadow = found[target] if found[target] is not self.personal else copy.deepcopy(self.personal)
        fresh = self._serving_twin(target, merged, shadow)
        take = first
        if not first:
            kept = per_sample(self.served_shadow, self.holdout)
            correct, losses = scored[target]
            if target == self.serving:
                # the same kind: step half-way from the served model to its new version unless the
                # held-out samples prefer the whole step (served weights move smoothly between versions)
                halfway = interpolate(self.served_shadow, shadow, 0.5)
                half_correct, half_loss = per_sample(halfway, self.holdout)
                if half_correct.sum() >= correct.sum():
                    shadow, correct, losses = halfway, half_correct, half_loss
                    fresh = halfway if fresh is found[target] else interpolate(self.served, fresh, 0.5)
            # at least as many held-out samples right, or one fewer with a lower held-out loss
            take = supported(kept, (correct, losses))
        if take:
            self.served, self.served_shadow, self.serving = fresh, shadow, target
        self.decision = {
            "serves": self.serving,
            "kept": not take,
            "version": self.global_version,
            "holdout_samples": len(self.holdout),
            "holdout_acc": {name: round(value, 4) for name, value in acc.items()},
        }

    def _finetuned(self, merged: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``merged`` with every layer trained ``finetune_epochs`` epochs on own data."""
        tuned = copy.deepcopy(merged)
        optimizer = self._optimizer(tuned)
        for _ in range(self.config.training.finetune_epochs):
            for index in self._epoch_batches():
                self._train_step(tuned, optimizer, index)
        return tuned

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        lr = max(level.lr for level in self.config.levels)
        if self.config.training.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.config.training.momentum)

    def _train_step(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, index: torch.Tensor, anchor=None, x=None, y=None
    ) -> float:
        """One step of every layer of ``model``; with ``anchor`` (name -> tensor) the Ditto pull
        ``personal_prox / 2 * |w - anchor|^2`` joins the loss."""
        model.train()
        x, y = (self._x, self._y) if x is None else (x, y)
        loss = F.cross_entropy(model(_take(x, index)), y[index])
        if anchor is not None:
            prox = sum(torch.sum((p - anchor[name]) ** 2) for name, p in model.named_parameters())
            loss = loss + 0.5 * self.config.training.personal_prox * prox
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; refusing to continue the round")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _train_personal(self, anchor: dict[str, torch.Tensor], should_stop: Callable[[], bool]) -> None:
        """Ditto's personal model (and its twin on every sample): ``personal_epochs`` epochs on own
        data, pulled toward ``anchor``."""
        if self.personal is None:
            return
        if self._personal_opt is None:
            self._personal_opt = self._optimizer(self.personal)
        self._train_epochs(self.personal, self._personal_opt, self._x, self._y, anchor, should_stop)
        if self.personal_full is not None and self.holdout is not None:
            if self._personal_full_opt is None:
                self._personal_full_opt = self._optimizer(self.personal_full)
            x = _to_torch(concat([self.train_set.x, self.holdout.x]))
            y = torch.from_numpy(np.concatenate([self.train_set.y, self.holdout.y]))
            self._train_epochs(self.personal_full, self._personal_full_opt, x, y, anchor, should_stop)

    def _train_epochs(self, model, optimizer, x, y, anchor, should_stop: Callable[[], bool]) -> None:
        size = self.config.training.batch_size
        for _ in range(self.config.training.personal_epochs):
            order = torch.randperm(len(y), generator=self._rng)
            for start in range(0, len(y), size):
                if should_stop():
                    return
                self._train_step(model, optimizer, order[start : start + size], anchor, x, y)

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
        anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}  # the merged model
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
        self._train_personal(anchor, should_stop)
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
        if self.served is not self.model and self.serving == "nested":
            # the served copy takes the new fast layers; its slow layers stay the merged global ones
            install(self.served, state_of(self.model, self.private_names))
        return done, None

    def sample_losses(self) -> np.ndarray:
        """Per training sample, the served model's cross-entropy (how much it still has to learn)."""
        return per_sample(self.served, self.train_set)[1]

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
            "serving": self.serving,
            "initial_private": {k: torch.from_numpy(v) for k, v in self._initial_private.items()},
            "personal": None if self.personal is None else self.personal.state_dict(),
            "personal_opt": None if self._personal_opt is None else self._personal_opt.state_dict(),
            "personal_full": None if self.personal_full is None else self.personal_full.state_dict(),
            "personal_full_opt": None if self._personal_full_opt is None else self._personal_full_opt.state_dict(),
            "served_shadow": None if self.served_shadow is self.served else self.served_shadow.state_dict(),
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
        self.served = self._copy_with(state["served"]) or self.model
        self.serving = state.get("serving", self.serving)
        if state.get("initial_private") is not None:
            self._initial_private = {k: v.numpy() for k, v in state["initial_private"].items()}
        self.personal = self._copy_with(state.get("personal"))
        self._personal_opt = self._optimizer_with(self.personal, state.get("personal_opt"))
        self.personal_full = self._copy_with(state.get("personal_full"))
        self._personal_full_opt = self._optimizer_with(self.personal_full, state.get("personal_full_opt"))
        self.served_shadow = self._copy_with(state.get("served_shadow")) or self.served

    def _copy_with(self, weights: dict | None) -> torch.nn.Module | None:
        """A copy of the model holding saved ``weights``; None for none."""
        if weights is None:
            return None
        model = copy.deepcopy(self.model)
        model.load_state_dict(weights)
        return model

    def _optimizer_with(self, model: torch.nn.Module | None, saved: dict | None) -> torch.optim.Optimizer | None:
        """``model``'s optimiser with its saved state; None without a model or a saved state."""
        if model is None or saved is None:
            return None
        optimizer = self._optimizer(model)
        optimizer.load_state_dict(saved)
        return optimizer
