"""The cluster of the hierarchy: FLARE's ``ScatterAndGatherForEdge`` with this ``Assessor``.

It hands out the current global slow-layer version, takes leaf sums from its children (checked
on arrival: fields, the leaf's own signature, made with the key of its FLARE startup kit, under
the project's root CA and for a leaf at or below the reporting child, so a cluster-tier client
can neither alter nor invent a sum; then shape, count, weight, base version and norm by the
``LeafSumCombiner``),
buffers them (one per leaf), and when the buffer holds ``buffer_size`` leaves, or its oldest sum
has waited ``buffer_timeout`` seconds, combines them (staleness-weighted, an outlying leaf
refused) and makes a candidate version through ``GlobalVersions``: the same gate and archive as
the flat job. Each refusal is logged with the leaf and the reason; a repeated (leaf, session) is
dropped, so a resent report is harmless.

``mode``: ``sync`` ends the FLARE round after each version (leaves start new sessions from it:
no staleness); ``async`` sends each new version in its replies to the children's reports
(buffered asynchronous aggregation, FedBuff) and renews the FLARE task every
``versions_per_task`` candidates. Staleness counts accepted versions only. The workflow ends
after ``num_versions`` accepted versions, or ``max_rounds`` rounds (sync) or candidates (async),
or ``max_wait`` seconds without a leaf sum.

The archive lives in the server's workspace (``archive_dir``, relative to it and then one folder
per job name, unless absolute), not in the job's run folder: a restarted server, or the same job
submitted again, resumes from its current version.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.edge.assessor import Assessment, Assessor

from app_custom.cluster.aggregation import SlowDeltaAggregator
from app_custom.cluster.archive import ACCEPTED
from app_custom.cluster.gate import ValidationGate
from app_custom.cluster.leaf_sums import LeafPolicy, LeafSum, LeafSumCombiner
from app_custom.cluster.versions import GlobalVersions
from app_custom.durable import write_json_atomic
from app_custom.flare.fleet_messages import (
    ACKNOWLEDGED,
    MODES,
    LeafSumVerifier,
    leaves_under,
    read_report,
    version_message,
)
from app_custom.flare.learner_executor import check_data_spec
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet
from app_custom.nested.slow_delta import UpdateError
from app_custom.privacy.dp import ACCOUNTING
from app_custom.privacy.private_update import PrivacySettings

LOG_FILE = "fleet_versions.json"
MAX_BACKLOG_PER_BUFFER = 4  # sums waiting for a later buffer, per buffer slot
MAX_LOGGED = 1000  # refusals kept in the version log


class NestedFleetAssessor(Assessor):
    def __init__(
        self,
        config: dict,
        data: dict,
        privacy: dict,
        mode: str = "async",
        num_versions: int = 3,
        max_rounds: int = 10,
        buffer_size: int = 2,
        buffer_timeout: float = 30.0,
        max_wait: float = 600.0,
        max_staleness: int = 4,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        max_acc_drop: float = 0.05,
        max_loss_rise: float = 0.25,
        max_cohort: int = 1024,
        versions_per_task: int = 5,
        archive_dir: str = "fleetnest_archive",
        project_ca: str = "startup/rootCA.pem",
    ) -> None:
        """Args:
        config, data: the nested configuration and the data spec (the cluster uses its validation set).
        privacy: the devices' ``PrivacySettings`` mapping (clip bound and noise bound the leaf-sum check).
        mode: ``sync`` or ``async`` (see the module's text).
        num_versions: accepted versions after which the workflow ends.
        max_rounds: rounds (sync) or candidate versions, accepted or not (async), after which it ends anyway.
        buffer_size, buffer_timeout: a version is made from ``buffer_size`` leaves' sums, or from
            what the buffer holds once its oldest sum waited ``buffer_timeout`` seconds.
        max_wait: seconds without any leaf sum after which the workflow ends (a fleet gone quiet).
        max_staleness: versions a sum may lag behind and still count (by 1/sqrt(1 + s)).
        max_cohort: the largest cohort a leaf may report.
        versions_per_task: in async mode the FLARE task is renewed after this many candidates, so
            that a leaf whose reporting loop ended (a timeout, a restart) gets the next task.
        archive_dir: relative to the server's workspace (then one folder per job name) or absolute.
        project_ca: the project's root CA certificate, which issued every leaf's site key: relative
            to the server's workspace (its startup kit's own by default) or absolute.
        """
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (
            ("num_versions", num_versions),
            ("max_rounds", max_rounds),
            ("buffer_size", buffer_size),
            ("versions_per_task", versions_per_task),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("buffer_timeout", buffer_timeout), ("max_wait", max_wait)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.config, self.privacy, self.mode = config, privacy, mode
        self.nested = NestedConfig.from_dict(config)
        self.data = check_data_spec(data)
        self.settings = PrivacySettings.from_dict(privacy)
        self.num_versions, self.max_rounds = num_versions, max_rounds
        self.buffer_size, self.buffer_timeout, self.max_wait = buffer_size, buffer_timeout, max_wait
        self.max_staleness, self.max_cohort = max_staleness, max_cohort
        self.versions_per_task = versions_per_task
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.max_acc_drop, self.max_loss_rise = max_acc_drop, max_loss_rise
        self.archive_dir = archive_dir
        self.project_ca = project_ca
        self.verifier: LeafSumVerifier | None = None
        self.versions: GlobalVersions | None = None
        self.combiner: LeafSumCombiner | None = None
        self._lock = threading.Lock()  # the buffer and what is published; never held while scoring
        self._version_lock = threading.Lock()  # one candidate at a time
        self._published: tuple[int, dict] = (0, {})
        self._accepted_versions: list[int] = []  # what leaves may train from, in order
        self._buffer: dict[str, LeafSum] = {}
        self._backlog: list[LeafSum] = []
        self._first_at: float | None = None
        self._last_sum_at = time.monotonic()
        self._seen: set[tuple[str, int]] = set()
        self._accepted = 0
        self._round = 0
        self._candidates = 0  # candidate versions made by this run
        self._rounds_run = 0  # FLARE rounds of this run (the archive's round numbers go on from before)
        self._task_candidates = 0
        self._log: dict = {"versions": [], "refused": []}
        self._log_path: Path | None = None

    # ---- SAGE's assessor API -------------------------------------------------------------------
    def start_task(self, fl_ctx: FLContext) -> Shareable:
        if self.verifier is None:
            self.verifier = self._open_verifier(fl_ctx)
        if self.versions is None:
            self._open(fl_ctx)
        with self._lock:
            self._round += 1
            self._rounds_run += 1
            self._task_candidates = 0
            return version_message(*self._published)

    def process_child_update(self, update: Shareable, fl_ctx: FLContext):
        peer = fl_ctx.get_peer_context()
        child = peer.get_identity_name() if peer else "?"
        known, entries, problems = read_report(update)
        if self.versions is None:  # no task handed out yet: nothing can be judged
            return False, None
        allowed = leaves_under(fl_ctx, child)
        refusals = [f"from {child}: {problem}" for problem in problems]
        acknowledged = []
        job_id = fl_ctx.get_job_id()
        with self._lock:
            for session, item, signature in entries:
                acknowledged.append([item.leaf, session])
                if allowed is not None and item.leaf not in allowed:
                    refusals.append(f"from {child}: leaf {item.leaf} is not one of its leaves")
                    continue
                try:  # before the (leaf, session) counts as seen: a forged one cannot pre-empt the genuine sum
                    self.verifier.verify(job_id, session, item, signature)
                except UpdateError as err:
                    refusals.append(f"from {child}: leaf {item.leaf}, session {session}: {err}")
                    continue
                key = (item.leaf, session)
                if key in self._seen:
                    continue  # a resent report: that sum is counted already
                self._seen.add(key)
                self._last_sum_at = time.monotonic()
                if item.leaf not in self._buffer:
                    self._add_to_buffer(item)
                elif len(self._backlog) < MAX_BACKLOG_PER_BUFFER * self.buffer_size:
                    self._backlog.append(item)
                else:
                    refusals.append(f"leaf {item.leaf}: the backlog is full; its sum of session {session} is dropped")
            version, weights = self._published
            self._refuse(fl_ctx, refusals)
        reply = version_message(version, weights if known is None or known < version else None)
        reply[ACKNOWLEDGED] = acknowledged
        return bool(entries), reply

    def assess(self, fl_ctx: FLContext) -> Assessment:
        with self._lock:
            now = time.monotonic()
            full = len(self._buffer) >= self.buffer_size
            waited = self._first_at is not None and now - self._first_at >= self.buffer_timeout
            items = self._take_buffer() if self._buffer and (full or waited) else None
            quiet = now - self._last_sum_at > self.max_wait
        if items:
            with self._version_lock:
                self._make_version(fl_ctx, items)
            if self._accepted >= self.num_versions:
                return Assessment.WORKFLOW_DONE
            spent = self._rounds_run if self.mode == "sync" else self._candidates
            if spent >= self.max_rounds:
                self.log_warning(fl_ctx, f"{self._accepted} of {self.num_versions} versions accepted in {spent}")
                return Assessment.WORKFLOW_DONE
            if self.mode == "sync" or self._task_candidates >= self.versions_per_task:
                return Assessment.TASK_DONE
        elif quiet:
            self.log_warning(fl_ctx, f"no leaf sum for {self.max_wait:.0f} s: ending the workflow")
            return Assessment.WORKFLOW_DONE
        return Assessment.CONTINUE

    def end_task(self, fl_ctx: FLContext) -> None:
        with self._lock:  # in sync mode a sum of the ended round that came too late is void
            if self.mode == "sync":
                self._buffer, self._backlog, self._first_at = {}, [], None

    # ---- versions ------------------------------------------------------------------------------
    def _open_verifier(self, fl_ctx: FLContext) -> LeafSumVerifier:
        path = Path(self.project_ca)
        if not path.is_absolute():
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            if workspace is None:
                raise ValueError(f"project_ca {self.project_ca!r} is relative, and there is no server workspace")
            path = Path(workspace.get_root_dir()) / path
        try:
            verifier = LeafSumVerifier(path.read_bytes())
        except (OSError, ValueError) as err:
            self.log_error(fl_ctx, f"cannot check the leaves' signatures: {err}")
            raise ValueError(f"cannot check the leaves' signatures with {path}: {err}") from err
        self.log_info(fl_ctx, f"leaf sums must be signed by their leaf under {path}")
        return verifier

    def _open(self, fl_ctx: FLContext) -> None:
        fleet = load_fleet(self.data["fn"], self.data.get("kwargs", {}))
        root = Path(self.archive_dir)
        if not root.is_absolute():
            # one archive per job name: the same job submitted again resumes, another starts its own
            workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
            job_name = (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("name") or "job"
            root = Path(workspace.get_root_dir()) / root / job_name
        self.versions = GlobalVersions(
            self.config,
            fleet.cluster_validation,
            self.nested.model.num_classes or fleet.num_classes,
            root,
            SlowDeltaAggregator(self.server_lr, self.server_momentum),
            ValidationGate(self.max_acc_drop, self.max_loss_rise),
        )
        policy = LeafPolicy(
            privacy=self.settings,
            length=self.settings.update_length(self.versions.expected),
            max_staleness=self.max_staleness,
            max_cohort=self.max_cohort,
        )
        self.combiner = LeafSumCombiner(policy, self.versions.expected)
        self._log_path = root / LOG_FILE
        if self._log_path.exists():
            self._log = json.loads(self._log_path.read_text())
        self._round = self.versions.next_round() - 1  # start_task counts on from the archive's rounds
        self._accepted_versions = [r.version for r in self.versions.archive.versions() if r.status == ACCEPTED]
        self._published = (self.versions.version, self.versions.current)
        state = "resumed from" if self.versions.resumed else "starting at"
        self.log_info(fl_ctx, f"{state} global version {self.versions.version} ({root})")
        dp = self.settings.dp
        self.log_info(
            fl_ctx,
            f"privacy: {self.settings.mechanism}, noise multiplier {dp.noise_multiplier} on the sum of"
            f" {dp.contributors_assumed} devices' shares, delta {dp.delta}; each device's ledger: {ACCOUNTING}",
        )

    def _add_to_buffer(self, item: LeafSum) -> None:
        if not self._buffer:
            self._first_at = time.monotonic()
        self._buffer[item.leaf] = item

    def _take_buffer(self) -> list[LeafSum]:
        """The buffer's sums; the backlog moves up (one sum per leaf)."""
        items = list(self._buffer.values())
        self._buffer, self._first_at = {}, None
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            (self._backlog.append if item.leaf in self._buffer else self._add_to_buffer)(item)
        return items

    def _make_version(self, fl_ctx: FLContext, items: list[LeafSum]) -> None:
        versions = self.versions
        versions.aggregator.reset()
        # staleness counts accepted versions: rejected candidates were never sent to a leaf
        order = {version: n for n, version in enumerate(self._accepted_versions)}
        refusals, ranked = [], []
        for item in items:
            if item.base_version not in order:
                refusals.append(f"leaf {item.leaf}: base version {item.base_version} was never an accepted version")
            else:
                ranked.append(replace(item, base_version=order[item.base_version]))
        combined = self.combiner.combine(ranked, len(order) - 1, versions.aggregator)
        refusals += [f"{rejection.contributor}: {rejection.reason}" for rejection in combined.rejections]
        entry = {"leaves": combined.accepted, "devices": combined.devices, "at": time.time()}
        if versions.aggregator.count:
            self._candidates += 1
            self._task_candidates += 1
            proposal = versions.propose(self._round, combined.devices)
            record = proposal.record
            self._accepted += proposal.accepted
            self.log_info(
                fl_ctx,
                f"version {record.version} {record.status} from {len(combined.accepted)} leaf sums"
                f" ({combined.devices} devices): {record.reason}",
            )
            entry |= {"version": record.version, "status": record.status, "probe": record.metrics}
            if proposal.accepted:
                with self._lock:
                    self._accepted_versions.append(record.version)
                    self._published = (versions.version, versions.current)
        else:
            entry |= {"version": versions.version, "status": "unchanged"}
        with self._lock:
            self._log["versions"].append(entry)
            self._refuse(fl_ctx, refusals)
            self._write_log()

    def _refuse(self, fl_ctx: FLContext, reasons: list[str]) -> None:
        """Log each refusal; keep them with the version log (one write for the lot). Caller holds the lock."""
        if not reasons:
            return
        for reason in reasons:
            self.log_warning(fl_ctx, f"refused a leaf sum {reason}")
        now = time.time()
        self._log["refused"] = (self._log["refused"] + [{"reason": r, "at": now} for r in reasons])[-MAX_LOGGED:]
        self._write_log()

    def _write_log(self) -> None:
        if self._log_path is not None:
            write_json_atomic(self._log_path, self._log)

    def finalize(self, fl_ctx: FLContext) -> None:
        with self._lock:
            self._write_log()
        if self.versions is not None:
            self.log_info(fl_ctx, f"final global version {self.versions.version}; {self._accepted} accepted this run")
