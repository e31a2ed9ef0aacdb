"""Serving on the device: a candidate model serves only after its checks, a failing one leaves the
served model in place, a model that fails while serving gives way to the last good one, a damaged
model file is never served; telemetry holds only allowed fields, waits (bounded) for a broker that
is down and sends in order once it is back; /metrics answers on localhost."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.inference import BadOutputs, LatencyMonitor, ModelCheckFailed, ModelServer
from edge_runtime.telemetry import HealthPublisher, Metrics, check_health
from ota.mqtt import DeviceLink
from tests.ota_fixtures import Mosquitto

PROBE = {"vision": np.abs(np.random.default_rng(0).standard_normal((4, 1, 8, 8))).astype(np.float32)}


def graph(weight: np.ndarray, op: str = "Identity") -> bytes:
    """vision (n, 1, 8, 8) -> flatten -> ``op`` -> @ weight (64, 10) -> logits."""
    nodes = [
        helper.make_node("Flatten", ["vision"], ["flat"], axis=1),
        helper.make_node(op, ["flat"], ["activated"]),
        helper.make_node("MatMul", ["activated", "w"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("vision", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


GOOD = graph(np.ones((64, 10)))
OTHER = graph(np.full((64, 10), 2.0))


def test_a_candidate_serves_only_after_its_checks(tmp_path):
    server = ModelServer(tmp_path)
    assert "serving first" in server.offer(GOOD, "first", PROBE, 10)
    nan = np.ones((64, 10))
    nan[0, 0] = np.nan
    note = server.offer(graph(nan), "broken", PROBE, 10)
    assert "rejected (outputs are not finite)" in note and server.label.startswith("first")
    assert isinstance(server.last_rejection, BadOutputs)
    note = server.offer(graph(np.ones((64, 3))), "narrow", PROBE, 10)
    assert "rejected" in note and "(batch, 10)" in note and server.label.startswith("first")
    slow = ModelServer(tmp_path / "slow", budget_ms=1e-6)
    assert "rejected" in slow.offer(GOOD, "too-slow", PROBE, 10) and slow.engine is None
    assert isinstance(slow.last_rejection, ModelCheckFailed) and not isinstance(slow.last_rejection, BadOutputs)
    assert server.rejected == 2
    assert server.infer({"vision": PROBE["vision"][:1]}).shape == (1, 10)


def test_a_model_that_fails_while_serving_gives_way_to_the_last_good_one(tmp_path):
    server = ModelServer(tmp_path)
    server.offer(GOOD, "good-1", PROBE, 10)
    server.offer(graph(np.ones((64, 10)), op="Sqrt"), "sqrt", PROBE, 10)  # finite on the probe's inputs
    assert server.label.startswith("sqrt")
    assert server.infer({"vision": -PROBE["vision"][:1]}) is None  # sqrt of negatives: NaN
    assert server.fallbacks == 1 and server.label.startswith("good-1")
    out = server.infer({"vision": -PROBE["vision"][:1]})
    assert out is not None and np.isfinite(out).all()
    restarted = ModelServer(tmp_path)  # and a restart serves the good one, not the failed one
    assert "good-1" in restarted.recover()


def test_a_damaged_model_file_is_never_served(tmp_path):
    server = ModelServer(tmp_path)
    server.offer(GOOD, "v1", PROBE, 10)
    server.offer(OTHER, "v2", PROBE, 10)
    good = tmp_path / "models" / "good.onnx"
    good.write_bytes(good.read_bytes()[:-7] + b"garbage")
    restarted = ModelServer(tmp_path)
    assert "v1" in restarted.recover() and restarted.verified() is None
    (tmp_path / "models" / "previous.onnx").write_bytes(b"not a model")
    assert ModelServer(tmp_path).recover() == "no verified model on disk"


def test_the_latency_monitor_alarms_over_budget_and_clears():
    monitor = LatencyMonitor(budget_ms=30, window=50)
    for _ in range(50):
        monitor.record(5.0)
    assert not monitor.alarm and monitor.percentile(50) == 5.0
    for _ in range(5):
        monitor.record(80.0)
    assert monitor.alarm and monitor.percentile(99) > 30
    for _ in range(50):
        monitor.record(5.0)
    assert not monitor.alarm


@pytest.mark.parametrize(
    "record",
    [{"sample": [0.1, 0.2]}, {"label": 3}, {"p50_ms": [1.0]}, {"model": "x" * 500}, {"inferences": True}],
)
def test_telemetry_refuses_anything_but_the_allowed_scalar_fields(record):
    with pytest.raises(ValueError, match="health field"):
        check_health(record)


class Subscriber:
    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()  # set once the broker acknowledged the subscription
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def wait(self, count: int, timeout: float = 10) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_health_waits_for_a_broker_that_is_down_bounded_and_arrives_in_order(tmp_path):
    broker = Mosquitto(tmp_path)  # its port is free: nothing listens yet
    link = DeviceLink("127.0.0.1", broker.port, "robot-9", "canary").start()
    health = HealthPublisher(link, "fleetnest", "robot-9", buffer=3)
    try:
        for i in range(5):
            health.publish({"device": "robot-9", "inferences": i})
        assert [json.loads(p)["inferences"] for p in health.queue] == [2, 3, 4] and health.dropped == 2
        broker.start()
        assert link.connected.wait(20)
        listener = Subscriber(broker.port, "fleetnest/#")
        health.flush()
        got = listener.wait(4)
        listener.close()
        records = [json.loads(p)["inferences"] for t, p in got if t == "fleetnest/health/robot-9"]
        assert records == [2, 3, 4] and not health.queue
        assert ("fleetnest/presence/robot-9", b"online") in got  # retained presence
    finally:
        link.stop()
        broker.stop()


def test_metrics_answer_on_localhost(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics(port)
    try:
        metrics.set(inferences=12, latency_p99_ms=3.5, global_version=None)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "fleetnest_inferences 12.0" in text and "fleetnest_latency_p99_ms 3.5" in text
        assert metrics.server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()
