import numpy as np

from app_custom.egress import leaving_keys_problems
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


def _result(params=None, metrics=None, meta=None, kind=None):
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    model = FLModel(params_type=kind or ParamsType.DIFF, params=params, metrics=metrics, meta=meta)
    return FLModelUtils.to_shareable(model)


SLOW = {"trunk.0.weight": np.zeros((2, 2), np.float32)}


def test_a_clean_result_passes_whole():
    from app_custom.flare.fast_layer_guard import result_problems

    clean = _result(SLOW, {"test_acc": 0.5}, {"global_version": 3, "NUM_STEPS_CURRENT_ROUND": 40})
    assert result_problems(NESTED, clean) == []


def test_every_side_channel_out_of_a_result_is_refused():
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.shareable import make_reply

    from app_custom.flare.fast_layer_guard import result_problems

    fast = np.ones((10, 64), np.float32)
    in_meta = _result(SLOW, {"test_acc": 0.5}, {"global_version": 3, "stash": fast})
    assert any("unknown meta field 'stash'" in p for p in result_problems(NESTED, in_meta))
    in_known_meta = _result(SLOW, None, {"global_version": fast})
    assert any("'global_version' is a ndarray" in p for p in result_problems(NESTED, in_known_meta))
    extra_key = _result(SLOW)
    extra_key["side"] = fast
    assert "extra result key 'side'" in result_problems(NESTED, extra_key)
    nested_value = _result({"trunk.0.weight": {"adapters.head.weight": fast}})
    assert any("not an array" in p for p in result_problems(NESTED, nested_value))
    not_a_mapping = DXO(DataKind.APP_DEFINED, data=fast).to_shareable()
    assert any("not a mapping" in p for p in result_problems(NESTED, not_a_mapping))
    error_with_payload = _result(SLOW)
    error_with_payload.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    assert any("an error reply carrying" in p for p in result_problems(NESTED, error_with_payload))
    in_header = _result(SLOW)
    in_header.set_header("cache", fast)
    assert "header 'cache' carries a ndarray" in result_problems(NESTED, in_header)
    assert result_problems(NESTED, make_reply(ReturnCode.EXECUTION_EXCEPTION)) == []


def test_a_private_result_may_carry_one_device_protocol_message_and_nothing_beside_it():
    from app_custom.egress import SECAGG_KEY
    from app_custom.flare.fast_layer_guard import result_problems
    from app_custom.flare.private_learner_executor import as_message_array
    from tests.privacy.secagg_harness import make_round

    r = make_round(2)
    advert = as_message_array(r.devices["site-1"].advertise())
    assert result_problems(NESTED, _result({SECAGG_KEY: advert}, {"dp_epsilon": 1.5})) == []
    skipped = _result({}, {"dp_epsilon": 9.0}, {"dp_skip_reason": "past the budget 8.0"})
    assert result_problems(NESTED, skipped) == []
    leak = _result({SECAGG_KEY: advert, "adapters.head.weight": np.zeros(2, np.float32)})
    assert any("beside a secure-aggregation message" in p for p in result_problems(NESTED, leak))
    garbage = _result({SECAGG_KEY: np.frombuffer(b"\x00\x00\x00\x02{}abc", np.uint8).copy()})
    assert any("not a device secure-aggregation message" in p for p in result_problems(NESTED, garbage))
    as_floats = _result({SECAGG_KEY: advert.astype(np.float32)})
    assert any("not a 1-D uint8 array" in p for p in result_problems(NESTED, as_floats))
    long_reason = _result({}, {}, {"dp_skip_reason": "x" * 5000})
    assert any("dp_skip_reason" in p for p in result_problems(NESTED, long_reason))
