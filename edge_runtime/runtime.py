"""Everything the daemon runs, put together: sensors -> inference (+ the sample store), continual
learning (micro-updates when idle and charging; private slow deltas when the leaf asks), OTA
(the signed updater, mission lock respected), telemetry.

Three workers, each a thread with a heartbeat:

- ``inference``: one sample from the sensors at ``rate_hz``, inferred by the served model (latency
  monitored), stored for learning;
- ``learning``: polls the leaf (``fleet``) and runs micro-updates the gate allows; after each, the
  served model is re-made with the new fast layers (checked before it serves);
- ``ota``: an update cycle every ``poll_s`` or on an MQTT hint; an installed release is merged
  under the device's fast layers and served.

The main loop (``EdgeDaemon``) pets the watchdog only while every worker's heartbeat is recent,
so a hung worker gets the service restarted by systemd. Startup recovers every part first: the
newest verified checkpoint, the OTA state (an interrupted switch is rolled back), the last good
model. A part that cannot start (no model yet, the broker away, a bad release) is reported and the
rest runs on: the device keeps inferring with what it has.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

from app_custom.durable import crash_trace as trace
from app_custom.nested.device_data import import_function
from app_custom.nested.learner import better_kind

from .config import EdgeConfig, EdgeConfigError
from .inference import BadOutputs, ModelCheckFailed, ModelServer, held_out_outcomes
from .learning import TEST_EVERY, ContinualLearner
from .samples import SampleError, SampleStore
from .scheduler import MicroUpdateGate, make_probe
from .telemetry import HealthPublisher, Metrics
from .unit import IDENTITY_FILES, identity_dir

log = logging.getLogger("fleetnest.edge")
STALL_S = {"inference": 60.0, "learning": 600.0, "ota": 1800.0}


def _check_files(config: EdgeConfig) -> dict | None:
    """The files the configuration names, read and checked before anything starts: an
    ``EdgeConfigError`` naming the setting and the file; the device job (if learning) returned."""
    job = None
    learning, ota, fleet = config.section("learning"), config.section("ota"), config.section("fleet")
    if learning:
        path = Path(learning["job_config"])
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise EdgeConfigError(f"learning.job_config: cannot read {path}: {err}") from err
        missing = {"config", "privacy"} - set(job) if isinstance(job, dict) else {"config", "privacy"}
        if missing:
            raise EdgeConfigError(f"learning.job_config: {path} lacks {sorted(missing)} (job.py --print-device-config)")
        try:
            from app_custom.nested.config import NestedConfig

            NestedConfig.from_dict(job["config"])
        except ValueError as err:
            raise EdgeConfigError(f"learning.job_config: {path}: {err}") from err
    if ota:
        try:
            json.loads(Path(ota["root"]).read_bytes())
        except (OSError, ValueError) as err:
            raise EdgeConfigError(f"ota.root: cannot read the trusted root metadata {ota['root']}: {err}") from err
    for name in ("ota", "telemetry"):
        section = config.section(name)
        for setting in ("ca_file", "cert_file", "key_file"):
            if section and section[setting] and not Path(section[setting]).is_file():
                raise EdgeConfigError(f"{name}.{setting}: {section[setting]} does not exist")
    if fleet:
        identity = identity_dir(Path(fleet["identity"]))
        # the key and certificate (or systemd's credentials), and the device CA that checks the
        # routing proxy and the peers' secure-aggregation keys
        for name in IDENTITY_FILES:
            if not (identity / name).is_file():
                raise EdgeConfigError(f"fleet.identity: {identity / name} does not exist")
    return job


def _tls(section: dict):
    """The section's TLS files (``ota.tls.TlsFiles``), or None when it sets none (plain: development)."""
    if not (section["ca_file"] or section["cert_file"]):
        return None
    from ota.tls import TlsFiles

    paths = [Path(section[name]) if section[name] else None for name in ("ca_file", "cert_file", "key_file")]
    return TlsFiles(*paths)


class Worker:
    def __init__(self, name: str, body, stop: threading.Event) -> None:
        self.name, self.body, self.stop = name, body, stop
        self.beat = time.monotonic()
        self.note = "starting"
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.beat = time.monotonic()
            try:
                wait = self.body()
            except Exception as err:  # noqa: BLE001 - a worker outlives one bad pass; the log says why
                log.exception("%s worker: %s", self.name, err)
                self.note = f"error: {type(err).__name__}: {err}"
                wait = 5.0
            self.beat = time.monotonic()
            if wait:
                self.stop.wait(wait)


