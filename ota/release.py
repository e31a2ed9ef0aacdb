"""Release builder: an accepted global slow-layer version from the cluster's archive -> a device bundle.

A bundle is a folder:

- ``slow.safetensors``: the global slow layers (what a device merges under its own fast layers);
- ``model.onnx``: the whole architecture as one ONNX file (no external data), at the opset of the
  target device class, holding the reference weights: the global slow layers and the private
  layers at their starting values (identity adapters). Every parameter is an initializer named
  ``net.<parameter name>``, so a device installs its own fast layers by name (``bundle.personalize``)
  without torch;
- ``golden.safetensors``: fixed inputs and the reference model's outputs, for the health check;
- ``manifest.json``: what the release is (global version, lineage, metrics), for whom
  (``compatibility``), how it was validated, and the size and sha256 of every file.

The candidate is validated before release: the exported graph must reproduce torch's outputs on the
golden inputs, and its median inference time (batch 1, onnxruntime on the build machine;
torch-tensorrt is not used) must stay within ``max_validation_ms``. The median, not the tail: the
build machine is not the device (the device checks its own p99 against its budget), and on a
shared build host the tail measures the host (a 0.05 ms graph showed a 108 ms p99 under load).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from app_custom.cluster.archive import ACCEPTED, VersionArchive
from app_custom.nested.config import NestedConfig
from app_custom.nested.levels import partition_parameters
from app_custom.nested.models import RobotModel, build_model
from app_custom.nested.slow_delta import merge_slow

from .device_classes import DeviceClass, device_class
from .engines import latency_ms
from .layout import FORMAT, GOLDEN, GRAPH, MANIFEST, OUTPUT, RUNTIME_VERSION, WEIGHTS, file_sha256

PARAM_PREFIX = "net."
GOLDEN_BATCH = 8
# how far an engine's outputs on the golden inputs may be from the reference model's
GOLDEN_TOLERANCE = {"fp32": {"rtol": 1e-3, "atol": 1e-4}, "fp16": {"rtol": 2e-2, "atol": 2e-2}}


class ReleaseError(ValueError):
    """The archive or the version cannot be released (the message says why)."""


class _Positional(torch.nn.Module):
    """ONNX inputs are positional: one per modality, in the model's (sorted) modality order."""

    def __init__(self, net: RobotModel) -> None:
        super().__init__()
        self.net = net  # parameters export as ``net.<name>`` (PARAM_PREFIX)
        self.names = list(net.modalities)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(dict(zip(self.names, inputs)))


def reference_model(card: dict, slow: dict[str, np.ndarray]) -> RobotModel:
    """The archived architecture with the global slow layers and the private layers at their start."""
    config = NestedConfig.from_dict(card["config"])
    torch.manual_seed(config.seed)  # the devices' starting weights (identity adapters)
    spec = {name: tuple(shape) for name, shape in card["input_spec"].items()}
    model = build_model(config.model, spec, card["num_classes"])
    shared = partition_parameters(model, config.levels).shared_names
    if sorted(shared) != sorted(card["shared_names"]):
        raise ReleaseError("the model card's shared layers do not match its configuration")
    merge_slow(model, slow, shared)
    return model.eval()


