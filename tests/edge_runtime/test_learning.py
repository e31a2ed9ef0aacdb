"""Learning on the device: the gate lets a micro-update run only while the probe says idle and
charging and stops one at once when that changes, leaving the checkpoint as it was; the sample
store stays within its bound, evicts as configured and survives a restart; Jetson sysfs is read
as the kernel lays it out."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config import EdgeConfig
from edge_runtime.learning import STATE, ContinualLearner
from edge_runtime.runtime import EdgeRuntime, fast_layers_win
from edge_runtime.samples import SampleError, SampleStore
from edge_runtime.scheduler import FileProbe, JetsonProbe, MicroUpdateGate
from simulator.edge_fleet import NUM_CLASSES, OtaService, device_job, edge_config, seed_archive, set_probe
from simulator.fleets import sensor_stream


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    return json.loads(device_job(tmp_path_factory.mktemp("job") / "job.json").read_text())


def _filled(store: SampleStore, n: int, index: int = 1) -> SampleStore:
    stream = sensor_stream(index, dataset="digits", num_devices=8)
    for _ in range(n):
        x, y = next(stream)
        store.add(x, y)
    return store


def _learner(tmp_path: Path, job: dict, steps: int = 20) -> ContinualLearner:
    store = _filled(SampleStore(tmp_path / "samples", 120), 80)
    return ContinualLearner(tmp_path, job["config"], NUM_CLASSES, store, steps=steps, min_samples=40)


def _checkpoint_bytes(learner: ContinualLearner) -> tuple[int, bytes]:
    latest = learner.store.latest()
    assert latest is not None
    return latest.seq, latest.read(STATE)


@pytest.mark.parametrize(("idle", "charging"), [(False, True), (True, False), (False, False)])
def test_no_micro_update_starts_while_busy_or_not_charging(tmp_path, job, idle, charging):
    probe = tmp_path / "probe.json"
    set_probe(probe, idle, charging)
    gate = MicroUpdateGate(FileProbe(probe), budget_s=60)
    learner = _learner(tmp_path, job)
    learner.ensure_learner()
    before = _checkpoint_bytes(learner)
    may, why = gate.may_start()
    assert not may and f"idle={idle} charging={charging}" in why
    assert _checkpoint_bytes(learner) == before and learner.micro_updates == 0


def test_a_missing_or_malformed_probe_reads_as_busy(tmp_path):
    probe = tmp_path / "probe.json"
    assert not FileProbe(probe).read().may_learn
    probe.write_text('{"idle": "yes", "charging": true}')
    conditions = FileProbe(probe).read()
    assert not conditions.may_learn and "boolean" in conditions.why


def test_an_interrupted_micro_update_leaves_the_previous_checkpoint_intact(tmp_path, job):
    probe = tmp_path / "probe.json"
    set_probe(probe, True, True)
    gate = MicroUpdateGate(FileProbe(probe), budget_s=60, recheck_s=0.0)
    learner = _learner(tmp_path, job, steps=100_000)  # far more steps than it will get to run
    assert "micro-update 1" in _learner(tmp_path / "warm", job).micro_update(lambda: None)
    learner.ensure_learner()
    seq, data = _checkpoint_bytes(learner)
    fast_before = learner.fast_layers()
    timer = threading.Timer(1.0, set_probe, (probe, False, True))  # the robot starts moving
    timer.start()
    note = learner.micro_update(gate.watch())
    timer.join()
    assert "interrupted" in note and "idle=False" in note
    assert _checkpoint_bytes(learner) == (seq, data)
    after = learner.fast_layers()  # the partial update was dropped in memory too
    assert all(np.array_equal(fast_before[k], after[k]) for k in fast_before)
    assert learner.micro_updates == 0


def test_a_micro_update_stops_at_its_time_budget(tmp_path, job):
    probe = tmp_path / "probe.json"
    set_probe(probe, True, True)
    gate = MicroUpdateGate(FileProbe(probe), budget_s=0.5)
    learner = _learner(tmp_path, job, steps=100_000)
    learner.ensure_learner()
    before = _checkpoint_bytes(learner)
    assert "time budget" in learner.micro_update(gate.watch())
    assert _checkpoint_bytes(learner) == before


def test_a_completed_micro_update_is_checkpointed_and_recovered_with_its_fast_layers(tmp_path, job):
    learner = _learner(tmp_path, job)
    assert "micro-update 1: 20 steps" in learner.micro_update(lambda: None)
    fast = learner.fast_layers()
    again = ContinualLearner(tmp_path, job["config"], NUM_CLASSES, SampleStore(tmp_path / "samples", 120))
    assert "1 micro-updates" in again.recover()
    recovered = again.fast_layers()
    assert sorted(recovered) == sorted(fast) and all(np.array_equal(fast[k], recovered[k]) for k in fast)
    assert len(again.samples) == 80


def test_the_store_is_bounded_and_evicts_the_oldest(tmp_path):
    store = _filled(SampleStore(tmp_path, capacity=30, policy="oldest"), 75)
    assert len(store) == 30 and store.evicted == 45
    assert sorted(store.seq.tolist()) == list(range(45, 75))
    store.save()
    again = SampleStore(tmp_path, capacity=30)
    assert again.seq.tolist() == store.seq.tolist() and again.seen == 75


def test_least_useful_eviction_keeps_what_the_model_still_gets_wrong(tmp_path):
    store = _filled(SampleStore(tmp_path, capacity=10, policy="least-useful"), 10)
    store.set_scores(np.arange(10), np.array([5.0, 0.1, 3.0, 0.2, 4.0, 6.0, 0.3, 7.0, 8.0, 9.0]))
    _filled(store, 3, index=2)  # three new (unscored) samples push out the three best-known ones
    assert sorted(store.seq.tolist()) == [0, 2, 4, 5, 7, 8, 9, 10, 11, 12]


def test_least_useful_eviction_keeps_held_out_samples_at_their_share(tmp_path):
    """Held-out samples (every 5th, never trained on) are never scored: without their own rule they
    outlast every scored training sample and end up filling the store."""
    store = SampleStore(tmp_path, capacity=50, policy="least-useful", holdout_every=5)
    stream = sensor_stream(1, dataset="digits", num_devices=8)
    for _ in range(100):  # 10 samples at a time, the training ones scored as a micro-update would
        for _ in range(10):
            store.add(*next(stream))
        train = store.seq[store.seq % 5 != 0]
        store.set_scores(train, np.full(len(train), 0.1))
    held = store.seq % 5 == 0
    assert len(store) == 50 and held.sum() <= 10, held.sum()
    assert store.seq[held].min() > store.seen - 100  # the held-out ones kept are recent


def test_the_store_refuses_a_sample_of_another_shape_or_with_a_nan(tmp_path):
    store = _filled(SampleStore(tmp_path, capacity=10), 2)
    with pytest.raises(SampleError, match="shape"):
        store.add({"vision": np.zeros((1, 4, 4), np.float32)}, 1)
    with pytest.raises(SampleError, match="finite"):
        store.add({"vision": np.full((1, 8, 8), np.nan, np.float32)}, 1)
    with pytest.raises(SampleError, match="modalities"):
        store.add({"imu": np.zeros((6, 50), np.float32)}, 1)
    assert len(store) == 2


def _sysfs(root: Path, supplies: dict[str, dict[str, str]], gpu: str | None, load: str) -> tuple[Path, Path]:
    for name, files in supplies.items():
        folder = root / "sys" / "class" / "power_supply" / name
        folder.mkdir(parents=True)
        for key, value in files.items():
            (folder / key).write_text(value + "\n")
    if gpu is not None:
        gpu_file = root / "sys" / "devices" / "platform" / "bus@0" / "17000000.gpu" / "load"
        gpu_file.parent.mkdir(parents=True)
        gpu_file.write_text(gpu + "\n")
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "loadavg").write_text(load + " 0.50 0.40 1/300 4242\n")
    (root / "sys").mkdir(exist_ok=True)
    return root / "sys", root / "proc"


@pytest.mark.parametrize(
    ("supplies", "gpu", "load", "idle", "charging"),
    [
        ({"ucsi-source-psy-USBC000:001": {"type": "USB", "online": "1"}}, "35", "0.40", True, True),
        ({"battery": {"type": "Battery", "status": "Discharging"}}, "35", "0.40", True, False),
        ({"battery": {"type": "Battery", "status": "Charging"}}, "850", "0.40", False, True),
        (
            {"battery": {"type": "Battery", "status": "Full"}, "ac": {"type": "Mains", "online": "0"}},
            "0",
            "3.9",
            False,
            True,
        ),
        ({}, None, "0.1", True, True),  # a developer kit on its barrel jack: no supply in sysfs
    ],
)
def test_the_jetson_probe_reads_sysfs(tmp_path, supplies, gpu, load, idle, charging):
    sysfs, proc = _sysfs(tmp_path, supplies, gpu, load)
    conditions = JetsonProbe(sysfs, proc, cpus=4).read()
    assert (conditions.idle, conditions.charging) == (idle, charging), conditions.why


def test_the_jetson_probe_assumes_battery_when_told(tmp_path):
    sysfs, proc = _sysfs(tmp_path, {}, "0", "0.1")
    assert not JetsonProbe(sysfs, proc, no_supply="battery", cpus=4).read().charging


def test_the_daemon_learns_only_while_the_probe_says_idle_and_charging(tmp_path, job):
    from simulator.edge_fleet import DaemonProcess, edge_config

    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    probe = tmp_path / "probe.json"
    set_probe(probe, idle=False, charging=True)  # the robot is moving
    daemon = DaemonProcess(edge_config(tmp_path, "robot-3", 3, job_path, probe, min_interval_s=0.2)).start()
    checkpoints = tmp_path / "robot-3" / "state" / "checkpoints"
    try:
        assert daemon.wait_for("no micro-update: idle=False charging=True", 90), daemon.text()[-2000:]
        time.sleep(4)  # well past min_samples at 20 Hz
        assert not list(checkpoints.glob("ck-*")) and "micro-update 1" not in daemon.text()
        set_probe(probe, idle=True, charging=False)  # parked, not on the charger
        time.sleep(2)
        assert not list(checkpoints.glob("ck-*"))
        set_probe(probe, idle=True, charging=True)
        assert daemon.wait_for("micro-update 1: 20 steps", 30), daemon.text()[-2000:]
    finally:
        assert daemon.stop() == 0


def test_a_rollback_returns_the_learner_to_the_last_checkpoint_marked_good(tmp_path, job):
    learner = _learner(tmp_path, job)
    assert "micro-update 1" in learner.micro_update(lambda: None)
    learner.mark_good()
    good_seq, good_fast = learner.checkpoint_seq, learner.fast_layers()
    assert "micro-update 2" in learner.micro_update(lambda: None)
    changed = learner.fast_layers()
    assert any(not np.array_equal(good_fast[k], changed[k]) for k in good_fast)
    assert learner.rollback_to_good() == f"rolled back to good checkpoint {good_seq}"
    back = learner.fast_layers()
    assert all(np.array_equal(good_fast[k], back[k]) for k in good_fast) and learner.micro_updates == 1
    again = ContinualLearner(tmp_path, job["config"], NUM_CLASSES, SampleStore(tmp_path / "samples", 120))
    assert f"checkpoint {good_seq}" in again.recover()  # and a restart starts from it


def _poison_fast_layers(learner: ContinualLearner) -> None:
    """What a diverged update leaves behind: fast layers that are not finite."""
    nested = learner.learner
    assert nested is not None
    for model in {id(nested.model): nested.model, id(nested.served): nested.served}.values():
        for name, parameter in model.named_parameters():
            if name in nested.private_names:
                parameter.data.fill_(float("nan"))


def test_a_diverged_micro_update_rolls_back_to_the_last_good_checkpoint(tmp_path, job):
    learner = _learner(tmp_path, job)
    assert "micro-update 1" in learner.micro_update(lambda: None)
    learner.mark_good()
    good_seq, good_fast = learner.checkpoint_seq, learner.fast_layers()
    _poison_fast_layers(learner)
    note = learner.micro_update(lambda: None)
    assert "diverged" in note and f"rolled back to good checkpoint {good_seq}" in note, note
    back = learner.fast_layers()
    assert all(np.array_equal(good_fast[k], back[k]) for k in good_fast)


@contextlib.contextmanager
def _runtime_serving_a_release(tmp_path: Path, job: dict):
    """A real runtime with a signed release installed and its learner built after one micro-update
    on 80 samples (16 of them held out): (runtime, release)."""
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    archive = seed_archive(tmp_path / "archive", job)
    ota = OtaService(tmp_path / "ota", (("all", 1.0),))
    try:
        release = ota.publish(archive, 1)
        ota.target("all", release)
        probe = tmp_path / "probe.json"
        set_probe(probe, idle=True, charging=True)
        path = edge_config(tmp_path, "robot-1", 1, job_path, probe, ota=ota, min_interval_s=0.0)
        runtime = EdgeRuntime(EdgeConfig.load(path), threading.Event())
        runtime.recover()
        runtime._ota_once()  # the release installed, served as shipped (no learner yet)
        assert runtime.updater.state["committed"] is not None
        _filled(runtime.samples, 80)
        runtime._learn_once()  # the learner built, one micro-update, its model checked and served
        assert runtime.learner.micro_updates == 1
        yield runtime, release
    finally:
        ota.close()


def _served_decision(runtime: EdgeRuntime, release: str) -> dict:
    """The serving decision, checked against what serves: the fast layers are installed exactly when
    the decision says so."""
    decision, label = runtime.serving_decision, runtime.models.label
    assert decision["holdout_samples"] == len(runtime.learner.holdout()) > 0
    assert label.startswith(release) and ("+fast" in label) == (decision["serves"] == f"{release}+fast"), label
    return decision


def test_fast_layers_whose_model_answers_nan_are_rolled_back_while_the_good_model_serves(tmp_path, job):
    with _runtime_serving_a_release(tmp_path, job) as (runtime, release):
        learner = runtime.learner
        _served_decision(runtime, release)
        good_seq, good_fast, served = learner.checkpoint_seq, learner.fast_layers(), runtime.models.label
        assert learner.store._pointer("good.json") == good_seq

        _poison_fast_layers(learner)
        learner.checkpoint("poisoned")  # written, as a finished update would be, then judged
        rejected = runtime.models.rejected
        runtime._judge_fast_layers(learner)
        assert runtime.models.rejected == rejected + 1 and runtime.models.label == served
        assert learner.checkpoint_seq == good_seq and learner.store.latest().seq == good_seq
        back = learner.fast_layers()
        assert all(np.array_equal(good_fast[k], back[k]) for k in good_fast)
        out = runtime.models.infer({name: value[:1] for name, value in runtime._probe_feeds.items()})
        assert out is not None and np.isfinite(out).all()


def test_finite_fast_layers_whose_outputs_overflow_are_rolled_back_not_marked_good(tmp_path, job):
    """Weights of 3e38 are finite (they pass ``personalize``) but the model answers inf and NaN: the
    held-out scoring refuses them and the learner goes back to its last good checkpoint."""
    with _runtime_serving_a_release(tmp_path, job) as (runtime, release):
        learner = runtime.learner
        good_seq, good_fast, served = learner.checkpoint_seq, learner.fast_layers(), runtime.models.label
        nested = learner.learner
        for model in {id(nested.model): nested.model, id(nested.served): nested.served}.values():
            for name, parameter in model.named_parameters():
                if name in nested.private_names:
                    parameter.data.fill_(3e38)
        learner.checkpoint("overflowing")
        rejected = runtime.models.rejected
        runtime._judge_fast_layers(learner)
        assert runtime.models.rejected == rejected + 1 and "not finite" in str(runtime.models.last_rejection)
        assert runtime.models.label == served and learner.store._pointer("good.json") == good_seq
        back = learner.fast_layers()
        assert all(np.array_equal(good_fast[k], back[k]) for k in good_fast)


def test_a_restarted_learner_decides_on_its_stored_held_out_samples_at_once(tmp_path, job):
    learner = _learner(tmp_path, job)
    assert "micro-update 1" in learner.micro_update(lambda: None)
    held = learner.holdout()
    again = ContinualLearner(tmp_path, job["config"], NUM_CLASSES, learner.samples, min_samples=40)
    again.recover()
    assert held is not None and again.holdout() is not None
    assert np.array_equal(again.holdout().y, held.y)  # before any micro-update after the restart


def test_fast_layers_serve_only_when_they_get_more_held_out_samples_right_with_a_significant_loss_gain():
    rng = np.random.default_rng(0)
    right, loss = np.ones(40, bool), rng.uniform(0.2, 0.4, 40)
    sharper = (right, loss * 0.5)  # as many right, every loss lower: a confident head, not a better one
    assert not fast_layers_win((right, loss), sharper)
    fewer = right.copy()
    fewer[:3] = False
    assert fast_layers_win((fewer, loss), sharper)  # three more right, and the loss gain significant
    assert not fast_layers_win((fewer, loss), (right, loss + rng.normal(0, 0.3, 40)))  # noise, not a gain


def test_fast_layers_that_lose_on_the_held_out_samples_are_not_served_the_release_is(tmp_path, job):
    """The attack: fast layers that are finite and pass every model check but answer one class the
    held-out samples never have (a bad micro-update, a biased owner's data). Served as before, they
    would take the robot below the release it was sent."""
    with _runtime_serving_a_release(tmp_path, job) as (runtime, release):
        learner = runtime.learner
        nested = learner.learner
        absent = sorted(set(range(NUM_CLASSES)) - set(learner.holdout().y.tolist()))[0]
        for model in {id(nested.model): nested.model, id(nested.served): nested.served}.values():
            for name, parameter in model.named_parameters():
                if name.startswith("adapters.head.") and name in nested.private_names:
                    parameter.data.zero_()
                    if name.endswith("bias"):
                        parameter.data[absent] = 1e3
        learner.checkpoint("biased")
        runtime._judge_fast_layers(learner)
        decision = _served_decision(runtime, release)
        assert decision["holdout_acc_with_fast_layers"] == 0.0 and decision["serves"] == release
        assert runtime.models.label.startswith(f"{release} (")  # the release as shipped, on its engine
        assert learner.store._pointer("good.json") == learner.checkpoint_seq  # the learning is kept


def test_the_device_decides_on_its_rolling_held_out_buffer_and_trains_no_personal_model(tmp_path, job):
    learner = _learner(tmp_path, job)
    assert learner.ensure_learner()
    nested = learner.learner
    _, _, seq = learner.samples.snapshot()
    assert len(nested.holdout) == int((seq % 5 == 0).sum()) > 0  # every 5th sample: never trained on
    assert len(nested.train_set) + len(nested.holdout) == len(seq)
    learner.micro_update(lambda: None)
    slow = nested.initial_slow()
    learner.merge_global({k: v + 0.01 for k, v in slow.items()}, 1)
    # what it may serve is the release's graph with its fast layers: no personal model is trained
    assert nested.personal is None and nested.serving in {"nested", "shared"}
    assert nested.decision["holdout_samples"] == len(nested.holdout)
