"""Runs the nested method and its baselines through FLARE's simulator and collects what happened.

Every method is its own FLARE job (``build_nested_job``), run by ``SimEnv`` with one simulated
client per device. What a method achieved is read back from the server's archive
(``fleet_metrics.json``) and from each device's outbound audit log: the runner never looks
inside a device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nvflare.recipe.sim_env import SimEnv

from app_custom.flare.job_builder import build_nested_job
from app_custom.flare.nested_controller import METRICS_FILE
from app_custom.flare.outbound_audit import AUDIT_FILE
from app_custom.nested.device_data import load_fleet

from .methods import ENGINES, METHODS, method_config

SHIPPED_FLEET_FN = "simulator.fleets:make_fleet"
PRIVATE_METHODS = (
    "nested",
    "fedavg",
    "fedavg_ft",
    "fedrep",
    "ditto",
)  # those that send something (local-only sends nothing)


@dataclass(frozen=True)
class Experiment:
    dataset: str = "digits"
    regime: str = "label_skew"
    devices: int = 8
    rounds: int = 10
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    # PrivacySettings as a mapping: DP and secure aggregation for every method that shares layers
    privacy: dict | None = None
    # "flare": every method a FLARE job in SimEnv; "inprocess": the same learners and cluster code
    # in this process (``simulator.inprocess``), for benchmarks of many runs
    engine: str = "flare"
    # shipped data only: the inputs as the package delivers them, in their own units
    unscaled: bool = False

    @property
    def is_plugin(self) -> bool:
        return ":" in self.dataset

    def data_spec(self) -> dict:
        if self.is_plugin:
            return {"fn": self.dataset, "kwargs": {}}
        kwargs = {"dataset": self.dataset, "regime": self.regime, "num_devices": self.devices, "seed": self.seed}
        if self.unscaled:
            kwargs["unscaled"] = True
        return {"fn": SHIPPED_FLEET_FN, "kwargs": kwargs}


# A FLARE simulator run that makes no progress for this long is killed and run once more (its
# client processes can hang on start-up: "Failed to create connection to the child process").
STALL_S = float(os.environ.get("FLEETNEST_STALL_S", "600"))


def _say(message: str) -> None:
    """Progress for the person at the terminal (FLARE's own output goes to a log file)."""
    print(message, file=sys.stderr, flush=True)


class Stalled(RuntimeError):
    """A watched process made no progress for the stall limit and was killed with its children."""


def run_watched(command: list[str], log_path: Path, progress: list[Path], stall_s: float) -> int:
    """Run ``command`` in its own process group, output appended to ``log_path``; kill the whole group
    when none of ``log_path`` and ``progress`` has changed for ``stall_s`` seconds. Returns the
    exit code; raises ``Stalled`` after a kill."""

    def mark() -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in [log_path, *progress])

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        last, changed = mark(), time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(min(1.0, stall_s / 10))
                now = mark()
                if now != last:
                    last, changed = now, time.monotonic()
                elif time.monotonic() - changed > stall_s:
                    raise Stalled(f"no progress for {stall_s:.0f} s: killed {command[:4]}... (log: {log_path})")
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:  # the leader exited: take down anything it left behind in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def _watch_rounds(metrics_path: Path, total: int, stop: threading.Event) -> None:
    seen = 0
    while not stop.wait(1.0):
        try:
            rounds = json.loads(metrics_path.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            continue
        for entry in rounds[seen:]:
            accs = [m.get("test_acc") for m in entry["devices"].values() if m.get("test_acc") is not None]
            mean = sum(accs) / len(accs) if accs else float("nan")
            _say(
                f"    round {entry['round'] + 1}/{total}: global version {entry.get('version')} "
                f"{entry.get('status')}, mean device accuracy {mean:.3f}"
            )
        seen = len(rounds)


def method_workspace(out: Path, method: str) -> Path:
    return out / "workspace" / method


def _deploy(experiment: Experiment, method: str, out: Path) -> None:
    """In the child process: build the method's FLARE job and run it in SimEnv."""
    data = experiment.data_spec()
    devices = len(load_fleet(data["fn"], data["kwargs"]).devices)
    job = build_nested_job(
        name=method,
        config=method_config(method, experiment.seed),
        data=data,
        num_rounds=experiment.rounds,
        min_clients=devices,
        privacy=experiment.privacy if method in PRIVATE_METHODS else None,
    )
    SimEnv(num_clients=devices, num_threads=devices, workspace_root=str(out / "workspace")).deploy(job)


def run_method(experiment: Experiment, method: str, out: Path, stall_s: float | None = None) -> Path:
    """Run one method as a FLARE job in a child process; return its server archive folder. A run
    that stalls is killed and started once more from an empty workspace."""
    stall_s = STALL_S if stall_s is None else stall_s
    archive = method_workspace(out, method) / "server" / "simulate_job" / "global_versions"
    command = [sys.executable, "-m", "simulator.runner", json.dumps(dataclasses.asdict(experiment)), method, str(out)]
    for attempt in (1, 2):
        shutil.rmtree(method_workspace(out, method), ignore_errors=True)
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_rounds, args=(archive / METRICS_FILE, experiment.rounds, stop), daemon=True
        )
        watcher.start()
        try:
            code = run_watched(command, out / "flare.log", [archive / METRICS_FILE], stall_s)
        except Stalled as e:
            if attempt == 2:
                raise RuntimeError(f"{method}: the FLARE run stalled twice: {e}") from e
            _say(f"    {e}; running {method} once more")
            continue
        finally:
            stop.set()
            watcher.join()
        if code != 0:
            raise RuntimeError(f"{method}: the FLARE run exited with {code}; see {out / 'flare.log'}")
        break
    if not (archive / METRICS_FILE).exists():
        raise RuntimeError(f"{method}: the FLARE run left no {METRICS_FILE}; see {out / 'flare.log'}")
    return archive


