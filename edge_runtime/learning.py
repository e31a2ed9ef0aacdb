"""Continual learning on the device: the nested learner trained on the bounded sample store in
micro-updates, its whole state checkpointed after each one.

A micro-update is a few steps of the nested schedule (fast levels every step, slow levels at their
period) within the gate's time budget. It works on the learner in memory and is checkpointed only
when it completes: one that is interrupted (the robot woke up, the charger was pulled, the budget
ran out, the daemon is stopping) restores the last checkpoint, so the checkpoint on disk is always
a finished state. The model's inputs and size come from the device's job configuration (the JSON
``job.py --print-device-config`` prints); the learner is built once the store holds
``min_samples`` samples, or at once from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from app_custom.cluster.archive import tensors_digest
from app_custom.durable import crash_trace
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import DeviceData, LabelledSet
from app_custom.nested.learner import NestedLearner

from .checkpoints import CheckpointError, CheckpointStore
from .samples import SampleStore

log = logging.getLogger("fleetnest.edge.learning")
STATE = "learner.pt"
TEST_EVERY = 5  # every 5th sample is held out, never trained on: the device's own test and decision set


class ContinualLearner:
    def __init__(
        self,
        state_dir: Path,
        config: dict,
        num_classes: int,
        samples: SampleStore | None,
        steps: int = 20,
        min_samples: int = 32,
    ) -> None:
        nested = NestedConfig.from_dict(config)
        # The device serves the OTA release's graph with its own fast layers installed: of what
        # ``personalize: select`` weighs, it can serve the shared model and the merged model with its
        # fast layers, not a personal model (every layer its own), so it trains none.
        training = dataclasses.replace(nested.training, personal_epochs=0, finetune_epochs=0)
        self.nested = dataclasses.replace(nested, training=training)
        self.num_classes, self.samples, self.steps, self.min_samples = num_classes, samples, steps, min_samples
        self.store = CheckpointStore(state_dir / "checkpoints")
        self.learner: NestedLearner | None = None
        self.lock = threading.RLock()  # the learner is shared by micro-updates, fleet sessions and OTA merges
        self.micro_updates = 0
        self.checkpoint_seq: int | None = None

    # ---- building and recovery --------------------------------------------------------------
    def _data(self) -> DeviceData | None:
        x, y, seq = self.samples.snapshot()
        if len(y) < self.min_samples:
            return None
        test = seq % TEST_EVERY == 0
        spare = test.any() and (~test).sum() >= 2  # a held-out buffer and enough left to train on
        train = ~test if spare else np.ones_like(test)
        test = test if spare else train
        whole = LabelledSet(x, y)
        held = whole.subset(np.flatnonzero(test))
        # the rolling held-out buffer: what the merge decisions are made on, never trained on
        return DeviceData(whole.subset(np.flatnonzero(train)), held, holdout=held if spare else None)

    def _build(self, spec: Mapping[str, list[int]]) -> NestedLearner:
        zeros = {name: np.zeros((2, *shape), np.float32) for name, shape in spec.items()}
        placeholder = LabelledSet(zeros, np.zeros(2, np.int64))
        learner = NestedLearner(self.nested, DeviceData(placeholder, placeholder), self.num_classes)
        return learner

    def recover(self) -> str:
        """Load the newest checkpoint that verifies; a line saying what was found."""
        checkpoint = self.store.latest()
        if checkpoint is None:
            return "no checkpoint yet"
        info = checkpoint.meta["info"]
        learner = self._build(info["input_spec"])
        learner.restore_bytes(checkpoint.read(STATE), str(checkpoint.path))
        if tensors_digest(learner.fast_layers()) != info["fast_sha256"]:
            raise RuntimeError(f"checkpoint {checkpoint.seq}: fast layers do not match their recorded digest")
        data = self._data() if self.samples is not None else None
        if data is not None:  # the stored samples and held-out buffer, as before the restart
            try:
                learner.use_data(data)
            except ValueError as err:  # samples that do not fit the model: the next micro-update says so
                log.error("stored samples not used after the restart: %s", err)
        self.learner, self.checkpoint_seq = learner, checkpoint.seq
        self.micro_updates = int(info.get("micro_updates", 0))
        return (
            f"checkpoint {checkpoint.seq} (global version {learner.global_version}, {self.micro_updates} micro-updates)"
        )

    def ensure_learner(self) -> bool:
        """Build the learner once enough samples are stored; whether there is one."""
        with self.lock:
            if self.learner is not None:
                return True
            data = self._data()
            if data is None:
                return False
            x, _, _ = self.samples.snapshot()
            self.learner = self._build({name: list(v.shape[1:]) for name, v in x.items()})
            self.learner.use_data(data)
            self.learner.receive_global(self.learner.initial_slow(), None)
            self.checkpoint("built")
            return True

    # ---- learning ---------------------------------------------------------------------------
    def checkpoint(self, why: str) -> int:
        with self.lock:
            learner = self.learner
            assert learner is not None
            x, _, _ = self.samples.snapshot()
            info = {
                "why": why,
                "global_version": learner.global_version,
                "micro_updates": self.micro_updates,
                "input_spec": {name: list(v.shape[1:]) for name, v in x.items()},
                "fast_sha256": tensors_digest(learner.fast_layers()),
            }
            crash_trace("checkpoint")
            self.checkpoint_seq = self.store.save({STATE: learner.state_bytes()}, info)
            crash_trace("checkpoint-done")
            self.samples.save()
            return self.checkpoint_seq

    def micro_update(self, should_stop: Callable[[], str | None]) -> str:
        """One micro-update; a line saying what happened."""
        if not self.ensure_learner():
            return f"waiting for samples ({len(self.samples)}/{self.min_samples})"
        with self.lock:
            learner = self.learner
            assert learner is not None
            data = self._data()
            if data is not None:
                learner.use_data(data)
            try:
                done, reason = learner.micro_update(self.steps, should_stop)
            except FloatingPointError as err:  # diverged: back to the last good state
                return f"micro-update diverged ({err}); {self.rollback_to_good()}"
            if reason is not None:
                self.restore()  # the partial update is dropped; the checkpoint is the last finished one
                return f"micro-update interrupted after {done} steps ({reason}); kept checkpoint {self.checkpoint_seq}"
            self.micro_updates += 1
            _, _, seq = self.samples.snapshot()
            train_seq = seq[seq % TEST_EVERY != 0] if len(seq) else seq
            losses = learner.sample_losses()
            if len(train_seq) == len(losses):
                self.samples.set_scores(train_seq, losses)
            try:
                ck = self.checkpoint("micro-update")
            except (CheckpointError, OSError) as err:  # kept in memory; the next checkpoint retries
                log.error("%s", err)
                return f"micro-update {self.micro_updates}: {done} steps, NOT checkpointed ({err})"
            return f"micro-update {self.micro_updates}: {done} steps, checkpoint {ck}"

    def restore(self) -> None:
        with self.lock:
            checkpoint = self.store.latest()
            if checkpoint is not None and self.learner is not None:
                self.learner.restore_bytes(checkpoint.read(STATE), str(checkpoint.path))

    def mark_good(self) -> None:
        """The current checkpoint's model passed its checks: the target of a rollback from now on."""
        with self.lock:
            if self.checkpoint_seq is not None:
                self.store.mark_good(self.checkpoint_seq)

    def rollback_to_good(self) -> str:
        """Back to the last checkpoint marked good (its learner state made current); a line saying so."""
        with self.lock:
            try:
                checkpoint = self.store.rollback()
            except CheckpointError as err:
                self.restore()
                return f"{err}: restored checkpoint {self.checkpoint_seq}"
            if self.learner is not None:
                self.learner.restore_bytes(checkpoint.read(STATE), str(checkpoint.path))
            self.checkpoint_seq = checkpoint.seq
            self.micro_updates = int(checkpoint.meta["info"].get("micro_updates", self.micro_updates))
            return f"rolled back to good checkpoint {checkpoint.seq}"

    def merge_global(self, slow: Mapping[str, np.ndarray], version: int) -> str:
        """A new global slow version installed by OTA: merge it under this device's fast layers."""
        if not self.ensure_learner():
            return "no learner yet: the new version is used as shipped"
        with self.lock:
            learner = self.learner
            assert learner is not None
            if learner.global_version is not None and version <= learner.global_version:
                return f"global version {version} already merged"
            report = learner.receive_global(slow, version)
            self.checkpoint(f"merged global version {version}")
            return f"merged global version {version} (own-data accuracy {report.acc_after:.3f})"

    def holdout(self) -> LabelledSet | None:
        """The rolling held-out buffer the learner decides on (never trained on), if there is one."""
        with self.lock:
            return None if self.learner is None else self.learner.holdout

    def fast_and_holdout(self) -> tuple[dict[str, np.ndarray] | None, LabelledSet | None]:
        """The served fast layers and the held-out buffer, of one learner state."""
        with self.lock:
            return self.fast_layers(), self.holdout()

    def fast_layers(self) -> dict[str, np.ndarray] | None:
        with self.lock:
            return None if self.learner is None else self.learner.fast_layers()
