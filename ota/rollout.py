"""The rollout controller: a release goes ring by ring, promoted only on healthy reports.

States: ``running`` (at stage k: rings 0..k are targeted) -> ``completed`` once the last ring is
healthy; ``paused`` (no promotion, reports still recorded) <-> ``running``; ``aborted`` when a
ring's failures pass the abort threshold: every targeted ring is pointed back at the release the
fleet ran before. ``rollback`` points the whole fleet at any earlier release the fleet completed.
A rollback is a signed targeting document naming the older release and ``rollback_from`` the one
to leave; a device follows it only off exactly that release and only to a release it committed
before (see ``ota.updater``), so the online rollout key cannot send a device anywhere it never ran.

A ring is promoted when at least ``min_reports`` of its devices reported the release installed
and healthy and the healthy share of its reports is at least ``promote_share``; it is aborted
when at least ``abort_failures`` of its devices failed (health check rolled back, or refused) and
the failure share is at least ``abort_share``. Everything is persisted in SQLite (one row per
rollout, one per device report, an event log), each change in one transaction, so a restarted
server loses nothing and carries on.

A report counts only if ``ota.reports.ReportGate`` admits it (sent by the device it names, which
is enrolled and in the ring it claims by the offline-signed layout, within its rate) and its ring
is one the rollout targets already; anything else is logged with its reason and counted nowhere.
The ring names come from that signed layout too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .reports import FAILED, HEALTHY, ReportGate, ReportRefused
from .repository import Repository, RepositoryError

log = logging.getLogger(__name__)

RUNNING, PAUSED, COMPLETED, ABORTED, ROLLED_BACK = "running", "paused", "completed", "aborted", "rolled-back"
COUNTED = "counted"
LAYOUT_TTL_S = 5.0  # a layout imported by another process is seen within this long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release TEXT NOT NULL,
    previous TEXT,
    state TEXT NOT NULL,
    stage INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    rollout_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    ring TEXT NOT NULL,
    release TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device)
);
CREATE TABLE IF NOT EXISTS events (rollout_id INTEGER, at REAL NOT NULL, message TEXT NOT NULL);
"""


class RolloutError(ValueError):
    """The rollout command cannot be done (the message says why); nothing changed."""


@dataclass(frozen=True)
class Policy:
    min_reports: int = 3
    promote_share: float = 0.9
    abort_failures: int = 1
    abort_share: float = 0.2

    def __post_init__(self) -> None:
        if self.min_reports < 1 or self.abort_failures < 1:
            raise ValueError("min_reports and abort_failures must be >= 1")
        if not (0 < self.promote_share <= 1 and 0 < self.abort_share <= 1):
            raise ValueError("promote_share and abort_share must be in (0, 1]")