def read_method(out: Path, method: str) -> tuple[dict, list[dict]]:
    """The server's round log and every device's outbound audit records for one method."""
    workspace = method_workspace(out, method)
    log = json.loads((workspace / "server" / "simulate_job" / "global_versions" / METRICS_FILE).read_text())
    audit = []
    for path in sorted(workspace.glob(f"site-*/{AUDIT_FILE}")):
        audit.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return log, audit


def run_experiment(experiment: Experiment, out: Path) -> dict:
    """Run every method and write ``out/report.json`` and the plots; return the report."""
    from .report import build_report, write_plots

    out.mkdir(parents=True, exist_ok=True)
    if experiment.is_plugin:
        # simulated devices run in FLARE subprocesses: let them import the user's module too
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, os.getcwd())
    data = experiment.data_spec()
    fleet = load_fleet(data["fn"], data["kwargs"])
    _say(
        f"fleetnest simulate: {experiment.dataset} ({'plug-in' if experiment.is_plugin else experiment.regime}), "
        f"{len(fleet.devices)} devices, {experiment.rounds} rounds, seed {experiment.seed}"
    )
    _say(f"FLARE's own output goes to {out / 'flare.log'}")
    if experiment.engine not in ENGINES:
        raise ValueError(f"unknown engine {experiment.engine!r}; known: {list(ENGINES)}")
    runs = {}
    for i, method in enumerate(experiment.methods, 1):
        started = time.monotonic()
        if experiment.engine == "inprocess":
            from .inprocess import run_method_inprocess

            _say(f"[{i}/{len(experiment.methods)}] {method}: in-process, {len(fleet.devices)} devices")
            runs[method] = run_method_inprocess(experiment, method, out)
        else:
            _say(f"[{i}/{len(experiment.methods)}] {method}: FLARE simulator job with {len(fleet.devices)} clients")
            run_method(experiment, method, out)
            runs[method] = read_method(out, method)
        final = runs[method][0].get("final", {})
        accs = [m["test_acc"] for m in final.values()]
        _say(
            f"    done in {time.monotonic() - started:.0f} s: mean accuracy {sum(accs) / len(accs):.3f}, "
            f"worst {min(accs):.3f}"
        )
    report = build_report(experiment, fleet, runs)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_plots(report, out)
    _say(f"wrote {out / 'report.json'} and plots in {out}")
    return report


if __name__ == "__main__":  # the child process of ``run_method``
    fields = json.loads(sys.argv[1])
    _deploy(Experiment(**fields | {"methods": tuple(fields["methods"])}), sys.argv[2], Path(sys.argv[3]))
