"""Secure aggregation of quantized slow deltas (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

Four stages (five when authenticated), each one message from every device to the aggregator and
one answer back:

1. ``advertise``: each device publishes two X25519 public keys (share transport, masking) and a
   commitment to its self-mask seed, signed with its device certificate when the session is
   ``authenticated``. The aggregator answers with the roster of devices that did (U1) and the
   neighbour graph over it (complete, or SecAgg+'s k-regular ring); every device checks every
   signature in the roster, so the aggregator cannot put its own keys in a peer's place.
2. ``share``: each device Shamir-shares its masking-key seed and its self-mask seed among its
   neighbours, each pair of shares sealed for its holder (ChaCha20-Poly1305, bound to context,
   dealer and holder), with a commitment to every share. The aggregator only routes them (U2).
3. ``mask``: each device adds to its quantized delta a self mask PRG(b_u) and, for every
   neighbour v in U2, +PRG(s_uv) if u < v else -PRG(s_uv), all mod 2^bits, and sends the result.
   The pairwise masks cancel in the sum; the self masks do not. A device refuses when fewer
   than its threshold of neighbours are in U2 (else the aggregator could leave it unmasked).
4. ``consistency`` (authenticated sessions): the aggregator names the survivors (U3) and the
   dropped (U2 \\ U3); each survivor signs that one set, once.
5. ``unmask``: the same set, with the survivors' signatures. A device answers only for the set it
   signed, with at least its threshold of valid signatures from its neighbourhood, and at least
   its threshold of its neighbours among the survivors. Each holder returns its shares of
   survivors' self-mask seeds and of dropped devices' masking seeds, never both for one device.
   The aggregator checks every share against its commitment, reconstructs, strips the self masks
   of survivors and the pairwise masks that dropped devices left behind.

The aggregator holds only masked vectors and their sum; it releases the sum only when every
needed secret could be reconstructed from at least its threshold of verified shares, else the
round aborts with ``SecAggAbort`` and nothing is released. Every message carries a header bound to
(job, round, cohort, stage, sender); the transport's authenticated sender must match it. A bad
message is rejected, attributed to its sender in ``rejections``, and the protocol goes on
without it where it can.

Threat model. Authenticated: an aggregator that lies, drops, reorders and equivocates, together
with ``c`` colluding devices among a target's ``deg`` neighbours, learns nothing about the
target's vector beyond the sum while ``c < 2 t - deg`` (``t`` = ``threshold(deg, max_dropout)``):
it would need ``t`` self-mask shares and ``t`` masking shares, and an honest holder gives only
one of the two, for the one set it signed (bound to the roster). A device deals its seeds once
per session, and only to a roster drawn from the session's cohort that leaves out at most
``max_dropout`` of it. With SecAgg+'s sparse graph the aggregator also chooses the context that
seeds the graph and which devices the roster leaves out, so it can search for a graph that puts
its colluders next to a target: there ``c`` counts the colluders it could place, not the
fleet's share of them (the complete graph, the default, has no such freedom). Unauthenticated
(no device identities, the flat simulation): an honest-but-curious aggregator only, since it
could swap a peer's keys unseen.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from . import secagg_crypto as crypto
from . import shamir
from .quantization import QuantizationError, Ring, check_ring_vector, decode_sum, pack, unpack

ADVERTISE, SHARE, MASK, CONSISTENCY, UNMASK = "advertise", "share", "mask", "consistency", "unmask"


class SecAggAbort(RuntimeError):
    """The round cannot release a correct sum (too few survivors or shares); nothing is released."""


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``sender`` is the device it is attributed to."""

    def __init__(self, sender: str, stage: str, reason: str) -> None:
        super().__init__(f"{stage} message from {sender!r} rejected: {reason}")
        self.sender, self.stage, self.reason = sender, stage, reason


@dataclass(frozen=True)
class Rejection:
    sender: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Header:
    context: crypto.SessionContext
    stage: str
    sender: str


@dataclass(frozen=True)
class KeyAdvert:
    header: Header
    transport_public: bytes
    masking_public: bytes
    seed_commitment: bytes
    certificate: bytes = b""  # the device's certificate (authenticated sessions)
    signature: bytes = b""  # over ``advert_payload``, with that certificate's key


class Signer(Protocol):
    """A device's own identity: its certificate and signatures made with its key."""

    certificate: bytes

    def sign(self, payload: bytes) -> bytes: ...


class Authority(Protocol):
    """Who checks a peer's certificate and signature; raises ``ValueError`` saying why not."""

    def verify(self, device: str, certificate: bytes, payload: bytes, signature: bytes) -> None: ...


@dataclass(frozen=True)
class PeerTrust:
    """A device's part in authenticated sessions: what it signs with, and whom it believes."""

    signer: Signer
    authority: Authority


