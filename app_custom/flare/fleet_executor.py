"""The clients of the hierarchy: a leaf sums its device cohorts securely; a cluster-tier client
forwards its leaves' sums. One executor serves both (FLARE's ``EdgeTaskExecutor``, a
``HierarchicalUpdateGatherer``), with ``CohortUpdater`` as its updater.

At a leaf, devices poll through FLARE's edge API (routing proxy -> this leaf's ``ApiService`` ->
``EdgeTaskReceiver`` -> here). Each poll must carry the device's token over a single-use
challenge this leaf gave it (``edge_messages.PollChallenges``; every answer carries the next) and
gets the device's next step in the leaf's current ``LeafCohort`` session; each answer must be a
signed envelope from a certificate of the fleet's device CA (``local/device_ca`` in the leaf's
workspace, CRL re-read on change) naming the device the proxy says sent it, for the session and
stage in progress. Anything else is refused with a log line naming the device and the reason,
and the session goes on. A request that fails its check never affects the device id it merely
claims; only a device that signed a lie (an answer naming another device) is dropped from its
session. A source that keeps failing is ignored for a while, a source being a claimed id with
the certificate it presents (``device_identity.FailureLimiter``), so no one's failures hold back
the id's owner; a claimed id's refusals past a few per minute are counted, not logged.

A finished session's decoded sum, signed with the leaf's FLARE site key (``startup/client.key``:
``fleet_messages.SiteSigner``), goes up with the next update report; it is resent until the
parent acknowledges it (the cluster drops a (leaf, session) it has seen), so a lost report loses
nothing. A cluster-tier client forwards its children's sums with their signatures, unchanged.

``mode``: ``sync`` runs one session per FLARE task (round); ``async`` starts the next session as
soon as one ends, from the newest global version the parent has sent (buffered asynchronous
aggregation: the cluster weighs each sum by its staleness).

Every device message the leaf accepted is summarised (type and size, never values) in
``leaf_audit.jsonl`` in the leaf's workspace: the tests read it to show that the leaf held only
masked vectors.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.edge.constants import EdgeApiStatus
from nvflare.edge.executors.ete import EdgeTaskExecutor
from nvflare.edge.executors.hug import TaskInfo
from nvflare.edge.updater import Updater
from nvflare.edge.web.models.result_report import ResultReport
from nvflare.edge.web.models.result_response import ResultResponse
from nvflare.edge.web.models.selection_request import SelectionRequest
from nvflare.edge.web.models.selection_response import SelectionResponse
from nvflare.edge.web.models.task_request import TaskRequest
from nvflare.edge.web.models.task_response import TaskResponse

from app_custom.cluster.leaf_cohort import TRAIN, CohortRefusal, LeafCohort
from app_custom.device_identity import (
    CertificateRefused,
    DeviceAuthenticator,
    FailureLimiter,
    IdentityError,
    SignedEnvelope,
    read_envelope,
)
from app_custom.durable import append_jsonl
from app_custom.edge_messages import (
    ChallengeError,
    EdgeMessageError,
    PollChallenges,
    read_answer,
    read_poll_cookie,
    read_poll_token,
    read_result_body,
    session_of,
    task_data,
)
from app_custom.egress import secagg_summary
from app_custom.flare.fleet_messages import (
    ACKNOWLEDGED,
    MODES,
    SiteSigner,
    acknowledged,
    leaf_sum_entry,
    leaves_under,
    read_report,
    read_version,
    report,
    version_message,
)
from app_custom.nested.slow_delta import UpdateError, shapes_of
from app_custom.privacy.peer_certificates import CertificateAuthority
from app_custom.privacy.private_update import PrivacySettings

AUDIT_FILE = "leaf_audit.jsonl"
MAX_PENDING = 10_000  # sums waiting for the parent (a cluster-tier client forwards many leaves')
DEVICE_CA_DIR = "local/device_ca"
REFUSED_RETRY_S = 30  # how long a device whose request failed its check is asked to wait


class CohortUpdater(Updater):
    """The leaf's sessions and the sums waiting for the parent; at a cluster-tier client, the
    children's sums waiting to be forwarded. Thread-safe: device polls, child reports and the
    periodic parent report arrive on different threads."""

    def __init__(self, settings: PrivacySettings, mode: str, cohort: dict, leaf: bool) -> None:
        super().__init__()
        self.settings, self.mode, self.cohort_args, self.is_leaf = settings, mode, cohort, leaf
        self.job_id, self.site = "", ""
        self.signer: SiteSigner | None = None  # a leaf's site key: it signs its sums for the cluster
        # a leaf's device CA: its sessions are authenticated (signed adverts, the consistency round)
        self.device_ca: DeviceAuthenticator | None = None
        self.version: int | None = None
        self.weights: dict[str, np.ndarray] | None = None
        self.session: LeafCohort | None = None
        self._session_weights: dict[str, np.ndarray] | None = None  # what the session's devices train from
        # session numbers start at a random point: a leaf restarted within a job never reuses one
        self._next_session = secrets.randbits(31) << 16
        self._started_in_task = False
        self._pending: dict[tuple[str, int], dict] = {}  # (leaf, session) -> entry, until acknowledged
        self._in_flight: set[tuple[str, int]] = set()
        self._lock = threading.RLock()

    # ---- HUG's updater API -----------------------------------------------------------------------
    def start_task(self, task_data: Shareable, fl_ctx: FLContext):
        version, weights = read_version(task_data)
        with self._lock:
            self.job_id, self.site = fl_ctx.get_job_id(), fl_ctx.get_identity_name()
            self._adopt(version, weights)
            self._started_in_task = False
            if self.mode == "sync":
                self.session = None
        return super().start_task(task_data, fl_ctx)

    def prepare_update_for_parent(self, fl_ctx: FLContext) -> Shareable | None:
        with self._lock:
            if self.session is not None:
                self.session.tick()
                self._collect(fl_ctx)
            # an empty report too: the parent's reply carries any newer global version
            self._in_flight = set(self._pending)
            return report(self.version, list(self._pending.values()))

    def process_parent_update_reply(self, reply: Shareable, fl_ctx: FLContext) -> None:
        with self._lock:
            taken = acknowledged(reply)  # what the parent took; the rest is sent again
            for key in self._in_flight if taken is None else self._in_flight & taken:
                self._pending.pop(key, None)
            self._in_flight = set()
            try:
                version, weights = read_version(reply)
            except UpdateError as err:
                self.log_error(fl_ctx, f"ignoring the parent's reply: {err}")
                return
            self._adopt(version, weights)

    def process_child_update(self, update: Shareable, fl_ctx: FLContext):
        child = fl_ctx.get_peer_context().get_identity_name()
        known, entries, problems = read_report(update)
        allowed = leaves_under(fl_ctx, child)
        taken = []
        for problem in problems:
            self.log_warning(fl_ctx, f"refused a sum from {child}: {problem}")
        with self._lock:
            for session, item, signature in entries:
                taken.append([item.leaf, session])
                if allowed is not None and item.leaf not in allowed:
                    self.log_warning(fl_ctx, f"refused a sum from {child}: leaf {item.leaf} is not one of its leaves")
                elif len(self._pending) >= MAX_PENDING:
                    self.log_warning(fl_ctx, f"dropped a sum of {item.leaf}: {MAX_PENDING} sums wait for the parent")
                else:  # forwarded as signed: the cluster checks the leaf's signature, not this client's word
                    self._pending[(item.leaf, session)] = leaf_sum_entry(session, item, signature)
            newer = self.weights if self.version is not None and (known is None or known < self.version) else None
            reply = version_message(self.version or 0, newer)
        reply[ACKNOWLEDGED] = taken
        return bool(entries), reply

    def end_task(self, fl_ctx: FLContext):
        with self._lock:
            self._collect(fl_ctx)
        super().end_task(fl_ctx)

    # ---- devices -------------------------------------------------------------------------------
    def next_task(self, device: str, fl_ctx: FLContext) -> dict | None:
        """The (authenticated) device's next step, or None."""
        with self._lock:
            session = self._current_session(fl_ctx)
            if session is None:
                return None
            task = session.task_for(device)
            if task is None:
                return None
            weights = self._session_weights if task.stage == TRAIN else None
            return task_data(task.stage, task.spec, session.base_version, weights, task.message)

    def drop(self, device: str) -> None:
        """``device`` takes no further part in the current session: only ever an authenticated
        device that misbehaved, never an id a request merely claimed."""
        with self._lock:
            if self.session is not None:
                self.session.drop(device)

    def take_answer(self, device: str, answer: dict, fl_ctx: FLContext) -> None:
        """Feed a checked answer to the session; ``CohortRefusal`` when it does not belong there."""
        with self._lock:
            session = self.session
            if session is None or session.done:
                raise CohortRefusal("no session in progress")
            if answer["session"] != session_of(session.spec):
                raise CohortRefusal(f"an answer for session {answer['session']}, this is {session_of(session.spec)}")
            session.submit(device, answer["stage"], answer["message"], answer["skip_reason"])

    def _current_session(self, fl_ctx: FLContext) -> LeafCohort | None:
        if self.weights is None or not self.is_leaf:
            return None
        if self.session is not None:
            self.session.tick()
            self._collect(fl_ctx)
        if self.session is None or (self.session.done and (self.mode == "async" or self.session.failure)):
            if self.mode == "sync" and self._started_in_task and not (self.session and self.session.failure):
                return None  # one sum per round; a failed session may be tried again
            self._next_session += 1
            self._session_weights = self.weights
            authority, crl_pem = None, None
            if self.device_ca is not None:
                ca_pem, crl_pem = self.device_ca.ca_and_crl()
                authority = CertificateAuthority(ca_pem, crl_pem)
            self.session = LeafCohort(
                job_id=self.job_id,
                leaf=self.site,
                session=self._next_session,
                base_version=self.version,
                settings=self.settings,
                shapes=shapes_of(self.weights),
                authority=authority,
                crl_pem=crl_pem,
                **self.cohort_args,
            )
            self._started_in_task = True
        return self.session

    def _collect(self, fl_ctx: FLContext) -> None:
        session = self.session
        if session is None or not session.done or session.collected:
            return
        session.collected = True
        for rejection in session.rejections:
            self.log_warning(
                fl_ctx,
                f"session {session.session}: refused {rejection.stage} from {rejection.sender}: {rejection.reason}",
            )
        if session.failure:
            self.log_warning(fl_ctx, f"session {session.session} released nothing: {session.failure}")
            return
        item = session.outcome
        signature = self.signer.sign(self.job_id, session.session, item) if self.signer is not None else None
        self._pending[(item.leaf, session.session)] = leaf_sum_entry(session.session, item, signature)
        self.log_info(
            fl_ctx,
            f"session {session.session}: secure sum of {item.count} devices from version {item.base_version} ready"
            f" ({len(session.skipped)} sat out)",
        )

    def _adopt(self, version: int | None, weights: dict | None) -> None:
        if version is None or weights is None:
            return
        if self.version is None or version > self.version:
            self.version, self.weights = version, weights


