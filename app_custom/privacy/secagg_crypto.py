"""The primitives secure aggregation is built from, all from maintained libraries.

- key agreement: X25519 (``cryptography``); a device's masking key is derived from a 16-byte seed
  so that the seed fits one Shamir secret;
- key derivation: HKDF-SHA256, with the session context in ``info`` so that no key, mask or share
  of one (job, round, cohort) is valid in another;
- masks: the ChaCha20 keystream as PRG, read as 32-bit words reduced into the ring;
- share transport: ChaCha20-Poly1305 with the (context, dealer, holder) as associated data;
- t-of-n sharing of 16-byte secrets: Shamir over a prime field (``shamir``; why not pycryptodome's
  is said there).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import shamir

SEED_BYTES = shamir.SECRET_BYTES  # one Shamir secret
KEY_BYTES = 32
# A share commitment only attributes a forged share to its holder: the secret a set of shares
# reconstructs is checked against its full commitment (the self-mask seed's 32 bytes, the masking
# key's public key), so a forgery that slipped past its share commitment aborts the round and
# cannot change a released sum. Slipping past one takes a second preimage of 64 bits (2^64 hash
# evaluations) within one round; 8 bytes, against 16, save 16 bytes per neighbour on the wire.
SHARE_COMMITMENT_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
# one holder's sealed pair of shares: nonce, the two share values (the holder's point is its place
# in the roster, known to both ends, so it does not travel), Poly1305 tag
SEALED_SHARES_BYTES = NONCE_BYTES + 2 * shamir.SHARE_BYTES + TAG_BYTES
Share = shamir.Share


@dataclass(frozen=True)
class SessionContext:
    """What every key, mask, share and message of one aggregation is bound to."""

    job_id: str
    round: int
    cohort_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise ValueError(f"job_id must be a non-empty string, got {self.job_id!r}")
        if not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be a non-negative integer, got {self.round!r}")
        if not isinstance(self.cohort_id, str) or not self.cohort_id:
            raise ValueError(f"cohort_id must be a non-empty string, got {self.cohort_id!r}")

    @cached_property
    def encoded(self) -> bytes:
        return json.dumps([self.job_id, self.round, self.cohort_id]).encode()


def _hkdf(material: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def _label(context: SessionContext, purpose: str, *names: str) -> bytes:
    return b"fleetnest-secagg|" + context.encoded + b"|" + json.dumps([purpose, *names]).encode()


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def masking_key(seed: bytes) -> X25519PrivateKey:
    """The device's masking key, recoverable from its seed (the part that is secret-shared)."""
    return X25519PrivateKey.from_private_bytes(_hkdf(seed, b"fleetnest-secagg|masking-key"))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def load_public(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


def pair_key(own: X25519PrivateKey, peer_public: bytes, context: SessionContext, purpose: str, a: str, b: str) -> bytes:
    """A key both ends of the pair (a, b) derive alike: DH, then HKDF bound to the context and pair."""
    shared = own.exchange(load_public(peer_public))
    return _hkdf(shared, _label(context, purpose, *sorted((a, b))))


def self_mask_key(seed: bytes, context: SessionContext, device: str) -> bytes:
    return _hkdf(seed, _label(context, "self-mask", device))


def prg(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random elements of Z_{2^bits} (uint64) from a 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(b"\x00" * (4 * length)), dtype="<u4").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)


def seed_commitment(seed: bytes, context: SessionContext, device: str) -> bytes:
    """Published in advance, so that a reconstructed self-mask seed can be checked."""
    return hashlib.sha256(_label(context, "seed-commitment", device) + seed).digest()


def share_commitment(share: Share, context: SessionContext, kind: str, dealer: str, holder: str) -> bytes:
    """Published by the dealer, so that the aggregator can check each share a holder returns."""
    digest = hashlib.sha256(_label(context, "share-commitment", kind, dealer, holder) + shamir.encode(share))
    return digest.digest()[:SHARE_COMMITMENT_BYTES]


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext, or None if ``sealed`` was not made with this key for this associated data."""
    if not isinstance(sealed, (bytes, bytearray)) or len(sealed) < NONCE_BYTES + TAG_BYTES:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(sealed[:NONCE_BYTES]), bytes(sealed[NONCE_BYTES:]), associated)
    except InvalidTag:
        return None


def share_channel_label(context: SessionContext, dealer: str, holder: str) -> bytes:
    return _label(context, "share-transport", dealer, holder)
