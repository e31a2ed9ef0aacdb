"""One secure-aggregation session over a cohort of devices at a leaf, driven by the devices' polls.

Devices reach a leaf only by asking for work (FLARE's edge API is request and response, device
first), so the leaf cannot push a stage: each poll gets the device's next step, each answer is
fed to the ``SecAggAggregator``, and ``tick`` moves the session on when every eligible device has
answered or the stage's deadline passed with enough answers. The stages:

``enrol``  devices that poll join the cohort until it is full or the enrolment window closes with
           at least ``min_devices``; the cohort (and with it the ring and the rotation) is fixed.
``train``  the global slow layers out; each device trains, clips, noises, quantizes, and answers
           with its key advert (or with the reason it sits this session out: its privacy budget).
``share``  the roster out, sealed shares back.
``mask``   to each device only the shares addressed to it; its masked vector back.
``consistency`` (authenticated sessions: the leaf has the fleet's device CA) survivors and
           dropped out; each survivor's signature of that set back.
``unmask`` survivors and dropped out (with the signatures); the shares that unmask the sum back.

The leaf holds masked vectors only and releases one decoded sum with its count and weight: a
``LeafSum`` for the cluster, and only when the sum is within what its survivors can reach
(``cohort_bound``): a sum past it means a device sent a crafted vector or weight. A session
that cannot finish (too few devices, too few shares, a sum past the bound) ends with
``failure`` saying why, and releases nothing. Everything a device sends is refused with a
named reason when it is not the expected message of the expected stage from that device; a
refusal never stops the session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from app_custom.privacy.private_update import PrivacySettings, SumPastBound, bounded_cohort_sum, session_params
from app_custom.privacy.secagg import (
    Authority,
    ConsistencySignature,
    KeyAdvert,
    MaskedInput,
    Rejection,
    SecAggAbort,
    SecAggAggregator,
    SecAggParams,
    ShareBundle,
    UnmaskShares,
)
from app_custom.privacy.wire import WireError, decode_message, encode_message

from .leaf_sums import LeafSum

ENROL, TRAIN, SHARE, MASK, DONE = "enrol", "train", "share", "mask", "done"
CONSISTENCY, UNMASK = "consistency", "unmask"
ANSWERED_STAGES = (TRAIN, SHARE, MASK, CONSISTENCY, UNMASK)
_EXPECTED = {
    TRAIN: KeyAdvert,
    SHARE: ShareBundle,
    MASK: MaskedInput,
    CONSISTENCY: ConsistencySignature,
    UNMASK: UnmaskShares,
}


class CohortRefusal(ValueError):
    """A device message the session does not take; the message says why."""


@dataclass(frozen=True)
class CohortTask:
    """A device's next step: ``stage``, the session it belongs to and the protocol message (bytes)."""

    stage: str
    spec: dict  # job_id, round (the leaf's session number), cohort_id (the leaf), cohort
    message: bytes | None


