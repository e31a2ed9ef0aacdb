"""The fleet's TUF repository (python-tuf metadata): signed releases and signed targeting.

Roles and what each signs:

- ``root`` (2 of 3 offline keys): the keys of every role;
- ``targets`` (offline key): the release bundles, as ``releases/<release>/<file>``, and the ring
  layout devices place themselves with, ``layout/rings.json``;
- ``rollout`` (online key, delegated by ``targets`` for ``desired/*`` only, terminating): which
  release each ring should run, as ``desired/<ring>.json``. This is Uptane's director idea: the
  online rollout server chooses among releases, but only among those the offline key signed, and
  for rings the offline key laid out;
- ``snapshot`` and ``timestamp`` (online keys): one consistent view of all metadata, and its
  freshness (the timestamp expires after a day: a frozen mirror is noticed).

The layout is TUF's consistent snapshot, served as is over HTTP: ``metadata/N.root.json``,
``metadata/N.targets.json``, ``metadata/N.rollout.json``, ``metadata/N.snapshot.json``,
``metadata/timestamp.json``, ``targets/<dir>/<sha256>.<file>``. Files are written atomically and
``timestamp.json`` last, so a client never sees a half-published state.

The targets role is signed offline (``ota.signing``) and imported here (``import_targets``): the
serving machine needs only the snapshot, timestamp and rollout keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from securesystemslib.signer import Signer
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from app_custom.durable import write_bytes_atomic

from .keys import ROOT_THRESHOLD, KeyDir
from .rings import LAYOUT, RingError, check_layout
from .signing import RELEASES, SigningError, layout_path, read_signed_folder, release_path, releases_in, sign_targets

ROLLOUT = "rollout"
DESIRED = "desired"
EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    ROLLOUT: timedelta(days=7),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
_JSON = JSONSerializer(compact=False)


class RepositoryError(ValueError):
    """The repository cannot do what was asked (the message says why); nothing was published."""


def _expires(role: str) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + EXPIRY[role]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


__all__ = [
    "DESIRED",
    "RELEASES",
    "ROLLOUT",
    "Repository",
    "RepositoryError",
    "desired_path",
    "layout_path",
    "release_path",
]


def desired_path(ring: str) -> str:
    return f"{DESIRED}/{ring}.json"


def _writes(method: Callable) -> Callable:
    """A repository change: done under the repository's lock, from the metadata on disk."""

    @functools.wraps(method)
    def locked(self: Repository, *args, **kwargs):
        with self._locked():
            return method(self, *args, **kwargs)

    return locked


