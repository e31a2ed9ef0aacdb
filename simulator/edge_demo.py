"""The full loop on one machine, with no external service: ``fleetnest edge-demo --out DIR``.

1. ``fleetnest provision`` a localhost fleet and start it: FLARE server, relay, cluster-tier client,
   two leaves, FLARE's routing proxy (real processes, mutual TLS);
2. the fleet's MQTT broker (Mosquitto when the machine has it, else amqtt in-process: TLS with
   device certificates, topic ACLs) and the OTA service (``ota.service``): keys split at a
   ceremony, the ring layout signed offline, HTTPS with the fleet's service CA, a rollout
   controller counting only reports its broker authenticated, from devices in their signed ring;
3. six edge daemons (``fleetnest edge run``, processes; no systemd), each with its own certificate,
   simulated sensors and a file probe saying idle and charging: they infer, store samples, learn
   in micro-updates;
4. ``jobs/nested_fleet`` submitted through the Flare API: the daemons' learners send clipped,
   noised, quantized, masked slow deltas through their leaves; the server makes global versions;
5. the newest accepted version is built into a release, published, and rolled out: canary ring,
   promoted on healthy MQTT reports, then the fleet; each daemon merges it under its own fast
   layers and serves it with them only where its held-out samples (every 5th, never trained on)
   support them, else as shipped;
6. the daemons keep inferring; ``report.json`` and ``edge_loop.png`` say what happened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import yaml

from .edge_fleet import DEVICE_CLASS, FLEET, DaemonProcess, device_job, edge_config, set_probe
from .localhost_fleet import LocalFleet, devices_by_leaf, wait_until

DEVICES_PER_LEAF = 3
# all a device may send up
PROTOCOL = {"KeyAdvert", "ShareBundle", "MaskedInput", "ConsistencySignature", "UnmaskShares"}
RINGS = (("canary", 0.4), ("fleet", 1.0))
# what a daemon's health record says of its serving decision
SERVING_DECISION = ("holdout_samples", "holdout_acc_release", "holdout_acc_with_fast_layers")


def say(step: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step:<9} {text}", flush=True)


def start_broker(work: Path, device_ca: Path):
    """The fleet's broker: Mosquitto when installed, else amqtt in this process; the same rules."""
    from ota.brokers import EmbeddedBroker, FleetBrokerSetup, MosquittoBroker, mosquitto_binary

    setup = FleetBrokerSetup.create(work, device_ca)
    broker = MosquittoBroker(setup) if mosquitto_binary() else EmbeddedBroker(setup)
    return setup, broker.start()


def secure_device_config(path: Path, setup, identity: Path) -> None:
    """The daemon's TLS settings: the service CA checks the OTA server and the broker; the device's
    certificate logs it in to the broker (its device listener)."""
    config = yaml.safe_load(path.read_text())
    ca = str(setup.service_ca.cert_file)
    config["ota"]["ca_file"] = ca
    config["telemetry"].update(
        mqtt_port=setup.config.port,
        ca_file=ca,
        cert_file=str(identity / "device.crt"),
        key_file=str(identity / "device.key"),
    )
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class HealthLog:
    """Every health record and presence change the daemons publish (the monitor service's identity)."""

    def __init__(self, setup) -> None:
        import paho.mqtt.client as mqtt

        self.records: list[dict] = []
        self.presence: dict[str, str] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleetnest-demo-monitor")
        self.client.tls_set_context(setup.monitor.client_context())
        self.client.on_connect = lambda c, *_: c.subscribe([("fleetnest/health/+", 1), ("fleetnest/presence/+", 1)])
        self.client.on_message = self._message
        self.client.connect(setup.config.service_host, setup.config.service_port)
        self.client.loop_start()

    def _message(self, client, userdata, message) -> None:
        device = message.topic.rsplit("/", 1)[-1]
        if "/presence/" in message.topic:
            self.presence[device] = message.payload.decode()
        else:
            self.records.append(json.loads(message.payload))

    def latest(self) -> dict[str, dict]:
        return {r["device"]: r for r in self.records}

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _pick_salt(devices: list[str]) -> str:
    """A ring salt that puts between a third and a half of the demo's devices in the canary ring."""
    from ota.rings import make_layout, ring_of

    for n in range(1000):
        layout = make_layout(f"fleetnest-demo-{n}", list(RINGS))
        canary = sum(ring_of(d, layout) == "canary" for d in devices)
        if 2 <= canary <= len(devices) // 2:
            return f"fleetnest-demo-{n}"
    raise RuntimeError("no ring salt splits the demo's devices")


