"""The cluster's validation gate: a candidate global slow version becomes current unless it is
worse than the current version on the cluster's own validation data, by more than a tolerance
*and* by more than chance explains.

The comparison is paired, sample by sample (both versions are scored on the same validation
samples): accuracy with a one-sided exact McNemar test on the samples the two versions
disagree on, loss with a one-sided paired t-test on the per-sample losses. A fixed tolerance
alone rejects good versions on a small validation set (one sample of 48 is two points), and
a poisoned version is both far worse and significantly so.

When the validation set names the recording each sample was cut from (``LabelledSet.groups``),
the unit of both tests is the recording, not the sample: a one-sided t-test over the recordings'
mean differences (a cluster-level analysis). Six overlapping windows of one recording flip
together; counted as six independent samples they made chance look significant, and the gate
rejected 8 of 10 good versions on basic_motions (8 recordings, 48 windows).

When the head is shared (the private levels are adapters that start as the identity, or
nothing is private), the cluster holds a complete classifier, the shared model with identity
adapters, and scores it directly on its validation data. When the head is private it holds
no device's head and measures the slow layers with a *linear probe*: the slow layers are installed in
the reference model (adapters standardizing the validation data), the trunk's features are computed on the
cluster's validation data, and a logistic-regression head is fitted on one half and scored
(accuracy, cross-entropy) on the other, then the halves swap (2-fold cross-fitting), so
every validation sample is scored once and the estimate is as steady as the set allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import LabelledSet
from app_custom.nested.learner import _to_torch, mcnemar_worse_p, per_sample
from app_custom.nested.levels import partition_parameters
from app_custom.nested.models import build_model, input_spec
from app_custom.nested.slow_delta import merge_slow


@dataclass(frozen=True)
class Scores:
    """Per validation sample: whether the version classifies it correctly, its cross-entropy, and
    (optionally) the recording it was cut from."""

    correct: np.ndarray
    loss: np.ndarray
    groups: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        return {"val_acc": float(self.correct.mean()), "val_loss": float(self.loss.mean())}


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
        # adapters start as the standardization of the cluster's own validation data, as a device's
        # start as that of its own samples (shared adapters ship that way in version 0)
        self.model.standardize_inputs(_to_torch(validation.x))
        partition = partition_parameters(self.model, config.levels)
        self.shared_names = partition.shared_names
        # identity-initialised adapters are all that is private: the shared model is a whole classifier
        self.whole_model = all(name.startswith("adapters.") for name in partition.private_names)
        self.validation = validation
        self.num_classes = num_classes
        # the probe's halves split whole recordings: a window in one half and its overlapping
        # neighbour in the other would let the probe score what it was fitted on
        groups = validation.groups if validation.groups is not None else np.arange(len(validation))
        unique = np.random.default_rng(seed).permutation(np.unique(groups))
        if len(unique) < 4:
            raise ValueError(f"the cluster validation set needs >= 4 recordings, got {len(unique)}")
        in_fit = np.isin(groups, unique[: len(unique) // 2])
        self._fit, self._eval = validation.subset(np.flatnonzero(in_fit)), validation.subset(np.flatnonzero(~in_fit))

    def _features(self, data: LabelledSet) -> np.ndarray:
        self.model.eval()
        with torch.no_grad():
            return self.model.features(_to_torch(data.x)).numpy()

    def measure(self, slow: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.score(slow).summary()

    def score(self, slow: Mapping[str, np.ndarray]) -> Scores:
        """Per-sample scores of ``slow`` on the validation set (always in the same sample order)."""
        merge_slow(self.model, slow, self.shared_names)
        if self.whole_model:
            return Scores(*per_sample(self.model, self.validation), self.validation.groups)
        halves = [(self._features(self._fit), self._fit.y), (self._features(self._eval), self._eval.y)]
        correct, losses = [], []
        for (fit_x, fit_y), (eval_x, eval_y) in (halves, halves[::-1]):
            mean, scale = fit_x.mean(axis=0), fit_x.std(axis=0) + 1e-6
            proba = np.full((len(eval_y), self.num_classes), 1e-6)
            if len(np.unique(fit_y)) < 2:  # a skewed half: the best linear head predicts its one class
                proba[:, fit_y[0]] = 1.0
            else:
                head = LogisticRegression(max_iter=300).fit((fit_x - mean) / scale, fit_y)
                proba[:, head.classes_] = head.predict_proba((eval_x - mean) / scale)
            proba /= proba.sum(axis=1, keepdims=True)
            correct.append(proba.argmax(axis=1) == eval_y)
            losses.append(-np.log(proba[np.arange(len(eval_y)), eval_y]))
        groups = None if self.validation.groups is None else np.concatenate([self._eval.groups, self._fit.groups])
        return Scores(np.concatenate(correct), np.concatenate(losses), groups)


def worse_p(diff: np.ndarray, groups: np.ndarray) -> float:
    """One-sided p-value that the per-sample differences ``diff`` (positive: worse) are > 0 on
    average, with the recording as the unit: a t-test over the recordings' mean differences."""
    unique, index = np.unique(groups, return_inverse=True)
    per_group = np.bincount(index, weights=diff) / np.bincount(index)
    mean = float(per_group.mean())
    if mean <= 0:
        return 1.0
    if len(unique) < 2 or float(per_group.std()) <= 1e-9 * max(1.0, mean):  # the same change everywhere
        return 0.0
    return float(stats.ttest_1samp(per_group, 0.0, alternative="greater").pvalue)


