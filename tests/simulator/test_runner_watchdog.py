import os
import sys
import time

import pytest

from simulator.runner import Stalled, run_watched

HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(60)
"""

PROGRESSES = """
import sys, time
for i in range(8):
    print("round", i, flush=True)
    time.sleep(0.3)
sys.exit(3)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child that its (dead) parent never reaped is a zombie: gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_stalled_run_is_killed_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with pytest.raises(Stalled, match="no progress for 2 s"):
        run_watched([sys.executable, "-c", HANGS, str(pid_file)], tmp_path / "run.log", [tmp_path / "m.json"], 2.0)
    assert time.monotonic() - started < 30  # not the 60 s the processes would sleep
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert "started" in (tmp_path / "run.log").read_text()


def test_a_run_that_keeps_making_progress_is_left_alone_and_its_exit_code_returned(tmp_path):
    # 2.4 s in all, longer than the 1 s stall limit, but it writes every 0.3 s
    code = run_watched([sys.executable, "-c", PROGRESSES], tmp_path / "run.log", [], 1.0)
    assert code == 3
    assert (tmp_path / "run.log").read_text().count("round") == 8
