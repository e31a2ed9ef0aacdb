"""The device updater: one check-and-install cycle, safe against a kill or power cut at any point.

State directory::

    DIR/current            -> slots/a or slots/b: the active model, always a complete, verified bundle
    DIR/slots/a, slots/b   A/B slots (bundle files plus ``model.personal.onnx``)
    DIR/state.json         committed release, version floor, the cycle's phase, refused releases
    DIR/downloads/         partial downloads (resumed on the next cycle)
    DIR/tuf/               TUF's trusted metadata
    DIR/mission.lock       present while the robot is on a mission: never switch then

A cycle: verified targeting for the device's ring -> refuse a release older than the committed one
(the version floor), for another device class, or one already refused -> download (resumable) ->
verify every file -> stage into the inactive slot -> [mission lock: stop, staged] -> switch
``current`` atomically -> health check (the engine loads, golden outputs within tolerance, latency
within budget, local validation not worse than the previous model's) -> commit, or switch back
and record why. A cycle interrupted after the switch and before the commit is rolled back when the
updater starts again (a trial that never committed, as in A/B boot counting); the release is then
tried again once, and refused after a second failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app_custom.durable import crash_trace, write_json_atomic

from .bundle import (
    BundleError,
    DeviceProfile,
    check_compatible,
    check_manifest,
    load_golden,
    personalize,
    read_manifest,
    verify_files,
)
from .client import ReleaseClient, UpdateRefused
from .layout import MANIFEST

PERSONAL = "model.personal.onnx"
MAX_ATTEMPTS = 2


class MissionInProgress(RuntimeError):
    """The update is staged; the switch waits until the mission lock is released."""


@dataclass
class Outcome:
    # "up-to-date" | "installed" | "staged" (mission lock) | "refused" (this release, for good) |
    # "rolled-back" (failed its health check) | "unavailable" (repository or network: try again)
    status: str
    release: str | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.status in ("up-to-date", "installed")


def _crashpoint(phase: str) -> None:
    """Fault injection for the crash tests: ``FLEETNEST_OTA_CRASH_AT=<phase>`` kills the process there."""
    crash_trace(f"ota-{phase}")
    if os.environ.get("FLEETNEST_OTA_CRASH_AT") == phase:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class HealthPolicy:
    latency_budget_ms: float = 30.0  # p99, batch 1
    max_acc_drop: float = 0.02  # local validation, against the previous model
    precision: str = "fp32"


class Updater:
    def __init__(
        self,
        state_dir: str | os.PathLike,
        client: ReleaseClient,
        profile: DeviceProfile,
        ring: str,
        fast_layers: dict[str, np.ndarray] | None = None,
        validation: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
        policy: HealthPolicy | None = None,
    ) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.profile = profile
        self.ring = ring
        self.fast_layers = fast_layers
        self.validation = validation
        self.policy = policy or HealthPolicy()
        self.state_path = self.dir / "state.json"
        self.state = self._load_state()

    # ---- state ---------------------------------------------------------------------------
    def _load_state(self) -> dict:
        if not self.state_path.exists():
            return {"committed": None, "floor": -1, "phase": "idle", "pending": None, "refused": {}, "attempts": {}}
        try:
            return json.loads(self.state_path.read_text())
        except ValueError as e:  # written atomically: only tampering gets here
            raise RuntimeError(f"{self.state_path} is corrupt ({e}); recover by hand (see the README)") from e

    def _save(self, **changes) -> None:
        self.state.update(changes)
        write_json_atomic(self.state_path, self.state)

    @property
    def current(self) -> Path:
        return self.dir / "current"

    def active_slot(self) -> str | None:
        return os.readlink(self.current).split("/")[-1] if self.current.is_symlink() else None

    def _point_current(self, slot: str | None) -> None:
        if slot is None:
            self.current.unlink(missing_ok=True)
            return
        link = self.dir / ".current.tmp"
        link.unlink(missing_ok=True)
        os.symlink(f"slots/{slot}", link)
        os.replace(link, self.current)  # atomic: ``current`` is always one complete slot
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self) -> str | None:
        """Bring the state directory back to the committed model after an interrupted cycle."""
        phase, pending = self.state["phase"], self.state.get("pending")
        committed = self.state["committed"]
        if phase in ("switched", "health-check") and pending:
            self._point_current(committed["slot"] if committed else None)
            release = pending["release"]
            reason = f"interrupted during {phase} of {release}: rolled back to the committed model"
            attempts = self.state["attempts"].get(release, 0) + 1
            self.state["attempts"][release] = attempts
            if attempts >= MAX_ATTEMPTS:
                self.state["refused"][release] = f"interrupted {attempts} times before its health check committed"
            self._save(phase="idle", pending=None, last_result=reason)
            return reason
        if phase != "idle":
            self._save(phase="idle", pending=None)
        if committed and self.active_slot() != committed["slot"]:
            self._point_current(committed["slot"])
        return None

    # ---- one cycle -----------------------------------------------------------------------
    def run_once(self) -> Outcome:
        self.recover()
        self._targeted: str | None = None
        try:
            return self._cycle()
        except UpdateRefused as e:
            if self._targeted is not None and self._targeted in self.state["refused"]:
                return self._finish("refused", self._targeted, str(e))
            return self._finish("unavailable", self._targeted, str(e))
        except MissionInProgress as e:
            return self._finish("staged", (self.state.get("pending") or {}).get("release"), str(e))

    def _finish(self, status: str, release: str | None, reason: str) -> Outcome:
        self._save(last_result=f"{status}: {reason}")
        return Outcome(status, release, reason)

    def _cycle(self) -> Outcome:
        self.client.refresh()  # new metadata every cycle (TUF refreshes once per Updater instance)
        desired = self.client.desired(self.ring)
        committed = self.state["committed"]
        if desired is None:
            return Outcome("up-to-date", committed and committed["release"], f"nothing targeted at ring {self.ring}")
        release = desired["release"]
        self._targeted = release
        if committed and committed["release"] == release:
            return Outcome("up-to-date", release, "already running the targeted release")
        if release in self.state["refused"]:
            raise UpdateRefused(f"{release} was refused before: {self.state['refused'][release]}")
        manifest_bytes = self.client.fetch(self.client.release_file(release, MANIFEST))
        try:
            manifest = check_manifest(json.loads(manifest_bytes), f"{release}/{MANIFEST}")
        except (BundleError, ValueError) as e:
            raise UpdateRefused(f"{release}: {e}") from e
        if manifest.get("release") != release:
            raise UpdateRefused(f"the manifest of {release} names release {manifest.get('release')!r}")
        if not isinstance(manifest.get("global_version"), int):
            raise self._refuse(release, "the manifest has no integer global_version")
        if manifest["global_version"] <= self.state["floor"] and not self._rollback_allowed(desired, release):
            raise self._refuse(
                release,
                f"global version {manifest.get('global_version')} is not newer than the committed "
                f"version {self.state['floor']} (rollback refused)",
            )
        try:
            notes = check_compatible(manifest, self.profile)
        except BundleError as e:
            raise self._refuse(release, str(e)) from e
        # ---- download (resumable) and verify
        self._save(phase="downloading", pending={"release": release})
        staging = self.dir / "downloads" / release
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST).write_bytes(manifest_bytes)  # the signed bytes, as verified
        for name in manifest["files"]:
            self.client.download_resumable(self.client.release_file(release, name), staging / name)
            _crashpoint("downloading")
        self._save(phase="verifying")
        _crashpoint("verifying")
        try:
            manifest = read_manifest(staging)
            verify_files(staging, manifest)
        except BundleError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UpdateRefused(str(e)) from e
        # ---- stage into the inactive slot
        self._save(phase="staging")
        slot = "b" if self.active_slot() == "a" else "a"
        target = self.dir / "slots" / slot
        tmp = self.dir / "slots" / f".{slot}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(staging, tmp)
        _crashpoint("staging")
        try:
            graph = personalize(tmp, manifest, self.fast_layers or _reference_private(tmp, manifest))
        except BundleError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._refuse(release, f"cannot install this device's fast layers: {e}") from e
        (tmp / PERSONAL).write_bytes(graph.SerializeToString())
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pending = {"release": release, "slot": slot, "global_version": manifest["global_version"]}
        self._save(phase="staged", pending=pending)
        if (self.dir / "mission.lock").exists():
            raise MissionInProgress(f"{release} is staged in slot {slot}; the switch waits for the mission to end")
        # ---- switch, health check, commit or roll back
        self._save(phase="switched")
        self._point_current(slot)
        _crashpoint("switching")
        self._save(phase="health-check")
        _crashpoint("health-checking")
        healthy, reason = self.health_check(target, manifest)
        if not healthy:
            self._point_current(committed["slot"] if committed else None)
            self.state["refused"][release] = f"health check failed: {reason}"
            self._save(phase="idle", pending=None)
            return self._finish("rolled-back", release, f"health check failed: {reason}")
        history = [h for h in self.state.get("history", []) if h["release"] != release]
        history.append({"release": release, "global_version": manifest["global_version"]})
        self._save(
            phase="idle",
            pending=None,
            committed={"release": release, "slot": slot, "global_version": manifest["global_version"]},
            floor=max(self.state["floor"], manifest["global_version"]),
            history=history,
        )
        shutil.rmtree(staging, ignore_errors=True)
        return self._finish("installed", release, "; ".join(["health check passed", *notes]))

    def _rollback_allowed(self, desired: dict, release: str) -> bool:
        """A signed rollback moves the device off exactly the release it runs, back to one it
        committed before; nothing else goes below the version floor."""
        committed = self.state["committed"]
        history = [entry["release"] for entry in self.state.get("history", [])]
        return bool(committed) and desired.get("rollback_from") == committed["release"] and release in history

    def _refuse(self, release: str, reason: str) -> UpdateRefused:
        self.state["refused"][release] = reason
        self._save()
        return UpdateRefused(reason)

    # ---- health ----------------------------------------------------------------------------
    def health_check(self, slot: Path, manifest: dict) -> tuple[bool, str]:
        """The engine loads; the shipped graph reproduces the golden outputs; the personal model
        answers within the latency budget; local validation is not worse than the previous model."""
        from .engines import latency_ms, prepare_engine

        shapes = {name: tuple(shape) for name, shape in manifest["model"]["input_spec"].items()}
        cache = self.dir / "engines"
        try:
            inputs, expected = load_golden(slot, manifest)
            reference, note = prepare_engine(slot / "model.onnx", shapes, cache, self.policy.precision)
            personal, _ = prepare_engine(slot / PERSONAL, shapes, cache, self.policy.precision)
        except Exception as e:
            return False, f"the engine does not load: {e}"
        self.engine_note = note
        tolerance = manifest["golden"]["tolerance"][self.policy.precision]
        got = reference.run(inputs)
        if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=tolerance["rtol"], atol=tolerance["atol"]
        ):
            diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
            return False, f"golden outputs differ by up to {diff:.3g}"
        single = {name: value[:1] for name, value in inputs.items()}
        _, p99 = latency_ms(lambda: personal.run(single))
        if p99 > self.policy.latency_budget_ms:
            return False, f"latency p99 {p99:.1f} ms > budget {self.policy.latency_budget_ms} ms"
        if self.validation is not None:
            x, y = self.validation
            new_acc = _accuracy(personal, x, y)
            previous = self.state["committed"]
            if previous is not None:
                old, _ = prepare_engine(self.dir / "slots" / previous["slot"] / PERSONAL, shapes, cache)
                old_acc = _accuracy(old, x, y)
                if new_acc < old_acc - self.policy.max_acc_drop:
                    return False, f"local validation accuracy {new_acc:.3f} < previous {old_acc:.3f} - tolerance"
        return True, f"{note}; p99 {p99:.2f} ms"


def _reference_private(slot: Path, manifest: dict) -> dict[str, np.ndarray]:
    """A device with no fast layers of its own yet keeps the shipped starting values."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(slot / "model.onnx"))
    prefix = manifest["model"]["param_prefix"]
    wanted = {prefix + name: name for name in manifest["model"]["private_names"]}
    return {wanted[i.name]: numpy_helper.to_array(i) for i in graph.graph.initializer if i.name in wanted}


def _accuracy(engine, x: dict[str, np.ndarray], y: np.ndarray) -> float:
    return float((engine.run(x).argmax(axis=1) == y).mean())
