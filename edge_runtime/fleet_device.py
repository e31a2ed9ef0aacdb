"""A device of the hierarchy: the nested learner behind FLARE's edge API.

``FleetDevice`` is the device's side of a leaf's secure-aggregation session (``LeafCohort``): it
merges the global slow layers with its own fast layers, trains, and hands its slow delta to
``DeviceRound`` (the same one the flat job's executor runs: clip, noise, rotate, quantize, mask;
the budget charged before a masked vector leaves). Every answer passes the same check as the
flat job's ``FastLayerGuard`` (one secure-aggregation message a device may send, scalar metrics)
before it is signed with the device's key and sent; nothing else leaves. The learner's state
(``device_state.pt``), the privacy ledger (``privacy_ledger.json``) and the session in progress
(``secagg_session.json``, owner-only) are kept on disk, so a device restarted mid-session
carries on where it was.

``run_device`` is the poll loop over FLARE's device HTTP API (``edge_api.EdgeApi``: ``/job``, ``/task``,
``/result`` through the routing proxy), with retries and backoff when the proxy or the leaf is
away. The proxy is reached over HTTPS only, its certificate verified against the fleet's device
CA (``device_ca.pem`` beside the identity, written by ``fleetnest provision device``). Every task
request carries the device's token over the last challenge its leaf gave it, signed once
(``PollTokens``). The identity (``device.key``, ``device.crt``) is re-read whenever the files
change, so a rotated certificate is used from the next answer on.

python -m edge_runtime.fleet_device --proxy https://proxy.example:4321 --device robot-3 \
    --identity DIR --state DIR --job nested_fleet --index 2 --job-config job.json
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app_custom.device_identity import sign_message
from app_custom.durable import append_jsonl, write_json_atomic
from app_custom.edge_messages import (
    EdgeMessageError,
    answer_payload,
    poll_cookie,
    poll_payload,
    read_challenge,
    read_task,
    result_body,
)
from app_custom.egress import SECAGG_KEY, leaving_keys_problems, secagg_summary
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import load_fleet
from app_custom.nested.learner import NestedLearner
from app_custom.nested.slow_delta import shapes_of
from app_custom.privacy.device_round import DeviceRound
from app_custom.privacy.dp import PrivacyLedger
from app_custom.privacy.peer_certificates import CertificateAuthority, CertificateSigner
from app_custom.privacy.private_update import PrivacySettings
from app_custom.privacy.secagg import MASK, UNMASK, PeerTrust, ProtocolError
from app_custom.privacy.wire import WireError, encode_message
from edge_runtime.edge_api import EdgeApi, Status
from edge_runtime.unit import DEVICE_CA_FILE

log = logging.getLogger("fleetnest.device")
STATE_FILE, LEDGER_FILE, AUDIT_FILE = "device_state.pt", "privacy_ledger.json", "outbound_audit.jsonl"
SESSION_FILE = "secagg_session.json"
PROXY_CA_FILE = DEVICE_CA_FILE  # beside device.key: the device CA, for the routing proxy and the peers' keys


class DeviceIdentity:
    """The device's key and certificate, re-read when either file changes."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._stamp: tuple | None = None
        self.key_pem = self.cert_pem = b""

    def current(self) -> tuple[bytes, bytes]:
        paths = (self.dir / "device.key", self.dir / "device.crt")
        stamp = tuple((p.stat().st_ino, p.stat().st_mtime_ns) for p in paths)
        if stamp != self._stamp:
            key_pem, cert_pem = (p.read_bytes() for p in paths)
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
            if key.public_key().public_numbers() != cert.public_key().public_numbers():
                if self._stamp is None:
                    raise ValueError("device.key and device.crt do not belong together")
                log.info("device.key and device.crt do not match yet (a rotation in progress): keeping the old pair")
                return self.key_pem, self.cert_pem
            if self._stamp is not None:
                log.info("identity changed on disk: now certificate %s", cert.serial_number)
            self.key_pem, self.cert_pem, self._stamp = key_pem, cert_pem, stamp
        return self.key_pem, self.cert_pem


