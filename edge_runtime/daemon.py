"""The edge daemon's main loop: ``fleetnest edge run --config /etc/fleetnest/edge.yaml``.

It recovers its local state first (the state folder, its run record) and only then tells
systemd READY; afterwards each pass of the main loop runs the daemon's steps and pets the
watchdog, from that loop and nowhere else, so a step that hangs stops the WATCHDOG pings and
systemd restarts the service (``WatchdogSec``, ``Restart=on-failure``). Steps may return a
line for ``systemctl status``. SIGTERM and SIGINT end the loop after the current pass.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from app_custom.durable import write_json_atomic

from .config import EdgeConfig, EdgeConfigError
from .notify import SystemdNotifier
from .runtime import EdgeRuntime

log = logging.getLogger("fleetnest.edge")

RUN_RECORD = "daemon.json"

Step = Callable[[], "str | None"]


class EdgeDaemon:
    def __init__(
        self,
        config: EdgeConfig,
        steps: Sequence[Step] = (),
        notifier: SystemdNotifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        runtime: EdgeRuntime | None = None,
    ) -> None:
        self.config, self.steps = config, list(steps)
        self.notifier = notifier or SystemdNotifier()
        self._clock = clock
        self.runtime = runtime
        if runtime is not None:
            self.steps.append(runtime.report)

    def recover(self) -> str:
        """Bring the local state back (creating it on first start); a line saying what was found."""
        state = self.config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        record_path = state / RUN_RECORD
        starts = 0
        if record_path.exists():
            try:
                starts = int(json.loads(record_path.read_text())["starts"])
            except (OSError, ValueError, KeyError, TypeError):
                starts = 0  # an unreadable record is replaced; it holds nothing else
        write_json_atomic(record_path, {"starts": starts + 1, "pid": os.getpid(), "at": time.time()}, 0o600)
        line = f"{self.config.device_id}: state in {state} recovered (start {starts + 1})"
        if self.runtime is not None:
            line += f": {self.runtime.recover()}"
        return line

    def run(self, stop: threading.Event) -> int:
        line = self.recover()
        log.info("%s", line)
        self.notifier.ready(line)
        if self.runtime is not None:
            self.runtime.start()
        interval = self.notifier.watchdog_interval_s
        tick = min(self.config.loop_interval_s, interval) if interval else self.config.loop_interval_s
        petted = None
        while not stop.is_set():
            for step in self.steps:
                note = step()
                if note:
                    self.notifier.status(note)
            stalled = self.runtime.stalled() if self.runtime is not None else None
            now = self._clock()
            if stalled:
                self.notifier.status(f"{stalled}: no watchdog ping (systemd restarts the service)")
            elif interval and (petted is None or now - petted >= interval):
                self.notifier.watchdog()
                petted = now
            stop.wait(tick)
        self.notifier.stopping(f"{self.config.device_id}: stopping")
        if self.runtime is not None:
            self.runtime.close()
        return 0


def run_daemon(config_path: str) -> int:
    try:
        config = EdgeConfig.load(config_path)
    except EdgeConfigError as err:
        print(f"fleetnest edge run: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runtime = EdgeRuntime(config, stop) if set(config.sections) - {"inference"} else None
    except EdgeConfigError as err:
        print(f"fleetnest edge run: {config_path}: {err}", file=sys.stderr)
        return 2
    return EdgeDaemon(config, runtime=runtime).run(stop)


def add_edge_parser(verbs) -> None:
    edge = verbs.add_parser("edge", help="the device daemon").add_subparsers(dest="edge_verb", required=True)
    run = edge.add_parser("run", help="run the edge daemon (as the systemd service does)")
    run.add_argument("--config", required=True, help="the daemon's YAML configuration")
    run.set_defaults(run=lambda args: run_daemon(args.config))
