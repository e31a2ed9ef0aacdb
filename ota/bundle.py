"""Device side of a bundle: read and check its manifest, verify its files, check that it is for this
device, and install the device's own fast layers into the shipped graph (no torch needed).

Everything here treats the bundle as untrusted input: the TUF layer decides whether a bundle is
the one the fleet's keys signed, and this module decides whether it is well formed and usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import load_file

from .layout import FORMAT, GOLDEN, GRAPH, MANIFEST, OUTPUT, WEIGHTS, file_sha256


class BundleError(ValueError):
    """The bundle is malformed, tampered with, or not for this device (the message says which)."""


class NonFiniteWeights(BundleError):
    """Weights to install hold NaN or inf: broken weights, not a release that does not fit."""


_REQUIRED = {
    "format": int,
    "release": str,
    "global_version": int,
    "weights_sha256": str,
    "model": dict,
    "compatibility": dict,
    "golden": dict,
    "files": dict,
}
_MODEL_KEYS = ("inputs", "output", "param_prefix", "shared_names", "private_names", "input_spec")


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise BundleError(f"{bundle}: no {MANIFEST}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupt manifest ({e})") from e
    return check_manifest(manifest, path)


def check_manifest(manifest: object, path: str | Path) -> dict:
    """The manifest's structure, format and required files (``path`` names it in errors)."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: corrupt manifest (not a JSON object)")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{path}: corrupt manifest ({key!r} missing or not a {kind.__name__})")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest['format']}, this runtime reads format {FORMAT}")
    missing = [key for key in _MODEL_KEYS if key not in manifest["model"]]
    if missing:
        raise BundleError(f"{path}: corrupt manifest (model lacks {missing})")
    if GOLDEN not in manifest["files"]:
        raise BundleError(f"{path}: the bundle has no golden data: it cannot be health-checked")
    for name in (WEIGHTS, GRAPH):
        if name not in manifest["files"]:
            raise BundleError(f"{path}: the manifest lists no {name}")
    return manifest


def verify_files(bundle: str | Path, manifest: dict) -> None:
    """Every listed file exists with its size and sha256 (a file is not read past its listed size)."""
    for name, entry in manifest["files"].items():
        path = Path(bundle) / name
        if Path(name).name != name:
            raise BundleError(f"{bundle}: file name {name!r} is not a plain name")
        if not path.is_file():
            raise BundleError(f"{bundle}: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{bundle}: {name} is {size} bytes, the manifest says {entry.get('bytes')}")
        if file_sha256(path) != entry.get("sha256"):
            raise BundleError(f"{bundle}: {name} does not match its sha256 (tampered or corrupt)")


@dataclass(frozen=True)
class DeviceProfile:
    """What a device is and runs: its class, L4T major release, TensorRT version (None: absent)
    and the fleetnest runtime version."""

    device_class: str
    runtime_version: str
    l4t_major: int | None = None
    tensorrt: str | None = None


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError as e:
        raise BundleError(f"not a version: {text!r}") from e


def check_compatible(manifest: dict, profile: DeviceProfile) -> list[str]:
    """Raise ``BundleError`` if the bundle is not for this device; return notes (e.g. the engine
    falls back to onnxruntime because TensorRT is absent)."""
    compat = manifest["compatibility"]
    if compat.get("name") != profile.device_class:
        raise BundleError(
            f"release {manifest['release']} is for {compat.get('name')}, this device is {profile.device_class}"
        )
    if _version(profile.runtime_version) < _version(str(compat.get("min_runtime_version", "0"))):
        raise BundleError(
            f"release needs runtime >= {compat['min_runtime_version']}, this device runs {profile.runtime_version}"
        )
    if (
        compat.get("l4t_major") is not None
        and profile.l4t_major is not None
        and compat["l4t_major"] != profile.l4t_major
    ):
        raise BundleError(f"release is for L4T R{compat['l4t_major']}, this device runs R{profile.l4t_major}")
    notes = []
    if compat.get("tensorrt_min") is not None:
        if profile.tensorrt is None:
            notes.append("TensorRT is absent on this device: onnxruntime runs the model")
        elif not (_version(compat["tensorrt_min"]) <= _version(profile.tensorrt) < _version(compat["tensorrt_below"])):
            raise BundleError(
                f"release needs TensorRT >= {compat['tensorrt_min']} and < {compat['tensorrt_below']}, "
                f"this device has {profile.tensorrt}"
            )
    return notes


def load_slow(bundle: str | Path, manifest: dict) -> dict[str, np.ndarray]:
    slow = load_file(str(Path(bundle) / WEIGHTS))
    if sorted(slow) != sorted(manifest["model"]["shared_names"]):
        raise BundleError(f"{bundle}: {WEIGHTS} does not hold exactly the manifest's shared layers")
    return slow


def load_golden(bundle: str | Path, manifest: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    golden = load_file(str(Path(bundle) / GOLDEN))
    inputs = {name: golden.get(f"input.{name}") for name in manifest["model"]["inputs"]}
    output = golden.get(f"output.{manifest['model']['output']}")
    if output is None or any(value is None for value in inputs.values()):
        raise BundleError(f"{bundle}: {GOLDEN} lacks inputs or outputs named in the manifest")
    return inputs, output  # type: ignore[return-value]


def personalize(bundle: str | Path, manifest: dict, private: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The shipped graph with this device's own private (fast) layers installed by name. Every
    private layer of the manifest must be given, with its shape, finite; nothing else."""
    expected = set(manifest["model"]["private_names"])
    if set(private) != expected:
        raise BundleError(
            f"fast layers do not match the release: missing {sorted(expected - set(private))}, "
            f"unknown {sorted(set(private) - expected)}"
        )
    graph = onnx.load(str(Path(bundle) / GRAPH))
    prefix = manifest["model"]["param_prefix"]
    by_name = {init.name: init for init in graph.graph.initializer}
    for name, value in private.items():
        init = by_name.get(prefix + name)
        if init is None:
            raise BundleError(f"{bundle}: the graph has no initializer {prefix + name}")
        value = np.asarray(value)
        if tuple(init.dims) != value.shape:
            raise BundleError(f"fast layer {name}: shape {value.shape}, the release expects {tuple(init.dims)}")
        if not np.all(np.isfinite(value)):
            raise NonFiniteWeights(f"fast layer {name}: contains NaN or inf")
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    if [output.name for output in graph.graph.output] != [OUTPUT]:
        raise BundleError(f"{bundle}: the graph's output is not {OUTPUT!r}")
    return graph