def export_onnx(model: RobotModel, opset: int) -> bytes:
    """One self-contained ONNX file with a dynamic batch; every parameter a named initializer."""
    wrapper = _Positional(model).eval()
    example = tuple(torch.zeros((1,) + shape) for shape in model.modalities.values())
    names = wrapper.names
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: it honours opset <= 17 (TensorRT 8.5), which the dynamo one does not
        torch.onnx.export(
            wrapper,
            example,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes={name: {0: "batch"} for name in [*names, OUTPUT]},
            do_constant_folding=False,  # keeps every parameter as its own named initializer
        )
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph)
    exported = {op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")}
    if exported != {opset}:
        raise ReleaseError(f"asked for ONNX opset {opset}, the exporter wrote {sorted(exported)}")
    initializers = {init.name for init in graph.graph.initializer}
    missing = [name for name, _ in model.named_parameters() if PARAM_PREFIX + name not in initializers]
    if missing:
        raise ReleaseError(f"parameters not exported as named initializers: {missing}")
    return buffer.getvalue()


def golden_data(model: RobotModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {
        name: rng.standard_normal((GOLDEN_BATCH,) + shape).astype(np.float32)
        for name, shape in model.modalities.items()
    }
    with torch.no_grad():
        outputs = model({name: torch.from_numpy(value) for name, value in inputs.items()}).numpy()
    return {f"input.{name}": value for name, value in inputs.items()} | {f"output.{OUTPUT}": outputs}


def validate_with_onnxruntime(graph: bytes, golden: dict[str, np.ndarray], runs: int = 50) -> dict:
    """The exported graph reproduces torch on the golden inputs; its batch-1 latency (p50, p99)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feeds = {name[len("input.") :]: value for name, value in golden.items() if name.startswith("input.")}
    (outputs,) = session.run([OUTPUT], feeds)
    expected = golden[f"output.{OUTPUT}"]
    diff = float(np.max(np.abs(outputs - expected)))
    tolerance = GOLDEN_TOLERANCE["fp32"]
    if not np.allclose(outputs, expected, rtol=tolerance["rtol"], atol=tolerance["atol"]):
        raise ReleaseError(f"the exported graph does not reproduce the model: max |difference| {diff:.3g}")
    single = {name: value[:1] for name, value in feeds.items()}
    p50, p99 = latency_ms(lambda: session.run([OUTPUT], single), runs)
    return {
        "engine": "onnxruntime",
        "reason": "torch-tensorrt is not used on the cluster; devices build their own engines",
        "max_abs_diff": diff,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def build_release(
    archive_root: str | os.PathLike,
    out: str | os.PathLike,
    device_class_name: str,
    version: int | None = None,
    max_validation_ms: float = 100.0,
) -> dict:
    """Build the bundle of ``version`` (default: the current one) for one device class in ``out``
    (which must not exist: a bundle is written once, under a temporary name, then renamed).
    Returns the manifest."""
    target: DeviceClass = device_class(device_class_name)
    out = Path(out)
    if out.exists():
        raise ReleaseError(f"{out} exists: a bundle is never overwritten")
    archive = VersionArchive(archive_root)
    card = archive.model_card()
    if card is None:
        raise ReleaseError(f"{archive_root} has no model.json: it was not written by the nested controller")
    version = archive.current_version() if version is None else version
    if version is None:
        raise ReleaseError(f"{archive_root} has no accepted version")
    slow, record = archive.load(version)  # checks the weights against their recorded sha256
    if record.status != ACCEPTED:
        raise ReleaseError(
            f"version {version} was {record.status} by the validation gate ({record.reason}): not released"
        )
    if record.round is None:
        raise ReleaseError(f"version {version} is the untrained initial version: not released")
    model = reference_model(card, slow)
    graph = export_onnx(model, target.opset)
    golden = golden_data(model, seed=version)
    validation = validate_with_onnxruntime(graph, golden)
    if validation["p50_ms"] > max_validation_ms:
        raise ReleaseError(f"validation inference median {validation['p50_ms']:.1f} ms > {max_validation_ms} ms")

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in slow.items()}, str(tmp / WEIGHTS))
    _write_durably(tmp / GRAPH, graph)
    save_file(golden, str(tmp / GOLDEN))
    private = [name for name, _ in model.named_parameters() if name not in set(card["shared_names"])]
    manifest = {
        "format": FORMAT,
        "release": f"v{version:06d}-{target.name}",
        "global_version": version,
        "parent": record.parent,
        "round": record.round,
        "weights_sha256": record.sha256,
        "metrics": record.metrics,
        "created_at": time.time(),
        "model": {
            "config": card["config"],
            "input_spec": card["input_spec"],
            "num_classes": card["num_classes"],
            "inputs": list(model.modalities),
            "output": OUTPUT,
            "param_prefix": PARAM_PREFIX,
            "shared_names": sorted(card["shared_names"]),
            "private_names": sorted(private),
        },
        "compatibility": target.as_manifest() | {"min_runtime_version": RUNTIME_VERSION},
        "golden": {"batch": GOLDEN_BATCH, "tolerance": GOLDEN_TOLERANCE},
        "validation": validation,
        "files": {
            name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (WEIGHTS, GRAPH, GOLDEN)
        },
    }
    _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    os.replace(tmp, out)
    return manifest