class PollTokens:
    """The device's side of its leaf's poll challenges: it keeps the newest challenge an answer of
    the leaf carried and signs its next task request over it, once. A challenge past half its
    window (by this device's own clock, e.g. after a long training step) is not used: the poll goes
    without a token and its answer brings a fresh one."""

    def __init__(self, device: str, identity: DeviceIdentity, clock: Callable[[], float] = time.monotonic) -> None:
        self.device, self.identity = device, identity
        self._clock = clock
        self._challenge: dict | None = None
        self._received = 0.0

    def take(self, cookie: object) -> None:
        """Keep the challenge in a leaf's answer (its cookie), if it carries one."""
        challenge = read_challenge(cookie)
        if challenge is not None:
            self._challenge, self._received = challenge, self._clock()

    def forget(self) -> None:
        self._challenge = None

    def cookie(self, job_id: str) -> dict:
        """The cookie of the next task request: the signed token, or nothing to ask for a challenge."""
        challenge, self._challenge = self._challenge, None  # single use
        if challenge is None or self._clock() - self._received > challenge["window"] / 2:
            return {}
        key_pem, cert_pem = self.identity.current()
        return poll_cookie(sign_message(poll_payload(self.device, job_id, challenge), key_pem, cert_pem))


class PeerKeys:
    """What a device takes part in authenticated secure aggregation with: its own key, to sign its
    adverts and its consistency answers, and the fleet's device CA, to check its neighbours; the
    CRL comes with each session from the leaf (signed by the CA and dated, so a leaf can hide at
    most a revocation younger than the CRL's validity)."""

    def __init__(self, identity: DeviceIdentity, ca_pem: bytes) -> None:
        self.identity, self.ca_pem = identity, ca_pem

    def trust(self, spec: dict) -> PeerTrust:
        crl = spec.get("device_crl")
        if not spec.get("authenticated") or not isinstance(crl, str) or not crl:
            raise ProtocolError(
                "leaf",
                "advertise",
                "an unauthenticated session (or one without the device CRL): this device joins"
                " only sessions where every peer's keys are signed",
            )
        key_pem, cert_pem = self.identity.current()
        return PeerTrust(CertificateSigner(key_pem, cert_pem), CertificateAuthority(self.ca_pem, crl.encode()))


