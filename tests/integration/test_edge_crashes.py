"""The edge daemon killed (SIGKILL) at 50 random moments, while it trains, checkpoints, stages OTA
releases and infers, and restarted each time: after every kill the state on disk recovers to a
consistent one (what the daemon's own start-up does, run here between kills): the newest
checkpoint verifies and is never older than one seen before, its fast layers match their recorded
digest, the last good model verifies, and the active OTA slot is the committed, verified release.
At the end the daemon, started once more, serves the newest release with its own fast layers."""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.checkpoints import CheckpointStore
from edge_runtime.learning import ContinualLearner
from edge_runtime.samples import SampleStore
from ota.bundle import read_manifest, verify_files
from ota.updater import Updater
from simulator.edge_fleet import (
    NUM_CLASSES,
    DaemonProcess,
    OtaService,
    device_job,
    edge_config,
    seed_archive,
    set_probe,
)

pytestmark = pytest.mark.integration
KILLS_PER_DAEMON = 25
RELEASES = 8
INJECTED_WAIT_S = 20.0
# deterministic kills where a random moment rarely lands: inside an OTA cycle, inside a checkpoint
CRASHES = (
    ("FLEETNEST_OTA_CRASH_AT", "downloading"),
    ("FLEETNEST_OTA_CRASH_AT", "staging"),
    ("FLEETNEST_OTA_CRASH_AT", "switching"),
    ("FLEETNEST_OTA_CRASH_AT", "health-checking"),
    ("FLEETNEST_EDGE_CRASH_AT", "checkpoint-files"),
    ("FLEETNEST_EDGE_CRASH_AT", "checkpoint-renamed"),
)


def consistent(state: Path, config: dict, last_seq: int) -> tuple[int, list[str]]:
    """Recover ``state`` as the daemon would and say what is wrong with it (nothing, ideally)."""
    problems = []
    store = CheckpointStore(state / "checkpoints")
    latest = store.latest()
    seq = latest.seq if latest is not None else 0
    if seq < last_seq:
        problems.append(f"checkpoint went back from {last_seq} to {seq}")
    if latest is not None:
        learner = ContinualLearner(state, config, NUM_CLASSES, SampleStore(state / "samples", 200))
        learner.recover()  # raises if the fast layers do not match their digest
        if not learner.fast_layers():
            problems.append("no fast layers after recovery")
    models = state / "models"
    if (models / "previous.json").exists() or (models / "good.json").exists():
        import hashlib

        pairs = []
        for name in ("good", "previous"):
            try:
                meta = json.loads((models / f"{name}.json").read_text())
                pairs.append(hashlib.sha256((models / f"{name}.onnx").read_bytes()).hexdigest() == meta["sha256"])
            except (OSError, ValueError, KeyError):
                pairs.append(False)
        if not any(pairs):
            problems.append("no model on disk verifies")
    if (state / "ota" / "state.json").exists():
        updater = Updater(state / "ota", None, None, "all")  # recovery needs neither client nor profile
        updater.recover()
        committed = updater.state["committed"]
        if committed is not None:
            if updater.active_slot() != committed["slot"]:
                problems.append(f"active slot {updater.active_slot()} is not the committed {committed['slot']}")
            verify_files(updater.current, read_manifest(updater.current))
    return seq, problems


def test_sigkill_at_random_moments_always_resumes_from_a_consistent_state(tmp_path):
    job = device_job(tmp_path / "job.json")
    config = json.loads(job.read_text())["config"]
    archive = seed_archive(tmp_path / "archive", json.loads(job.read_text()), versions=RELEASES)
    ota = OtaService(tmp_path / "ota", (("all", 1.0),))
    releases = [ota.publish(archive, version) for version in range(1, RELEASES + 1)]
    probe = tmp_path / "probe.json"
    set_probe(probe, idle=True, charging=True)
    ota.target("all", releases[0])
    rng = random.Random(20261125)
    lock = threading.Lock()
    results: dict[str, list] = {}

    def cycle(device: str, index: int) -> None:
        try:
            kill_and_check(device, index)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures.append(f"{device}: {err}")

    def kill_and_check(device: str, index: int) -> None:
        cfg = edge_config(tmp_path, device, index, job, probe, ota=ota, min_interval_s=0.2, steps=10)
        state, trace = cfg.parent / "state", cfg.parent / "trace.txt"
        last_seq, kills = 0, []
        for k in range(KILLS_PER_DAEMON):
            env = {"FLEETNEST_EDGE_TRACE": str(trace)}
            variable = None
            with lock:
                delay = rng.uniform(0.1, 2.5)
                if k % 3 == 2:
                    variable, phase = CRASHES[(k // 3) % len(CRASHES)]
                    env[variable] = phase
            daemon = DaemonProcess(cfg, env).start()
            try:
                assert daemon.wait_for(f"(start {k + 1})", 90), daemon.text()[-2000:]
                if variable == "FLEETNEST_EDGE_CRASH_AT":
                    # a checkpoint comes with every micro-update: wait for the daemon to kill itself there
                    # (a random delay on a loaded machine can end the run before the first one); an OTA
                    # phase comes only with a new release, so those kills keep the random delay
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        daemon.process.wait(timeout=INJECTED_WAIT_S)
                else:
                    time.sleep(delay)
            finally:
                daemon.kill()
            with open(trace, "a") as f:
                f.write(f"KILL {k}\n")
            seq, problems = consistent(state, config, last_seq)
            assert not problems, (device, k, problems)
            last_seq = seq
            kills.append(seq)
            if device == "robot-1" and k % 3 == 1:  # a new release before every injected crash
                ota.target("all", releases[min(k // 3 + 1, RELEASES - 1)])
        results[device] = kills

    failures: list[str] = []
    threads = [threading.Thread(target=cycle, args=(d, i)) for i, d in enumerate(("robot-1", "robot-2"), 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not failures, failures
        assert sum(len(k) for k in results.values()) >= 50
        # what the kills interrupted, from the phases each daemon noted before it died
        hit = {"learning": 0, "checkpoint": 0, "ota": 0, "inference": 0}
        for device in results:
            text = (tmp_path / device / "trace.txt").read_text()
            for block in text.split("KILL")[:-1]:
                last = {}
                for line in block.strip().splitlines():
                    parts = line.split()
                    if len(parts) == 3:
                        last[parts[1]] = parts[2]
                hit["learning"] += last.get("learning", "") in ("micro-update", "checkpoint", "checkpoint-files")
                hit["checkpoint"] += last.get("learning", "").startswith("checkpoint-") and not last[
                    "learning"
                ].endswith("done")
                hit["ota"] += bool(
                    re.match(r"ota-(downloading|verifying|staging|switching|health)", last.get("ota", ""))
                )
                hit["inference"] += last.get("inference") == "inference"
        assert all(hit[k] > 0 for k in hit), hit
        # and once more, undisturbed: the newest release (with the device's own fast layers where
        # its held-out samples support them)
        ota.target("all", releases[-1])
        daemon = DaemonProcess(edge_config(tmp_path, "robot-1", 1, job, probe, ota=ota)).start()
        try:
            assert daemon.wait_for(f"serving {releases[-1]}", 120), daemon.text()[-3000:]
        finally:
            assert daemon.stop() == 0
        print(f"kills: {sum(len(k) for k in results.values())}, interrupted: {hit}")
    finally:
        ota.close()