def advert_payload(advert: KeyAdvert) -> bytes:
    """What a device signs in its advert: its keys, bound to the session and to its name."""
    header = advert.header
    return (
        b"fleetnest-secagg-advert|"
        + header.context.encoded
        + b"|"
        + json.dumps(header.sender).encode()
        + b"|"
        + advert.transport_public
        + advert.masking_public
        + advert.seed_commitment
    )


def roster_digest(roster: Roster) -> bytes:
    """Names the roster (every advert's keys): what a consistency signature is bound to, besides the
    context, so that no signature made in one run of a session counts in another."""
    entries = [
        [name, a.transport_public.hex(), a.masking_public.hex(), a.seed_commitment.hex()]
        for name, a in sorted(roster.adverts.items())
    ]
    return hashlib.sha256(json.dumps(entries).encode()).digest()


def survivors_payload(
    context: crypto.SessionContext, roster: Roster, survivors: tuple[str, ...], dropped: tuple[str, ...]
) -> bytes:
    """What a survivor signs in the consistency round: the one (U3, U2 \\ U3) it was shown, of this roster."""
    sets = json.dumps([sorted(survivors), sorted(dropped)]).encode()
    return b"fleetnest-secagg-survivors|" + context.encoded + b"|" + roster_digest(roster) + b"|" + sets


@dataclass(frozen=True)
class Roster:
    """U1: the devices whose adverts the aggregator accepted, and the neighbour graph over them."""

    context: crypto.SessionContext
    adverts: dict[str, KeyAdvert]
    neighbours: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class ShareBundle:
    """One entry per neighbour of the sender, in the roster's order of its neighbours (so no holder
    is named on the wire)."""

    header: Header
    sealed: tuple[bytes, ...]  # sealed (self share, masking share) for each holder
    commitments: tuple[tuple[bytes, bytes], ...]  # commitments of those two shares


@dataclass(frozen=True)
class SharesFor:
    """What the aggregator routes to one holder: U2, and the sealed shares addressed to it."""

    context: crypto.SessionContext
    senders: tuple[str, ...]
    sealed: dict[str, bytes]


@dataclass(frozen=True)
class MaskedInput:
    header: Header
    ring_bits: int
    length: int
    payload: bytes  # the masked vector, packed at ring_bits per value
    unreadable_shares: tuple[str, ...] = ()  # dealers whose sealed shares failed authentication


@dataclass(frozen=True)
class UnmaskRequest:
    """U3 and U2 \\ U3: first to be signed (``consistency``), then with the signatures (``unmask``)."""

    context: crypto.SessionContext
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signatures: dict[str, bytes] = field(default_factory=dict)  # survivor -> its signature of the set


@dataclass(frozen=True)
class ConsistencySignature:
    header: Header
    signature: bytes


@dataclass(frozen=True)
class UnmaskShares:
    header: Header
    self_shares: dict[str, crypto.Share]  # survivor -> its self-mask seed share held here
    masking_shares: dict[str, crypto.Share]  # dropped device -> its masking seed share held here


@dataclass(frozen=True)
class SecAggResult:
    total: np.ndarray  # decoded float64 sum of the survivors' quantized vectors
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    rejections: tuple[Rejection, ...]


@dataclass(frozen=True)
class SecAggParams:
    """What every party agrees on before a round.

    ``neighbours``: None for the complete graph (Bonawitz), else an even degree k < cohort size for
    SecAgg+'s k-regular graph. ``max_dropout``: the fraction of a device's neighbours that may drop
    after sharing; each secret's threshold is the largest that still tolerates it, and never half
    of the neighbours or fewer (else the aggregator could learn both seeds of one device).
    """

    context: crypto.SessionContext
    ring: Ring
    length: int
    neighbours: int | None = None
    max_dropout: float = 0.3
    min_survivors: int = 2
    authenticated: bool = False  # signed adverts and the consistency round
    cohort: tuple[str, ...] = ()  # the session's cohort, fixed before any key is seen (empty: not checked)

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"length must be a positive integer, got {self.length!r}")
        if self.neighbours is not None and (
            not isinstance(self.neighbours, int) or self.neighbours < 2 or self.neighbours % 2
        ):
            raise ValueError(
                f"neighbours must be None (complete graph) or an even integer >= 2, got {self.neighbours!r}"
            )
        if not isinstance(self.max_dropout, (int, float)) or not 0 <= self.max_dropout < 0.5:
            raise ValueError(f"max_dropout must be in [0, 0.5), got {self.max_dropout!r}")
        if not isinstance(self.min_survivors, int) or self.min_survivors < 1:
            raise ValueError(f"min_survivors must be a positive integer, got {self.min_survivors!r}")
        if not isinstance(self.authenticated, bool):
            raise ValueError(f"authenticated must be true or false, got {self.authenticated!r}")
        if not isinstance(self.cohort, tuple) or not all(isinstance(d, str) for d in self.cohort):
            raise ValueError(f"cohort must be a tuple of device ids, got {self.cohort!r}")

    @property
    def min_roster(self) -> int:
        """The fewest of the cohort a roster may hold: the aggregator may leave out no more than
        ``max_dropout`` of it, so it cannot shrink a device's neighbourhood (and threshold) at will."""
        return max(self.min_survivors, math.ceil((1 - self.max_dropout) * len(self.cohort)))


