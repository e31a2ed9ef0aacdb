"""What a bundle is made of, shared by the builder (cluster side, with torch) and everything on the
device (no torch): file names, the format version, the runtime version, and the file digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = 1
RUNTIME_VERSION = "0.1.0"  # the oldest device runtime that reads this bundle format
MANIFEST = "manifest.json"
WEIGHTS = "slow.safetensors"
GRAPH = "model.onnx"
GOLDEN = "golden.safetensors"
OUTPUT = "logits"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
