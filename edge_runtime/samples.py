"""The device's bounded sample store: what continual learning trains on. It never leaves the device.

Samples (inputs, label) arrive from the robot's sensors; at ``capacity`` one is evicted per new
one: the ``oldest`` (a sliding window, for drifting conditions) or the ``least-useful`` (the
lowest training loss at the last micro-update: what the model already knows; unscored samples
are kept first). With ``holdout_every`` (every n-th sample is held out, never trained on, so
never scored), least-useful eviction keeps the held-out samples at their share: beyond it the
oldest held-out sample goes (unscored, they would otherwise crowd out the training samples).
The store is written atomically (``samples.npz``, owner-only) at every checkpoint and every
``flush_every`` new samples or ``flush_s`` seconds, so a power cut costs at most the samples since
the last write and never the file.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import numpy as np

from app_custom.durable import write_bytes_atomic

log = logging.getLogger("fleetnest.edge.samples")
POLICIES = ("oldest", "least-useful")
FILE = "samples.npz"


class SampleError(ValueError):
    """A sample that does not fit the store (shape, dtype, a NaN)."""


class SampleStore:
    def __init__(
        self,
        directory: str | Path,
        capacity: int,
        policy: str = "oldest",
        flush_every: int = 50,
        flush_s: float = 2.0,
        holdout_every: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = Path(directory) / FILE
        self.capacity, self.policy, self.flush_every, self.flush_s = capacity, policy, flush_every, flush_s
        self.holdout_every = holdout_every
        self._saved_at = time.monotonic()
        self._lock = threading.Lock()
        self.x: dict[str, np.ndarray] = {}
        self.y = np.zeros(0, np.int64)
        self.seq = np.zeros(0, np.int64)
        self.score = np.zeros(0, np.float64)
        self.seen = 0  # samples ever added
        self.evicted = 0
        self._unsaved = 0
        self.save_error: str | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path) as data:
                self.x = {k[2:]: data[k] for k in data.files if k.startswith("x.")}
                self.y, self.seq, self.score = data["y"], data["seq"], data["score"]
                self.seen, self.evicted = int(data["seen"]), int(data["evicted"])
        except (OSError, ValueError, KeyError) as err:  # written atomically: only tampering gets here
            broken = self.path.with_suffix(".broken")
            self.path.replace(broken)
            self.x, self.y = {}, np.zeros(0, np.int64)
            raise SampleError(f"{self.path} is unreadable ({err}); moved to {broken}, starting empty") from err

    def __len__(self) -> int:
        return len(self.y)

    def add(self, x: dict[str, np.ndarray], label: int) -> None:
        """One sample (each modality without the batch axis) and its label."""
        with self._lock:
            if self.x and set(x) != set(self.x):
                raise SampleError(f"sample modalities {sorted(x)} differ from the store's {sorted(self.x)}")
            for name, value in x.items():
                value = np.asarray(value)
                if value.dtype != np.float32 or not np.all(np.isfinite(value)):
                    raise SampleError(f"sample {name}: float32 and finite expected, got {value.dtype}")
                if self.x and value.shape != self.x[name].shape[1:]:
                    raise SampleError(f"sample {name}: shape {value.shape}, the store holds {self.x[name].shape[1:]}")
            if len(self) >= self.capacity:
                self._evict()
            self.x = {
                n: np.concatenate([self.x.get(n, np.zeros((0, *np.shape(v)), np.float32)), [v]]) for n, v in x.items()
            }
            self.y = np.append(self.y, np.int64(label))
            self.seq = np.append(self.seq, np.int64(self.seen))
            self.score = np.append(self.score, np.inf)  # not scored yet: kept before any scored one
            self.seen += 1
            self._unsaved += 1
        if self._unsaved >= self.flush_every or time.monotonic() - self._saved_at >= self.flush_s:
            try:
                self.save()
            except OSError as err:  # a full disk: the samples stay in memory (bounded); retried later
                self.save_error = f"cannot write {self.path}: {err}"
                self._unsaved, self._saved_at = 0, time.monotonic()
                log.warning("%s", self.save_error)

    def _evict(self) -> None:
        if self.policy == "oldest":
            victim = int(np.argmin(self.seq))
        else:
            every = self.holdout_every or 0
            held = self.seq % every == 0 if every else np.zeros(len(self), bool)
            if every and held.sum() * every > len(self):
                pool = np.flatnonzero(held)  # held-out samples over their share: the oldest of them
                victim = int(pool[np.argmin(self.seq[pool])])
            else:
                pool = np.flatnonzero(~held) if (~held).any() else np.arange(len(self))
                victim = int(pool[np.lexsort((self.seq[pool], self.score[pool]))[0]])
        keep = np.arange(len(self)) != victim
        self.x = {n: v[keep] for n, v in self.x.items()}
        self.y, self.seq, self.score = self.y[keep], self.seq[keep], self.score[keep]
        self.evicted += 1

    def snapshot(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(inputs, labels, sequence numbers) as they are now: what a micro-update trains on."""
        with self._lock:
            return {n: v.copy() for n, v in self.x.items()}, self.y.copy(), self.seq.copy()

    def set_scores(self, seq: np.ndarray, loss: np.ndarray) -> None:
        """Record the training loss of the samples ``seq`` (those still held)."""
        with self._lock:
            where = {int(s): i for i, s in enumerate(self.seq)}
            for s, value in zip(seq, loss):
                if int(s) in where:
                    self.score[where[int(s)]] = float(value)

    def save(self) -> None:
        with self._lock:
            buffer = io.BytesIO()
            np.savez(
                buffer,
                **{f"x.{n}": v for n, v in self.x.items()},
                y=self.y,
                seq=self.seq,
                score=self.score,
                seen=np.int64(self.seen),
                evicted=np.int64(self.evicted),
            )
            write_bytes_atomic(self.path, buffer.getvalue(), 0o600)
            self._unsaved = 0
            self._saved_at = time.monotonic()
            self.save_error = None
