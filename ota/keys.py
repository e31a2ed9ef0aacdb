"""The fleet's signing keys (ed25519, securesystemslib signers) and where each one lives.

``fleetnest ota keygen --keys DIR`` writes::

    DIR/offline/root-1.pem root-2.pem root-3.pem   root role, 2 of 3 (keep offline: HSM or air-gapped)
    DIR/offline/targets.pem                         signs releases (keep offline)
    DIR/online/snapshot.pem timestamp.pem           freshness, held by the OTA server
    DIR/online/rollout.pem                          signs which ring runs which release (OTA server)
    DIR/public.json                                 every role's public keys (no secret)

Private keys are PKCS#8 PEM files, mode 0600, never overwritten.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from app_custom.durable import write_json_atomic

ROOT_KEYS = 3
ROOT_THRESHOLD = 2
OFFLINE_ROLES = ("targets",)
ONLINE_ROLES = ("snapshot", "timestamp", "rollout")


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or does not match the published public key."""


@dataclass(frozen=True)
class KeyDir:
    path: Path

    def private(self, name: str) -> Path:
        kind = "offline" if name.startswith("root-") or name in OFFLINE_ROLES else "online"
        return self.path / kind / f"{name}.pem"

    @property
    def public_file(self) -> Path:
        return self.path / "public.json"

    def public(self) -> dict[str, list[SSlibKey]]:
        try:
            raw = json.loads(self.public_file.read_text())
        except (OSError, ValueError) as e:
            raise KeyFileError(f"{self.public_file}: cannot read the public keys ({e})") from e
        return {role: [Key.from_dict(keyid, dict(d)) for keyid, d in keys.items()] for role, keys in raw.items()}

    def signer(self, name: str) -> CryptoSigner:
        """The signer for one key (``root-1`` .. ``root-3``, ``targets``, ``snapshot``, ...)."""
        path = self.private(name)
        try:
            private = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise KeyFileError(f"{path}: cannot load the private key ({e})") from e
        role = "root" if name.startswith("root-") else name
        published = {key.keyid: key for key in self.public().get(role, [])}
        signer = CryptoSigner(private)
        if signer.public_key.keyid not in published:
            raise KeyFileError(f"{path}: this key is not among the published {role} keys")
        return signer

    def root_signers(self) -> list[CryptoSigner]:
        return [self.signer(f"root-{i}") for i in range(1, ROOT_KEYS + 1) if self.private(f"root-{i}").exists()]


def replace_key(keys: KeyDir, name: str) -> CryptoSigner:
    """A new key for ``name`` (``targets``, ``snapshot``, ``timestamp``, ``rollout``): the old private
    key is kept beside it as ``<name>.pem.retired-<n>`` and ``public.json`` lists only the new one.
    The repository must then publish metadata that trusts it (``Repository.rotate_key``)."""
    if name.startswith("root-") or name not in OFFLINE_ROLES + ONLINE_ROLES:
        raise KeyFileError(
            f"replace_key handles {list(OFFLINE_ROLES + ONLINE_ROLES)}; root keys rotate with rotate_root"
        )
    path = keys.private(name)
    retired = 1
    while path.with_name(f"{path.name}.retired-{retired}").exists():
        retired += 1
    os.replace(path, path.with_name(f"{path.name}.retired-{retired}"))
    signer = CryptoSigner.generate_ed25519()
    _write_private(path, signer)
    public = json.loads(keys.public_file.read_text())
    public[name] = {signer.public_key.keyid: signer.public_key.to_dict()}
    write_json_atomic(keys.public_file, public)
    return signer


def _write_private(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
        f.flush()
        os.fsync(f.fileno())


def generate(path: str | os.PathLike) -> KeyDir:
    """Create every role's keys under ``path`` (which must not hold keys yet)."""
    keys = KeyDir(Path(path))
    if keys.public_file.exists():
        raise KeyFileError(f"{keys.public_file} exists: keys are never overwritten (rotate them instead)")
    public: dict[str, dict] = {}
    names = [f"root-{i}" for i in range(1, ROOT_KEYS + 1)] + list(OFFLINE_ROLES) + list(ONLINE_ROLES)
    for name in names:
        signer = CryptoSigner.generate_ed25519()
        _write_private(keys.private(name), signer)
        role = "root" if name.startswith("root-") else name
        public.setdefault(role, {})[signer.public_key.keyid] = signer.public_key.to_dict()
    write_json_atomic(keys.public_file, public)
    return keys
