"""Inference engines for a device's personal ONNX graph: TensorRT where it is present, onnxruntime
otherwise, with the reason logged and returned.

TensorRT engines are tied to the TensorRT version and the GPU, so built engines are cached under a
key of TensorRT version, compute capability, L4T release, CUDA, the ONNX file's sha256, precision
and batch profile: a new release, a JetPack upgrade or another board builds a new engine, and an
unchanged one is loaded from the cache. The build uses the ``tensorrt`` Python API (``Builder`` +
``OnnxParser``, a timing cache): TensorRT 10.x takes ``BuilderFlag.FP16``; TensorRT 11 removed it
(strongly typed networks: precision comes from the graph), so fp16 there needs an fp16 graph.

TensorRT cannot be installed on the machines this project is built and tested on; that path is
written against the API and its absence is what the tests exercise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from app_custom.durable import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()
GPU_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl")


@dataclass(frozen=True)
class EngineKey:
    tensorrt: str
    compute_capability: str
    l4t: str
    cuda: str
    onnx_sha256: str
    precision: str
    max_batch: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def latency_ms(run: Callable[[], object], runs: int = 50, warmup: int = 5) -> tuple[float, float]:
    """(p50, p99) in ms of ``run()``'s wall time over ``runs`` calls after ``warmup`` (the first
    calls warm caches up), by ``numpy.percentile``: the one latency probe of the build host's
    validation, the health check and the served model's check."""
    times = []
    for _ in range(runs + warmup):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    p50, p99 = np.percentile(times[warmup:], [50, 99])
    return float(p50), float(p99)


def l4t_release(path: str = "/etc/nv_tegra_release") -> str:
    """``# R36 (release), REVISION: 3.0, ...`` -> ``36.3.0``; ``none`` off Jetson."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "none"
    major = text.split("R", 1)[1].split()[0] if "R" in text else "?"
    revision = text.split("REVISION:", 1)[1].split(",")[0].strip() if "REVISION:" in text else "?"
    return f"{major}.{revision}"


def tensorrt_status() -> tuple[object | None, str]:
    """(the tensorrt module, "") when TensorRT can build engines here, else (None, why not)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, comes with JetPack
    except (ImportError, OSError) as e:
        return None, f"TensorRT is not installed ({type(e).__name__}: {e})"
    if not any(os.path.exists(node) for node in GPU_NODES):
        return None, f"TensorRT {trt.__version__} is installed but no GPU device node is visible"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    except Exception as e:  # a driver or CUDA problem
        return None, f"TensorRT {trt.__version__} cannot create a builder: {e}"
    if builder is None:
        return None, f"TensorRT {trt.__version__} cannot create a builder (no CUDA device?)"
    return trt, ""


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path | bytes, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a robot's CPU is shared
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        source = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)  # a file, or a graph in memory
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: feeds[name] for name in self.inputs})[0]


class TensorRTEngine:  # pragma: no cover - needs TensorRT and a GPU
    name = "tensorrt"

    def __init__(self, trt, engine_bytes: bytes, inputs: list[str]) -> None:
        import torch  # CUDA buffers

        self.trt, self.torch, self.inputs = trt, torch, inputs
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.outputs[0]))
        output = torch.empty(shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.outputs[0], output.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return output.cpu().numpy()


def build_tensorrt(
    trt, onnx_path: Path, shapes: dict[str, tuple[int, ...]], precision: str, max_batch: int
) -> bytes:  # pragma: no cover
    """Parse the ONNX graph and build a serialized engine with a batch profile 1..max_batch."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 256 << 20)
    if precision == "fp16":
        if major >= 11:
            raise RuntimeError("TensorRT 11 builds strongly typed networks: ship an fp16 graph for fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, (1, *shape), (1, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine")
    return bytes(serialized)


def prepare_engine(
    onnx_path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    cache_dir: str | Path,
    precision: str = "fp32",
    max_batch: int = 8,
    compute_capability: str = "unknown",
) -> tuple[object, str]:
    """(an engine with ``run(feeds)``, a note): TensorRT from the cache or freshly built when TensorRT
    works here, else onnxruntime, the note saying why."""
    trt, reason = tensorrt_status()
    if trt is None:
        note = f"onnxruntime: {reason}"
        if note not in _LOGGED:  # once per process, not once per model
            _LOGGED.add(note)
            log.info(note)
        return OnnxRuntimeEngine(onnx_path), note
    onnx_path = Path(onnx_path)  # pragma: no cover - TensorRT present
    key = EngineKey(
        tensorrt=trt.__version__,
        compute_capability=compute_capability,
        l4t=l4t_release(),
        cuda=os.environ.get("CUDA_VERSION", "unknown"),
        onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        precision=precision,
        max_batch=max_batch,
    )
    cached = Path(cache_dir) / f"{key.digest()}.engine"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, build_tensorrt(trt, onnx_path, shapes, precision, max_batch))
        write_json_atomic(cached.with_suffix(".json"), asdict(key))
    return TensorRTEngine(trt, cached.read_bytes(), list(shapes)), f"tensorrt {trt.__version__} ({key.digest()})"
