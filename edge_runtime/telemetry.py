"""What the device tells the fleet and its own monitoring, and nothing more.

- **MQTT** (paho-mqtt, the OTA issue's ``DeviceLink``: one connection per device): presence
  (retained ``online``; ``offline`` as the last will, so a dead device shows up as offline),
  health every ``interval_s`` on ``<prefix>/health/<device>``. Health records are queued while the
  broker is away, at most ``buffer`` of them (the oldest are dropped and counted), and sent in order
  once it is back.
- **Prometheus** ``/metrics`` on 127.0.0.1 only (``prometheus_client``), for the device's own
  monitoring.

A health record holds only the fields in ``HEALTH_FIELDS``, each a number, a boolean or a short
label (model and engine names, a status line without sample values): counts, latencies, versions,
and the serving decision's held-out size and two accuracies (with the size, how many held-out
samples each graph got right: an aggregate of the device's own samples). Nothing in it identifies
or describes a single sample; ``check_health`` refuses anything else.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque

log = logging.getLogger("fleetnest.edge.telemetry")

HEALTH_FIELDS = {
    "device": str,
    "at": float,
    "model": str,
    "global_version": int,
    "inferences": int,
    "p50_ms": float,
    "p99_ms": float,
    "latency_alarm": bool,
    "fallbacks": int,
    "rejected_models": int,
    "samples_stored": int,
    "micro_updates": int,
    "checkpoint": int,
    # the serving decision on the held-out buffer: its size and two accuracies over all of it
    "holdout_samples": int,
    "holdout_acc_release": float,
    "holdout_acc_with_fast_layers": float,
    "ota": str,
    "learning": str,
}


def check_health(record: dict) -> dict:
    """The record, if it holds only the allowed fields with their types; ValueError otherwise."""
    for name, value in record.items():
        kind = HEALTH_FIELDS.get(name)
        if kind is None:
            raise ValueError(f"health field {name!r} is not allowed in telemetry")
        if value is None:
            continue
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is float
            else isinstance(value, kind)
        )
        if kind is int and isinstance(value, bool):
            ok = False
        if not ok or (isinstance(value, str) and len(value) > 200):
            raise ValueError(f"health field {name!r}: {kind.__name__} expected, got {type(value).__name__}")
    return record


class HealthPublisher:
    def __init__(self, link, prefix: str, device: str, buffer: int = 500) -> None:
        self.link, self.topic = link, f"{prefix}/health/{device}"
        self.queue: deque[str] = deque(maxlen=buffer)
        self.dropped = 0
        self.sent = 0
        self._lock = threading.Lock()

    def publish(self, record: dict) -> None:
        payload = json.dumps(check_health(record), allow_nan=False, default=str)
        with self._lock:
            if len(self.queue) == self.queue.maxlen:
                self.dropped += 1
            self.queue.append(payload)
        self.flush()

    def flush(self) -> int:
        """Send what is queued while the broker is connected; how many were sent."""
        sent = 0
        with self._lock:
            while self.queue and self.link is not None and self.link.connected.is_set():
                info = self.link.client.publish(self.topic, self.queue[0], qos=1)
                if info.rc != 0:  # not connected after all: keep it for the next try
                    break
                self.queue.popleft()
                sent += 1
        self.sent += sent
        return sent


class Metrics:
    """The Prometheus endpoint (localhost only) and the gauges behind it."""

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        names = {
            "inferences": "inferences served since start",
            "latency_p50_ms": "median inference latency over the monitor's window",
            "latency_p99_ms": "99th percentile inference latency over the monitor's window",
            "latency_alarm": "1 while p99 latency is over the budget",
            "model_fallbacks": "times the served model failed and the last good one took over",
            "models_rejected": "candidate models that failed their checks",
            "samples_stored": "samples in the bounded store",
            "micro_updates": "micro-updates completed",
            "global_version": "global slow-layer version merged",
            "telemetry_queued": "health records waiting for the MQTT broker",
            "telemetry_dropped": "health records dropped while the broker was away",
        }
        self.gauges = {n: Gauge(f"fleetnest_{n}", help_, registry=self.registry) for n, help_ in names.items()}
        self.server = None
        if port:
            self.server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def set(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(float(value))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