class LeafCohort:
    def __init__(
        self,
        *,
        job_id: str,
        leaf: str,
        session: int,
        base_version: int,
        settings: PrivacySettings,
        shapes: Mapping[str, tuple[int, ...]],
        cohort_size: int,
        min_devices: int,
        stage_timeout: float,
        enrol_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        authority: Authority | None = None,
        crl_pem: bytes | None = None,
    ) -> None:
        if not 2 <= min_devices <= cohort_size:
            raise ValueError(f"need 2 <= min_devices <= cohort_size, got {min_devices} and {cohort_size}")
        self.authority = authority  # the fleet's device CA: adverts signed, the consistency round held
        self.spec = {
            "job_id": job_id,
            "round": session,
            "cohort_id": leaf,
            "cohort": [],
            "authenticated": authority is not None,
        }
        if authority is not None and crl_pem:
            # the device CA's CRL in force: devices check their peers against it (it is the CA's,
            # signed and dated, so a leaf can only withhold a revocation younger than its validity)
            self.spec["device_crl"] = crl_pem.decode()
        self.leaf, self.session, self.base_version = leaf, session, base_version
        self.settings, self.shapes = settings, dict(shapes)
        self.cohort_size, self.min_devices = cohort_size, min_devices
        self.stage_timeout = stage_timeout
        self.enrol_timeout = stage_timeout if enrol_timeout is None else enrol_timeout
        self._clock = clock
        self.stage = ENROL
        self._deadline = clock() + self.enrol_timeout
        self.cohort: list[str] = []
        self.params: SecAggParams | None = None
        self.aggregator: SecAggAggregator | None = None
        self._eligible: set[str] = set()
        self._answered: set[str] = set()
        self._messages: dict[str, bytes] = {}  # per device: what this stage hands it
        self.skipped: dict[str, str] = {}  # device -> why it sat the session out
        self.refusals: list[Rejection] = []
        self.outcome: LeafSum | None = None
        self.failure: str | None = None
        self.collected = False  # the leaf has taken the outcome (or the failure) from this session

    # ---- devices ----------------------------------------------------------------------------
    def task_for(self, device: str) -> CohortTask | None:
        """The device's next step in this session, or None (wait, or nothing for it here)."""
        self.tick()
        if self.stage == ENROL:
            if device not in self.cohort and len(self.cohort) < self.cohort_size:
                self.cohort.append(device)
                self.tick()
            return None
        if self.stage == DONE or device not in self._eligible or device in self._answered:
            return None
        return CohortTask(self.stage, dict(self.spec), self._messages.get(device))

    def drop(self, device: str) -> None:
        """``device`` gets no further step in this session (as if it had gone quiet)."""
        if device in self.cohort and self.stage == ENROL:
            self.cohort.remove(device)
        elif device in self._eligible:
            self._answered.add(device)
        self.tick()

    def submit(self, device: str, stage: str, raw: bytes | None, skip_reason: str | None = None) -> None:
        """Take a device's answer to ``stage``; ``CohortRefusal`` when it is not the one expected."""
        self.tick()
        if stage != self.stage:
            raise CohortRefusal(f"an answer to stage {stage!r} while the session is at {self.stage!r}")
        if device not in self._eligible:
            raise CohortRefusal(f"{device} has no part in stage {stage!r} of session {self.session}")
        if device in self._answered:
            raise CohortRefusal(f"{device} already answered stage {stage!r} (a replay?)")
        self._answered.add(device)
        if stage == TRAIN and skip_reason:
            self.skipped[device] = str(skip_reason)[:200]
        else:
            try:
                message = decode_message(raw, _EXPECTED[stage])
            except WireError as err:
                self._refuse(device, stage, str(err))
                raise CohortRefusal(str(err)) from err
            adders = {
                TRAIN: self.aggregator.add_advert,
                SHARE: self.aggregator.add_shares,
                MASK: self.aggregator.add_masked,
                CONSISTENCY: self.aggregator.add_consistency,
                UNMASK: self.aggregator.add_unmask,
            }
            before = len(self.aggregator.rejections)
            adders[stage](device, message)
            if len(self.aggregator.rejections) > before:
                raise CohortRefusal(self.aggregator.rejections[-1].reason)
        self.tick()

    # ---- progress ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Move on when every eligible device answered, or the deadline passed."""
        if self.stage == DONE:
            return
        now = self._clock()
        if self.stage == ENROL:
            if len(self.cohort) >= self.cohort_size or (now >= self._deadline and len(self.cohort) >= self.min_devices):
                self._start_training()
            elif now >= self._deadline and len(self.cohort) < self.min_devices:
                self._deadline = now + self.enrol_timeout  # keep enrolling: the task is still open
            return
        if self._answered >= self._eligible or now >= self._deadline:
            try:
                self._advance()
            except SecAggAbort as err:
                self._fail(f"secure aggregation aborted: {err}")

    @property
    def done(self) -> bool:
        return self.stage == DONE

    def _start_training(self) -> None:
        self.spec["cohort"] = sorted(self.cohort)
        self.params = session_params(self.settings, self.spec, self.settings.update_length(self.shapes))
        self.aggregator = SecAggAggregator(self.params, self.spec["cohort"], self.authority)
        self._enter(TRAIN, {d: None for d in self.spec["cohort"]})

    def _advance(self) -> None:
        aggregator = self.aggregator
        if self.stage == TRAIN:
            roster = aggregator.roster()
            raw = encode_message(roster)
            self._enter(SHARE, {d: raw for d in roster.adverts})
        elif self.stage == SHARE:
            routed = aggregator.route_shares()
            self._enter(MASK, {d: encode_message({d: shares}) for d, shares in routed.items()})
        elif self.stage == MASK and self.params.authenticated:
            shown = aggregator.consistency_request()
            raw = encode_message(shown)
            self._enter(CONSISTENCY, {d: raw for d in shown.survivors})
        elif self.stage in (MASK, CONSISTENCY):
            raw = encode_message(aggregator.unmask_request())
            self._enter(UNMASK, {d: raw for d in aggregator.unmaskers})
        elif self.stage == UNMASK:
            result = aggregator.result()
            survivors = len(result.survivors)
            try:
                total, weight = bounded_cohort_sum(
                    result.total, survivors, self.shapes, self.settings, self.params.context, len(self.spec["cohort"])
                )
            except SumPastBound as err:
                self._fail(str(err))
                return
            self.outcome = LeafSum(self.leaf, self.base_version, survivors, weight, total)
            self.stage = DONE

    def _enter(self, stage: str, messages: dict[str, bytes | None]) -> None:
        self.stage = stage
        self._messages = messages
        self._eligible = set(messages)
        self._answered = set()
        self._deadline = self._clock() + self.stage_timeout

    def _refuse(self, device: str, stage: str, reason: str) -> None:
        self.refusals.append(Rejection(device, stage, reason))

    def _fail(self, reason: str) -> None:
        self.failure, self.stage = reason, DONE

    @property
    def rejections(self) -> list[Rejection]:
        """Every refused message of the session: malformed on the wire, or refused by the protocol."""
        return self.refusals + (list(self.aggregator.rejections) if self.aggregator else [])
