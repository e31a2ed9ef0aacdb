"""Inference on the device: the model it serves, checked before it serves, watched while it serves.

The served model is the OTA release's graph (``ota/current``, verified by the updater) with this
device's own fast layers installed (``ota.bundle.personalize``), run by the OTA issue's engines
(TensorRT where present, onnxruntime otherwise; ``ota.engines.prepare_engine`` logs why). Every
new candidate (a new release, new fast layers after a micro-update) is checked before it serves:
the engine loads, its outputs on the release's golden inputs are finite and of the right shape,
and its p99 latency at batch 1 is within the budget. A candidate that passes is written as
``models/good.onnx`` (with its digest in ``good.json``; the one before it stays as
``previous.onnx``); one that fails leaves the served model as it was. A served model that raises or
answers NaN is replaced by the last good one. Before any release is installed the device serves
its learner's own model in torch, and says so.

``LatencyMonitor`` keeps the last ``window`` latencies; p50 and p99 against the 30 ms budget, an
alarm (logged once, shown in the status line and the metrics) while p99 is over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from app_custom.durable import write_bytes_atomic, write_json_atomic
from app_custom.nested.device_data import LabelledSet

log = logging.getLogger("fleetnest.edge.inference")


class ModelCheckFailed(RuntimeError):
    """A candidate model that may not serve; the message says which check it failed."""


class BadOutputs(ModelCheckFailed):
    """The candidate answers the golden inputs with outputs of the wrong shape or non-finite ones: the
    weights are broken (unlike a candidate that is only too slow on this device, or does not load)."""


class LatencyMonitor:
    def __init__(self, budget_ms: float = 30.0, window: int = 200) -> None:
        self.budget_ms = budget_ms
        self.samples: deque[float] = deque(maxlen=window)
        self.count = 0
        self.alarm = False
        self._lock = threading.Lock()

    def record(self, ms: float) -> None:
        with self._lock:
            self.samples.append(ms)
            self.count += 1
            if len(self.samples) >= 20:
                over = self.percentile(99) > self.budget_ms
                if over and not self.alarm:
                    log.warning("latency alarm: p99 %.1f ms > budget %.0f ms", self.percentile(99), self.budget_ms)
                elif self.alarm and not over:
                    log.info("latency back within budget: p99 %.1f ms", self.percentile(99))
                self.alarm = over

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.fromiter(self.samples, float), q)) if self.samples else float("nan")


class TorchEngine:
    """The learner's own model (before any release is installed)."""

    name = "torch"

    def __init__(self, model, inputs: list[str]) -> None:
        import torch

        self.torch, self.model, self.inputs = torch, model, inputs

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self.torch.no_grad():
            self.model.eval()
            x = {n: self.torch.from_numpy(feeds[n]) for n in self.inputs}
            return self.model(x if len(x) > 1 else next(iter(x.values()))).numpy()


def p99_ms(engine, feeds: dict[str, np.ndarray], runs: int = 40) -> float:
    """The batch-1 p99 latency (ms) of ``engine`` on ``feeds``."""
    from ota.engines import latency_ms

    return latency_ms(lambda: engine.run(feeds), runs)[1]


