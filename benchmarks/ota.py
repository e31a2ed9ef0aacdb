"""OTA benchmark: a canary rollout of a broken release on a simulated fleet, the server's throughput,
the bundle's size, and the inference latency of the shipped graph against eager torch.

Writes ``benchmarks/results/ota.json``::

    {"canary": {"devices", "canary_devices", "bad_installed_outside_canary", "rolled_back",
                "time_to_rollback_s", "good_release_reached", "time_to_full_rollout_s"},
     "serve_mb_per_s": float, "bundle_bytes": {file: bytes, "total": bytes},
     "inference": {"onnxruntime_p50_ms", "onnxruntime_p99_ms", "torch_p50_ms", "ratio_torch_over_onnxruntime"},
     "setup": {...}}

Every number is measured on this machine in this run; latency is batch 1 on CPU (medians of
many runs: the machine is shared and noisy). Mosquitto must be installed (``mosquitto`` on PATH
or in /usr/sbin); the benchmark starts its own on a free port. Usage: ``python benchmarks/ota.py
[--devices 50]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app_custom.cluster.archive import ACCEPTED, VersionArchive, VersionRecord  # noqa: E402
from app_custom.nested.config import NestedConfig  # noqa: E402
from app_custom.nested.levels import partition_parameters  # noqa: E402
from app_custom.nested.models import build_model  # noqa: E402
from benchmarks.common import add_output_arguments, output_path, write_results  # noqa: E402
from ota.download import download  # noqa: E402
from ota.rollout import ABORTED, COMPLETED, Policy  # noqa: E402
from ota.server import RepositoryServer  # noqa: E402
from ota.simulation import FleetSimulation, build_bundle  # noqa: E402
from simulator.methods import method_config  # noqa: E402

SPEC = {"imu": (6, 50), "vision": (1, 8, 8)}  # the reference robot model of the demo (vision + IMU)


def make_archive(root: Path) -> tuple[VersionArchive, torch.nn.Module]:
    raw = method_config("nested")
    config = NestedConfig.from_dict(raw)
    torch.manual_seed(config.seed)
    model = build_model(config.model, SPEC, 4).eval()
    shared = partition_parameters(model, config.levels).shared_names
    archive = VersionArchive(root)
    archive.write_model_card({"config": raw, "input_spec": SPEC, "num_classes": 4, "shared_names": shared})
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in shared}
    archive.save(params, VersionRecord(0, ACCEPTED, None, None, 0, {}, "initial weights"))
    archive.save(params, VersionRecord(1, ACCEPTED, 0, 0, 8, {}))
    archive.save({k: v * 1.01 for k, v in params.items()}, VersionRecord(3, ACCEPTED, 1, 2, 8, {}))
    return archive, model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(work: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = work / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([binary, "-c", str(config)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("mosquitto did not start")


def canary(work: Path, archive: VersionArchive, devices: int) -> dict:
    process, port = start_mosquitto(work)
    fleet = FleetSimulation(work / "fleet", port, devices, policy=Policy(min_reports=3))
    try:
        first = fleet.publish(build_bundle(archive.root, work / "b1", 1, "x86-64-cpu"))
        started = time.monotonic()
        fleet.controller.start(first)
        fleet.wait({COMPLETED})
        reached_first = not fleet.stragglers(first)
        first_s = time.monotonic() - started
        canary_devices = fleet.ring_members("canary")
        bad = fleet.publish(build_bundle(archive.root, work / "bad", 3, "x86-64-cpu", break_golden=True))
        started = time.monotonic()
        fleet.controller.start(bad)
        status = fleet.wait({ABORTED, COMPLETED})
        # rolled back: the abort is decided and every canary device that tried the release is back
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tried = fleet.tried(bad)
            if tried and all(fleet.running()[d] == first for d in tried):
                break
            time.sleep(0.05)
        time_to_rollback = time.monotonic() - started
        time.sleep(6)  # a poll period: anything late shows up
        outside = fleet.installed_ever(bad) - canary_devices
        return {
            "devices": devices,
            "canary_devices": len(canary_devices),
            "bad_release_state": status["state"],
            "bad_installed_outside_canary": len(outside | (fleet.tried(bad) - canary_devices)),
            "bad_committed_anywhere": len(fleet.installed_ever(bad)),
            "rolled_back": len(fleet.tried(bad)),
            "time_to_rollback_s": round(time_to_rollback, 2),
            "good_release_reached": "all" if reached_first else "not all",
            "time_to_full_rollout_s": round(first_s, 2),
        }
    finally:
        fleet.close()
        process.terminate()
        process.wait(timeout=10)


def serve_throughput(work: Path, megabytes: int = 64, repeats: int = 3) -> float:
    root = work / "served"
    root.mkdir()
    data = os.urandom(megabytes * 1024 * 1024)
    (root / "blob.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    rates = []
    with RepositoryServer(root) as server:
        for i in range(repeats):
            started = time.perf_counter()
            download(f"{server.url}/blob.bin", work / f"got-{i}.bin", len(data), sha)
            rates.append(megabytes / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def inference(bundle: Path, model: torch.nn.Module, runs: int = 300) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, *shape)).astype(np.float32) for name, shape in SPEC.items()}
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}

    def timed(fn) -> list[float]:
        for _ in range(20):
            fn()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        return sorted(times)

    torch.set_num_threads(2)
    with torch.no_grad():
        eager = timed(lambda: model(tensors))
    onnx_times = timed(lambda: session.run(["logits"], feeds))
    result = {
        "onnxruntime_p50_ms": round(statistics.median(onnx_times), 4),
        "onnxruntime_p99_ms": round(onnx_times[int(0.99 * (len(onnx_times) - 1))], 4),
        "torch_p50_ms": round(statistics.median(eager), 4),
    }
    result["ratio_torch_over_onnxruntime"] = round(result["torch_p50_ms"] / result["onnxruntime_p50_ms"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50, help="simulated devices in the canary rollout")
    add_output_arguments(
        parser,
        "ota",
        "one 8 MB throughput run, 50 inference runs (the rollout keeps its 50 devices: the canary needs 3)",
    )
    args = parser.parse_args(argv)
    run = {"megabytes": 8, "repeats": 1, "runs": 50} if args.quick else {"megabytes": 64, "repeats": 3, "runs": 300}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        archive, model = make_archive(work / "archive")
        bundle = build_bundle(archive.root, work / "bundle", 3, "jetson-orin-jp6")
        sizes = {p.name: p.stat().st_size for p in sorted(bundle.iterdir())}
        payload = {
            "canary": canary(work, archive, args.devices),
            "serve_mb_per_s": serve_throughput(work, run["megabytes"], run["repeats"]),
            "bundle_bytes": sizes | {"total": sum(sizes.values())},
            "inference": inference(bundle, model, run["runs"]),
            "setup": {
                "model": "reference robot model, vision (1x8x8) + IMU (6x50), 4 classes",
                "device_class": "jetson-orin-jp6 bundle, run here with onnxruntime on CPU (no TensorRT here)",
                "machine": f"{os.cpu_count()} CPU cores, no GPU",
                "torch": torch.__version__,
            },
        }
    write_results(output_path(args, "ota"), payload)
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
