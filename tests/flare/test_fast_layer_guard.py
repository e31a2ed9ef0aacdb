import numpy as np

from app_custom.flare.fast_layer_guard import leaving_keys_problems
from app_custom.nested.config import NestedConfig
from simulator.methods import method_config

NESTED = NestedConfig.from_dict(method_config("nested"))


def test_only_shared_level_parameters_and_scalar_metrics_may_leave():
    ok = {"trunk.0.weight": np.zeros(2), "encoders.vision.0.bias": np.zeros(2), "head.weight": np.zeros(2)}
    assert leaving_keys_problems(NESTED, ok, {"test_acc": 0.9, "train_loss": 1.0}) == []


def test_fast_layers_unknown_keys_and_hidden_arrays_are_named():
    problems = leaving_keys_problems(
        NESTED,
        {"adapters.head.weight": np.zeros(2), "adapters.vision.scale": np.zeros(2), "decoder.w": np.zeros(2)},
        {"raw_sample": np.zeros((8, 8)), "flag": True},
    )
    assert "fast-layer parameter 'adapters.head.weight'" in problems
    assert "fast-layer parameter 'adapters.vision.scale'" in problems
    assert "parameter 'decoder.w' of no shared level" in problems
    assert "non-scalar metric 'raw_sample' (ndarray)" in problems
    assert "non-scalar metric 'flag' (bool)" in problems


def test_with_nothing_shared_nothing_may_leave():
    local = NestedConfig.from_dict(method_config("local"))
    assert leaving_keys_problems(local, {"head.weight": np.zeros(2)}, None) == ["fast-layer parameter 'head.weight'"]
