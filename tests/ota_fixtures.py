"""Shared fixtures (``tests/conftest.py`` offers them to every test): an archive as the cluster
leaves it, a bundle built from it, a folder served over HTTP, and a real Mosquitto broker."""

import numpy as np
import pytest
import torch

from app_custom.cluster.archive import ACCEPTED, REJECTED, VersionArchive, VersionRecord
from app_custom.nested.config import NestedConfig
from app_custom.nested.levels import partition_parameters
from app_custom.nested.models import build_model
from simulator.methods import method_config

SPEC = {"imu": (6, 50), "vision": (1, 8, 8)}


def model_for(config):
    torch.manual_seed(config.seed)
    return build_model(config.model, SPEC, 4)


@pytest.fixture
def archive(tmp_path):
    """A cluster archive with the model card, the initial version, one accepted and one rejected."""
    raw = method_config("nested")
    config = NestedConfig.from_dict(raw)
    model = model_for(config)
    shared = partition_parameters(model, config.levels).shared_names
    archive = VersionArchive(tmp_path / "archive")
    archive.write_model_card({"config": raw, "input_spec": SPEC, "num_classes": 4, "shared_names": shared})
    params = {name: p.detach().numpy().copy() for name, p in model.named_parameters() if name in shared}
    archive.save(params, VersionRecord(0, ACCEPTED, None, None, 0, {}, "initial weights"))
    rng = np.random.default_rng(0)
    trained = {
        name: value + 0.05 * rng.standard_normal(value.shape).astype(np.float32) for name, value in params.items()
    }
    archive.save(trained, VersionRecord(1, ACCEPTED, 0, 0, 8, {"val_acc": 0.9}))
    archive.save(params, VersionRecord(2, REJECTED, 1, 1, 8, {"val_acc": 0.2}, "accuracy drops"))
    return archive, config, trained


@pytest.fixture
def bundle(archive, tmp_path):
    """A release bundle of the archive's version 1 for simulated devices."""
    from ota.release import build_release

    archive, _, _ = archive
    build_release(archive.root, tmp_path / "bundle", "x86-64-cpu")
    return tmp_path / "bundle"


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on a free localhost port serving a folder; yields (folder, base url)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Mosquitto:
    """A real Mosquitto broker on a free localhost port, restartable on the same port."""

    def __init__(self, folder):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process = None

    def start(self):
        import shutil
        import socket
        import subprocess
        import time

        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()