def neighbour_graph(devices: list[str], params: SecAggParams) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours: everyone else, or k/2 on each side on a ring shuffled from the context."""
    ordered = sorted(devices)
    n = len(ordered)
    if params.neighbours is None or params.neighbours >= n - 1:
        return {d: tuple(x for x in ordered if x != d) for d in ordered}
    seed = int.from_bytes(hashlib.sha256(params.context.encoded + b"|graph").digest()[:8], "big")
    ring = ordered[:]
    random.Random(seed).shuffle(ring)
    half = params.neighbours // 2
    graph: dict[str, set[str]] = {d: set() for d in ordered}
    for i, d in enumerate(ring):
        for step in range(1, half + 1):
            graph[d].add(ring[(i + step) % n])
            graph[d].add(ring[(i - step) % n])
    return {d: tuple(sorted(graph[d])) for d in ordered}


def roster_point(roster: Roster, device: str) -> int:
    """The public point at which ``device`` holds shares: its place in the roster, from 1."""
    return sorted(roster.adverts).index(device) + 1


def threshold(degree: int, max_dropout: float) -> int:
    """Shares needed to reconstruct a secret dealt to ``degree`` neighbours: the largest number that
    still tolerates ``max_dropout`` of the neighbourhood (the device and its neighbours) dropping."""
    return max(degree - math.floor(max_dropout * (degree + 1)), degree // 2 + 1)


def _signed_pair_mask(me: str, peer: str, key: bytes, params: SecAggParams) -> np.ndarray:
    mask = crypto.prg(key, params.length, params.ring.bits)
    return mask if me < peer else (np.uint64(params.ring.modulus) - mask) % np.uint64(params.ring.modulus)


class SecAggDevice:
    """One device's side of a round. Call the stages in order; each returns the message to send."""

    def __init__(
        self, device_id: str, params: SecAggParams, signer: Signer | None = None, authority: Authority | None = None
    ) -> None:
        if params.authenticated and (signer is None or authority is None):
            raise ValueError("an authenticated session needs the device's signer and the fleet's authority")
        self.id = device_id
        self.params = params
        self._signer, self._authority = signer, authority
        self._transport_key = crypto.X25519PrivateKey.generate()
        self._masking_seed = crypto.new_seed()
        self._masking_key = crypto.masking_key(self._masking_seed)
        self._self_seed = crypto.new_seed()
        self._roster: Roster | None = None
        self._held: dict[str, tuple[crypto.Share, crypto.Share]] = {}  # dealer -> (self share, masking share)
        self._senders: tuple[str, ...] = ()
        self._masked = False
        self._signed: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # the (U3, dropped) it signed
        self._signature = b""
        self._unmasked = False

    def export_state(self) -> dict:
        """Everything the device must keep between stages (its secrets included), for a device
        whose process does not live through the whole round; ``restore`` reads it back."""
        return {
            "id": self.id,
            "transport_key": crypto.private_bytes(self._transport_key),
            "masking_seed": self._masking_seed,
            "self_seed": self._self_seed,
            "roster": self._roster,
            "held": {dealer: [list(s), list(m)] for dealer, (s, m) in self._held.items()},
            "senders": list(self._senders),
            "masked": self._masked,
            "signed": None if self._signed is None else [list(self._signed[0]), list(self._signed[1])],
            "signature": self._signature,
            "unmasked": self._unmasked,
        }

    @classmethod
    def restore(
        cls, state: dict, params: SecAggParams, signer: Signer | None = None, authority: Authority | None = None
    ) -> SecAggDevice:
        device = cls(state["id"], params, signer, authority)
        device._transport_key = crypto.X25519PrivateKey.from_private_bytes(state["transport_key"])
        device._masking_seed = state["masking_seed"]
        device._masking_key = crypto.masking_key(device._masking_seed)
        device._self_seed = state["self_seed"]
        device._roster = state["roster"]
        device._held = {dealer: (tuple(s), tuple(m)) for dealer, (s, m) in state["held"].items()}
        device._senders = tuple(state["senders"])
        device._masked = bool(state["masked"])
        signed = state.get("signed")
        device._signed = None if signed is None else (tuple(signed[0]), tuple(signed[1]))
        device._signature = state.get("signature", b"")
        device._unmasked = bool(state["unmasked"])
        return device

    def _header(self, stage: str) -> Header:
        return Header(self.params.context, stage, self.id)

    def _check_context(self, context: crypto.SessionContext, what: str) -> None:
        if context != self.params.context:
            raise ProtocolError("aggregator", what, f"bound to {context}, this round is {self.params.context}")

    def _threshold(self) -> int:
        return threshold(len(self._roster.neighbours[self.id]), self.params.max_dropout)

    def advertise(self) -> KeyAdvert:
        advert = KeyAdvert(
            self._header(ADVERTISE),
            crypto.public_bytes(self._transport_key),
            crypto.public_bytes(self._masking_key),
            crypto.seed_commitment(self._self_seed, self.params.context, self.id),
        )
        if not self.params.authenticated:
            return advert
        signed = replace(advert, certificate=self._signer.certificate)
        return replace(signed, signature=self._signer.sign(advert_payload(signed)))

    def _check_adverts(self, roster: Roster) -> None:
        """Every neighbour's keys (the only ones this device uses) as that neighbour signed them:
        the aggregator cannot stand in for anyone."""
        for name in (self.id, *roster.neighbours[self.id]):
            advert = roster.adverts[name]
            if not isinstance(advert, KeyAdvert) or advert.header != Header(self.params.context, ADVERTISE, name):
                raise ProtocolError("aggregator", SHARE, f"the roster's advert of {name} is not its own for this round")
            try:
                self._authority.verify(name, advert.certificate, advert_payload(advert), advert.signature)
            except ValueError as err:
                raise ProtocolError("aggregator", SHARE, f"advert of {name} refused: {err}") from err

    def share_keys(self, roster: Roster) -> ShareBundle:
        if self._roster is not None:
            # dealt again to another roster, the same seeds would reach two groups of holders, whom an
            # aggregator could then tell two stories: this device deals once per session
            raise ProtocolError("aggregator", SHARE, f"{self.id} already dealt its shares in this session")
        self._check_context(roster.context, SHARE)
        if self.id not in roster.neighbours:
            raise ProtocolError("aggregator", SHARE, f"roster leaves out {self.id}")
        outsiders = sorted(set(roster.adverts) - set(self.params.cohort)) if self.params.cohort else []
        if outsiders:
            raise ProtocolError("aggregator", SHARE, f"roster names {outsiders}, not in the session's cohort")
        if self.params.cohort and len(roster.adverts) < self.params.min_roster:
            raise ProtocolError(
                "aggregator",
                SHARE,
                f"roster of {len(roster.adverts)} of a cohort of {len(self.params.cohort)},"
                f" below {self.params.min_roster}",
            )
        if len(roster.adverts) < self.params.min_survivors:
            # a sum over fewer devices would not hide this one (nor carry the noise DP assumes)
            raise ProtocolError(
                "aggregator", SHARE, f"roster of {len(roster.adverts)}, below {self.params.min_survivors}"
            )
        if roster.neighbours != neighbour_graph(list(roster.adverts), self.params):
            raise ProtocolError("aggregator", SHARE, "neighbour graph does not follow from the roster")
        if self.params.authenticated:
            self._check_adverts(roster)
        mine = roster.adverts[self.id]
        if (mine.transport_public, mine.masking_public) != (
            crypto.public_bytes(self._transport_key),
            crypto.public_bytes(self._masking_key),
        ):
            raise ProtocolError("aggregator", SHARE, f"roster carries keys that are not {self.id}'s")
        self._roster = roster
        holders = roster.neighbours[self.id]
        t = threshold(len(holders), self.params.max_dropout)
        points = [roster_point(roster, holder) for holder in holders]
        self_shares = shamir.split(self._self_seed, t, points)
        masking_shares = shamir.split(self._masking_seed, t, points)
        sealed, commitments = [], []
        for holder, s_share, m_share in zip(holders, self_shares, masking_shares):
            key = crypto.pair_key(
                self._transport_key,
                roster.adverts[holder].transport_public,
                self.params.context,
                "transport",
                self.id,
                holder,
            )
            plaintext = shamir.encode_value(s_share) + shamir.encode_value(m_share)
            sealed.append(crypto.seal(key, plaintext, crypto.share_channel_label(self.params.context, self.id, holder)))
            commitments.append(
                (
                    crypto.share_commitment(s_share, self.params.context, "self", self.id, holder),
                    crypto.share_commitment(m_share, self.params.context, "masking", self.id, holder),
                )
            )
        return ShareBundle(self._header(SHARE), tuple(sealed), tuple(commitments))

    def masked_input(self, routed: SharesFor, levels: np.ndarray) -> MaskedInput:
        """Mask ``levels`` (this device's quantized delta, ring elements) for the devices in U2."""
        if self._roster is None:
            raise RuntimeError("masked_input before share_keys")
        if self._masked:
            raise RuntimeError("this device already sent its masked input for the round")
        self._check_context(routed.context, MASK)
        params = self.params
        levels = check_ring_vector(levels, params.ring, params.length, f"{self.id}'s quantized delta")
        if self.id not in routed.senders:
            raise ProtocolError("aggregator", MASK, f"{self.id} is not in U2")
        neighbours = set(self._roster.neighbours[self.id])
        live = len(neighbours & set(routed.senders))
        if live < self._threshold():
            # with fewer pairwise masks than that, the shares the aggregator may collect unmask this vector
            raise ProtocolError(
                "aggregator", MASK, f"only {live} of its neighbours are in U2, below the threshold {self._threshold()}"
            )
        unreadable = []
        for dealer, sealed in sorted(routed.sealed.items()):
            if dealer not in neighbours or dealer not in routed.senders:
                unreadable.append(dealer)
                continue
            key = crypto.pair_key(
                self._transport_key,
                self._roster.adverts[dealer].transport_public,
                params.context,
                "transport",
                dealer,
                self.id,
            )
            plaintext = crypto.open_sealed(key, sealed, crypto.share_channel_label(params.context, dealer, self.id))
            try:
                if plaintext is None:
                    raise shamir.ShamirError("failed authentication")
                point, cut = roster_point(self._roster, self.id), shamir.SHARE_BYTES
                if len(plaintext) != 2 * cut:
                    raise shamir.ShamirError(f"{len(plaintext)} bytes of shares")
                held = (shamir.decode_value(plaintext[:cut], point), shamir.decode_value(plaintext[cut:], point))
            except shamir.ShamirError:
                unreadable.append(dealer)
                continue
            self._held[dealer] = held
        self._senders = tuple(routed.senders)
        modulus = np.uint64(params.ring.modulus)
        masked = (
            levels
            + crypto.prg(
                crypto.self_mask_key(self._self_seed, params.context, self.id), params.length, params.ring.bits
            )
        ) % modulus
        for peer in sorted(neighbours & set(routed.senders)):
            key = crypto.pair_key(
                self._masking_key, self._roster.adverts[peer].masking_public, params.context, "pair-mask", self.id, peer
            )
            masked = (masked + _signed_pair_mask(self.id, peer, key, params)) % modulus
        self._masked = True
        return MaskedInput(
            self._header(MASK), params.ring.bits, params.length, pack(masked, params.ring), tuple(unreadable)
        )

    def _check_survivors(self, request: UnmaskRequest, stage: str) -> None:
        self._check_context(request.context, stage)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            # revealing both seeds of one device would unmask its vector
            raise ProtocolError(
                "aggregator", stage, f"devices named both survivor and dropped: {sorted(survivors & dropped)}"
            )
        if not (survivors | dropped) <= set(self._senders):
            raise ProtocolError("aggregator", stage, "names devices outside U2")
        if self.id not in survivors:
            raise ProtocolError("aggregator", stage, f"names {self.id} dropped after it sent its masked input")
        if len(survivors) < self.params.min_survivors:
            raise ProtocolError(
                "aggregator", stage, f"only {len(survivors)} survivors, below {self.params.min_survivors}"
            )
        live = len(survivors & set(self._roster.neighbours[self.id]))
        if live < self._threshold():
            raise ProtocolError(
                "aggregator", stage, f"only {live} of its neighbours survive, below the threshold {self._threshold()}"
            )

    def sign_survivors(self, request: UnmaskRequest) -> ConsistencySignature:
        """The consistency round: this device's signature of the one survivor set it was shown."""
        if not self.params.authenticated:
            raise RuntimeError("the consistency round belongs to authenticated sessions")
        if not self._masked:
            raise RuntimeError("consistency before masked_input")
        self._check_survivors(request, CONSISTENCY)
        shown = (tuple(sorted(request.survivors)), tuple(sorted(request.dropped)))
        if self._signed is not None and self._signed != shown:
            raise ProtocolError("aggregator", CONSISTENCY, "asked to sign a second, different survivor set")
        if self._signed is None:
            self._signed = shown
            self._signature = self._signer.sign(survivors_payload(self.params.context, self._roster, *shown))
        return ConsistencySignature(self._header(CONSISTENCY), self._signature)

    def _check_signatures(self, request: UnmaskRequest) -> None:
        shown = (tuple(sorted(request.survivors)), tuple(sorted(request.dropped)))
        if self._signed is None:
            raise ProtocolError("aggregator", UNMASK, "an unmask request before this device signed a survivor set")
        if shown != self._signed:
            raise ProtocolError("aggregator", UNMASK, "the survivor set differs from the one this device signed")
        payload = survivors_payload(self.params.context, self._roster, *shown)
        neighbourhood = set(self._roster.neighbours[self.id]) | {self.id}
        valid = 0
        for signer, signature in request.signatures.items():
            if signer not in neighbourhood or signer not in request.survivors:
                continue
            try:
                self._authority.verify(signer, self._roster.adverts[signer].certificate, payload, signature)
            except ValueError:
                continue
            valid += 1
        if valid < self._threshold():
            raise ProtocolError(
                "aggregator",
                UNMASK,
                f"only {valid} valid signatures on the survivor set, below the threshold {self._threshold()}",
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        if not self._masked:
            raise RuntimeError("unmask before masked_input")
        if self._unmasked:
            raise RuntimeError("this device already answered the unmask request")
        self._check_survivors(request, UNMASK)
        if self.params.authenticated:
            self._check_signatures(request)
        survivors, dropped = set(request.survivors), set(request.dropped)
        self._unmasked = True
        return UnmaskShares(
            self._header(UNMASK),
            {d: self._held[d][0] for d in sorted(survivors) if d in self._held},
            {d: self._held[d][1] for d in sorted(dropped) if d in self._held},
        )


@dataclass
class _Stage:
    accepted: dict = field(default_factory=dict)
    excluded: set = field(default_factory=set)


class SecAggAggregator:
    """The aggregator's side: collects each stage's messages, routes shares, releases only the sum."""

    def __init__(self, params: SecAggParams, cohort: list[str], authority: Authority | None = None) -> None:
        if params.authenticated and authority is None:
            raise ValueError("an authenticated session needs the fleet's authority to check adverts")
        if len(set(cohort)) != len(cohort) or not all(isinstance(d, str) and d for d in cohort):
            raise ValueError(f"cohort must be distinct non-empty device ids, got {cohort!r}")
        if len(cohort) > params.ring.cohort:
            raise ValueError(f"the ring is sized for {params.ring.cohort} devices, the cohort has {len(cohort)}")
        self.params = params
        self.authority = authority
        self.cohort = tuple(sorted(cohort))
        self.rejections: list[Rejection] = []
        self._stages = {stage: _Stage() for stage in (ADVERTISE, SHARE, MASK, CONSISTENCY, UNMASK)}
        self._roster: Roster | None = None
        self._survivor_set: UnmaskRequest | None = None  # the set the survivors are asked to sign
        self._request: UnmaskRequest | None = None
        self._combiner = shamir.Combiner()
        # sender -> (holder -> sealed shares, holder -> their commitments), from accepted bundles
        self._dealt: dict[str, tuple[dict[str, bytes], dict[str, tuple[bytes, bytes]]]] = {}

    # ---- intake -----------------------------------------------------------------------------
    def _reject(self, sender: str, stage: str, reason: str) -> bool:
        self.rejections.append(Rejection(str(sender), stage, reason))
        return False

    def _admit(self, sender: str, message: object, stage: str, kind: type, eligible: set[str]) -> bool:
        if not isinstance(message, kind):
            return self._reject(sender, stage, f"expected {kind.__name__}, got {type(message).__name__}")
        header = message.header
        if not isinstance(header, Header) or header.context != self.params.context:
            context = getattr(header, "context", None)
            return self._reject(sender, stage, f"bound to {context}, this round is {self.params.context} (replay?)")
        if header.stage != stage:
            return self._reject(sender, stage, f"a {header.stage!r} message sent as {stage!r}")
        if header.sender != sender:
            return self._reject(sender, stage, f"claims to come from {header.sender!r}")
        if sender not in eligible:
            return self._reject(sender, stage, "not in this stage's cohort")
        state = self._stages[stage]
        if sender in state.excluded:
            return self._reject(sender, stage, "already excluded from this stage")
        if sender in state.accepted:
            if stage == MASK and state.accepted[sender] != message:
                # two different vectors: neither may count; the device is treated as dropped
                del state.accepted[sender]
                state.excluded.add(sender)
                return self._reject(sender, stage, "sent two different masked vectors; both discarded")
            return self._reject(sender, stage, "duplicate message (replay)")
        return True

    def add_advert(self, sender: str, advert: KeyAdvert) -> None:
        if not self._admit(sender, advert, ADVERTISE, KeyAdvert, set(self.cohort)):
            return
        keys = (advert.transport_public, advert.masking_public, advert.seed_commitment)
        if not all(isinstance(k, bytes) and len(k) == 32 for k in keys):
            self._reject(sender, ADVERTISE, "keys and commitment must be 32 bytes each")
            return
        if advert.transport_public == advert.masking_public:
            self._reject(sender, ADVERTISE, "transport and masking keys must differ")
            return
        if self.params.authenticated:
            try:
                self.authority.verify(sender, advert.certificate, advert_payload(advert), advert.signature)
            except ValueError as err:
                # refused here, so that one bad advert does not make every honest device refuse the roster
                self._reject(sender, ADVERTISE, f"advert not signed by {sender}: {err}")
                return
        self._stages[ADVERTISE].accepted[sender] = advert

    def roster(self) -> Roster:
        adverts = dict(sorted(self._stages[ADVERTISE].accepted.items()))
        self._require(len(adverts), ADVERTISE)
        if self.params.cohort and len(adverts) < self.params.min_roster:
            raise SecAggAbort(
                f"{self.params.context}: {len(adverts)} of the cohort's {len(self.params.cohort)} devices advertised,"
                f" need {self.params.min_roster}: devices refuse a roster that small"
            )
        self._roster = Roster(self.params.context, adverts, neighbour_graph(list(adverts), self.params))
        return self._roster

    def add_shares(self, sender: str, bundle: ShareBundle) -> None:
        if self._roster is None:
            raise RuntimeError("add_shares before roster")
        if not self._admit(sender, bundle, SHARE, ShareBundle, set(self._roster.adverts)):
            return
        holders = self._roster.neighbours[sender]
        if not isinstance(bundle.sealed, tuple) or len(bundle.sealed) != len(holders):
            self._reject(sender, SHARE, f"expected sealed shares for its {len(holders)} neighbours")
            return
        if not isinstance(bundle.commitments, tuple) or len(bundle.commitments) != len(holders):
            self._reject(sender, SHARE, f"expected share commitments for its {len(holders)} neighbours")
            return
        for holder, sealed, pair in zip(holders, bundle.sealed, bundle.commitments):
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(c, bytes) and len(c) == crypto.SHARE_COMMITMENT_BYTES for c in pair)
            ):
                self._reject(sender, SHARE, f"malformed share commitments for {holder}")
                return
            if not isinstance(sealed, bytes):
                self._reject(sender, SHARE, f"sealed share for {holder} is not bytes")
                return
        self._stages[SHARE].accepted[sender] = bundle
        self._dealt[sender] = (dict(zip(holders, bundle.sealed)), dict(zip(holders, bundle.commitments)))

    def route_shares(self) -> dict[str, SharesFor]:
        """U2 and, for each of its members, the sealed shares addressed to it."""
        senders = tuple(sorted(self._stages[SHARE].accepted))
        self._require(len(senders), SHARE)
        dealt = self._dealt
        return {
            holder: SharesFor(
                self.params.context,
                senders,
                {dealer: dealt[dealer][0][holder] for dealer in senders if holder in dealt[dealer][0]},
            )
            for holder in senders
        }

    def add_masked(self, sender: str, message: MaskedInput) -> None:
        senders = set(self._stages[SHARE].accepted)
        if not self._admit(sender, message, MASK, MaskedInput, senders):
            return
        ring = self.params.ring
        if message.ring_bits != ring.bits or message.length != self.params.length:
            self._reject(
                sender,
                MASK,
                f"vector of {message.length} values in Z_2^{message.ring_bits}, expected"
                f" {self.params.length} in Z_2^{ring.bits}",
            )
            return
        try:
            unpack(message.payload, ring, self.params.length)
        except QuantizationError as err:
            self._reject(sender, MASK, str(err))
            return
        for dealer in message.unreadable_shares:
            self.rejections.append(
                Rejection(str(dealer), SHARE, f"its sealed share for {sender} failed authentication")
            )
        self._stages[MASK].accepted[sender] = message

    def _survivors(self) -> UnmaskRequest:
        survivors = tuple(sorted(self._stages[MASK].accepted))
        self._require(len(survivors), MASK)
        dropped = tuple(sorted(set(self._stages[SHARE].accepted) - set(survivors)))
        return UnmaskRequest(self.params.context, survivors, dropped)

    def consistency_request(self) -> UnmaskRequest:
        """U3 and the dropped, for every survivor to sign (authenticated sessions)."""
        if not self.params.authenticated:
            raise RuntimeError("the consistency round belongs to authenticated sessions")
        self._survivor_set = self._survivors()
        return self._survivor_set

    def add_consistency(self, sender: str, message: ConsistencySignature) -> None:
        if self._survivor_set is None:
            raise RuntimeError("add_consistency before consistency_request")
        shown = self._survivor_set
        if not self._admit(sender, message, CONSISTENCY, ConsistencySignature, set(shown.survivors)):
            return
        payload = survivors_payload(self.params.context, self._roster, shown.survivors, shown.dropped)
        try:
            self.authority.verify(sender, self._roster.adverts[sender].certificate, payload, message.signature)
        except ValueError as err:
            self._reject(sender, CONSISTENCY, f"its signature of the survivor set is not valid: {err}")
            return
        self._stages[CONSISTENCY].accepted[sender] = message

    def unmask_request(self) -> UnmaskRequest:
        """The survivor set (with its signatures when authenticated), for the survivors to unmask."""
        if not self.params.authenticated:
            self._request = self._survivors()
            return self._request
        if self._survivor_set is None:
            raise RuntimeError("unmask_request before the consistency round")
        signed = self._stages[CONSISTENCY].accepted
        self._require(len(signed), CONSISTENCY)
        signatures = {d: signed[d].signature for d in sorted(signed)}
        self._request = replace(self._survivor_set, signatures=signatures)
        return self._request

    @property
    def unmaskers(self) -> tuple[str, ...]:
        """The devices asked to unmask: the survivors, or when authenticated those that signed."""
        if self._request is None:
            return ()
        return tuple(self._request.signatures) if self.params.authenticated else self._request.survivors

    def add_unmask(self, sender: str, message: UnmaskShares) -> None:
        if self._request is None:
            raise RuntimeError("add_unmask before unmask_request")
        if not self._admit(sender, message, UNMASK, UnmaskShares, set(self.unmaskers)):
            return
        if not isinstance(message.self_shares, dict) or not isinstance(message.masking_shares, dict):
            self._reject(sender, UNMASK, "shares must be mappings")
            return
        survivors, dropped = set(self._request.survivors), set(self._request.dropped)
        if not set(message.self_shares) <= survivors or not set(message.masking_shares) <= dropped:
            self._reject(sender, UNMASK, "shares for devices the request did not ask about")
            return
        verified: dict[tuple[str, str], crypto.Share] = {}
        for kind, shares in (("self", message.self_shares), ("masking", message.masking_shares)):
            for dealer, share in shares.items():
                position = 0 if kind == "self" else 1
                commitment = self._dealt[dealer][1].get(sender, (None, None))[position]
                if (
                    not isinstance(share, tuple)
                    or len(share) != 2
                    or not all(isinstance(v, int) and 0 <= v < shamir.PRIME for v in share)
                    or crypto.share_commitment(share, self.params.context, kind, dealer, sender) != commitment
                ):
                    self._reject(sender, UNMASK, f"its {kind} share of {dealer} does not match the dealer's commitment")
                    continue
                verified[(kind, dealer)] = share
        self._stages[UNMASK].accepted[sender] = verified

    # ---- release ----------------------------------------------------------------------------
    def _require(self, count: int, stage: str) -> None:
        needed = max(self.params.min_survivors, 1)
        if count < needed:
            raise SecAggAbort(f"{self.params.context}: only {count} devices completed {stage!r}, need {needed}")

    def _reconstruct(self, kind: str, dealer: str) -> bytes:
        shares = [s[(kind, dealer)] for s in self._stages[UNMASK].accepted.values() if (kind, dealer) in s]
        degree = len(self._roster.neighbours[dealer])
        needed = threshold(degree, self.params.max_dropout)
        if len(shares) < needed:
            raise SecAggAbort(
                f"{self.params.context}: {len(shares)} verified {kind} shares of {dealer}, need {needed};"
                " too many devices dropped, nothing is released"
            )
        try:
            return self._combiner.combine(shares, needed)
        except shamir.ShamirError as err:
            raise SecAggAbort(f"{self.params.context}: {kind} seed of {dealer}: {err}") from err

    def result(self) -> SecAggResult:
        """The decoded sum of the survivors' vectors; ``SecAggAbort`` if it cannot be recovered exactly."""
        if self._request is None:
            raise RuntimeError("result before unmask_request")
        params, ring = self.params, self.params.ring
        modulus = np.uint64(ring.modulus)
        masked = self._stages[MASK].accepted
        total = np.zeros(params.length, dtype=np.uint64)
        for message in masked.values():
            total = (total + unpack(message.payload, ring, params.length)) % modulus
        for device in self._request.survivors:
            seed = self._reconstruct("self", device)
            if crypto.seed_commitment(seed, params.context, device) != self._roster.adverts[device].seed_commitment:
                raise SecAggAbort(f"{params.context}: {device}'s self-mask seed does not match its commitment")
            mask = crypto.prg(crypto.self_mask_key(seed, params.context, device), params.length, ring.bits)
            total = (total + modulus - mask) % modulus
        survivors = set(self._request.survivors)
        for device in self._request.dropped:
            seed = self._reconstruct("masking", device)
            key = crypto.masking_key(seed)
            if crypto.public_bytes(key) != self._roster.adverts[device].masking_public:
                raise SecAggAbort(f"{params.context}: {device}'s masking seed does not match its public key")
            for peer in sorted(survivors & set(self._roster.neighbours[device])):
                pair = crypto.pair_key(
                    key, self._roster.adverts[peer].masking_public, params.context, "pair-mask", device, peer
                )
                # the peer added its side of the pair mask, the dropped device never added its own
                total = (total + modulus - _signed_pair_mask(peer, device, pair, params)) % modulus
        return SecAggResult(
            decode_sum(total, ring), self._request.survivors, self._request.dropped, tuple(self.rejections)
        )
