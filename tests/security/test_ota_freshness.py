"""The server's timestamp refresher outlives a failure: each one is logged and the next try comes
sooner, so a transient error (a key on a briefly unmounted disk, a full disk) never lets the
timestamp expire silently and freeze the fleet."""

import logging
import os
import time

from ota import keys as fleet_keys
from ota.freshness import TimestampKeeper
from ota.repository import Repository


def test_a_failing_refresh_is_logged_and_the_keeper_keeps_going(tmp_path, caplog):
    keys = fleet_keys.generate(tmp_path / "keys")
    repository = Repository.create(tmp_path / "repo", keys)
    first = repository.timestamp.signed.version
    key = keys.private("timestamp")
    os.replace(key, key.with_name("away.pem"))  # the refresh now fails
    keeper = TimestampKeeper(repository, every_s=0.2, retry_s=0.05)
    with caplog.at_level(logging.ERROR, logger="ota.freshness"):
        keeper.start()
        deadline = time.monotonic() + 5
        while keeper.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert keeper.failures >= 3 and keeper.alive
        assert sum("timestamp refresh failed" in r.getMessage() for r in caplog.records) >= 3
        os.replace(key.with_name("away.pem"), key)  # the key is back: the next try renews
        deadline = time.monotonic() + 5
        while keeper.refreshes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    keeper.stop()
    assert keeper.refreshes >= 1 and not keeper.alive
    assert Repository(tmp_path / "repo").timestamp.signed.version > first
