"""Desired state and health reports over MQTT (paho-mqtt 2.x); polling is the fallback.

Topics (``<prefix>`` is ``fleetnest`` by default):

- ``<prefix>/desired/<ring>``: retained, QoS 1, the ring's targeting ``{"release", ...}`` as a
  *hint*: a device acts on it only after verifying the same targeting through TUF;
- ``<prefix>/report/<device>``: QoS 1, ``{"device", "ring", "release", "status", "reason"}``;
- ``<prefix>/presence/<device>``: retained ``online``, and ``offline`` as the last will.

With ``tls`` (``ota.tls.TlsFiles``) every connection is TLS with a client certificate: a device's
own, or a fleet service's (``ota.broker_config`` writes the broker's side). The server hands each
report to ``on_report(sender, body)`` with ``sender`` the device segment of its topic, which the
broker's ACL lets only that device's certificate write: the controller checks the body against it.

No artifact and no sample ever goes over MQTT. Callbacks only queue work (an exception in a paho
callback would kill its network thread); a worker thread does it. After a broker restart
(retained messages gone when it does not persist them) the server publishes every ring's
targeting again and each device sends its last report again, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from .tls import TlsFiles

log = logging.getLogger(__name__)
PREFIX = "fleetnest"


def _client(client_id: str, tls: TlsFiles | None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    if tls is not None:
        client.tls_set_context(tls.client_context())
    return client


def report_sender(topic: str, prefix: str = PREFIX) -> str | None:
    """The device a report topic names (``<prefix>/report/<device>``), or None for any other topic."""
    head = f"{prefix}/report/"
    if not topic.startswith(head) or "/" in topic[len(head) :] or topic == head:
        return None
    return topic[len(head) :]


class RolloutBroker:
    """Server side: publishes targeting hints, receives device reports (handed to ``on_report``)."""

    def __init__(
        self,
        host: str,
        port: int,
        on_report: Callable[[str | None, object], object],
        current_targeting: Callable[[], dict[str, dict]],
        prefix: str = PREFIX,
        tls: TlsFiles | None = None,
        max_queued: int = 10_000,
    ) -> None:
        """``on_report(sender, body)``: ``sender`` is the device the topic names, ``body`` the
        parsed JSON (whatever it holds: the controller checks it)."""
        self.prefix = prefix
        self.on_report = on_report
        self.current_targeting = current_targeting
        self.reports: queue.Queue = queue.Queue(maxsize=max_queued)
        self.dropped = 0
        self.connected = threading.Event()
        self.client = _client("fleetnest-rollout-server", tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_message = self._on_message
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self.client.connect_async(host, port, keepalive=10)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connection refused: %s", reason_code)
            return
        client.subscribe(f"{self.prefix}/report/+", qos=1)
        for ring, desired in self.current_targeting().items():  # the broker may have lost retained state
            client.publish(f"{self.prefix}/desired/{ring}", json.dumps(desired), qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.reports.put_nowait((message.topic, message.payload))
        except queue.Full:  # a flood: dropped here rather than growing without bound
            self.dropped += 1

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self.reports.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.on_report(report_sender(topic, self.prefix), json.loads(payload))
            except Exception as e:  # a malformed report must not stop the rollout
                log.warning("ignored a report on %s: %s", topic, e)

    def start(self) -> RolloutBroker:
        self._worker.start()
        self.client.loop_start()
        return self

    def publish_desired(self, ring: str, desired: dict) -> None:
        self.client.publish(f"{self.prefix}/desired/{ring}", json.dumps(desired), qos=1, retain=True)

    def stop(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        self._worker.join(timeout=5)


class DeviceLink:
    """Device side: presence with a last will, the ring's targeting hints, reports."""

    def __init__(
        self, host: str, port: int, device: str, ring: str, prefix: str = PREFIX, tls: TlsFiles | None = None
    ) -> None:
        self.prefix, self.device, self.ring = prefix, device, ring
        self.hint = threading.Event()  # set when the ring's targeting changes
        self.last_report: dict | None = None
        self.connected = threading.Event()
        self.client = _client(f"fleetnest-device-{device}", tls)
        self.client.will_set(self._topic("presence"), "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_message = lambda client, userdata, message: self.hint.set()
        self.client.connect_async(host, port, keepalive=10)

    def _topic(self, kind: str) -> str:
        return f"{self.prefix}/{kind}/{self.device}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.publish(self._topic("presence"), "online", qos=1, retain=True)
        client.subscribe(f"{self.prefix}/desired/{self.ring}", qos=1)
        if self.last_report is not None:  # the server may have missed it while the broker was down
            client.publish(self._topic("report"), json.dumps(self.last_report), qos=1)
        self.connected.set()

    def start(self) -> DeviceLink:
        self.client.loop_start()
        return self

    def report(self, report: dict) -> None:
        self.last_report = report
        self.client.publish(self._topic("report"), json.dumps(report), qos=1)

    def stop(self) -> None:
        self.client.publish(self._topic("presence"), "offline", qos=1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()