class ValidationGate:
    """Reject a candidate whose accuracy drops by more than ``max_acc_drop``, or whose loss rises by
    more than ``max_loss_rise`` while its accuracy also drops, when that change is also
    significant at level ``alpha``."""

    def __init__(self, max_acc_drop: float = 0.05, max_loss_rise: float = 0.25, alpha: float = 0.05) -> None:
        if not (0 <= max_acc_drop <= 1):
            raise ValueError(f"max_acc_drop must be in [0, 1], got {max_acc_drop!r}")
        if max_loss_rise < 0:
            raise ValueError(f"max_loss_rise must be >= 0, got {max_loss_rise!r}")
        if not (0 < alpha < 1):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.max_acc_drop = max_acc_drop
        self.max_loss_rise = max_loss_rise
        self.alpha = alpha

    def assess(self, candidate: Scores, current: Scores | None) -> Verdict:
        """``current=None``: the current version is the untrained initial one, which is no reference
        (a linear probe on random features can score well); the first trained candidate then only
        has to be finite."""
        if not np.all(np.isfinite(candidate.loss)):
            return Verdict(False, "candidate validation loss is not finite")
        if current is None:
            return Verdict(True, "first trained version (the initial weights are no reference)")
        if candidate.correct.shape != current.correct.shape:
            raise ValueError("candidate and current were scored on different validation sets")
        drop = float(current.correct.mean() - candidate.correct.mean())
        diff = candidate.loss - current.loss
        rise = float(diff.mean())
        if candidate.groups is None:
            p_acc = mcnemar_worse_p(current.correct, candidate.correct)
            p_loss = worse_p(diff, np.arange(len(diff)))
        else:
            lost = current.correct.astype(np.float64) - candidate.correct.astype(np.float64)
            p_acc = worse_p(lost, candidate.groups)
            p_loss = worse_p(diff, candidate.groups)
        change = f"accuracy {-drop:+.4f} (p={p_acc:.3g}), loss {rise:+.4f} (p={p_loss:.3g})"
        if drop <= self.max_acc_drop:
            # Within the accuracy tolerance a loss rise alone does not reject: early in training, or
            # on data unlike the fleet's (reference robots with sensors of their own, scored with
            # identity adapters), a model grows more confident on what it gets right and on what it
            # gets wrong, and its mean cross-entropy rises while it classifies as well or better.
            return Verdict(True, change)
        if p_acc < self.alpha:
            return Verdict(False, f"validation accuracy drops by {drop:.4f} > {self.max_acc_drop}: {change}")
        # An accuracy drop past the tolerance that the accuracy test cannot confirm (on 8 recordings
        # one recording is 12 points) is confirmed by a significant rise of the loss, a per-sample
        # continuous score that carries more evidence.
        if rise > self.max_loss_rise and p_loss < self.alpha:
            return Verdict(
                False,
                f"validation accuracy drops by {drop:.4f} > {self.max_acc_drop} and loss rises by "
                f"{rise:.4f} > {self.max_loss_rise}: {change}",
            )
        return Verdict(True, change)