def held_out_outcomes(graph: bytes | Path, data: LabelledSet, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out sample: whether ``graph`` (ONNX, in memory or a file, run by onnxruntime)
    classifies it right, and its cross-entropy; the learner's own measure (``outcomes``) applied to
    the graph's outputs, in batches. Outputs that are not finite raise ``BadOutputs``."""
    from app_custom.nested.learner import outcomes
    from ota.engines import OnnxRuntimeEngine

    if not isinstance(data.x, dict):
        raise TypeError("held-out inputs must be a mapping of modality to array, as the sample store keeps them")
    engine = OnnxRuntimeEngine(graph, threads=1)
    correct, loss = [], []
    for start in range(0, len(data.y), batch_size):
        logits = engine.run({name: value[start : start + batch_size] for name, value in data.x.items()})
        if not np.all(np.isfinite(logits)):
            raise BadOutputs("outputs on the held-out samples are not finite")
        right, losses = outcomes(logits, data.y[start : start + batch_size])
        correct.append(right)
        loss.append(losses)
    return np.concatenate(correct), np.concatenate(loss)


class ModelServer:
    def __init__(self, state_dir: Path, budget_ms: float = 30.0, window: int = 200) -> None:
        self.dir = state_dir / "models"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.engines_dir = state_dir / "engines"
        self.budget_ms = budget_ms
        self.monitor = LatencyMonitor(budget_ms, window)
        self.engine = None
        self.label = "none"
        self.fallbacks = 0
        self.rejected = 0
        self.last_rejection: Exception | None = None  # why the last candidate offered was refused
        self.serving_sha: str | None = None  # SHA-256 of the ONNX graph being served
        self.bad_inputs = 0
        self._lock = threading.Lock()

    # ---- loading ------------------------------------------------------------------------------
    def _engine(self, graph: Path, shapes: dict[str, tuple[int, ...]]):
        from ota.engines import prepare_engine

        engine, note = prepare_engine(graph, shapes, self.engines_dir)
        return engine, note

    def recover(self) -> str:
        """Serve the last good model that verifies (``good``, else ``previous``)."""
        for name in ("good", "previous"):
            try:
                meta = json.loads((self.dir / f"{name}.json").read_text())
                data = (self.dir / f"{name}.onnx").read_bytes()
            except (OSError, ValueError):
                continue
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                log.warning("models/%s.onnx does not match its digest: not served", name)
                continue
            try:
                engine, note = self._engine(self.dir / f"{name}.onnx", {k: tuple(v) for k, v in meta["shapes"].items()})
            except Exception as err:  # noqa: BLE001 - a model that does not load is skipped, never fatal
                log.warning("models/%s.onnx does not load: %s", name, err)
                continue
            with self._lock:
                self.engine, self.label = engine, f"{meta['label']} ({note.split(':')[0]})"
                self.serving_sha = meta["sha256"]
            return f"serving {self.label}"
        return "no verified model on disk"

    def verified(self) -> dict | None:
        """The served model's record, if its file matches its digest (what the crash tests check)."""
        try:
            meta = json.loads((self.dir / "good.json").read_text())
            data = (self.dir / "good.onnx").read_bytes()
        except (OSError, ValueError):
            return None
        return meta if hashlib.sha256(data).hexdigest() == meta.get("sha256") else None

    def offer(self, graph: bytes, label: str, probe: dict[str, np.ndarray], classes: int) -> str:
        """Check a candidate graph; serve it and keep it as the good model if it passes."""
        shapes = {name: tuple(value.shape[1:]) for name, value in probe.items()}
        candidate = self.dir / "candidate.onnx"
        try:
            write_bytes_atomic(candidate, graph, 0o600)
            engine, note = self._engine(candidate, shapes)
            out = engine.run(probe)
            if out.shape != (len(next(iter(probe.values()))), classes):
                raise BadOutputs(f"outputs of shape {out.shape}, expected (batch, {classes})")
            if not np.all(np.isfinite(out)):
                raise BadOutputs("outputs are not finite")
            p99 = p99_ms(engine, {n: v[:1] for n, v in probe.items()})
            if p99 > self.budget_ms:
                raise ModelCheckFailed(f"p99 {p99:.1f} ms > budget {self.budget_ms:.0f} ms")
        except Exception as err:  # noqa: BLE001 - any failure keeps the served model
            return self.refuse(label, err)
        meta = {"label": label, "sha256": hashlib.sha256(graph).hexdigest(), "shapes": shapes, "p99_ms": p99}
        self.last_rejection = None
        try:
            self._keep_good(graph, meta)
        except OSError as err:  # a full disk: it serves, but a restart comes back to the one on disk
            log.error("cannot keep %s as the good model: %s", label, err)
        with self._lock:
            self.engine, self.label, self.serving_sha = engine, f"{label} ({note.split(':')[0]})", meta["sha256"]
        return f"serving {self.label}, p99 {p99:.2f} ms"

    def serves(self, graph: bytes) -> bool:
        """Whether ``graph`` is the model being served (an unchanged candidate need not be checked and
        kept again: keeping it would push the real fallback out of ``previous``)."""
        with self._lock:
            return self.engine is not None and self.serving_sha == hashlib.sha256(graph).hexdigest()

    def refuse(self, label: str, err: Exception) -> str:
        """A candidate that failed a check, here or before it could be offered: the served model stays."""
        self.rejected, self.last_rejection = self.rejected + 1, err
        log.warning("candidate %s rejected: %s; still serving %s", label, err, self.label)
        return f"candidate {label} rejected ({err}); serving {self.label}"

    def serve_local(self, model, inputs: list[str]) -> None:
        """The learner's own model, until a release is installed."""
        with self._lock:
            if self.engine is None or isinstance(self.engine, TorchEngine):
                self.engine, self.label = TorchEngine(model, inputs), "local model (torch; no release installed yet)"
                self.serving_sha = None

    # ---- serving ------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        with self._lock:
            engine = self.engine
        if engine is None:
            return None
        if not all(np.all(np.isfinite(value)) for value in feeds.values()):
            self.bad_inputs += 1  # a sensor fault, not the model's: skipped, the model keeps serving
            if self.bad_inputs in (1, 10, 100) or self.bad_inputs % 1000 == 0:
                log.warning("%d samples with NaN or inf skipped", self.bad_inputs)
            return None
        started = time.perf_counter()
        try:
            out = engine.run(feeds)
            if not np.all(np.isfinite(out)):
                raise ModelCheckFailed("non-finite outputs")
        except Exception as err:  # noqa: BLE001 - a failing model is replaced, never fatal
            self.fallbacks += 1
            with self._lock:
                failed, self.engine, self.serving_sha = self.label, None, None
            if not isinstance(engine, TorchEngine):
                self._demote_good()
            log.error("model %s failed while serving (%s): falling back to %s", failed, err, self.recover())
            return None
        self.monitor.record((time.perf_counter() - started) * 1000)
        return out

    def _keep_good(self, graph: bytes, meta: dict) -> None:
        """good -> previous, the new one -> good; each write leaves a verified pair on disk."""
        good = self.dir / "good.onnx"
        if self.verified() is not None:
            write_bytes_atomic(self.dir / "previous.onnx", good.read_bytes(), 0o600)
            write_bytes_atomic(self.dir / "previous.json", (self.dir / "good.json").read_bytes(), 0o600)
        (self.dir / "good.json").unlink(missing_ok=True)  # good.onnx is about to change under it
        write_bytes_atomic(good, graph, 0o600)
        write_json_atomic(self.dir / "good.json", meta, 0o600)

    def _demote_good(self) -> None:
        """The good model failed while serving: the previous one becomes good. Each step leaves a
        complete verified pair on disk (good, or else previous) for ``recover``."""
        if (self.dir / "good.json").exists():
            (self.dir / "good.json").replace(self.dir / "failed.json")
        if (self.dir / "previous.json").exists():
            write_bytes_atomic(self.dir / "good.onnx", (self.dir / "previous.onnx").read_bytes(), 0o600)
            write_bytes_atomic(self.dir / "good.json", (self.dir / "previous.json").read_bytes(), 0o600)