class RolloutController:
    def __init__(
        self,
        db: str | Path,
        repository: Repository,
        rings: list[str] | None = None,
        policy: Policy | None = None,
        notify: Callable[[str, dict], None] | None = None,
        enrolled: Callable[[str], bool] | None = None,
        gate: ReportGate | None = None,
    ) -> None:
        """``rings``: the signed layout's ring names in order (default: read from it; given, they
        must match it); ``notify(ring, desired)`` is called after every signed change of a ring's
        targeting (the MQTT push); ``enrolled(device)``: the fleet's enrolment, for the report gate."""
        layout = repository.layout()
        if layout is None:
            raise RolloutError("the repository has no ring layout signed by the offline key: sign one first")
        names = [ring["name"] for ring in layout["rings"]]
        if rings is not None and list(rings) != names:
            raise RolloutError(f"rings {list(rings)} are not the signed layout's {names}")
        self.repository = repository
        self.rings = names
        self.policy = policy or Policy()
        self.notify = notify or (lambda ring, desired: None)
        self.gate = gate or ReportGate(self._layout, enrolled)
        self.refused = 0  # reports refused since start (each logged with its reason)
        self._layout_cache: tuple[float, dict | None] = (time.monotonic(), layout)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    # ---- queries --------------------------------------------------------------------------
    def _row(self, rollout_id: int | None = None) -> dict | None:
        query = "SELECT id, release, previous, state, stage, reason FROM rollouts "
        query += "WHERE id = ?" if rollout_id is not None else "ORDER BY id DESC LIMIT 1"
        row = self.db.execute(query, (rollout_id,) if rollout_id is not None else ()).fetchone()
        if row is None:
            return None
        return dict(zip(("id", "release", "previous", "state", "stage", "reason"), row))

    def status(self, rollout_id: int | None = None) -> dict:
        with self._lock:
            row = self._row(rollout_id)
            if row is None:
                raise RolloutError("no rollout yet")
            rings = {}
            for ring in self.rings:
                counts = dict(
                    self.db.execute(
                        "SELECT status, COUNT(*) FROM reports WHERE rollout_id = ? AND ring = ? AND release = ? "
                        "GROUP BY status",
                        (row["id"], ring, row["release"]),
                    ).fetchall()
                )
                rings[ring] = counts
            events = [m for (m,) in self.db.execute("SELECT message FROM events WHERE rollout_id = ?", (row["id"],))]
            targeted = self.rings[: row["stage"] + 1] if row["state"] in (RUNNING, PAUSED, COMPLETED) else []
            return row | {"rings": rings, "targeted": targeted, "events": events}

    def fleet_release(self) -> str | None:
        """The release the whole fleet last completed (the base of the next rollout)."""
        row = self.db.execute(
            "SELECT release FROM rollouts WHERE state = ? ORDER BY id DESC LIMIT 1", (COMPLETED,)
        ).fetchone()
        return row[0] if row else None

    # ---- changes --------------------------------------------------------------------------
    def _event(self, rollout_id: int, message: str) -> None:
        self.db.execute("INSERT INTO events VALUES (?, ?, ?)", (rollout_id, time.time(), message))

    def _set(self, rollout_id: int, **fields) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(
            f"UPDATE rollouts SET {assignments}, updated_at = ? WHERE id = ?",
            (*fields.values(), time.time(), rollout_id),
        )

    def _target(self, ring: str, desired: dict) -> None:
        self.repository.set_desired(ring, desired)
        self.notify(ring, desired)

    def start(self, release: str) -> int:
        with self._lock:
            if release not in self.repository.releases():
                raise RolloutError(f"release {release!r} does not exist; published: {self.repository.releases()}")
            current = self._row()
            if current and current["state"] in (RUNNING, PAUSED):
                raise RolloutError(f"rollout {current['id']} of {current['release']} is still {current['state']}")
            previous = self.fleet_release()
            now = time.time()
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "INSERT INTO rollouts (release, previous, state, stage, created_at, updated_at) "
                "VALUES (?, ?, ?, 0, ?, ?)",
                (release, previous, RUNNING, now, now),
            )
            rollout_id = int(cursor.lastrowid)
            self._event(rollout_id, f"started {release} (fleet on {previous}); ring {self.rings[0]} targeted")
            self.db.execute("COMMIT")
            self._target(self.rings[0], {"release": release, "rollout": rollout_id})
            return rollout_id

    def _layout(self) -> dict | None:
        at, layout = self._layout_cache
        if time.monotonic() - at > LAYOUT_TTL_S:
            self.repository.reload()  # a layout imported by another process
            layout = self.repository.layout()
            self._layout_cache = (time.monotonic(), layout)
        return layout

    def report(self, sender: str | None, body: object) -> str:
        """A device's outcome for a release, as ``sender`` (the device the transport authenticated)
        sent it; evaluates the rollout. Returns ``"counted"``, or why it was not."""
        with self._lock:
            try:
                report = self.gate.admit(sender, body)
            except ReportRefused as e:
                self.refused += 1
                log.warning("report refused: %s", e)
                return f"refused: {e}"
            row = self._row()
            if row is None or report.release != row["release"]:
                return "ignored: not about the current rollout's release"
            if report.ring not in self.rings[: row["stage"] + 1]:
                self.refused += 1
                log.warning("report refused: %s reports for ring %s, not targeted yet", report.device, report.ring)
                return f"refused: ring {report.ring} is not targeted yet"
            self.db.execute(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row["id"], report.device, report.ring, report.release, report.status, report.reason, time.time()),
            )
            self.evaluate()
            return COUNTED

    def evaluate(self) -> str | None:
        """Promote, complete or abort the running rollout on its reports; returns what happened."""
        with self._lock:
            row = self._row()
            if row is None or row["state"] != RUNNING:
                return None
            ring = self.rings[row["stage"]]
            statuses = [
                s
                for (s,) in self.db.execute(
                    "SELECT status FROM reports WHERE rollout_id = ? AND ring = ? AND release = ?",
                    (row["id"], ring, row["release"]),
                )
            ]
            healthy = sum(s == HEALTHY for s in statuses)
            failed = sum(s in FAILED for s in statuses)
            p = self.policy
            if failed >= p.abort_failures and failed / max(len(statuses), 1) >= p.abort_share:
                self._abort(row, f"ring {ring}: {failed} of {len(statuses)} devices failed")
                return ABORTED
            if healthy >= p.min_reports and healthy / len(statuses) >= p.promote_share:
                if row["stage"] + 1 == len(self.rings):
                    self.db.execute("BEGIN IMMEDIATE")
                    self._set(row["id"], state=COMPLETED, reason=f"every ring healthy ({ring}: {healthy})")
                    self._event(row["id"], f"completed: ring {ring} healthy ({healthy} of {len(statuses)})")
                    self.db.execute("COMMIT")
                    return COMPLETED
                following = self.rings[row["stage"] + 1]
                self.db.execute("BEGIN IMMEDIATE")
                self._set(row["id"], stage=row["stage"] + 1)
                self._event(row["id"], f"ring {ring} healthy ({healthy} of {len(statuses)}): ring {following} targeted")
                self.db.execute("COMMIT")
                self._target(following, {"release": row["release"], "rollout": row["id"]})
                return "promoted"
            return None

    def _abort(self, row: dict, reason: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self._set(row["id"], state=ABORTED, reason=reason)
        self._event(row["id"], f"aborted: {reason}")
        self.db.execute("COMMIT")
        if row["previous"]:
            for ring in self.rings[: row["stage"] + 1]:
                self._target(ring, {"release": row["previous"], "rollback_from": row["release"], "rollout": row["id"]})

    def pause(self) -> None:
        self._transition(RUNNING, PAUSED, "paused")

    def resume(self) -> None:
        self._transition(PAUSED, RUNNING, "resumed")
        self.evaluate()

    def abort(self, reason: str = "aborted by an operator") -> None:
        with self._lock:
            row = self._row()
            if row is None or row["state"] not in (RUNNING, PAUSED):
                raise RolloutError("no running or paused rollout to abort")
            self._abort(row, reason)

    def _transition(self, source: str, target: str, verb: str) -> None:
        with self._lock:
            row = self._row()
            if row is None or row["state"] != source:
                raise RolloutError(f"nothing to do: no {source} rollout ({verb} refused)")
            self.db.execute("BEGIN IMMEDIATE")
            self._set(row["id"], state=target)
            self._event(row["id"], verb)
            self.db.execute("COMMIT")

    def rollback(self, release: str) -> None:
        """Point every ring at an earlier release the fleet completed (an operator's decision)."""
        with self._lock:
            completed = [r for (r,) in self.db.execute("SELECT release FROM rollouts WHERE state = ?", (COMPLETED,))]
            if release not in completed:
                raise RolloutError(f"{release!r} is not a release the fleet completed; completed: {completed}")
            row = self._row()
            if row and row["state"] in (RUNNING, PAUSED):
                self._abort(row, f"rolled back to {release} by an operator")
            now = time.time()
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "INSERT INTO rollouts (release, previous, state, stage, reason, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (release, row["release"] if row else None, ROLLED_BACK, len(self.rings) - 1, "operator", now, now),
            )
            self._event(int(cursor.lastrowid), f"fleet rolled back to {release}")
            self.db.execute("COMMIT")
            current = row["release"] if row else None
            for ring in self.rings:
                try:
                    self._target(ring, {"release": release, "rollback_from": current})
                except RepositoryError as e:
                    raise RolloutError(str(e)) from e

    def close(self) -> None:
        self.db.close()


def describe(status: dict) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