class FleetDevice:
    def __init__(
        self,
        device_id: str,
        config: dict,
        data: dict | None,
        privacy: dict,
        index: int,
        state_dir: Path,
        learner: NestedLearner | None = None,
        persist: Callable[[], object] | None = None,
        peers: PeerKeys | None = None,
    ) -> None:
        """``learner`` and ``persist``: the edge daemon's own learner and its checkpoint (else the
        learner is built from ``data`` and saved to ``device_state.pt``). ``peers``: the device's
        key and the fleet's device CA; with them it takes part only in authenticated sessions
        (``FleetClient`` sets them from the device's identity)."""
        self.id = device_id
        self.nested = NestedConfig.from_dict(config)
        self.settings = PrivacySettings.from_dict(privacy)
        self.state_dir = state_dir
        self.peers = peers
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if learner is None:
            fleet = load_fleet(data["fn"], data.get("kwargs", {}))
            if not 0 <= index < len(fleet.devices):
                raise ValueError(f"device index {index} is outside the fleet's {len(fleet.devices)} devices")
            num_classes = self.nested.model.num_classes or fleet.num_classes
            learner = NestedLearner(self.nested, fleet.devices[index], num_classes, device_seed=index)
            if (state_dir / STATE_FILE).exists():
                learner.load(state_dir / STATE_FILE)
                log.info("%s: resumed its device state", device_id)
        self.learner = learner
        self.persist = persist or (lambda: self.learner.save(self.state_dir / STATE_FILE))
        history = None
        if (state_dir / LEDGER_FILE).exists():
            history = json.loads((state_dir / LEDGER_FILE).read_text())["history"]
        self.ledger = PrivacyLedger(self.settings.dp, history)
        self._rng = np.random.default_rng(secrets.randbits(128))
        self._session_path = state_dir / SESSION_FILE
        self._round: DeviceRound | None = None
        self._resumed = False  # the session on disk is read at first use, once ``peers`` are known
        self.metrics: dict[str, float] = {}

    def _session(self) -> DeviceRound | None:
        """The session in progress: a session this device was in when it stopped is carried on if
        the leaf is still at it."""
        if not self._resumed:
            self._resumed = True
            if self._session_path.exists():
                spec = json.loads(self._session_path.read_text())["spec"]
                trust = self.peers.trust(spec) if self.peers is not None and spec.get("authenticated") else None
                self._round = DeviceRound.load(self._session_path, self.settings, trust)
        return self._round

    @property
    def in_session(self) -> bool:
        """Whether this device is between the train step and the end of a session."""
        return self._session() is not None

    def answer(
        self, stage: str, spec: dict, version: int, weights: dict | None, message: bytes | None
    ) -> tuple[bytes | None, str | None, dict]:
        """(protocol message, skip reason, metrics) for one step of a session."""
        if stage == "train":
            return self._train(spec, version, weights)
        if self._session() is None or self._round.round != spec.get("round"):
            raise ProtocolError("leaf", stage, "no session of this device in progress")
        out = self._round.answer(stage, message, self._charge)
        metrics = {"dp_epsilon": self.ledger.epsilon()} if stage == MASK else {}
        if stage == UNMASK:
            self._round = None
            DeviceRound.discard(self._session_path)
        else:
            self._round.save(self._session_path)
        return encode_message(out), None, metrics

    def _charge(self) -> None:
        """Count this session against the budget before the masked vector leaves."""
        self.ledger.record_contribution()
        write_json_atomic(self.state_dir / LEDGER_FILE, {"history": self.ledger.history}, mode=0o600)

    def _train(self, spec: dict, version: int, weights: dict | None) -> tuple[bytes | None, str | None, dict]:
        if weights is None:
            raise EdgeMessageError("a train task without the global slow layers")
        self._round, self._resumed = None, True
        DeviceRound.discard(self._session_path)  # a new session: whatever was left of the last one is void
        noise = self.settings.dp.noise_multiplier > 0
        min_cohort = self.settings.dp.contributors_assumed if noise else 1
        trust = self.peers.trust(spec) if self.peers is not None else None
        DeviceRound.check(self.id, spec, shapes_of(weights), self.settings, min_cohort, trust)
        merge = self.learner.receive_global(weights, version)
        outcome = self.learner.train_round()
        self.persist()
        self.metrics = {"acc_after_merge": merge.acc_after} | outcome.metrics
        # the numbers stay on the device: not even its log, which its operators may collect
        log.info("%s: trained from version %d", self.id, version)
        reason = self.ledger.over_budget_reason()
        if reason:
            return None, reason, {}
        self._round, _ = DeviceRound.begin(
            self.id, spec, outcome.slow_delta, self.settings, self._rng, outcome.num_samples, min_cohort, trust
        )
        self._round.save(self._session_path)
        return encode_message(self._round.advert()), None, {}

    def leaving_problems(self, message: bytes | None, metrics: dict) -> list[str]:
        """The flat job's outbound check, applied to what this device is about to send."""
        params = {} if message is None else {SECAGG_KEY: np.frombuffer(message, dtype=np.uint8)}
        return leaving_keys_problems(self.nested, params, metrics)


