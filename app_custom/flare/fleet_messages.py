"""What moves between the tiers of the hierarchy inside FLARE (Shareables between the server, the
cluster-tier clients and the leaves), and its checks on arrival.

Down (the task, and replies to update reports): ``{"global_version": int, "slow": {name: array}}``;
a reply carries ``slow`` only when the child's ``known_version`` is older (asynchronous mode).
Up (update reports and task results): ``{"known_version": int, "leaf_sums": [{"leaf", "session",
"base_version", "count", "weight", "total": {name: array}, "signature": {"cert", "sig"}}, ...]}``;
a cluster-tier client forwards its leaves' sums unchanged, so the cluster judges every leaf on
its own.

A leaf signs its sum end to end with the key of its FLARE startup kit (``SiteSigner``) over
``leaf_sum_statement``: the job, the leaf, the session, the base version, the count, the weight
and the SHA-256 of every tensor in name order. The cluster checks it (``LeafSumVerifier``) against
the project's root CA: issued by it, valid now, and for the leaf the sum names; so a cluster-tier
client in between can drop a sum but neither alter one nor invent one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.fuel.utils.tree_utils import Forest

from app_custom.cluster.leaf_sums import LeafSum
from app_custom.nested.slow_delta import UpdateError

GLOBAL_VERSION, SLOW, KNOWN_VERSION, LEAF_SUMS = "global_version", "slow", "known_version", "leaf_sums"
MODES = ("sync", "async")  # how the cluster and the leaves run rounds: one version per round, or buffered
ACKNOWLEDGED = "acknowledged"  # in a reply: the [leaf, session] pairs the parent took (or refused for good)
MAX_SUMS_PER_REPORT = 10_000
SIGNATURE = "signature"
SUM_SIGNING_LABEL = b"fleetnest-leaf-sum|"
MAX_CERTIFICATE_BYTES = 16 << 10


def version_message(version: int, weights: Mapping[str, np.ndarray] | None) -> Shareable:
    message = Shareable()
    message[GLOBAL_VERSION] = int(version)
    if weights is not None:
        message[SLOW] = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    return message


def read_version(message: Shareable) -> tuple[int | None, dict[str, np.ndarray] | None]:
    version = message.get(GLOBAL_VERSION)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise UpdateError(f"global_version must be a non-negative integer, got {version!r}")
    weights = message.get(SLOW)
    if weights is not None:
        if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
            raise UpdateError("slow must map names to arrays")
        if not all(np.isfinite(v).all() for v in weights.values()):
            raise UpdateError("slow weights are not finite")
    return version, weights


def leaf_sum_entry(session: int, item: LeafSum, signature: Mapping | None = None) -> dict:
    entry = {
        "leaf": item.leaf,
        "session": int(session),
        "base_version": int(item.base_version),
        "count": int(item.count),
        "weight": float(item.weight),
        "total": {name: np.asarray(value, dtype=np.float32) for name, value in item.total.items()},
    }
    if signature is not None:
        entry[SIGNATURE] = dict(signature)
    return entry


def leaf_sum_statement(job_id: str, session: int, item: LeafSum) -> bytes:
    """The canonical bytes a leaf signs for its sum: every field, the tensors by their SHA-256 in
    name order (as float32, little-endian, C order: what ``leaf_sum_entry`` sends)."""
    tensors = []
    for name in sorted(item.total):
        value = np.ascontiguousarray(item.total[name], dtype="<f4")
        tensors.append([name, list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()])
    body = {
        "job_id": str(job_id),
        "leaf": item.leaf,
        "session": int(session),
        "base_version": int(item.base_version),
        "count": int(item.count),
        "weight": float(item.weight).hex(),  # exact: the float the entry carries
        "tensors": tensors,
    }
    return SUM_SIGNING_LABEL + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _sign(key, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise ValueError(f"a site key must be RSA or elliptic-curve, not {type(key).__name__}")


def _verify(public_key, signature: bytes, data: bytes) -> None:
    """``InvalidSignature`` unless ``signature`` is ``public_key``'s over ``data``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        scheme = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
        public_key.verify(signature, data, scheme, hashes.SHA256())
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        raise InvalidSignature


class SiteSigner:
    """A FLARE site's key and certificate (its startup kit's ``client.key`` and ``client.crt``)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        self._key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the site key does not belong to its certificate")
        self.certificate = bytes(cert_pem)

    @classmethod
    def from_startup(cls, startup: str | Path) -> SiteSigner:
        startup = Path(startup)
        try:
            return cls((startup / "client.key").read_bytes(), (startup / "client.crt").read_bytes())
        except OSError as err:
            raise ValueError(f"no site key and certificate in {startup}: {err}") from err

    def sign(self, job_id: str, session: int, item: LeafSum) -> dict:
        """The ``signature`` field of this leaf's entry for ``item``."""
        return {"cert": self.certificate, "sig": _sign(self._key, leaf_sum_statement(job_id, session, item))}


