"""The versioned archive of global slow-layer versions.

Every version (accepted or rejected) is a folder ``v000042/`` holding ``slow.safetensors`` and
``meta.json`` (status, metrics, parent version, contributing device count, round, sha256 of the
weights). ``current.json`` names the current accepted version. Writes are atomic (a folder is
written under a temporary name, fsynced and renamed), so a crash never leaves half a version,
and a restarted server resumes from ``current.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ACCEPTED = "accepted"
REJECTED = "rejected"


class ArchiveError(RuntimeError):
    """The archive on disk is inconsistent with what was asked (missing version, hash mismatch)."""


@dataclass
class VersionRecord:
    version: int
    status: str
    parent: int | None
    round: int | None
    num_devices: int
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    sha256: str = ""
    created_at: float = 0.0


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VersionArchive:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a crash mid-write leaves only temporaries
            shutil.rmtree(stale, ignore_errors=True)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[VersionRecord]:
        records = []
        for meta in sorted(self.root.glob("v*/meta.json")):
            records.append(VersionRecord(**json.loads(meta.read_text())))
        return records

    def next_version(self) -> int:
        existing = [int(p.name[1:]) for p in self.root.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
        return max(existing, default=-1) + 1

    def save(self, tensors: dict[str, np.ndarray], record: VersionRecord) -> VersionRecord:
        """Write one version; if it is accepted it becomes current."""
        if self._dir(record.version).exists():
            raise ArchiveError(f"version {record.version} already exists in {self.root}")
        record.sha256 = _digest(tensors)
        record.created_at = record.created_at or time.time()
        tmp = self.root / f".tmp-v{record.version:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp / "slow.safetensors")
        )
        _write_json_atomic(tmp / "meta.json", asdict(record))
        os.replace(tmp, self._dir(record.version))
        if record.status == ACCEPTED:
            _write_json_atomic(self.root / "current.json", {"version": record.version})
        return record

    def current_version(self) -> int | None:
        path = self.root / "current.json"
        return json.loads(path.read_text())["version"] if path.exists() else None

    def load(self, version: int) -> tuple[dict[str, np.ndarray], VersionRecord]:
        folder = self._dir(version)
        if not folder.is_dir():
            raise ArchiveError(f"version {version} is not in {self.root}")
        record = VersionRecord(**json.loads((folder / "meta.json").read_text()))
        tensors = load_file(str(folder / "slow.safetensors"))
        if _digest(tensors) != record.sha256:
            raise ArchiveError(f"version {version}: weights do not match the recorded sha256")
        return tensors, record
