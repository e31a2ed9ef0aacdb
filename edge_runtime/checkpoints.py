"""The device's checkpoints: atomic, versioned, verified, with rollback to the last good one.

Layout under the daemon's state folder::

    checkpoints/
      ck-000041/            one checkpoint: its files and meta.json (sequence, sizes, sha256 of each
      ck-000042/            file, what it holds); complete or absent, never half-written
      current.json          the checkpoint to start from
      good.json             the last checkpoint that passed its checks (rollback target)

A checkpoint is written into a temporary folder, every file synced, its digests recorded, then
renamed into place and the folder synced; only then does ``current.json`` move (atomically). A
power cut at any point leaves either the old checkpoint current or the new one complete, and a
leftover temporary folder is removed on the next start. ``latest`` verifies the digests and falls
back, newest first, to a checkpoint that verifies: a corrupted file costs the newest state, never
all of it. The store holds bytes; what they mean (the learner's state, its fast layers) is the
caller's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app_custom.durable import crash_trace, fsync_path, write_bytes_atomic, write_json_atomic

log = logging.getLogger("fleetnest.checkpoints")
NAME = "ck-{:06d}"


class CheckpointError(RuntimeError):
    """No checkpoint could be written or read as asked; the message says which and why."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    path: Path
    meta: dict

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.root.glob(".tmp-*"):  # a write cut short: it never became a checkpoint
            shutil.rmtree(leftover, ignore_errors=True)

    # ---- writing ---------------------------------------------------------------------------------
    def save(self, files: Mapping[str, bytes], info: Mapping | None = None) -> int:
        """Write a new checkpoint of ``files`` (name -> bytes) and make it current; its sequence number."""
        if not files or not all(isinstance(n, str) and "/" not in n and n != "meta.json" for n in files):
            raise CheckpointError(f"checkpoint files must be plain names other than meta.json, got {sorted(files)}")
        seq = max(self._sequences(), default=0) + 1
        tmp = self.root / f".tmp-{NAME.format(seq)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            digests = {}
            for name, data in files.items():
                write_bytes_atomic(tmp / name, data, 0o600)
                digests[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                crash_trace("checkpoint-files")
            meta = {"seq": seq, "files": digests, "info": dict(info or {}), "created_at": time.time()}
            write_json_atomic(tmp / "meta.json", meta, 0o600)
        except OSError as err:  # a full disk, say: the partial folder goes, the current checkpoint stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {seq} in {self.root}: {err}") from err
        final = self.root / NAME.format(seq)
        tmp.rename(final)
        crash_trace("checkpoint-renamed")
        fsync_path(self.root)
        write_json_atomic(self.root / "current.json", {"seq": seq}, 0o600)
        self._prune()
        return seq

    def mark_good(self, seq: int) -> None:
        """``seq`` passed its checks (health, validation): the target of a rollback from now on."""
        if self._verified(seq) is None:
            raise CheckpointError(f"checkpoint {seq} does not verify; it cannot be marked good")
        write_json_atomic(self.root / "good.json", {"seq": seq}, 0o600)

    def rollback(self) -> Checkpoint:
        """Make the last good checkpoint current again (the newer ones stay, for inspection)."""
        good = self._pointer("good.json")
        checkpoint = self._verified(good) if good is not None else None
        if checkpoint is None:
            raise CheckpointError("no good checkpoint to roll back to")
        write_json_atomic(self.root / "current.json", {"seq": checkpoint.seq}, 0o600)
        log.warning("rolled back to checkpoint %d", checkpoint.seq)
        return checkpoint

    # ---- reading ---------------------------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        """The current checkpoint if it verifies, else the newest one that does; None if none does."""
        current = self._pointer("current.json")
        candidates = ([current] if current is not None else []) + sorted(self._sequences(), reverse=True)
        for seq in candidates:
            checkpoint = self._verified(seq)
            if checkpoint is not None:
                if seq != current:
                    log.warning("checkpoint %s does not verify; starting from checkpoint %d", current, seq)
                return checkpoint
        return None

    def _verified(self, seq: int) -> Checkpoint | None:
        path = self.root / NAME.format(seq)
        try:
            meta = json.loads((path / "meta.json").read_text())
            for name, expected in meta["files"].items():
                data = (path / name).read_bytes()
                if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
                    raise ValueError(f"{name} does not match its digest")
        except (OSError, ValueError, KeyError, TypeError) as err:
            if path.exists():
                log.warning("checkpoint %d is damaged: %s", seq, err)
            return None
        return Checkpoint(seq, path, meta)

    def _pointer(self, name: str) -> int | None:
        try:
            seq = json.loads((self.root / name).read_text())["seq"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    def _sequences(self) -> list[int]:
        return [int(p.name[3:]) for p in self.root.glob("ck-*") if p.name[3:].isdigit()]

    def _prune(self) -> None:
        """Keep the newest ``keep``, the current and the good one."""
        protected = {self._pointer("current.json"), self._pointer("good.json")}
        for seq in sorted(self._sequences(), reverse=True)[self.keep :]:
            if seq not in protected:
                shutil.rmtree(self.root / NAME.format(seq), ignore_errors=True)