def _accuracy(graph: Path | bytes, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> float:
    """``graph``'s accuracy on a device's test data, scored as the device scores its held-out samples."""
    from app_custom.nested.device_data import LabelledSet
    from edge_runtime.inference import held_out_outcomes

    right, _ = held_out_outcomes(graph, LabelledSet({"vision": x}, y))
    return float(np.average(right, weights=weight))


def _with_own_fast_layers(state: Path, job: dict, num_classes: int) -> bytes | None:
    """The installed release with the device's fast layers from its newest checkpoint (what it
    would serve if it always installed them), as an ONNX graph; None before it has a learner."""
    from edge_runtime.learning import ContinualLearner
    from ota.bundle import personalize, read_manifest

    learner = ContinualLearner(state, job["config"], num_classes, samples=None)
    learner.recover()
    fast = learner.fast_layers()
    current = state / "ota" / "current"
    return None if fast is None else personalize(current, read_manifest(current), fast).SerializeToString()


def run(
    out: Path, versions: int = 12, noise: float = 0.0, timeout: float = 600.0, device_python: str | None = None
) -> dict:
    """The full loop in ``out``; ``device_python``: the daemons run from that device install (no
    nvflare there), on their samples recorded to a file and played back."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    events: list[tuple[float, str]] = []

    def event(step: str, text: str) -> None:
        events.append((time.monotonic() - started, time.time(), step, text))
        say(step, text)

    (out / "flare").mkdir(exist_ok=True)
    fleet = LocalFleet.provision(out / "flare")
    event("provision", f"localhost fleet provisioned: server, relay, cluster client eu, leaves {fleet.leaves}")
    broker = ota = health = None
    daemons: dict[str, DaemonProcess] = {}
    try:
        fleet.start_all()
        fleet.wait_for_clients(3, timeout=180)
        fleet.start_proxy()
        event("flare", f"FLARE is up; the routing proxy listens on {fleet.proxy_url}")

        from ota.rollout import Policy
        from ota.service import FleetOtaService

        setup, broker = start_broker(out / "mqtt", fleet.provisioned.device_ca)
        health = HealthLog(setup)
        by_leaf = devices_by_leaf(fleet.leaves, DEVICES_PER_LEAF)
        devices = [d for leaf in fleet.leaves for d in by_leaf[leaf]]
        ota = FleetOtaService(
            out / "ota", RINGS, _pick_salt(devices), setup.service_ca, broker=setup, policy=Policy(min_reports=2)
        )
        kind = type(broker).__name__
        event(
            "ota",
            f"{kind} on 127.0.0.1:{setup.config.port} (TLS, device certificates, topic ACLs); "
            f"OTA repository at {ota.url} (rings {[r for r, _ in RINGS]}); offline and online keys apart",
        )

        job = device_job(out / "device_job.json", "--noise", str(noise))
        probe = out / "probe.json"
        set_probe(probe, idle=True, charging=True)
        recorded = _record_sensors(out / "devices", devices)
        for index, device in enumerate(devices):
            identity = out / "identities" / device
            if fleet.cli("device", "--id", device, "--out", str(identity)) != 0:
                raise RuntimeError(f"cannot issue a certificate for {device}")
            fleet_cfg = {"proxy": fleet.proxy_url, "identity": str(identity), "job": "nested_fleet"}
            config = edge_config(
                out / "devices",
                device,
                index,
                job,
                probe,
                ota,
                setup.config.port,
                fleet_cfg,
                min_interval_s=5.0,
                sensor={"fn": "edge_runtime.sensors:replay", "kwargs": {"path": str(recorded[device])}, "rate_hz": 5.0},
            )
            secure_device_config(config, setup, identity)
            daemons[device] = DaemonProcess(config, device_python=device_python).start()
        for device, daemon in daemons.items():
            if not daemon.wait_for("serving local model", 120):
                raise RuntimeError(f"{device} did not start serving:\n{daemon.text()[-3000:]}")
        rings = {d: ota.ring_of(d) for d in devices}
        where = f"from the device install {device_python}" if device_python else "from this checkout"
        event("devices", f"{len(devices)} edge daemons ({where}) infer and learn on their own samples; rings {rings}")

        flags = ("--versions", str(versions), "--max-rounds", str(2 * versions), "--noise", str(noise))
        job_id = fleet.submit(*flags, "--buffer-timeout", "10", "--max-wait", "180")
        event("job", f"nested_fleet submitted as {job_id}: the daemons send masked slow deltas through their leaves")
        told: set[int] = set()

        def tell_versions() -> bool:
            """Each new version as the cluster archives it: accepted, or refused by the gate and why."""
            for v in fleet.versions():
                if v["round"] is None or v["version"] in told:
                    continue
                told.add(v["version"])
                name = f"global version {v['version']}"
                if v["status"] == "accepted":
                    metrics = ", ".join(f"{k} {_short(value)}" for k, value in sorted(v["metrics"].items()))
                    event("cluster", f"{name} accepted from {v['num_devices']} devices: {metrics}")
                else:
                    event("cluster", f"{name} {v['status']} by the validation gate: {v['reason']}")
            return len(fleet.accepted()) >= versions

        wait_until(tell_versions, timeout, f"{versions} accepted versions", interval=2)
        accepted = fleet.accepted()

        newest = accepted[-1]["version"]
        release = ota.publish(fleet.archive, newest, DEVICE_CLASS)
        assert ota.controller is not None
        ota.controller.start(release)
        event("rollout", f"{release} signed offline, imported online and rolled out: ring canary first")
        seen_stage = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = ota.controller.status()
            if status["stage"] != seen_stage and status["state"] == "running":
                seen_stage = status["stage"]
                event("rollout", status["events"][-1])
            if status["state"] != "running":
                break
            time.sleep(0.5)
        event("rollout", f"{status['state']}: {status['events'][-1]}")
        if status["state"] != "completed":
            raise RuntimeError(f"the rollout ended {status['state']}: {status['reason']}")
        for device, daemon in daemons.items():
            if not daemon.wait_for(f"serving {release}", 120):
                raise RuntimeError(f"{device} does not serve {release}")
        event(
            "merge",
            f"every daemon serves {release}, with its own fast layers where its held-out samples support "
            "them; inferring on for 10 s",
        )
        time.sleep(10)
        for daemon in daemons.values():  # the report reads their checkpoints: no write may be under way
            daemon.stop()
        job_config = json.loads(job.read_text())
        report = _report(out, fleet, ota, job_config, health, devices, rings, release, accepted, events)
    finally:
        for daemon in daemons.values():
            daemon.stop()
        if health is not None:
            time.sleep(1)
            health.stop()
        if ota is not None:
            ota.close()
        if broker is not None:
            broker.stop()
        fleet.stop_all()
    say("done", f"report: {out / 'report.json'}, plot: {out / 'edge_loop.png'} ({time.monotonic() - started:.0f} s)")
    return report


def _short(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _report(out, fleet, ota, job, health, devices, rings, release, accepted, events) -> dict:
    from simulator.fleets import make_fleet

    data = make_fleet(**FLEET)
    latest = health.latest()
    per_device = {}
    for index, device in enumerate(devices):
        state = out / "devices" / device / "state"
        test = data.devices[index].test
        x = test.x["vision"] if isinstance(test.x, dict) else test.x
        audit = state / "fleet" / "outbound_audit.jsonl"
        sent = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        record = latest.get(device, {})
        shipped = state / "ota" / "current" / "model.onnx"
        alone = _accuracy(shipped, x, test.y, test.weight)
        mine = _with_own_fast_layers(state, job, data.num_classes)
        per_device[device] = {
            "ring": rings[device],
            "served": record.get("model"),
            "inferences": record.get("inferences"),
            "p50_ms": record.get("p50_ms"),
            "p99_ms": record.get("p99_ms"),
            "micro_updates": record.get("micro_updates"),
            "messages_sent": len(sent),
            "message_types": sorted({r["secagg"]["type"] for r in sent if "secagg" in r}),
            # what the device decided on its held-out samples, and what its test data says
            "serving_decision": {k: record.get(k) for k in SERVING_DECISION},
            "acc_release_alone": alone,
            "acc_release_with_own_fast_layers": alone if mine is None else _accuracy(mine, x, test.y, test.weight),
            "acc_served": _accuracy(state / "models" / "good.onnx", x, test.y, test.weight),
        }
    leaked = {d: row["message_types"] for d, row in per_device.items() if set(row["message_types"]) - PROTOCOL}
    if leaked:
        raise RuntimeError(f"devices sent more than secure-aggregation messages: {leaked}")
    report = {
        "release": release,
        "global_versions": [{k: v[k] for k in ("version", "parent", "num_devices", "metrics")} for v in accepted],
        "refused_versions": [
            {k: v.get(k) for k in ("version", "parent", "status", "reason", "metrics")}
            for v in fleet.versions()
            if v["status"] != "accepted"
        ],
        # every link the loop uses, and what protects it
        "links": {
            "flare": "mutual TLS under the project root CA (server, relay, cluster client, leaves)",
            "routing_proxy": f"{fleet.proxy_url} (server certificate from the device CA; devices verify it)",
            "secure_aggregation": "authenticated: adverts signed with device certificates, the consistency round",
            "mqtt": "TLS, device certificates from the device CA and its CRL, per-device topic ACLs",
            "ota": f"{ota.url} (HTTPS under the service CA; releases signed offline)",
            "rollout_reports": "counted only from the authenticated device, in the ring the signed layout gives it",
        },
        "rollout": ota.controller.status(),
        "reports_refused": ota.controller.refused,
        "devices": per_device,
        "every_robot_at_least_release_alone": all(
            row["acc_served"] >= row["acc_release_alone"] for row in per_device.values()
        ),
        "presence": health.presence,
        "events": [{"t_s": round(t, 1), "step": step, "event": text} for t, _, step, text in events],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plot(out, health.records, per_device, events)
    for device, row in per_device.items():
        say(
            "summary",
            f"{device} ({row['ring']}): serves {row['served']}; accuracy: release alone "
            f"{row['acc_release_alone']:.3f}, with its fast layers {row['acc_release_with_own_fast_layers']:.3f}, "
            f"served {row['acc_served']:.3f}; p99 {row['p99_ms']} ms; "
            f"{row['micro_updates']} micro-updates; sent {row['messages_sent']} masked protocol messages",
        )
    return report


def _plot(out: Path, records: list[dict], per_device: dict, events: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    t0 = min((r["at"] for r in records), default=0.0)
    for device in per_device:
        mine = [r for r in records if r["device"] == device and r.get("p99_ms") is not None]
        left.plot([r["at"] - t0 for r in mine], [r["p99_ms"] for r in mine], label=device, lw=1)
    left.axhline(30, color="red", ls="--", lw=1, label="30 ms budget")
    for _, at, step, _ in events:
        if step in ("job", "merge"):
            left.axvline(at - t0, color="grey", ls=":", lw=1)
            left.annotate(
                "job submitted" if step == "job" else "release served", (at - t0, 30), fontsize=7, rotation=90
            )
    left.set(xlabel="seconds", ylabel="p99 latency (ms)", yscale="log", title="Inference latency on each daemon")
    left.legend(fontsize=7)
    names = list(per_device)
    xs = np.arange(len(names))
    for offset, key, name in (
        (-0.27, "acc_release_alone", "release alone"),
        (0.0, "acc_release_with_own_fast_layers", "+ own fast layers"),
        (0.27, "acc_served", "served (decided on held-out samples)"),
    ):
        right.bar(xs + offset, [per_device[n][key] for n in names], 0.27, label=name)
    right.set_xticks(xs, [f"{n}\n{per_device[n]['ring']}" for n in names], fontsize=7)
    right.set(ylabel="accuracy on the device's own test data", ylim=(0, 1), title="After the rollout")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "edge_loop.png", dpi=110)
    plt.close(fig)


def _record_sensors(work: Path, devices: list[str]) -> dict[str, Path]:
    """Each demo robot's sensor samples (its training samples in the simulated fleet), recorded to
    ``work/<device>/recorded.npz`` for ``edge_runtime.sensors:replay``."""
    from app_custom.nested.device_data import save_labelled
    from app_custom.nested.models import input_spec
    from simulator.fleets import make_fleet

    fleet = make_fleet(**FLEET)
    recorded = {}
    for index, device in enumerate(devices):
        train = fleet.devices[index].train
        x = train.x if isinstance(train.x, dict) else {next(iter(input_spec(train.x))): train.x}
        recorded[device] = Path(work) / device / "recorded.npz"
        recorded[device].parent.mkdir(parents=True, exist_ok=True)
        save_labelled(recorded[device], x, train.y)
    return recorded


def add_edge_demo_parser(verbs) -> None:
    demo = verbs.add_parser("edge-demo", help="the full loop: FLARE hierarchy, edge daemons, signed canary rollout")
    demo.add_argument("--out", default="demo_out/edge", help="folder for the fleet, the devices and the report")
    demo.add_argument("--versions", type=int, default=12, help="accepted global versions before the rollout")
    demo.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="DP noise multiplier on each leaf's sum (0: secure aggregation without noise; see the README)",
    )
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds each phase may take")
    demo.add_argument(
        "--device-python",
        default=None,
        help="the python of a device install (pip install '.[device]', no nvflare): the daemons run from it",
    )
    demo.set_defaults(
        run=lambda args: 0 if run(Path(args.out), args.versions, args.noise, args.timeout, args.device_python) else 1
    )