class FleetClient:
    """The device's side of FLARE's device HTTP API (``EdgeApi``: ``/job``, ``/task``, ``/result``
    through the routing proxy): one poll at a time, with backoff when the proxy or the leaf is away."""

    def __init__(
        self, device: FleetDevice, proxy: str, identity: DeviceIdentity, job: str, proxy_ca: Path | None = None
    ) -> None:
        """``proxy_ca``: the fleet's device CA, which the proxy's certificate must verify under and
        the peers' secure-aggregation keys too (default: ``device_ca.pem`` beside the identity)."""
        self.device, self.identity, self.job = device, identity, job
        self.tokens = PollTokens(device.id, identity)
        self.audit = device.state_dir / AUDIT_FILE
        device_ca = Path(proxy_ca or identity.dir / PROXY_CA_FILE)
        self.api = EdgeApi(proxy, device.id, device_ca)
        device.peers = PeerKeys(identity, device_ca.read_bytes())  # the same CA checks the peers' keys
        self.job_id: str | None = None
        self.backoff = 1.0
        self.last = "not polled yet"

    def poll_once(self) -> float:
        """Ask for a task and answer it; seconds to wait before the next poll (0: poll again now)."""
        device = self.device
        try:
            if self.job_id is None:
                reply = self.api.get_job(self.job, capabilities={"methods": ["fleetnest"]})
                if reply.get("status") != Status.OK or not reply.get("job_id"):
                    self.last = f"no {self.job} job open"
                    return min(float(reply.get("retry_wait") or 2), 5)
                self.job_id = reply["job_id"]
                log.info("%s: joined job %s", device.id, self.job_id)
            task = self.api.get_task(self.job_id, self.tokens.cookie(self.job_id))
            self.tokens.take(task.get("cookie"))
            status = task.get("status")
            if status in (Status.NO_JOB, Status.DONE):
                self.job_id = None  # the job ended: look for the next one
                self.tokens.forget()
                return 0.0
            if status != Status.OK or not task.get("task_data"):
                wait = task.get("retry_wait")
                wait = 1.0 if wait is None else float(wait)
                if str(task.get("message") or "").startswith("not admitted"):
                    log.warning("%s: the leaf refused its poll: %s", device.id, task.get("message"))
                    wait = max(wait, 1.0)  # a fresh challenge came with it; never a tight loop
                return min(wait, 5)
            stage, spec, version, weights, message = read_task(task["task_data"])
            out, skip, metrics = device.answer(stage, spec, version, weights, message)
            problems = device.leaving_problems(out, metrics)
            if problems:
                raise RuntimeError(f"refusing to send: {problems}")
            key_pem, cert_pem = self.identity.current()
            envelope = sign_message(answer_payload(device.id, stage, spec, out, metrics, skip), key_pem, cert_pem)
            result = self.api.report_result(self.job_id, task["task_id"], stage, result_body(envelope))
            self.tokens.take(result.get("cookie"))
            _audit(self.audit, stage, spec, out, metrics, result.get("status"))
            if result.get("status") != Status.OK:
                log.warning("%s: the leaf refused its %s answer: %s", device.id, stage, result.get("message"))
            self.last = f"answered {stage} of session {spec.get('round')} (version {version})"
            self.backoff = 1.0
            return 0.0
        except (EdgeMessageError, WireError, ProtocolError, ValueError) as err:
            log.warning("%s: dropping out of this step: %s", device.id, err)
            return 1.0
        except (requests.RequestException, OSError, KeyError) as err:
            # proxy or leaf away (or restarting): back off and try again, from the job request on
            log.warning("%s: edge API unreachable (%s); retrying in %.0f s", device.id, err, self.backoff)
            self.last = "edge API unreachable"
            self.job_id = None
            wait, self.backoff = self.backoff, min(self.backoff * 2, 10.0)
            return wait
        except Exception as err:  # an EdgeApiError and anything unexpected: never crash the device
            log.warning("%s: %s; retrying", device.id, err)
            self.job_id = None
            return 2.0


def run_device(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    job = json.loads(Path(args.job_config).read_text())
    device = FleetDevice(args.device, job["config"], job["data"], job["privacy"], args.index, Path(args.state))
    proxy_ca = Path(args.proxy_ca) if args.proxy_ca else None
    client = FleetClient(device, args.proxy, DeviceIdentity(Path(args.identity)), args.job, proxy_ca)
    deadline = time.monotonic() + args.max_runtime
    while time.monotonic() < deadline:
        time.sleep(client.poll_once())
    return 0


def _audit(path: Path, stage: str, spec: dict, out: bytes | None, metrics: dict, status: str | None) -> None:
    record = {"stage": stage, "session": spec.get("round"), "metrics": sorted(metrics), "status": status}
    if out is not None:
        record["secagg"] = secagg_summary(np.frombuffer(out, dtype=np.uint8))
    append_jsonl(path, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.fleet_device", description=__doc__.split("\n")[0])
    parser.add_argument("--proxy", required=True, help="the routing proxy's URL (https://)")
    parser.add_argument("--proxy-ca", help=f"the CA its certificate verifies under (default: IDENTITY/{PROXY_CA_FILE})")
    parser.add_argument("--device", required=True, help="this device's id (its certificate's common name)")
    parser.add_argument("--identity", required=True, help="folder with device.key and device.crt")
    parser.add_argument("--state", required=True, help="folder for the device's own state")
    parser.add_argument("--job", default="nested_fleet", help="the job name to ask the leaf for")
    parser.add_argument("--job-config", required=True, help="JSON with the job's config, data and privacy")
    parser.add_argument("--index", type=int, required=True, help="this device's entry in the fleet's data")
    parser.add_argument("--max-runtime", type=float, default=3600.0, help="seconds before the device stops")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    return run_device(args)


if __name__ == "__main__":
    sys.exit(main())