def fast_layers_win(release: tuple[np.ndarray, np.ndarray], with_fast: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether held-out outcomes (per sample: right or not, loss) say to serve the release with the
    device's fast layers: more samples right than the release as shipped, with a lower loss that a
    paired test finds significant (``better_kind``, the rule by which the learner switches kinds, and
    strictly more right: the release is the fleet's validated default, and a lower loss on a buffer
    both got all right cost a demo robot 2 points on its test data)."""
    return int(with_fast[0].sum()) > int(release[0].sum()) and better_kind(release, with_fast)


class EdgeRuntime:
    def __init__(self, config: EdgeConfig, stop: threading.Event) -> None:
        self.config, self.stop = config, stop
        self.job = _check_files(config)
        state = config.state_dir
        inference = config.sections["inference"]
        self.models = ModelServer(state, inference["latency_budget_ms"], inference["window"])
        self.sensor_cfg = config.section("sensor")
        self.learning_cfg = config.section("learning")
        self.samples: SampleStore | None = None
        self.learner: ContinualLearner | None = None
        self.gate: MicroUpdateGate | None = None
        self.fleet = None
        self.updater = self.agent = self.link = None
        self.health: HealthPublisher | None = None
        self.metrics: Metrics | None = None
        self.workers: list[Worker] = []
        self.learning_note = "off"
        self.ota_note = "off"
        self._sensor = None
        self._probe_feeds: dict[str, np.ndarray] | None = None
        self._last_report = 0.0
        self._last_served = ""
        # what the device serves of the installed release, and the held-out figures it decided on
        self.serving_decision: dict = {}
        self._told_decision: dict = {}
        self._serve_lock = threading.RLock()

    # ---- startup ----------------------------------------------------------------------------
    def recover(self) -> str:
        config, state, notes = self.config, self.config.state_dir, []
        if self.learning_cfg:
            cfg = self.learning_cfg
            try:
                self.samples = SampleStore(
                    state / "samples", cfg["capacity"], cfg["eviction"], holdout_every=TEST_EVERY
                )
            except SampleError as err:
                log.error("%s", err)
                notes.append(str(err))
                self.samples = SampleStore(
                    state / "samples", cfg["capacity"], cfg["eviction"], holdout_every=TEST_EVERY
                )
            job = self.job
            self.learner = ContinualLearner(
                state, job["config"], cfg["num_classes"], self.samples, cfg["steps"], cfg["min_samples"]
            )
            notes.append(self.learner.recover())
            self.gate = MicroUpdateGate(make_probe(cfg["probe"]), cfg["budget_s"], cfg["min_interval_s"])
            fleet = config.section("fleet")
            if fleet:
                self._start_fleet(job, fleet)
        ota = config.section("ota")
        if ota:
            notes.append(self._start_ota(ota))
        notes.append(self.models.recover())
        if self.models.engine is None:
            self._serve_latest()
        telemetry = config.section("telemetry")
        if telemetry:
            self._start_telemetry(telemetry)
        return "; ".join(notes)

    def _start_fleet(self, job: dict, fleet: dict) -> None:
        from .fleet_device import DeviceIdentity, FleetClient, FleetDevice

        learner = self.learner
        assert learner is not None
        if not learner.ensure_learner():
            return  # built later, once the store holds enough samples
        device = FleetDevice(
            self.config.device_id,
            job["config"],
            None,
            job["privacy"],
            0,
            self.config.state_dir / "fleet",
            learner=learner.learner,
            persist=lambda: learner.checkpoint("fleet session"),
        )
        identity = DeviceIdentity(identity_dir(Path(fleet["identity"])))
        self.fleet = FleetClient(device, fleet["proxy"], identity, fleet["job"])

    def _start_ota(self, ota: dict) -> str:
        from ota.agent import DeviceAgent
        from ota.bundle import DeviceProfile
        from ota.client import ReleaseClient
        from ota.engines import l4t_release, tensorrt_status
        from ota.layout import RUNTIME_VERSION
        from ota.updater import HealthPolicy, Updater

        directory = self.config.state_dir / "ota"
        client = ReleaseClient(ota["repository"], directory, Path(ota["root"]).read_bytes(), tls=_tls(ota))
        trt, _ = tensorrt_status()
        l4t = l4t_release()
        profile = DeviceProfile(
            ota["device_class"],
            RUNTIME_VERSION,
            int(l4t.split(".")[0]) if l4t[0].isdigit() else None,
            getattr(trt, "__version__", None),
        )
        ring = ota.get("ring")
        if ring is None:
            try:
                ring = client.ring(self.config.device_id)
            except Exception as err:  # noqa: BLE001 - the repository away: retried by the OTA worker
                self.ota_note = f"repository unreachable ({err})"
                ring = None
        budget = self.config.sections["inference"]["latency_budget_ms"]
        self.updater = Updater(directory, client, profile, ring or "", policy=HealthPolicy(latency_budget_ms=budget))
        self.ota_ring, self.ota_poll = ring, ota["poll_s"]
        self._ota_client = client
        self.agent = DeviceAgent(self.config.device_id, ring or "", self.updater, None, ota["poll_s"])
        recovered = self.updater.recover()
        committed = self.updater.state.get("committed")
        return recovered or f"OTA: {committed['release'] if committed else 'no release installed'}"

    def _start_telemetry(self, telemetry: dict) -> None:
        from ota.mqtt import DeviceLink

        if telemetry["mqtt_host"]:
            ring = getattr(self, "ota_ring", None) or "none"
            self.link = DeviceLink(
                telemetry["mqtt_host"],
                telemetry["mqtt_port"],
                self.config.device_id,
                ring,
                telemetry["prefix"],
                tls=_tls(telemetry),
            ).start()
            if self.agent is not None:
                self.agent.link = self.link
        if self.link is not None:
            self.health = HealthPublisher(self.link, telemetry["prefix"], self.config.device_id, telemetry["buffer"])
        self.metrics = Metrics(telemetry["metrics_port"])
        self.report_every = telemetry["interval_s"]

    # ---- the served model -------------------------------------------------------------------
    def _serve_latest(self) -> str:
        """Serve the installed release, with this device's fast layers where its held-out samples
        support them (``_with_fast_layers``), else the learner's own model. One at a time: the
        learning and OTA workers both call it."""
        with self._serve_lock:
            return self._serve_latest_locked()

    def _serve_latest_locked(self) -> str:
        updater, learner = self.updater, self.learner
        current = updater.current if updater is not None else None
        if current is not None and current.exists():
            from ota.bundle import BundleError, NonFiniteWeights, load_golden, personalize, read_manifest

            manifest = read_manifest(current)
            # the fast layers and the held-out buffer of one learner state
            fast, holdout = learner.fast_and_holdout() if learner is not None else (None, None)
            label = f"{manifest['release']}+fast" if fast else manifest["release"]
            try:
                graph = personalize(current, manifest, fast) if fast else None
                inputs, _ = load_golden(current, manifest)
                self._probe_feeds = inputs
                decision: dict = {}
                if graph is None:
                    data = (current / "model.personal.onnx").read_bytes()
                else:
                    data, label, decision = self._with_fast_layers(
                        current, graph.SerializeToString(), manifest["release"], holdout
                    )
            except NonFiniteWeights as err:  # broken fast layers: the learner rolls back
                return self.models.refuse(label, BadOutputs(str(err)))
            except BadOutputs as err:  # fast layers whose outputs are broken: the learner rolls back
                return self.models.refuse(label, err)
            except BundleError as err:  # fast layers that do not fit this release: the served model stays
                return self.models.refuse(label, ModelCheckFailed(str(err)))
            if self.models.serves(data):
                note = f"serving {self.models.label} (unchanged)"
            else:
                trace("offer-model")
                note = self.models.offer(data, label, inputs, manifest["model"]["num_classes"])
            if self.models.serves(data):  # the decision of what serves, not of a refused candidate
                self.serving_decision = decision
            return note
        if learner is not None and learner.learner is not None:
            self.models.serve_local(learner.learner.served, list(learner.learner.model.modalities))
            return f"serving {self.models.label}"
        return "no model to serve yet"

    def _with_fast_layers(self, current: Path, graph: bytes, release: str, holdout) -> tuple[bytes, str, dict]:
        """(graph, label, decision) to serve: the release with this device's fast layers only where
        they win on its held-out samples (``fast_layers_win``); else the release as shipped. Scored
        by onnxruntime on the two graphs as built (in FP32, also where TensorRT serves). Fast layers
        whose outputs are not finite raise ``BadOutputs``; a scoring that fails otherwise serves the
        release as shipped."""
        shipped = (current / "model.onnx").read_bytes()
        if holdout is None:
            return shipped, release, {"serves": release, "why": "no held-out samples yet", "holdout_samples": 0}
        mine = held_out_outcomes(graph, holdout)  # BadOutputs propagates: the fast layers are rolled back
        try:
            alone = held_out_outcomes(shipped, holdout)
        except Exception as err:  # noqa: BLE001 - the shipped graph passed its health check: serve it
            log.warning("cannot score %s on the held-out samples (%s): serving it as shipped", release, err)
            return shipped, release, {"serves": release, "why": str(err)[:200], "holdout_samples": len(holdout)}
        take = fast_layers_win(alone, mine)
        decision = {
            "serves": f"{release}+fast" if take else release,
            "holdout_samples": len(holdout),
            "holdout_acc_release": round(float(alone[0].mean()), 4),
            "holdout_acc_with_fast_layers": round(float(mine[0].mean()), 4),
        }
        if decision != self._told_decision:
            log.info("serving decision on %d held-out samples: %s", len(holdout), decision)
            self._told_decision = decision
        return (graph, f"{release}+fast", decision) if take else (shipped, release, decision)

    # ---- workers ----------------------------------------------------------------------------
    def _infer_once(self) -> float:
        if self._sensor is None:
            cfg = self.sensor_cfg
            self._sensor = iter(import_function(cfg["fn"])(**cfg["kwargs"]))
        started = time.monotonic()
        x, label = next(self._sensor)
        trace("inference")
        self.models.infer({name: value[None] for name, value in x.items()})
        if self.samples is not None and label is not None:
            try:
                self.samples.add(x, label)
            except SampleError as err:  # a bad sample is dropped; the stream goes on
                log.warning("sample dropped: %s", err)
        return max(0.0, 1.0 / self.sensor_cfg["rate_hz"] - (time.monotonic() - started))

    def _learn_once(self) -> float:
        learner, gate = self.learner, self.gate
        assert learner is not None and gate is not None
        if self.fleet is None and self.config.section("fleet") and learner.learner is not None:
            self._start_fleet(self.job, self.config.section("fleet"))
        # a session's training is learning too: joined only while idle and charging; a session
        # already joined is finished (its remaining steps are small protocol messages)
        if self.fleet is not None and (self.fleet.device.in_session or gate.probe.read().may_learn):
            trace("fleet-poll")
            wait = self.fleet.poll_once()
            if wait == 0.0:
                self.learning_note = self.fleet.last
                return 0.0
        may, why = gate.may_start()
        if not may:
            if why != self.learning_note and not why.startswith("next micro-update"):
                log.info("%s", why)
            self.learning_note = why
            return 1.0
        trace("micro-update")
        updates, seq = learner.micro_updates, learner.checkpoint_seq
        note = learner.micro_update(gate.watch(self.stop.is_set))
        gate.finished()
        trace("micro-update-done")
        if note != self.learning_note:
            log.info("%s", note)
        self.learning_note = note
        if learner.micro_updates > updates and learner.checkpoint_seq != seq:  # finished and checkpointed
            self._judge_fast_layers(learner)
        return 0.5

    def _judge_fast_layers(self, learner: ContinualLearner) -> None:
        """Serve the model with the new fast layers; they become the learner's rollback target once it
        passes its checks, and are rolled back if its outputs are broken (a candidate only too slow
        here says nothing about the weights: the learning is kept, the old model serves)."""
        rejected = self.models.rejected
        served = self._serve_latest()
        if self.models.label != self._last_served or self.models.rejected > rejected:
            log.info("%s", served)
            self._last_served = self.models.label
        if self.models.rejected == rejected:
            learner.mark_good()
        elif isinstance(self.models.last_rejection, BadOutputs):
            log.warning("%s", learner.rollback_to_good())

    def _ota_once(self) -> float:
        agent, updater = self.agent, self.updater
        assert agent is not None and updater is not None
        if not agent.ring:
            try:
                agent.ring = updater.ring = self._ota_client.ring(self.config.device_id)
            except Exception as err:  # noqa: BLE001 - retried; the device serves what it has meanwhile
                self._ota_status(f"repository unreachable ({err}); serving {self.models.label}")
                return min(self.ota_poll, 10.0)
        if self.learner is not None:
            updater.fast_layers = self.learner.fast_layers()
        trace("ota-cycle")
        outcome = agent.cycle()
        self._ota_status(f"{outcome.status} {outcome.release or ''}: {outcome.reason}"[:200])
        if outcome.status == "installed":
            from ota.bundle import load_slow, read_manifest

            manifest = read_manifest(updater.current)
            if self.learner is not None:
                slow = load_slow(updater.current, manifest)
                log.info("%s", self.learner.merge_global(slow, manifest["global_version"]))
            log.info("%s", self._serve_latest())
        deadline = time.monotonic() + self.ota_poll
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.link is not None and self.link.hint.is_set():
                self.link.hint.clear()
                break
            self.stop.wait(0.1)
        return 0.0

    def _ota_status(self, note: str) -> None:
        if note != self.ota_note:
            log.log(
                logging.WARNING if note.startswith(("repository", "unavailable")) else logging.INFO, "OTA: %s", note
            )
        self.ota_note = note

    def start(self) -> None:
        if self.sensor_cfg:
            self.workers.append(Worker("inference", self._infer_once, self.stop))
        if self.learner is not None:
            self.workers.append(Worker("learning", self._learn_once, self.stop))
        if self.agent is not None:
            self.workers.append(Worker("ota", self._ota_once, self.stop))
        for worker in self.workers:
            worker.thread.start()

    # ---- main-loop steps --------------------------------------------------------------------
    def stalled(self) -> str | None:
        """Why the watchdog must not be petted (a worker stopped beating), else None."""
        now = time.monotonic()
        for worker in self.workers:
            if now - worker.beat > STALL_S[worker.name]:
                return f"{worker.name} worker stalled for {now - worker.beat:.0f} s"
        return None

    def health_record(self) -> dict:
        monitor, learner, decision = self.models.monitor, self.learner, self.serving_decision
        committed = (self.updater.state.get("committed") or {}) if self.updater is not None else {}
        p50, p99 = monitor.percentile(50), monitor.percentile(99)
        return {
            "device": self.config.device_id,
            "at": time.time(),
            "model": self.models.label,
            "global_version": committed.get("global_version"),
            "inferences": monitor.count,
            "p50_ms": None if np.isnan(p50) else round(p50, 3),
            "p99_ms": None if np.isnan(p99) else round(p99, 3),
            "latency_alarm": monitor.alarm,
            "fallbacks": self.models.fallbacks,
            "rejected_models": self.models.rejected,
            "samples_stored": len(self.samples) if self.samples is not None else 0,
            "micro_updates": learner.micro_updates if learner is not None else 0,
            "checkpoint": learner.checkpoint_seq if learner is not None else None,
            "holdout_samples": decision.get("holdout_samples"),
            "holdout_acc_release": decision.get("holdout_acc_release"),
            "holdout_acc_with_fast_layers": decision.get("holdout_acc_with_fast_layers"),
            "ota": self.ota_note[:200],
            "learning": self.learning_note[:200],
        }

    def report(self) -> str:
        record = self.health_record()
        if self.metrics is not None:
            self.metrics.set(
                inferences=record["inferences"],
                latency_p50_ms=record["p50_ms"],
                latency_p99_ms=record["p99_ms"],
                latency_alarm=record["latency_alarm"],
                model_fallbacks=record["fallbacks"],
                models_rejected=record["rejected_models"],
                samples_stored=record["samples_stored"],
                micro_updates=record["micro_updates"],
                global_version=record["global_version"],
                telemetry_queued=len(self.health.queue) if self.health else 0,
                telemetry_dropped=self.health.dropped if self.health else 0,
            )
        if self.health is not None:
            if time.monotonic() - self._last_report >= self.report_every:
                self._last_report = time.monotonic()
                self.health.publish(record)
            else:
                self.health.flush()
        p99 = record["p99_ms"]
        alarm = " LATENCY ALARM" if record["latency_alarm"] else ""
        return (
            f"{self.models.label}; p99 {p99 if p99 is not None else '-'} ms{alarm}; "
            f"{record['samples_stored']} samples, {record['micro_updates']} micro-updates; "
            f"learning: {self.learning_note[:60]}; ota: {self.ota_note[:60]}"
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.thread.join(timeout=10)
        if self.samples is not None:
            self.samples.save()
        if self.link is not None:
            self.link.stop()
        if self.metrics is not None:
            self.metrics.close()
