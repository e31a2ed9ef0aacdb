"""Edge benchmark: the reference robot model (vision 1x8x8 + IMU 6x50, 4 classes) on the edge
daemon, on this machine.

Writes ``benchmarks/results/edge.json``::

    {"micro_update_s": float,                 # median of one micro-update (20 steps + checkpoint)
     "inference": {"engine": str, "p50_ms": float, "p99_ms": float,
                   "torch_p50_ms": float},     # the served graph (release + fast layers), batch 1
     "rss_mb": float,                         # the daemon process's peak resident memory
     "budgets": {...}, "setup": {...}}

The baselines run in the same process: eager torch for inference (the same weights), the 3-minute
budget for a micro-update and the 30 ms latency budget. The daemon's memory is measured on a real
``fleetnest edge run`` (sensors at 20 Hz, micro-updates, an OTA install) sampled every 0.2 s.
Usage: ``python benchmarks/edge.py [--runs 2000]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import add_output_arguments, output_path, write_results  # noqa: E402
from edge_runtime.learning import ContinualLearner  # noqa: E402
from edge_runtime.samples import SampleStore  # noqa: E402
from ota.bundle import load_golden, personalize, read_manifest  # noqa: E402
from ota.engines import prepare_engine  # noqa: E402
from ota.release import reference_model  # noqa: E402
from simulator.edge_fleet import DaemonProcess, OtaService, device_job, edge_config, seed_archive, set_probe  # noqa: E402
from simulator.fleets import synthetic_stream  # noqa: E402

SPEC = {"imu": [6, 50], "vision": [1, 8, 8]}  # the reference robot model (benchmarks/ota.py)
CLASSES = 4
MICRO_UPDATE_BUDGET_S = 180.0
LATENCY_BUDGET_MS = 30.0


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]


def micro_updates(work: Path, job: dict, repeats: int) -> list[float]:
    store = SampleStore(work / "samples", capacity=512)
    stream = synthetic_stream(SPEC, CLASSES)
    for _ in range(512):
        x, y = next(stream)
        store.add(x, y)
    learner = ContinualLearner(work, job["config"], CLASSES, store, steps=20, min_samples=32)
    learner.ensure_learner()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        note = learner.micro_update(lambda: None)
        times.append(time.perf_counter() - started)
        assert "checkpoint" in note, note
    return times


def inference(bundle: Path, fast: dict, runs: int) -> dict:
    manifest = read_manifest(bundle)
    graph = personalize(bundle, manifest, fast)
    served = bundle.parent / "served.onnx"
    served.write_bytes(graph.SerializeToString())
    inputs, _ = load_golden(bundle, manifest)
    single = {name: value[:1] for name, value in inputs.items()}
    shapes = {name: tuple(value.shape[1:]) for name, value in inputs.items()}
    engine, note = prepare_engine(served, shapes, bundle.parent / "engines")
    times = []
    for _ in range(runs + 50):
        started = time.perf_counter()
        engine.run(single)
        times.append((time.perf_counter() - started) * 1000)
    p50, p99 = percentiles(times[50:])
    torch_model = _torch_model(bundle, manifest, fast)
    feeds = {name: torch.from_numpy(value) for name, value in single.items()}
    torch_times = []
    with torch.no_grad():
        for _ in range(runs // 2 + 50):
            started = time.perf_counter()
            torch_model(feeds)
            torch_times.append((time.perf_counter() - started) * 1000)
    torch_p50, _ = percentiles(torch_times[50:])
    return {
        "engine": note.split(":")[0].split(" (")[0],
        "engine_note": note,
        "p50_ms": p50,
        "p99_ms": p99,
        "torch_p50_ms": torch_p50,
        "ratio_torch_over_engine": torch_p50 / p50,
    }


def _torch_model(bundle: Path, manifest: dict, fast: dict) -> torch.nn.Module:
    from ota.bundle import load_slow

    card = {
        "config": manifest["model"]["config"],
        "input_spec": manifest["model"]["input_spec"],
        "num_classes": manifest["model"]["num_classes"],
        "shared_names": manifest["model"]["shared_names"],
    }
    model = reference_model(card, load_slow(bundle, manifest))
    state = model.state_dict()
    for name, value in fast.items():
        state[name] = torch.from_numpy(np.asarray(value))
    model.load_state_dict(state)
    return model.eval()


def daemon_rss(work: Path, job_path: Path, archive: Path, seconds: float) -> dict:
    ota = OtaService(work / "ota", (("all", 1.0),))
    try:
        release = ota.publish(archive, 1)
        ota.target("all", release)
        probe = work / "probe.json"
        set_probe(probe, idle=True, charging=True)
        sensor = {
            "fn": "simulator.fleets:synthetic_stream",
            "kwargs": {"spec": SPEC, "num_classes": CLASSES},
            "rate_hz": 20,
        }
        config = edge_config(
            work, "robot-bench", 0, job_path, probe, ota, sensor=sensor, num_classes=CLASSES, capacity=512
        )
        daemon = DaemonProcess(config).start()
        peak, samples = 0.0, []
        try:
            deadline = time.monotonic() + seconds
            process = psutil.Process(daemon.process.pid)
            while time.monotonic() < deadline:
                rss = process.memory_info().rss / 2**20
                samples.append(rss)
                peak = max(peak, rss)
                time.sleep(0.2)
            text = daemon.text()
        finally:
            daemon.stop()
        return {
            "rss_mb": peak,
            "rss_median_mb": statistics.median(samples),
            "seconds": seconds,
            "installed": f"serving {release}" in text,
            "micro_updates": text.count("micro-update "),
        }
    finally:
        ota.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="inference runs per engine")
    parser.add_argument("--repeats", type=int, default=7, help="micro-updates timed")
    parser.add_argument("--daemon-seconds", type=float, default=45.0, help="how long the daemon's memory is sampled")
    add_output_arguments(parser, "edge", "200 inference runs, 2 micro-updates, the daemon for 20 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.repeats, args.daemon_seconds = 200, 2, 20.0
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job_path = device_job(work / "job.json")
        job = json.loads(job_path.read_text())
        archive = seed_archive(work / "archive", job, 1, SPEC, CLASSES)
        times = micro_updates(work / "learner", job, args.repeats)
        learner = ContinualLearner(
            work / "learner", job["config"], CLASSES, SampleStore(work / "learner" / "samples", 512)
        )
        learner.recover()
        from ota.release import build_release

        build_release(archive, work / "bundle", "x86-64-cpu", version=1)
        result = {
            "micro_update_s": statistics.median(times),
            "inference": inference(work / "bundle", learner.fast_layers(), args.runs),
        }
        memory = daemon_rss(work / "daemon", job_path, archive, args.daemon_seconds)
        result["rss_mb"] = memory["rss_mb"]
        result["daemon"] = memory
        result["micro_update_all_s"] = times
        result["budgets"] = {
            "micro_update_s": MICRO_UPDATE_BUDGET_S,
            "micro_update_share_of_budget": result["micro_update_s"] / MICRO_UPDATE_BUDGET_S,
            "latency_ms": LATENCY_BUDGET_MS,
            "p99_within_budget": result["inference"]["p99_ms"] <= LATENCY_BUDGET_MS,
        }
        result["setup"] = {
            "model": "reference robot model, vision (1x8x8) + IMU (6x50), 4 classes, nested config",
            "micro_update": "20 steps of the nested schedule, batch 16, from a store of 512 samples, then a checkpoint",
            "machine": f"{psutil.cpu_count()} CPUs, torch threads 1, no GPU",
            "inference": f"batch 1, {args.runs} runs after 50 warm-up",
        }
    write_results(output_path(args, "edge"), result)
    print(json.dumps({k: result[k] for k in ("micro_update_s", "inference", "rss_mb")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
