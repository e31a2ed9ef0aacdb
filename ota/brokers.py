"""A fleet's MQTT broker on one machine, set up the way ``ota.broker_config`` describes: what the
demo and the tests start.

``FleetBrokerSetup.create(work, device_ca_dir, project)`` makes (or reuses) the service CA, the
broker's server certificate and the client certificates of the rollout server and the monitor, and
writes the Mosquitto configuration; ``MosquittoBroker(setup).start()`` runs ``mosquitto`` with it;
``EmbeddedBroker(setup).start()`` runs amqtt in a thread of this process instead (no Mosquitto on
the machine): the same two TLS listeners, the same CAs and ACLs, enforced by ``ota.amqtt_plugins``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .broker_config import MONITOR_SERVICE, ROLLOUT_SERVICE, BrokerConfig, BrokerFiles
from .tls import ServiceCA, TlsFiles

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class FleetBrokerSetup:
    config: BrokerConfig
    conf_file: Path
    service_ca: ServiceCA
    device_ca_dir: Path
    rollout: TlsFiles  # the rollout server's client identity (service listener)
    monitor: TlsFiles  # the monitor's

    @classmethod
    def create(
        cls,
        work: str | os.PathLike,
        device_ca_dir: str | os.PathLike,
        project: str = "fleetnest",
        port: int | None = None,
        service_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> FleetBrokerSetup:
        work = Path(work).resolve()
        device_ca_dir = Path(device_ca_dir).resolve()
        service_ca = ServiceCA.create(work / "service_ca", project)
        server = service_ca.issue_server("broker", [host, "localhost"], work / "broker")
        services = work / "services"
        rollout = service_ca.issue_client(ROLLOUT_SERVICE, services)
        monitor = service_ca.issue_client(MONITOR_SERVICE, services)
        files = BrokerFiles(
            device_ca=device_ca_dir / "ca.pem",
            device_crl=device_ca_dir / "crl.pem",
            service_ca=service_ca.cert_file,
            server_cert=server.cert_file,
            server_key=server.key_file,
        )
        config = BrokerConfig(
            files,
            host=host,
            port=port or free_port(),
            service_host=host,
            service_port=service_port or free_port(),
            user="root" if os.geteuid() == 0 else None,  # a test or demo run as root reads its own files
        )
        conf = config.write(work / "broker")
        ca = service_ca.cert_file
        return cls(
            config,
            conf,
            service_ca,
            device_ca_dir,
            TlsFiles(ca, rollout.cert_file, rollout.key_file),
            TlsFiles(ca, monitor.cert_file, monitor.key_file),
        )

    def device_tls(self, cert_file: str | os.PathLike, key_file: str | os.PathLike) -> TlsFiles:
        """What a device connects with: the service CA (to check the broker) and its own identity."""
        return TlsFiles(self.service_ca.cert_file, Path(cert_file), Path(key_file))


def _wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the MQTT broker did not listen on {host}:{port}")


class MosquittoBroker:
    """``mosquitto -c <conf>`` as a child process; restartable on the same ports."""

    def __init__(self, setup: FleetBrokerSetup, binary: str | None = None) -> None:
        self.setup = setup
        self.binary = binary or mosquitto_binary()
        if self.binary is None:
            raise RuntimeError("no mosquitto binary on this machine")
        self.process: subprocess.Popen | None = None
        self.log = setup.conf_file.with_name("mosquitto.log")

    def start(self) -> MosquittoBroker:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.setup.conf_file), "-v"], stderr=log)
        c = self.setup.config
        for host, port in ((c.host, c.port), (c.service_host, c.service_port)):
            _wait_for_port(host, port, 10, lambda: self.process is not None and self.process.poll() is None)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class EmbeddedBroker:
    """amqtt in a thread of this process: the device and service listeners over TLS, client
    certificates checked (device CA and CRL, service CA) and topic ACLs as in the Mosquitto setup."""

    def __init__(self, setup: FleetBrokerSetup) -> None:
        self.setup = setup
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mqtt-broker", daemon=True)

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        from .amqtt_plugins import plugin_config

        c, f = self.setup.config, self.setup.config.files
        server = {"ssl": True, "certfile": str(f.server_cert), "keyfile": str(f.server_key)}
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{c.host}:{c.port}", "cafile": str(f.device_ca), **server},
                "services": {
                    "type": "tcp",
                    "bind": f"{c.service_host}:{c.service_port}",
                    "cafile": str(f.service_ca),
                    **server,
                },
            },
            "plugins": plugin_config(self.setup),
        }
        self.thread.start()

        async def start() -> Broker:
            broker = Broker(config, loop=self.loop)
            await broker.start()
            return broker

        self.broker = asyncio.run_coroutine_threadsafe(start(), self.loop).result(20)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
