"""The cluster's validation gate: a candidate global slow version becomes current only if it
does not regress on the cluster's own validation data by more than a tolerance.

When the head is shared (the private levels are adapters that start as the identity, or
nothing is private), the cluster holds a complete classifier, the shared model with identity
adapters, and scores it directly on its validation data. When the head is private it holds
no device's head and measures the slow layers with a *linear probe*: the slow layers are installed in
the reference model (adapters at the identity), the trunk's features are computed on the
cluster's validation data, and a logistic-regression head is fitted on one half and scored
(accuracy, cross-entropy) on the other, then the halves swap (2-fold cross-fitting), so
every validation sample is scored once and the estimate is as steady as the set allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import LabelledSet
from app_custom.nested.learner import _to_torch, evaluate
from app_custom.nested.levels import partition_parameters
from app_custom.nested.models import build_model, input_spec
from app_custom.nested.slow_delta import merge_slow


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str


class SlowLayerValidator:
    """Scores global slow weights: the shared model directly when it has the head, else by a
    linear head fitted on the cluster's validation data."""

    def __init__(self, config: NestedConfig, validation: LabelledSet, num_classes: int, seed: int = 0) -> None:
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, input_spec(validation.x), num_classes)
        partition = partition_parameters(self.model, config.levels)
        self.shared_names = partition.shared_names
        # identity-initialised adapters are all that is private: the shared model is a whole classifier
        self.whole_model = all(name.startswith("adapters.") for name in partition.private_names)
        self.validation = validation
        self.num_classes = num_classes
        order = np.random.default_rng(seed).permutation(len(validation))
        half = len(order) // 2
        if half < 2:
            raise ValueError(f"the cluster validation set needs >= 4 samples, got {len(validation)}")
        self._fit, self._eval = validation.subset(order[:half]), validation.subset(order[half:])

    def _features(self, data: LabelledSet) -> np.ndarray:
        self.model.eval()
        with torch.no_grad():
            return self.model.features(_to_torch(data.x)).numpy()

    def measure(self, slow: Mapping[str, np.ndarray]) -> dict[str, float]:
        merge_slow(self.model, slow, self.shared_names)
        if self.whole_model:
            accuracy, loss = evaluate(self.model, self.validation)
            return {"val_acc": accuracy, "val_loss": loss}
        halves = [(self._features(self._fit), self._fit.y), (self._features(self._eval), self._eval.y)]
        correct, loss = 0.0, 0.0
        for (fit_x, fit_y), (eval_x, eval_y) in (halves, halves[::-1]):
            mean, scale = fit_x.mean(axis=0), fit_x.std(axis=0) + 1e-6
            proba = np.full((len(eval_y), self.num_classes), 1e-6)
            if len(np.unique(fit_y)) < 2:  # a skewed half: the best linear head predicts its one class
                proba[:, fit_y[0]] = 1.0
            else:
                head = LogisticRegression(max_iter=300).fit((fit_x - mean) / scale, fit_y)
                proba[:, head.classes_] = head.predict_proba((eval_x - mean) / scale)
            proba /= proba.sum(axis=1, keepdims=True)
            correct += float((proba.argmax(axis=1) == eval_y).sum())
            loss += float(log_loss(eval_y, proba, labels=np.arange(self.num_classes), normalize=False))
        n = len(self._fit) + len(self._eval)
        return {"val_acc": correct / n, "val_loss": loss / n}


class ValidationGate:
    """Accept a candidate unless its probe accuracy drops or its probe loss rises past the tolerances."""

    def __init__(self, max_acc_drop: float = 0.05, max_loss_rise: float = 0.25) -> None:
        if not (0 <= max_acc_drop <= 1):
            raise ValueError(f"max_acc_drop must be in [0, 1], got {max_acc_drop!r}")
        if max_loss_rise < 0:
            raise ValueError(f"max_loss_rise must be >= 0, got {max_loss_rise!r}")
        self.max_acc_drop = max_acc_drop
        self.max_loss_rise = max_loss_rise

    def assess(self, candidate: Mapping[str, float], current: Mapping[str, float] | None) -> Verdict:
        """``current=None``: the current version is the untrained initial one, which is no reference
        (a linear probe on random features can score well); the first trained candidate then only
        has to be finite."""
        if not np.isfinite(candidate["val_loss"]):
            return Verdict(False, "candidate validation loss is not finite")
        if current is None:
            return Verdict(True, "first trained version (the initial weights are no reference)")
        drop = current["val_acc"] - candidate["val_acc"]
        rise = candidate["val_loss"] - current["val_loss"]
        if drop > self.max_acc_drop:
            return Verdict(False, f"validation accuracy drops by {drop:.4f} > {self.max_acc_drop}")
        if rise > self.max_loss_rise:
            return Verdict(False, f"validation loss rises by {rise:.4f} > {self.max_loss_rise}")
        return Verdict(True, f"validation accuracy change {-drop:+.4f}, loss change {rise:+.4f}")