class Repository:
    """A TUF repository on disk. Signing keys come from ``keys`` only when an operation needs them."""

    def __init__(self, path: str | os.PathLike, keys: KeyDir | None = None) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.keys = keys
        if not (self.metadata_dir / "timestamp.json").exists():
            raise RepositoryError(f"{self.path} is not a fleetnest OTA repository (no metadata/timestamp.json)")
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._reload()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time across processes and threads (the server renewing the timestamp, an
        operator starting a rollout), each starting from what is on disk, not from a stale copy."""
        with self._thread_lock:
            if self._depth:  # re-entered by the same writer
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with open(self.path / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    self._reload()
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def reload(self) -> None:
        """Read the metadata on disk again (another process may have published since)."""
        with self._locked():
            pass

    def _reload(self) -> None:
        roots = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json")]
        self.root = Metadata[Root].from_file(str(self.metadata_dir / f"{max(roots)}.root.json"))
        self.timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
        self.snapshot = self._load("snapshot", self.timestamp.signed.snapshot_meta.version)
        self.targets = self._load("targets", self.snapshot.signed.meta["targets.json"].version)
        self.rollout = self._load(ROLLOUT, self.snapshot.signed.meta[f"{ROLLOUT}.json"].version)

    def _load(self, role: str, version: int) -> Metadata:
        return Metadata.from_file(str(self.metadata_dir / f"{version}.{quote(role, '')}.json"))

    # ---- creation ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, keys: KeyDir) -> Repository:
        path = Path(path)
        if (path / "metadata").exists():
            raise RepositoryError(f"{path} already holds a repository")
        public = keys.public()
        root = Metadata(Root(expires=_expires("root")))
        for role in ("root", "targets", "snapshot", "timestamp"):
            for key in public[role]:
                root.signed.add_key(key, role)
        root.signed.roles["root"].threshold = ROOT_THRESHOLD
        targets = Metadata(Targets(expires=_expires("targets")))
        targets.signed.delegations = Delegations(keys={}, roles={})
        targets.signed.delegations.roles[ROLLOUT] = DelegatedRole(
            name=ROLLOUT, keyids=[], threshold=1, terminating=True, paths=[f"{DESIRED}/*"]
        )
        for key in public[ROLLOUT]:
            targets.signed.add_key(key, ROLLOUT)
        rollout = Metadata(Targets(expires=_expires(ROLLOUT)))
        snapshot = Metadata(Snapshot(expires=_expires("snapshot")))
        timestamp = Metadata(Timestamp(expires=_expires("timestamp")))
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = tmp / "metadata"
        meta.mkdir(parents=True)
        for signer in keys.root_signers():
            root.sign(signer, append=True)
        root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
        targets.sign(keys.signer("targets"))
        rollout.sign(keys.signer(ROLLOUT))
        snapshot.signed.meta = {"targets.json": MetaFile(1), f"{ROLLOUT}.json": MetaFile(1)}
        snapshot.sign(keys.signer("snapshot"))
        timestamp.signed.snapshot_meta = MetaFile(1)
        timestamp.sign(keys.signer("timestamp"))
        for md, name in [(root, "1.root.json"), (targets, "1.targets.json"), (rollout, f"1.{ROLLOUT}.json")]:
            _atomic_write(meta / name, md.to_bytes(_JSON))
        _atomic_write(meta / "1.snapshot.json", snapshot.to_bytes(_JSON))
        _atomic_write(meta / "timestamp.json", timestamp.to_bytes(_JSON))
        (tmp / "targets").mkdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return cls(path, keys)

    # ---- publishing ----------------------------------------------------------------------
    def _keys(self) -> KeyDir:
        if self.keys is None:
            raise RepositoryError("this operation signs metadata: give the key folder (--keys)")
        return self.keys

    def _publish(self, changed: dict[str, tuple[Metadata, Signer]]) -> None:
        """Bump, sign and write the changed targets roles, then a new snapshot, then the timestamp."""
        for role, (md, signer) in changed.items():
            md.signed.version += 1
            md.signed.expires = _expires(role)
            md.sign(signer)
            self._write_role(role, md)
        if changed:
            self._write_snapshot()
        self._write_timestamp()

    def _write_role(self, role: str, md: Metadata) -> None:
        delegator = self.root.signed if role == "targets" else self.targets.signed
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        _atomic_write(self.metadata_dir / f"{md.signed.version}.{quote(role, '')}.json", md.to_bytes(_JSON))
        self.snapshot.signed.meta[f"{role}.json"] = MetaFile(md.signed.version)

    def _write_snapshot(self) -> None:
        self.snapshot.signed.version += 1
        self.snapshot.signed.expires = _expires("snapshot")
        self.snapshot.sign(self._keys().signer("snapshot"))
        _atomic_write(
            self.metadata_dir / f"{self.snapshot.signed.version}.snapshot.json", self.snapshot.to_bytes(_JSON)
        )

    @_writes
    def refresh_timestamp(self) -> None:
        """A new timestamp (the server does this well within its one-day expiry)."""
        self._write_timestamp()

    def _write_timestamp(self) -> None:
        self.timestamp.signed.version += 1
        self.timestamp.signed.expires = _expires("timestamp")
        self.timestamp.signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
        self.timestamp.sign(self._keys().signer("timestamp"))
        _atomic_write(self.metadata_dir / "timestamp.json", self.timestamp.to_bytes(_JSON))

    def _add_target(self, md: Metadata, path: str, local: Path) -> None:
        target = TargetFile.from_file(path, str(local), ["sha256"])
        self._store_target(target, local)
        md.signed.targets[path] = target

    def _store_target(self, target: TargetFile, local: Path) -> None:
        for prefixed in target.get_prefixed_paths():
            dest = self.targets_dir / prefixed
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)

    def releases(self) -> list[str]:
        return releases_in(self.targets.signed)

    # ---- the offline targets role --------------------------------------------------------------
    @_writes
    def import_targets(self, folder: str | os.PathLike) -> list[str]:
        """Take targets metadata signed offline (``ota.signing.sign_targets``) with the files it newly
        signs, then publish a new snapshot and timestamp (the online keys); returns the paths added or
        changed. Refused unless it is signed by the root's targets keys, is exactly the next version,
        keeps every file signed before (only the ring layout may change) and every new file matches
        its signed length and hashes."""
        try:
            md, files = read_signed_folder(folder)
        except SigningError as e:
            raise RepositoryError(str(e)) from e
        try:
            self.root.signed.verify_delegate("targets", md.signed_bytes, md.signatures)
        except UnsignedMetadataError as e:
            raise RepositoryError(f"the targets metadata is not signed by the fleet's targets key: {e}") from e
        new, old = md.signed, self.targets.signed
        if new.version != old.version + 1:
            raise RepositoryError(
                f"targets version {new.version} is not the next one ({old.version + 1}): sign again on top of "
                f"metadata/{old.version}.targets.json"
            )
        if new.is_expired():
            raise RepositoryError(f"the targets metadata expired at {new.expires.isoformat()}")
        for path, info in old.targets.items():
            if path != layout_path() and new.targets.get(path) != info:
                raise RepositoryError(f"{path} is changed or removed: a signed release file is never replaced")
        added = {path: info for path, info in new.targets.items() if old.targets.get(path) != info}
        for path, info in added.items():
            local = files / info.get_prefixed_paths()[0]
            try:
                with open(local, "rb") as f:
                    info.verify_length_and_hashes(f)
            except (OSError, LengthOrHashMismatchError) as e:
                raise RepositoryError(f"{path}: the signed folder's file is missing or does not match: {e}") from e
        for info in added.values():
            self._store_target(info, files / info.get_prefixed_paths()[0])
        self._write_role("targets", md)
        self.targets = md
        changed: dict[str, tuple[Metadata, Signer]] = {}
        try:  # a rollout key the offline role newly delegates to: the rollout metadata is signed again
            self.targets.signed.verify_delegate(ROLLOUT, self.rollout.signed_bytes, self.rollout.signatures)
        except UnsignedMetadataError:
            changed[ROLLOUT] = (self.rollout, self._keys().signer(ROLLOUT))
        for role, (role_md, signer) in changed.items():
            role_md.signed.version += 1
            role_md.signed.expires = _expires(role)
            role_md.sign(signer)
            self._write_role(role, role_md)
        self._write_snapshot()
        self._write_timestamp()
        return sorted(added)

    def _sign_and_import(self, **what) -> None:
        """The single-machine path: sign offline (the targets key is here too), then import."""
        staging = self.path / ".staging"
        staging.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            try:
                sign_targets(self._keys(), self.targets, Path(tmp) / "signed", **what)
            except SigningError as e:
                raise RepositoryError(str(e)) from e
            self.import_targets(Path(tmp) / "signed")

    @_writes
    def add_release(self, bundle: str | os.PathLike) -> str:
        """Sign a verified bundle into the repository (needs the offline targets key here: a
        development setup; a fleet signs offline and imports, see ``ota.signing``)."""
        from .bundle import read_manifest

        release = read_manifest(Path(bundle))["release"]
        self._sign_and_import(bundle=bundle)
        return release

    @_writes
    def set_desired(self, ring: str, document: dict) -> None:
        """Sign which release ``ring`` should run (the online rollout key); the release must be one
        the offline targets key signed."""
        if not ring or "/" in ring or ring.startswith(".") or ring == LAYOUT:
            raise RepositoryError(f"bad ring name {ring!r}")
        release = document.get("release")
        if release not in self.releases():
            raise RepositoryError(
                f"release {release!r} is not signed into the repository; published: {self.releases()}"
            )
        self._sign_desired(ring, document)

    def desired(self, ring: str) -> dict | None:
        """The signed targeting document of ``ring``, as published."""
        if ring == LAYOUT:
            return None  # never a targeting document: the layout is the offline role's (``layout()``)
        info = self.rollout.signed.targets.get(desired_path(ring))
        if info is None:
            return None
        return json.loads((self.targets_dir / info.get_prefixed_paths()[0]).read_bytes())

    def layout(self) -> dict | None:
        """The ring layout the offline targets key signed (``layout/rings.json``), or None."""
        info = self.targets.signed.targets.get(layout_path())
        if info is None:
            return None
        return check_layout(json.loads((self.targets_dir / info.get_prefixed_paths()[0]).read_bytes()))

    @_writes
    def set_layout(self, layout: dict) -> None:
        """Sign the ring layout devices place themselves with (needs the offline targets key here: a
        development setup; a fleet signs it offline with ``fleetnest ota sign --salt``)."""
        try:
            check_layout(layout)
        except RingError as e:
            raise RepositoryError(str(e)) from e
        self._sign_and_import(layout=layout)

    def _sign_desired(self, ring: str, document: dict) -> None:
        signer = self._keys().signer(ROLLOUT)
        data = json.dumps(document, sort_keys=True).encode()
        staging = self.path / ".staging"
        staging.mkdir(exist_ok=True)
        local = staging / f"{ring}.json"
        _atomic_write(local, data)
        self._add_target(self.rollout, desired_path(ring), local)
        local.unlink()
        self._publish({ROLLOUT: (self.rollout, signer)})

    @_writes
    def rotate_key(self, role: str, root_signers: list[Signer]) -> None:
        """Trust the key now in the key folder for ``role`` instead of the old one (after
        ``keys.replace_key``): a new root version (signed by a root threshold) for targets, snapshot
        and timestamp, a new targets version (the offline key) for the delegated rollout role; then
        the role's metadata is signed again with the new key. Devices follow on their next check."""
        keys = self._keys()
        new_key = keys.public()[role][0]
        if role == ROLLOUT:
            for keyid in list(self.targets.signed.delegations.roles[ROLLOUT].keyids):
                self.targets.signed.revoke_key(keyid, ROLLOUT)
            self.targets.signed.add_key(new_key, ROLLOUT)
            self._publish(
                {"targets": (self.targets, keys.signer("targets")), ROLLOUT: (self.rollout, keys.signer(ROLLOUT))}
            )
            return
        if role not in ("targets", "snapshot", "timestamp"):
            raise RepositoryError(f"cannot rotate {role!r} this way (root keys: rotate_root)")
        previous = Metadata[Root].from_bytes(self.root.to_bytes())
        for keyid in list(self.root.signed.roles[role].keyids):
            self.root.signed.revoke_key(keyid, role)
        self.root.signed.add_key(new_key, role)
        self.root.signed.version += 1
        self.root.signed.expires = _expires("root")
        self.root.signatures.clear()
        for signer in root_signers:
            self.root.sign(signer, append=True)
        if not self.root.signed.get_root_verification_result(
            previous.signed, self.root.signed_bytes, self.root.signatures
        ).verified:
            self.root = previous
            raise RepositoryError("the new root is not signed by a threshold of the root keys")
        _atomic_write(self.metadata_dir / f"{self.root.signed.version}.root.json", self.root.to_bytes(_JSON))
        # everything the rotated role signs is signed again, with the new key
        self._publish(
            {"targets": (self.targets, keys.signer("targets"))}
            if role == "targets"
            else {ROLLOUT: (self.rollout, keys.signer(ROLLOUT))}
        )

    @_writes
    def rotate_root(
        self, old_signers: list[Signer], new_signers: list[Signer], threshold: int = ROOT_THRESHOLD
    ) -> None:
        """A new root version trusting ``new_signers``' keys for the root role, signed by a threshold
        of the old keys and of the new ones (a device that trusts the old root walks to the new)."""
        if len(new_signers) < threshold:
            raise RepositoryError(f"{len(new_signers)} new root keys cannot meet a threshold of {threshold}")
        previous = Metadata[Root].from_bytes(self.root.to_bytes())
        for keyid in list(self.root.signed.roles["root"].keyids):
            self.root.signed.revoke_key(keyid, "root")
        for signer in new_signers:
            self.root.signed.add_key(signer.public_key, "root")
        self.root.signed.roles["root"].threshold = threshold
        self.root.signed.version += 1
        self.root.signed.expires = _expires("root")
        self.root.signatures.clear()
        for signer in [*old_signers, *new_signers]:
            self.root.sign(signer, append=True)
        result = self.root.signed.get_root_verification_result(
            previous.signed, self.root.signed_bytes, self.root.signatures
        )
        if not result.verified:
            self.root = previous
            raise RepositoryError("the new root is not signed by a threshold of both the old and the new root keys")
        _atomic_write(self.metadata_dir / f"{self.root.signed.version}.root.json", self.root.to_bytes(_JSON))
        self._write_timestamp()
