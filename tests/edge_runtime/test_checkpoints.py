"""The device's checkpoints survive a kill at any moment: a process writing checkpoints in a loop
is SIGKILLed at 30 random moments, and every time the store opens on a complete checkpoint no
older than the last one the writer had finished. A damaged checkpoint is skipped for the newest
one that verifies, and a rollback returns to the last good one."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime.checkpoints import CheckpointError, CheckpointStore

ROOT = Path(__file__).resolve().parents[2]
WRITER = """
import sys
from edge_runtime.checkpoints import CheckpointStore
store = CheckpointStore(sys.argv[1])
latest = store.latest()
i = latest.meta["info"]["i"] + 1 if latest else 0
while True:
    fast = (b"fast-%d;" % i) * 20000  # about 200 kB: the kill lands mid-file as often as between files
    seq = store.save({"fast.bin": fast, "slow.bin": b"slow-%d" % i}, {"i": i})
    if i % 5 == 0:
        store.mark_good(seq)
    print(seq, flush=True)
    i += 1
"""


def _consistent(checkpoint) -> bool:
    i = checkpoint.meta["info"]["i"]
    return checkpoint.read("fast.bin") == (b"fast-%d;" % i) * 20000 and checkpoint.read("slow.bin") == b"slow-%d" % i


def test_a_kill_at_any_moment_leaves_a_complete_checkpoint_no_older_than_the_last_finished(tmp_path):
    rng = random.Random(7)
    root = tmp_path / "checkpoints"
    finished = 0
    for _ in range(30):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        time.sleep(rng.uniform(0.15, 0.6))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        done = [int(line) for line in out.split()]
        finished = max([finished, *done])
        latest = CheckpointStore(root).latest()
        if finished:
            assert latest is not None and latest.seq >= finished, (latest and latest.seq, finished)
            assert _consistent(latest)
    assert finished >= 20, "the writer hardly ran: the kills did not land among writes"
    assert not list(root.glob(".tmp-*"))  # leftovers are cleared when the store opens


def test_a_damaged_checkpoint_is_skipped_and_rollback_returns_to_the_last_good(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    first = store.save({"fast.bin": b"one"}, {"n": 1})
    store.mark_good(first)
    second = store.save({"fast.bin": b"two"}, {"n": 2})
    (store.root / f"ck-{second:06d}" / "fast.bin").write_bytes(b"tw0")  # a flipped bit on disk
    assert store.latest().seq == first
    third = store.save({"fast.bin": b"three"}, {"n": 3})
    assert store.latest().read("fast.bin") == b"three"
    assert store.rollback().seq == first and store.latest().read("fast.bin") == b"one"
    with pytest.raises(CheckpointError, match="does not verify"):
        store.mark_good(second)
    for n in range(4, 9):
        store.save({"fast.bin": b"%d" % n})
    kept = sorted(int(p.name[3:]) for p in store.root.glob("ck-*"))
    assert first in kept and len(kept) == 4 and third not in kept  # the 3 newest and the good one
