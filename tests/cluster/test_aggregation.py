import numpy as np
import pytest

from app_custom.cluster.aggregation import SlowDeltaAggregator

EXPECTED = {"w": (2,), "b": (1,)}


def _delta(w, b):
    return {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}


def test_weighted_mean_by_samples_then_server_step():
    agg = SlowDeltaAggregator(server_lr=0.5)
    assert agg.add("a", _delta([1, 1], 1), 1, EXPECTED) is None
    assert agg.add("b", _delta([4, 4], 4), 3, EXPECTED) is None
    new = agg.apply(_delta([0, 0], 0))
    np.testing.assert_allclose(new["w"], [0.5 * 3.25, 0.5 * 3.25])
    np.testing.assert_allclose(new["b"], [0.5 * 3.25])


@pytest.mark.parametrize(
    "delta, weight, reason",
    [
        ({**_delta([1, 1], 1), "head.weight": np.zeros(3, np.float32)}, 1, "unknown keys"),
        ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, 1, "shape"),
        (_delta([np.nan, 1], 1), 1, "NaN"),
        (_delta([np.inf, 1], 1), 1, "NaN or inf"),
        ({"w": np.zeros(2, np.float32)}, 1, "missing keys"),
        (_delta([1, 1], 1), 0, "weight must be > 0"),
        (_delta([1, 1], 1), float("nan"), "finite"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason_and_the_round_goes_on(delta, weight, reason):
    agg = SlowDeltaAggregator()
    rejection = agg.add("bad", delta, weight, EXPECTED)
    assert rejection is not None and reason in rejection.reason
    assert agg.add("good", _delta([2, 2], 2), 1, EXPECTED) is None
    np.testing.assert_allclose(agg.apply(_delta([0, 0], 0))["w"], [2, 2])
    assert agg.contributors == ["good"]


def test_momentum_advances_only_when_a_candidate_is_committed():
    agg = SlowDeltaAggregator(momentum=0.5)
    agg.add("a", _delta([1, 1], 1), 1, EXPECTED)
    first = agg.apply(_delta([0, 0], 0))
    agg.commit()
    agg.reset()
    agg.add("a", _delta([1, 1], 1), 1, EXPECTED)
    second = agg.apply(first)
    np.testing.assert_allclose(second["w"], [1 + 1.5, 1 + 1.5])
    agg.reset()  # not committed: the next round's momentum still starts from the committed velocity
    agg.add("a", _delta([1, 1], 1), 1, EXPECTED)
    np.testing.assert_allclose(agg.apply(first)["w"], [2.5, 2.5])


def test_constructor_validates_its_arguments():
    with pytest.raises(ValueError, match="server_lr"):
        SlowDeltaAggregator(server_lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SlowDeltaAggregator(momentum=1.0)