class LeafSumVerifier:
    """The cluster's check that a leaf sum was signed by that leaf: a certificate the project's root
    CA issued to a site named as the sum's leaf, valid now, and its signature over the sum."""

    def __init__(self, root_ca_pem: bytes) -> None:
        try:
            self.root = x509.load_pem_x509_certificate(root_ca_pem)
        except ValueError as err:
            raise ValueError(f"the project's root CA certificate is unreadable: {err}") from err
        self._sites: dict[bytes, tuple[str, object, dt.datetime, dt.datetime]] = {}

    def _site(self, cert_pem: object) -> tuple[str, object]:
        if not isinstance(cert_pem, bytes) or len(cert_pem) > MAX_CERTIFICATE_BYTES:
            raise UpdateError("signature.cert must be a PEM certificate (bytes)")
        digest = hashlib.sha256(cert_pem).digest()
        now = dt.datetime.now(dt.timezone.utc)
        known = self._sites.get(digest)
        if known is None:
            try:
                cert = x509.load_pem_x509_certificate(cert_pem)
                cert.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as err:
                raise UpdateError(f"its signing certificate is not one of this project's sites ({err})") from err
            try:
                if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                    raise UpdateError("its signing certificate is a CA's, not a site's")
            except x509.ExtensionNotFound:
                pass
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(names) != 1:
                raise UpdateError("its signing certificate names no single site")
            known = (str(names[0].value), cert.public_key(), cert.not_valid_before_utc, cert.not_valid_after_utc)
            if len(self._sites) >= 10_000:
                self._sites = {}
            self._sites[digest] = known
        site, public_key, valid_from, valid_until = known
        if not valid_from <= now <= valid_until:
            raise UpdateError(
                f"the certificate of {site} is valid {valid_from.isoformat()} to {valid_until.isoformat()}, not now"
            )
        return site, public_key

    def verify(self, job_id: str, session: int, item: LeafSum, signature: object) -> None:
        """``UpdateError`` saying why, unless ``signature`` is ``item.leaf``'s own over the sum."""
        if not isinstance(signature, dict) or set(signature) != {"cert", "sig"}:
            raise UpdateError("no signature of the leaf (a sum must carry its leaf's signature)")
        site, public_key = self._site(signature["cert"])
        if site != item.leaf:
            raise UpdateError(f"signed by {site}, not by the leaf it names")
        if not isinstance(signature["sig"], bytes):
            raise UpdateError("signature.sig must be bytes")
        try:
            _verify(public_key, signature["sig"], leaf_sum_statement(job_id, session, item))
        except InvalidSignature as err:
            raise UpdateError(
                "the signature does not match the sum (altered on the way, or made for another job or session)"
            ) from err


def report(known_version: int | None, entries: list[dict]) -> Shareable:
    message = Shareable()
    message[KNOWN_VERSION] = known_version
    message[LEAF_SUMS] = list(entries)
    return message


def read_report(message: Shareable) -> tuple[int | None, list[tuple[int, LeafSum, object]], list[str]]:
    """(the sender's known version, its well-formed (session, LeafSum, signature) entries, what was
    wrong with the others). Signatures are ``LeafSumVerifier``'s to judge; shapes, norms and counts
    the ``LeafSumCombiner``'s."""
    known = message.get(KNOWN_VERSION)
    if known is not None and (isinstance(known, bool) or not isinstance(known, int)):
        known = None
    entries = message.get(LEAF_SUMS)
    if entries is None:
        return known, [], []
    if not isinstance(entries, list) or len(entries) > MAX_SUMS_PER_REPORT:
        return known, [], [f"leaf_sums must be a list of at most {MAX_SUMS_PER_REPORT} entries"]
    good, problems = [], []
    for entry in entries:
        try:
            good.append(_entry(entry))
        except UpdateError as err:
            leaf = entry.get("leaf", "?") if isinstance(entry, dict) else "?"
            problems.append(f"leaf {leaf}: {err}")
    return known, good, problems


def _entry(entry: object) -> tuple[int, LeafSum, object]:
    fields = {"leaf", "session", "base_version", "count", "weight", "total"}
    if not isinstance(entry, dict) or not fields <= set(entry) <= fields | {SIGNATURE}:
        raise UpdateError(f"a leaf sum must have exactly the fields {sorted(fields)} and its {SIGNATURE}")
    if not isinstance(entry["leaf"], str) or not entry["leaf"]:
        raise UpdateError("leaf must be a site name")
    for name in ("session", "base_version", "count"):
        if isinstance(entry[name], bool) or not isinstance(entry[name], int):
            raise UpdateError(f"{name} must be an integer, got {entry[name]!r}")
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UpdateError(f"weight must be a finite number, got {weight!r}")
    total = entry["total"]
    if not isinstance(total, dict) or not all(isinstance(v, np.ndarray) for v in total.values()):
        raise UpdateError("total must map names to arrays")
    item = LeafSum(entry["leaf"], entry["base_version"], entry["count"], float(weight), total)
    return entry["session"], item, entry.get(SIGNATURE)


def leaves_under(fl_ctx: FLContext, child: str) -> set[str] | None:
    """The leaf sites at or below ``child`` in the client hierarchy (whose sums it may report);
    None when the hierarchy is not known (outside a deployment)."""
    forest = fl_ctx.get_prop(FLContextKey.CLIENT_HIERARCHY)
    if not isinstance(forest, Forest):
        return None
    node = forest.nodes.get(child)
    if node is None:
        return set()
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.children:
            stack.extend(current.children)
        else:
            found.add(current.obj.name)
    return found


def acknowledged(reply: Shareable) -> set[tuple[str, int]] | None:
    """The (leaf, session) pairs a parent's reply acknowledges; None if it names none (take all)."""
    pairs = reply.get(ACKNOWLEDGED)
    if not isinstance(pairs, list):
        return None
    return {(p[0], p[1]) for p in pairs if isinstance(p, (list, tuple)) and len(p) == 2}
