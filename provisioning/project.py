"""Fleet description -> FLARE ``project.yml`` -> ``nvflare provision`` -> startup kits, plus what
FLARE leaves to us: the routing proxy's leaf map, the device CA, and rotating one site's
certificate.

What FLARE does itself: the project's root CA and one mTLS certificate per server, relay, client
and admin; signed startup kits; the edge API service certificate of each leaf (``EdgeBuilder``).
What this adds:
- the hierarchy from a fleet description (a relay, a regional aggregator client and its leaf
  clients per region), every relay's ``scheme`` and ``connection_security`` written out (FLARE
  falls back to clear TCP for a relay without them, whatever the project says);
- ``scripts/lcp_map.json`` and ``rootCA.pem`` for the routing proxy (it checks each leaf's edge API
  service against that root), and its own TLS certificate for devices, ``scripts/proxy.crt`` and
  ``proxy.key`` (owner-only), under the device CA (``issue_proxy_certificate``);
- a leaf's internal listener (FLARE's link between the leaf and its job processes, clear TCP by
  FLARE's design) kept on the loopback interface: a leaf's ``listening_host`` exists only for the
  certificate of its edge API service, which names the leaf's host;
- the fleet's device CA (``identities``) and, in every leaf's ``local/``, its certificate and CRL;
- ``rotate_site``: a new certificate for one site under the same root, without touching anyone
  else's (FLARE has no rotation command: the site's entry leaves the provisioning state and the
  project is provisioned again, which re-issues only what is missing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509

from app_custom.durable import write_bytes_atomic, write_json_atomic

from .fleet import FleetSpec
from .identities import DeviceCA

RELAY_SCHEME = "grpc"
CONNECTION_SECURITY = "mtls"
DEVICE_CA_FILES = ("ca.pem", "crl.pem")
PROXY_NAME = "routing-proxy"
LOOPBACK = "localhost"


class ProvisionError(RuntimeError):
    """``nvflare provision`` failed or left no startup kits; the message carries its output."""


def project_config(spec: FleetSpec) -> dict:
    """The FLARE ``project.yml`` (api_version 3) for ``spec``."""
    server = {
        "name": "server",
        "type": "server",
        "org": spec.org,
        "fed_learn_port": spec.fed_learn_port,
        "default_host": spec.server_host,
        "host_names": [spec.server_host] + (["127.0.0.1"] if spec.server_host == "localhost" else []),
        "connection_security": CONNECTION_SECURITY,
    }
    if spec.admin_port is not None:
        server["admin_port"] = spec.admin_port
    participants = [server]
    for region in spec.regions:
        participants.append(
            {
                "name": region.relay,
                "type": "relay",
                "org": spec.org,
                "listening_host": {
                    "default_host": region.relay_host,
                    "port": region.relay_port,
                    "scheme": RELAY_SCHEME,
                    "connection_security": CONNECTION_SECURITY,
                },
            }
        )
        participants.append(
            {"name": region.name, "type": "client", "org": spec.org, "connect_to": {"name": region.relay}}
        )
        for leaf in region.leaves:
            # the certificate of its edge API service names the leaf's host; FLARE also opens the
            # leaf's internal listener (clear TCP, for its own job processes) on default_host, so
            # that one stays on the loopback interface
            listening = {"default_host": LOOPBACK}
            if leaf.host != LOOPBACK:
                listening["host_names"] = [leaf.host]
            participants.append(
                {
                    "name": leaf.name,
                    "type": "client",
                    "org": spec.org,
                    "parent": region.name,
                    "connect_to": {"name": region.relay},
                    "listening_host": listening,
                    "edge_service_port": leaf.edge_port,
                }
            )
    participants += [{"name": a.name, "type": "admin", "org": a.org, "role": a.role} for a in spec.admins]
    return {
        "api_version": 3,
        "name": spec.project,
        "description": f"fleetnest fleet {spec.project}: {len(spec.regions)} regions, {len(spec.leaves)} leaves,"
        f" {spec.expected_devices} devices expected",
        "participants": participants,
        "builders": [
            {
                "path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
                "args": {"template_file": ["master_template.yml"]},
            },
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
            {"path": "nvflare.lighter.impl.edge.EdgeBuilder"},
        ],
    }


@dataclass(frozen=True)
class Provisioned:
    """Where a provisioned fleet lives: ``<workspace>/<project>/``, the one place its layout is known."""

    workspace: Path
    project: str

    @classmethod
    def existing(cls, workspace: str | Path, project: str) -> Provisioned:
        found = cls(Path(workspace).resolve(), project)
        if not found.device_ca.is_dir():
            raise ProvisionError(f"no provisioned fleet in {found.project_dir}: run `fleetnest provision` first")
        return found

    @property
    def project_dir(self) -> Path:
        return self.workspace / self.project

    @property
    def kits(self) -> Path:
        """The newest prod_NN folder: one startup kit per site and admin."""
        return newest_kits(self.project_dir)

    @property
    def state(self) -> Path:
        """FLARE's provisioning state (root CA, every site's key) and the device CA: keep it offline."""
        return self.project_dir / "state"

    @property
    def device_ca(self) -> Path:
        return self.state / "device_ca"

    def kit(self, site: str) -> Path:
        return self.kits / site


def _nvflare() -> list[str]:
    script = Path(sys.executable).with_name("nvflare")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nvflare.cli"]


def newest_kits(project_dir: Path) -> Path:
    prods = sorted(
        (p for p in project_dir.glob("prod_*") if re.fullmatch(r"prod_\d+", p.name)), key=lambda p: int(p.name[5:])
    )
    if not prods:
        raise ProvisionError(f"nvflare provision left no prod_NN folder in {project_dir}")
    return prods[-1]


def provision(spec: FleetSpec, workspace: str | Path, gen_scripts: bool = True) -> Provisioned:
    """Provision ``spec`` into ``workspace`` (again: the root CA and existing certificates are kept)."""
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    project_file = workspace / "project.yml"
    project_file.write_text(yaml.safe_dump(project_config(spec), sort_keys=False))
    command = _nvflare() + ["provision", "-p", str(project_file), "-w", str(workspace), "--force"]
    if gen_scripts:
        command.append("-s")
    done = subprocess.run(command, capture_output=True, text=True, cwd=workspace, timeout=300)
    if done.returncode != 0:
        raise ProvisionError(f"nvflare provision failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = Provisioned(workspace, spec.project)
    kits = result.kits
    missing = [s for s in _sites(spec) if not (kits / s / "startup").is_dir()]
    if missing:
        raise ProvisionError(f"nvflare provision wrote no startup kit for {missing}:\n{done.stdout}\n{done.stderr}")
    DeviceCA.create(result.device_ca, spec.project)
    distribute_device_ca(spec, result)
    _write_proxy_files(spec, result)
    return result


def _sites(spec: FleetSpec) -> list[str]:
    return ["server"] + [n for r in spec.regions for n in (r.relay, r.name, *(leaf.name for leaf in r.leaves))]


def distribute_device_ca(spec: FleetSpec, provisioned: Provisioned) -> None:
    """The device CA's certificate and current CRL into every leaf's ``local/device_ca/`` (not part
    of the signed startup kit, so a new CRL reaches a leaf without re-provisioning)."""
    for leaf in spec.leaves:
        target = provisioned.kit(leaf.name) / "local" / "device_ca"
        target.mkdir(parents=True, exist_ok=True)
        for name in DEVICE_CA_FILES:  # atomically: a running leaf may be reading the CRL
            write_bytes_atomic(target / name, (provisioned.device_ca / name).read_bytes())


def _write_proxy_files(spec: FleetSpec, provisioned: Provisioned) -> None:
    scripts = provisioned.kits / "scripts"
    scripts.mkdir(exist_ok=True)
    lcp_map = {leaf.name: {"host": leaf.host, "port": leaf.edge_port} for leaf in spec.leaves}
    write_json_atomic(scripts / "lcp_map.json", lcp_map)
    shutil.copyfile(provisioned.kit("server") / "startup" / "rootCA.pem", scripts / "rootCA.pem")
    issue_proxy_certificate(spec, provisioned)


def issue_proxy_certificate(spec: FleetSpec, provisioned: Provisioned) -> Path:
    """A new TLS certificate and key for the routing proxy (``spec.proxy_hosts``) under the device CA,
    in the newest kits' ``scripts/`` (``proxy.crt``, ``proxy.key`` owner-only, and ``proxy_ca.pem``,
    the CA devices verify it with): start the proxy with ``--ssl-cert`` and ``--ssl-key``."""
    scripts = provisioned.kits / "scripts"
    scripts.mkdir(exist_ok=True)
    issued = DeviceCA(provisioned.device_ca).issue_server(PROXY_NAME, spec.proxy_hosts)
    write_bytes_atomic(scripts / "proxy.key", issued.key_pem, 0o600)  # key first: never a new cert with an old key
    write_bytes_atomic(scripts / "proxy.crt", issued.cert_pem, 0o644)
    write_bytes_atomic(scripts / "proxy_ca.pem", (provisioned.device_ca / "ca.pem").read_bytes(), 0o644)
    return scripts / "proxy.crt"


def site_certificate(provisioned: Provisioned, site: str) -> x509.Certificate:
    startup = provisioned.kit(site) / "startup"
    for name in ("client.crt", "server.crt", "relay.crt"):
        if (startup / name).exists():
            return x509.load_pem_x509_certificate((startup / name).read_bytes())
    raise ProvisionError(f"no certificate for {site!r} in {startup}")


def rotate_site(spec: FleetSpec, workspace: str | Path, site: str) -> Provisioned:
    """A new key and certificate for ``site`` under the same root; every other site keeps its own.
    Deploy the site's new startup kit (``Provisioned.kit(site)``) and restart it."""
    if site not in _sites(spec):
        raise ProvisionError(f"{site!r} is not a site of fleet {spec.project!r}: {_sites(spec)}")
    state_file = Provisioned(Path(workspace).resolve(), spec.project).state / "cert.json"
    if not state_file.exists():
        raise ProvisionError(f"no provisioning state in {state_file.parent}: provision the fleet first")
    state = json.loads(state_file.read_text())
    if site not in state:
        raise ProvisionError(f"the provisioning state holds no certificate for {site!r}")
    del state[site]
    write_json_atomic(state_file, state, mode=0o600)
    return provision(spec, workspace)
