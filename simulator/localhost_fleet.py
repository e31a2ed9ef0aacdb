"""A provisioned fleet on localhost, as separate processes: the FLARE server, a relay, a
cluster-tier client, leaves, FLARE's routing proxy (HTTPS, with the certificate ``fleetnest
provision`` issued it under the device CA) and device processes (which verify it). Every process
runs in its own session (process group), so stopping one stops its job processes too, and
``stop_all`` leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from provisioning.cli import main as provision_cli
from provisioning.fleet import load_fleet_spec
from provisioning.project import Provisioned

REPO = Path(__file__).resolve().parents[1]
PROJECT = "fleetnest-it"
ADMIN = "admin@fleetnest.dev"
CLIENT_OUTCOME_WAIT_S = 20
MODULES = {
    "server": ("nvflare.private.fed.app.server.server_train", "fed_server.json"),
    "relay": ("nvflare.private.fed.app.relay.relay", "fed_relay.json"),
    "client": ("nvflare.private.fed.app.client.client_train", "fed_client.json"),
}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def processes_under(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (the fleet's sites, jobs and devices do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # FLARE starts jobs as python3
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class LocalFleet:
    base: Path
    ports: dict[str, int]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def provision(cls, base: Path, leaves: int = 2) -> LocalFleet:
        names = ["server", "admin", "relay", "proxy"] + [f"leaf{i}" for i in range(1, leaves + 1)]
        ports = dict(zip(names, free_ports(len(names))))
        fleet = {
            "project": PROJECT,
            "server": {"host": "localhost", "fed_learn_port": ports["server"], "admin_port": ports["admin"]},
            "admins": [{"name": ADMIN, "role": "project_admin"}],
            "devices": {"valid_days": 7},
            "regions": [
                {
                    "name": "eu",
                    "relay": {"host": "localhost", "port": ports["relay"]},
                    "leaves": [
                        {"name": f"eu-depot-{i}", "host": "localhost", "edge_port": ports[f"leaf{i}"]}
                        for i in range(1, leaves + 1)
                    ],
                }
            ],
        }
        (base / "fleet.yaml").write_text(yaml.safe_dump(fleet))
        if provision_cli(cls._provision_args(base)) != 0:
            raise RuntimeError(f"fleetnest provision failed for {base / 'fleet.yaml'}")
        return cls(base, ports)

    @staticmethod
    def _provision_args(base: Path) -> list[str]:
        return ["--fleet", str(base / "fleet.yaml"), "--workspace", str(base / "ws")]

    def cli(self, *args: str) -> int:
        """``fleetnest provision --fleet ... --workspace ... ARGS`` on this fleet (in this process)."""
        return provision_cli(self._provision_args(self.base) + list(args))

    @property
    def provisioned(self) -> Provisioned:
        return Provisioned.existing(self.base / "ws", PROJECT)

    @property
    def leaves(self) -> list[str]:
        return [leaf.name for leaf in load_fleet_spec(self.base / "fleet.yaml").leaves]

    def kit(self, site: str) -> Path:
        return self.provisioned.kit(site)

    @property
    def admin_kit(self) -> Path:
        return self.kit(ADMIN)

    # ---- processes ----------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
        with open(self.base / f"{name}.out", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                command, cwd=cwd, env=env or environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[name] = process
        return process

    def start_site(self, site: str, kind: str) -> None:
        module, config = MODULES[kind]
        kit = self.kit(site)
        command = [sys.executable, "-u", "-m", module, "-m", str(kit), "-s", config, "--set", "secure_train=true"]
        command += ([f"uid={site}"] if kind != "server" else []) + ["org=fleetnest", "config_folder=config"]
        env = environment()
        if kind == "server":
            # how long a finished job waits for the outcome of a client that died (FLARE's default: 900 s)
            env["NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"] = str(CLIENT_OUTCOME_WAIT_S)
        self._spawn(site, command, kit, env)

    def start_all(self) -> None:
        self.start_site("server", "server")
        self.start_site("eu-relay", "relay")
        self.start_site("eu", "client")
        for leaf in self.leaves:
            self.start_site(leaf, "client")

    def start_proxy(self) -> None:
        """FLARE's routing proxy: HTTPS for devices, TLS (checked against the project's root CA) to the leaves."""
        scripts = self.provisioned.kits / "scripts"
        command = [sys.executable, "-m", "nvflare.edge.web.routing_proxy", str(self.ports["proxy"])]
        command += [str(scripts / "lcp_map.json"), str(scripts / "rootCA.pem")]
        command += ["--ssl-cert", str(scripts / "proxy.crt"), "--ssl-key", str(scripts / "proxy.key")]
        self._spawn("proxy", command, self.base)

    @property
    def proxy_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['proxy']}"

    @property
    def proxy_ca(self) -> Path:
        """What devices verify the proxy with: the device CA (every identity holds it as device_ca.pem)."""
        return self.provisioned.kits / "scripts" / "proxy_ca.pem"

    def start_device(self, device: str, index: int, job_config: Path, identity: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "edge_runtime.fleet_device",
            "--proxy",
            self.proxy_url,
            "--device",
            device,
            "--identity",
            str(identity),
            "--state",
            str(self.base / "devices" / device / "state"),
            "--job-config",
            str(job_config),
            "--index",
            str(index),
            "--max-runtime",
            "600",
        ]
        self._spawn(device, command, REPO)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop a site with everything it started: FLARE spawns job processes in sessions of their
        own, so its process group is not enough (a crashed machine takes them all)."""
        process = self.processes.pop(name)
        tree = descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        process.wait(timeout=30)
        _reap_group(process.pid)
        for pid in tree:
            _wait_gone(pid)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        path = self.base / f"{name}.out"
        logs = [path]
        if name in self._sites():  # the site's own log, then each job's
            logs += [self.kit(name) / "log.txt", *sorted(self.kit(name).glob("*/log.txt"))]
        return "".join(p.read_text(errors="replace") for p in logs if p.exists())

    def _sites(self) -> set[str]:
        return {"server", "eu-relay", "eu", *self.leaves}

    # ---- the admin side ------------------------------------------------------------------------
    def session(self):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        return new_secure_session(ADMIN, str(self.admin_kit), timeout=30)

    def wait_for_clients(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                session = self.session()
                try:
                    info = session.get_system_info()
                    last = [c.name for c in info.client_info]
                    if len(last) >= count:
                        return
                finally:
                    session.close()
            except Exception as err:  # the server is still starting
                last = repr(err)
            time.sleep(2)
        raise TimeoutError(f"{count} clients not connected after {timeout} s: {last}")

    def submit(self, *flags: str) -> str:
        command = [sys.executable, str(REPO / "jobs/nested_fleet/job.py"), "--startup-kit", str(self.admin_kit)]
        command += ["--username", ADMIN, *flags]
        out = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=120, cwd=self.base)
        if out.returncode != 0:
            raise RuntimeError(f"job submission failed: {out.stdout}{out.stderr}")
        return out.stdout.strip().split()[-1]

    @property
    def archive(self) -> Path:
        return self.kit("server") / "fleetnest_archive" / "nested_fleet"

    def versions(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.archive.glob("v*/meta.json"))]

    def accepted(self) -> list[dict]:
        return [v for v in self.versions() if v["status"] == "accepted" and v["round"] is not None]


def devices_by_leaf(leaves: list[str], per_leaf: int) -> dict[str, list[str]]:
    """Device ids the routing proxy sends to each leaf (it hashes the id over its leaf list)."""
    from nvflare.fuel.utils.hash_utils import UniformHash

    hashing, found = UniformHash(len(leaves)), {leaf: [] for leaf in leaves}
    for n in range(200):
        device = f"robot-{n}"
        leaf = leaves[hashing.hash(device)]
        if len(found[leaf]) < per_leaf:
            found[leaf].append(device)
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except OSError:
            return  # gone
        if ") Z" in state:  # a zombie waiting for its (new) parent: it holds nothing
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap_group(pgid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout:.0f} s: {what}")