class NestedFleetExecutor(EdgeTaskExecutor):
    def __init__(
        self,
        privacy: dict,
        mode: str = "async",
        cohort_size: int = 3,
        min_devices: int = 2,
        stage_timeout: float = 20.0,
        enrol_timeout: float = 10.0,
        update_timeout: float = 30.0,
        device_ca_dir: str = DEVICE_CA_DIR,
    ) -> None:
        """Args:
        privacy: the ``PrivacySettings`` mapping the devices use (secure aggregation is required).
        mode: ``sync`` (one cohort session per round) or ``async`` (sessions back to back).
        cohort_size, min_devices: a session's cohort closes when full, or when ``enrol_timeout``
            passed with at least ``min_devices``.
        stage_timeout: seconds a protocol stage waits for devices that have not answered; they
            drop out (their masks are recovered) and the session goes on.
        update_timeout: seconds a report to the parent may take.
        device_ca_dir: the fleet's device CA and CRL, relative to the site's workspace.
        """
        super().__init__(updater_id="", update_timeout=update_timeout)
        self.privacy = privacy
        self.settings = PrivacySettings.from_dict(privacy)
        if not self.settings.secure_aggregation:
            raise ValueError("the fleet job needs secure_aggregation: a leaf must never see a single delta")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("stage_timeout", stage_timeout), ("enrol_timeout", enrol_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name, value in (("cohort_size", cohort_size), ("min_devices", min_devices)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        if min_devices > cohort_size:
            raise ValueError(f"min_devices ({min_devices}) exceeds cohort_size ({cohort_size})")
        dp = self.settings.dp
        if dp.noise_multiplier > 0 and min_devices < dp.contributors_assumed:
            raise ValueError(
                f"min_devices ({min_devices}) is below the {dp.contributors_assumed} contributors the devices'"
                " noise shares assume (dp.min_cohort, else dp.cohort_size): a smaller sum would be under-noised"
            )
        self.mode, self.cohort_size, self.min_devices = mode, cohort_size, min_devices
        self.stage_timeout, self.enrol_timeout = stage_timeout, enrol_timeout
        self.device_ca_dir = device_ca_dir
        self._authenticator: DeviceAuthenticator | None = None
        self._audit_path: Path | None = None
        self._updater_obj: CohortUpdater | None = None
        self._challenges: PollChallenges | None = None
        self._challenges_lock = threading.Lock()
        self.failures = FailureLimiter()  # (claimed id, certificate digest): ignored for a while
        self.noisy = FailureLimiter()  # claimed id: refusals no longer logged one by one for a while
        self._failures_crl: tuple | None = None  # the CRL the failures were counted under

    def get_updater(self, fl_ctx: FLContext):
        leaf = bool(fl_ctx.get_prop(ReservedKey.IS_LEAF))
        cohort = {
            "cohort_size": self.cohort_size,
            "min_devices": self.min_devices,
            "stage_timeout": self.stage_timeout,
            "enrol_timeout": self.enrol_timeout,
        }
        self._updater_obj = CohortUpdater(self.settings, self.mode, cohort, leaf)
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        root = Path(workspace.get_root_dir()) if workspace else Path.cwd()
        if leaf:
            try:
                self._authenticator = DeviceAuthenticator(root / self.device_ca_dir)
            except IdentityError as err:
                self.system_panic(f"this leaf cannot authenticate devices: {err}", fl_ctx)
                return None
            self._updater_obj.device_ca = self._authenticator
            startup = Path(workspace.get_startup_kit_dir()) if workspace else root / "startup"
            try:
                self._updater_obj.signer = SiteSigner.from_startup(startup)
            except ValueError as err:
                self.system_panic(f"this leaf cannot sign its sums for the cluster: {err}", fl_ctx)
                return None
            self._audit_path = root / AUDIT_FILE
        return self._updater_obj

    # ---- the edge API ------------------------------------------------------------------------
    def process_edge_task_request(self, request: TaskRequest, current_task: TaskInfo, fl_ctx: FLContext):
        job_id = fl_ctx.get_job_id()
        device = request.get_device_id()
        try:
            challenges = self._poll_challenges(fl_ctx)
        except CohortRefusal as err:
            return TaskResponse(EdgeApiStatus.RETRY, job_id, retry_wait=REFUSED_RETRY_S, message=str(err))
        credential = None  # the digest of the certificate the request presents, once it is read
        try:
            raw = read_poll_cookie(request.cookie)
            if raw is None:  # first contact, or a challenge the device let expire: its token comes next
                return TaskResponse(EdgeApiStatus.RETRY, job_id, retry_wait=0, cookie=challenges.issue(device))
            envelope = read_envelope(raw)
            credential = hashlib.sha256(envelope.cert_pem).digest()
            self._authenticate_poll(device, envelope, credential, challenges)
        except (IdentityError, EdgeMessageError) as err:
            self._refused(fl_ctx, "a task request", device, err, credential)
            wait = 0 if isinstance(err, ChallengeError) else REFUSED_RETRY_S
            message = f"not admitted: {err}"[:300]
            cookie = challenges.issue(device)
            return TaskResponse(EdgeApiStatus.RETRY, job_id, retry_wait=wait, message=message, cookie=cookie)
        cookie = challenges.issue(device)  # for the device's next poll
        try:
            data = self._updater_obj.next_task(device, fl_ctx)
        except Exception as err:  # a poll must never take the leaf down
            self.log_exception(fl_ctx, f"device {device}: cannot make its task: {err}")
            data = None
        if data is None:
            return TaskResponse(
                EdgeApiStatus.RETRY, job_id, retry_wait=1, message="no step for this device now", cookie=cookie
            )
        return TaskResponse(
            EdgeApiStatus.OK,
            job_id,
            retry_wait=0,
            task_id=current_task.id,
            task_name=data["stage"],
            task_data=data,
            cookie=cookie,
        )

    def process_edge_result_report(self, request: ResultReport, current_task: TaskInfo, fl_ctx: FLContext):
        claimed = request.get_device_id()
        device = credential = None  # the device is known once its envelope is verified, not before
        try:
            if self._authenticator is None:
                raise CohortRefusal("this site is not a leaf")
            envelope = read_envelope(read_result_body(request.result))
            credential = hashlib.sha256(envelope.cert_pem).digest()
            self._admit(claimed, credential)
            device, payload = self._authenticator.open_envelope(envelope)
            answer = read_answer(payload)
            if answer["device"] != device:
                # an honest device never signs an answer in another's name: this one lied, so it goes
                self._updater_obj.drop(device)
                raise EdgeMessageError(f"signed by {device}, the payload names {answer['device']}: {device} is dropped")
            if device != claimed:  # perhaps its genuine answer replayed under another id: refused, no one dropped
                raise IdentityError(f"signed by {device}, sent as {claimed}")
            self._updater_obj.take_answer(device, answer, fl_ctx)
        except (IdentityError, EdgeMessageError, CohortRefusal) as err:
            self._refused(fl_ctx, "a result", claimed, err, credential)
            return ResultResponse(EdgeApiStatus.INVALID_REQUEST, message=str(err)[:300])
        except Exception as err:  # garbage must never take the leaf down
            self.log_exception(fl_ctx, f"refused a result from device {claimed!r}: unexpected {err!r}")
            return ResultResponse(EdgeApiStatus.ERROR, message="internal error")
        self._audit(device, answer)
        # the device may poll with this challenge at once: its step may have outlasted the last one
        cookie = self._poll_challenges(fl_ctx).issue(device)
        return ResultResponse(EdgeApiStatus.OK, task_id=current_task.id, task_name=answer["stage"], cookie=cookie)

    def process_edge_selection_request(self, request: SelectionRequest, current_task: TaskInfo, fl_ctx: FLContext):
        return SelectionResponse(EdgeApiStatus.OK, job_id=fl_ctx.get_job_id())

    def _poll_challenges(self, fl_ctx: FLContext) -> PollChallenges:
        if self._authenticator is None:
            raise CohortRefusal("this site is not a leaf")
        job_id, site = fl_ctx.get_job_id(), fl_ctx.get_identity_name()
        with self._challenges_lock:
            if self._challenges is None or (self._challenges.job_id, self._challenges.leaf) != (job_id, site):
                self._challenges = PollChallenges(job_id, site)
            return self._challenges

    def _authenticate_poll(
        self, device: str, envelope: SignedEnvelope, credential: bytes, challenges: PollChallenges
    ) -> None:
        """``IdentityError`` or ``EdgeMessageError`` unless ``envelope`` is ``device``'s token over a
        good challenge. The cheap checks come first (which leaf, which job, the challenge's MAC, age
        and use), the certificate and the signature last; the challenge is spent only then, so that
        no one can use up a device's challenge without its key."""
        token = read_poll_token(envelope.payload)
        nonce = challenges.check(token, device)
        self._admit(device, credential)
        signer, _ = self._authenticator.open_envelope(envelope)
        if signer != device:
            raise IdentityError(f"signed by {signer}, sent as {device}")
        challenges.spend(nonce)

    def _admit(self, claimed: str, credential: bytes) -> None:
        """Refuse, unchecked, a source that keeps failing (see ``_refused``)."""
        stamp = self._authenticator.crl_stamp
        if stamp != self._failures_crl:  # a new CRL (or a repaired one): every source is judged afresh
            self.failures.clear()
            self._failures_crl = stamp
        left = self.failures.ignored_for((claimed, credential))
        if left > 0:
            raise _Ignored(f"this certificate failed its check too often as {claimed!r}: ignored for {left:.0f} s")

    def _refused(self, fl_ctx: FLContext, what: str, claimed: str, err: Exception, credential: bytes | None) -> None:
        """Log a refusal (a claimed id's first few per period) and count it against its source, a
        claimed id with the certificate it presented, when the fault is that certificate's (foreign,
        expired, revoked): that can never be the fault of the id's owner, who signs with its own
        good certificate. Garbage, a bad signature under a good certificate, a replayed or stale
        token are refused each time, cheaply (a parse, a MAC, one signature check), and never
        ignored, since anyone can send them in the owner's name."""
        if not self.noisy.ignored_for(claimed):
            self.log_warning(fl_ctx, f"refused {what} from device {claimed!r}: {err}")
            if self.noisy.failed(claimed):
                self.log_warning(
                    fl_ctx,
                    f"device id {claimed!r}: {self.noisy.threshold} refusals within {self.noisy.period:.0f} s;"
                    f" its next refusals are not logged for {self.noisy.period:.0f} s",
                )
        if isinstance(err, _Ignored) or not isinstance(err, CertificateRefused) or credential is None:
            return
        source = (claimed, credential)
        if self.failures.failed(source):
            self.log_warning(
                fl_ctx,
                f"device id {claimed!r}: {self.failures.threshold} failed checks of one certificate within"
                f" {self.failures.period:.0f} s; requests as {claimed!r} with it are ignored for"
                f" {self.failures.period:.0f} s ({err})",
            )

    def _audit(self, device: str, answer: dict) -> None:
        raw = answer["message"]
        record = {"device": device, "stage": answer["stage"], "session": answer["session"]}
        if raw is None:
            record["skipped"] = True
        else:
            record["secagg"] = secagg_summary(np.frombuffer(raw, dtype=np.uint8))
        append_jsonl(self._audit_path, record)


class _Ignored(IdentityError):
    """A request refused unchecked: its source keeps failing."""
