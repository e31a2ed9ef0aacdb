"""Offline signing: the targets role's metadata, made on a machine that holds only the offline keys.

The offline machine gets the repository's current targets metadata (``metadata/N.targets.json``:
public, the OTA server serves it) and a bundle or a ring layout, and writes a *signed folder*::

    OUT/<N+1>.targets.json      signed by the offline targets key, nothing else
    OUT/targets/<dir>/<sha256>.<file>   every file it newly signs (bundle files, the layout)

which is carried to the serving machine and imported there (``Repository.import_targets``): the
server checks the signature against the root's targets keys, the version, and every file against
its signed length and hashes, then signs a new snapshot and timestamp with its online keys. Neither
machine ever holds the other's keys. ``Repository.add_release`` and ``set_layout`` (a single-machine
development setup) run the same two steps.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from .bundle import read_manifest, verify_files
from .keys import KeyDir
from .layout import MANIFEST
from .rings import LAYOUT, RingError, check_layout

RELEASES = "releases"
TARGETS_EXPIRY_DAYS = 90


class SigningError(ValueError):
    """Nothing was signed (the message says why)."""


def release_path(release: str, name: str) -> str:
    return f"{RELEASES}/{release}/{name}"


def layout_path() -> str:
    """Where the ring layout lives: under the top-level targets role, signed by the offline key only
    (the online rollout role is delegated ``desired/*`` and cannot sign it)."""
    return f"layout/{LAYOUT}.json"


def releases_in(targets: Targets) -> list[str]:
    return sorted({path.split("/")[1] for path in targets.targets if path.startswith(f"{RELEASES}/")})


def _check_base(current: Metadata, keys: KeyDir) -> None:
    """The metadata to sign on top of must carry a valid signature of this fleet's targets key: a
    tampered copy brought to the offline machine is not signed over."""
    if current.signed.type != Targets.type:
        raise SigningError(f"expected targets metadata, got {current.signed.type!r}")
    trusted = {key.keyid: key for key in keys.public()["targets"]}
    for keyid, signature in current.signatures.items():
        key = trusted.get(keyid)
        if key is None:
            continue
        try:
            key.verify_signature(signature, current.signed_bytes)
            return
        except Exception:  # noqa: BLE001, S112 - securesystemslib raises several kinds; try the next one
            continue
    raise SigningError("the current targets metadata is not signed by this fleet's targets key (tampered copy?)")


def _stage(out: Path, path: str, local: Path, targets: Targets) -> None:
    target = TargetFile.from_file(path, str(local), ["sha256"])
    for prefixed in target.get_prefixed_paths():
        dest = out / "targets" / prefixed
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
    targets.targets[path] = target


def sign_targets(
    keys: KeyDir,
    current_targets: str | os.PathLike | Metadata,
    out: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    layout: dict | None = None,
    signer: Signer | None = None,
) -> Path:
    """Sign ``bundle`` (a release) and/or ``layout`` (the ring layout) on top of ``current_targets``
    into the new folder ``out`` with the offline targets key; returns the new metadata file."""
    if bundle is None and layout is None:
        raise SigningError("nothing to sign: give a bundle, a ring layout or both")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SigningError(f"{out} is not empty: a signed folder is written once")
    md = (
        Metadata.from_bytes(current_targets.to_bytes())
        if isinstance(current_targets, Metadata)
        else Metadata.from_file(str(current_targets))
    )
    _check_base(md, keys)
    signer = signer or keys.signer("targets")
    out.mkdir(parents=True, exist_ok=True)
    targets: Targets = md.signed
    if bundle is not None:
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        verify_files(bundle, manifest)
        release = manifest["release"]
        if release in releases_in(targets):
            raise SigningError(f"release {release} is already signed: a release is never replaced")
        for name in [MANIFEST, *manifest["files"]]:
            _stage(out, release_path(release, name), bundle / name, targets)
    if layout is not None:
        try:
            check_layout(layout)
        except RingError as e:
            raise SigningError(str(e)) from e
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "rings.json"
            local.write_bytes(json.dumps(layout, sort_keys=True).encode())
            _stage(out, layout_path(), local, targets)
    targets.version += 1
    now = datetime.now(timezone.utc).replace(microsecond=0)
    targets.expires = now + timedelta(days=TARGETS_EXPIRY_DAYS)
    md.signatures.clear()
    md.sign(signer)
    path = out / f"{targets.version}.targets.json"
    path.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    return path


def read_signed_folder(folder: str | os.PathLike) -> tuple[Metadata, Path]:
    """The one targets metadata file of a signed folder, parsed (not yet verified)."""
    folder = Path(folder)
    found = sorted(folder.glob("*.targets.json"))
    if len(found) != 1:
        raise SigningError(f"{folder}: expected exactly one <version>.targets.json, found {[p.name for p in found]}")
    try:
        md = Metadata.from_file(str(found[0]))
    except Exception as e:  # noqa: BLE001 - any parse failure is a refusal
        raise SigningError(f"{found[0]}: not TUF metadata ({e})") from e
    if md.signed.type != Targets.type:
        raise SigningError(f"{found[0]}: expected targets metadata, got {md.signed.type!r}")
    return md, folder / "targets"
