"""The fleet's OTA service on one machine, set up as a real fleet is (what the demo runs):

- a key ceremony: every key made in ``work/ceremony``, the repository created and the ring layout
  signed there, then the offline key moved to ``work/offline`` and the online ones to
  ``work/online``; the ceremony folder is deleted (the root keys would go to their safes);
- releases signed in ``work/offline`` (``ota.signing``) and imported by the server (``work/online``);
- the repository served over HTTPS with a certificate from the fleet's service CA, the timestamp
  kept fresh (``ota.freshness``);
- with a broker (``ota.brokers.FleetBrokerSetup``): the rollout controller on the broker's service
  listener, counting reports only from enrolled devices of the device CA, in their signed ring.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from . import keys as fleet_keys
from .brokers import FleetBrokerSetup
from .freshness import TimestampKeeper
from .keys import KeyDir
from .mqtt import RolloutBroker
from .reports import Enrolment
from .repository import Repository
from .rings import make_layout, ring_of
from .rollout import Policy, RolloutController
from .server import RepositoryServer
from .signing import sign_targets
from .tls import ServiceCA, TlsFiles

OFFLINE = ("targets",)
ONLINE = ("snapshot", "timestamp", "rollout")


def split_keys(ceremony: Path, offline: Path, online: Path) -> tuple[KeyDir, KeyDir]:
    """Copy the offline targets key and the online keys out of a ceremony folder, each with the
    public keys; returns (offline, online) key folders."""
    for folder, kind, roles in ((offline, "offline", OFFLINE), (online, "online", ONLINE)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        shutil.copy2(ceremony / "public.json", folder / "public.json")
        for role in roles:
            shutil.copy2(ceremony / kind / f"{role}.pem", folder / kind / f"{role}.pem")
    return KeyDir(offline), KeyDir(online)


class FleetOtaService:
    def __init__(
        self,
        work: Path,
        rings: tuple[tuple[str, float], ...],
        salt: str,
        service_ca: ServiceCA,
        broker: FleetBrokerSetup | None = None,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.work = Path(work)
        ceremony = fleet_keys.generate(self.work / "ceremony")
        repository = Repository.create(self.work / "repo", ceremony)
        self.layout = make_layout(salt, list(rings))
        repository.set_layout(self.layout)
        self.offline, self.online = split_keys(ceremony.path, self.work / "offline", self.work / "online")
        shutil.rmtree(ceremony.path)
        self.repository = Repository(self.work / "repo", self.online)
        self.root = self.work / "root.json"
        self.root.write_bytes((self.repository.metadata_dir / "1.root.json").read_bytes())
        self.ca_file = service_ca.cert_file
        identity = service_ca.issue_server("ota-server", [host, "localhost"], self.work / "tls")
        tls = TlsFiles(None, identity.cert_file, identity.key_file).server_context()
        self.server = RepositoryServer(self.work / "repo", host, tls=tls).start()
        self.keeper = TimestampKeeper(self.repository, every_s=3600).start()
        self.controller: RolloutController | None = None
        self.broker: RolloutBroker | None = None
        if broker is not None:
            self.controller = RolloutController(
                self.work / "rollouts.sqlite",
                self.repository,
                policy=policy,
                enrolled=Enrolment(broker.device_ca_dir),
            )
            self.broker = RolloutBroker(
                broker.config.service_host,
                broker.config.service_port,
                on_report=self.controller.report,
                current_targeting=lambda: {r: d for r in self.controller.rings if (d := self.repository.desired(r))},
                prefix=broker.config.prefix,
                tls=broker.rollout,
            ).start()
            self.controller.notify = self.broker.publish_desired

    @property
    def url(self) -> str:
        return self.server.url

    def ring_of(self, device: str) -> str:
        return ring_of(device, self.layout)

    def publish(self, archive_root: Path, version: int, device_class: str, **build) -> str:
        """Build a release, sign it with the offline key alone, import it with the online keys alone."""
        from .bundle import read_manifest
        from .release import build_release

        bundle = self.work / "bundles" / f"v{version}"
        if not bundle.exists():
            build_release(archive_root, bundle, device_class, version=version, **build)
        current = self.repository.metadata_dir / f"{self.repository.targets.signed.version}.targets.json"
        with tempfile.TemporaryDirectory(dir=self.work) as carried:
            sign_targets(self.offline, current, Path(carried) / "signed", bundle=bundle)
            self.repository.import_targets(Path(carried) / "signed")
        return read_manifest(bundle)["release"]

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        if self.controller is not None:
            self.controller.close()
        self.keeper.stop()
        self.server.stop()
