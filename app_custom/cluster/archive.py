"""The versioned archive of global slow-layer versions.

Every version (accepted or rejected) is a folder ``v000042/`` holding ``slow.safetensors`` and
``meta.json`` (status, metrics, parent version, contributing device count, round, sha256 of the
weights), and for accepted versions the server optimiser's state (``server_state.safetensors``).
``current.json`` names the current accepted version, and ``model.json`` (the model card) what the
weights belong to: the nested configuration, the input modalities and shapes, the number of
classes, so that a release can be built from the archive alone. Writes are atomic and durable (a folder is
written under a temporary name, fsynced, renamed, and its parent fsynced), so a crash never
leaves half a version; on opening, ``current.json`` is reconciled with the newest accepted
version (a crash between the two writes), and a restarted server resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from app_custom.durable import fsync_path, write_json_atomic

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


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over tensors by name, as float32 (what the archive records and devices check)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def _save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    fsync_path(path)


class VersionArchive:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a crash mid-write leaves only temporaries
            shutil.rmtree(stale, ignore_errors=True)
        accepted = [r.version for r in self.versions() if r.status == ACCEPTED]
        if accepted and max(accepted) != self.current_version():
            write_json_atomic(self.root / "current.json", {"version": max(accepted)})

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

    def save(
        self,
        tensors: dict[str, np.ndarray],
        record: VersionRecord,
        server_state: dict[str, np.ndarray] | None = None,
    ) -> VersionRecord:
        """Write one version (and the server optimiser state that goes with it); if it is accepted
        it becomes current."""
        if self._dir(record.version).exists():
            raise ArchiveError(f"version {record.version} already exists in {self.root}")
        record.sha256 = tensors_digest(tensors)
        record.created_at = record.created_at or time.time()
        tmp = self.root / f".tmp-v{record.version:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_tensors(tensors, tmp / "slow.safetensors")
        if server_state:
            _save_tensors(server_state, tmp / "server_state.safetensors")
        write_json_atomic(tmp / "meta.json", asdict(record))
        os.replace(tmp, self._dir(record.version))
        fsync_path(self.root)
        if record.status == ACCEPTED:
            write_json_atomic(self.root / "current.json", {"version": record.version})
        return record

    def write_model_card(self, card: dict) -> None:
        """Record what the archived weights belong to (``config``, ``input_spec``, ``num_classes``,
        ``shared_names``). An archive of another architecture is refused; a changed training
        setting (learning rate, epochs) only updates the card."""
        card = json.loads(json.dumps(card))  # plain JSON values (tuples become lists)

        def layout(c: dict) -> tuple:
            return c["input_spec"], c["num_classes"], c["shared_names"], c["config"].get("model")

        existing = self.model_card()
        if existing is not None and layout(existing) != layout(card):
            raise ArchiveError(
                f"{self.root} holds versions of another model (inputs, classes, shared layers or model "
                f"settings differ from this job's); use a new archive_dir"
            )
        if existing != card:
            write_json_atomic(self.root / "model.json", card)

    def model_card(self) -> dict | None:
        path = self.root / "model.json"
        return json.loads(path.read_text()) if path.exists() else None

    def last_round(self) -> int | None:
        """The highest round any archived version (accepted or rejected) came from."""
        rounds = [r.round for r in self.versions() if r.round is not None]
        return max(rounds) if rounds else None

    def load_server_state(self, version: int) -> dict[str, np.ndarray] | None:
        path = self._dir(version) / "server_state.safetensors"
        return load_file(str(path)) if path.exists() else None

    def current_version(self) -> int | None:
        path = self.root / "current.json"
        return json.loads(path.read_text())["version"] if path.exists() else None

    def load(self, version: int) -> tuple[dict[str, np.ndarray], VersionRecord]:
        folder = self._dir(version)
        if not folder.is_dir():
            raise ArchiveError(f"version {version} is not in {self.root}")
        record = VersionRecord(**json.loads((folder / "meta.json").read_text()))
        tensors = load_file(str(folder / "slow.safetensors"))
        if tensors_digest(tensors) != record.sha256:
            raise ArchiveError(f"version {version}: weights do not match the recorded sha256")
        return tensors, record
