import numpy as np
import pytest

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import DeviceData, LabelledSet
from tests.ota_fixtures import archive, bundle, http_root, mosquitto  # noqa: F401  (fixtures for every test)

NESTED = {
    "levels": [
        {"name": "fast", "patterns": ["head.*", "adapters.*"], "period": 1, "lr": 0.01},
        {"name": "slow", "patterns": ["encoders.*", "trunk.*"], "period": 3, "lr": 0.01, "shared": True},
    ],
    "model": {"width": 16},
    "training": {"local_epochs": 1, "batch_size": 8},
}


@pytest.fixture
def nested_config() -> NestedConfig:
    return NestedConfig.from_dict(NESTED)


def make_device(seed: int = 0, n: int = 40, d: int = 6, classes: int = 3) -> DeviceData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    y = np.minimum(y, classes - 1)
    return DeviceData(LabelledSet(x[: n // 2], y[: n // 2]), LabelledSet(x[n // 2 :], y[n // 2 :]))
