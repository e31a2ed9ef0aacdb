import numpy as np
import pytest
import torch

from app_custom.nested.config import NestedConfig
from app_custom.nested.learner import NestedLearner
from app_custom.nested.slow_delta import UpdateError, state_of

from ..conftest import NESTED, make_device


def _learner(raw=NESTED, seed=0):
    return NestedLearner(NestedConfig.from_dict(raw), make_device(seed), num_classes=3, device_seed=seed)


def test_slow_delta_is_trained_minus_received_and_holds_only_slow_layers():
    learner = _learner()
    received = learner.initial_slow()
    learner.receive_global(received, 0)
    result = learner.train_round()
    trained = state_of(learner.model, learner.shared_names)
    assert set(result.slow_delta) == set(learner.shared_names)
    assert not set(result.slow_delta) & set(learner.private_names)
    for name, delta in result.slow_delta.items():
        np.testing.assert_allclose(delta, trained[name] - received[name], atol=1e-6)
    assert any(np.abs(d).sum() > 0 for d in result.slow_delta.values())


def test_merge_installs_global_slow_layers_and_keeps_the_devices_fast_layers():
    learner = _learner()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    fast_before = state_of(learner.model, learner.private_names)
    new_global = {k: v + 0.5 for k, v in learner.initial_slow().items()}
    learner.receive_global(new_global, 1)
    for name, value in state_of(learner.model, learner.shared_names).items():
        np.testing.assert_array_equal(value, new_global[name])
    for name, value in state_of(learner.model, learner.private_names).items():
        np.testing.assert_array_equal(value, fast_before[name])


def test_slow_level_steps_only_every_period_steps():
    raw = {**NESTED, "training": {"local_epochs": 1, "batch_size": 4}}  # 20 samples -> 5 steps, slow period 3
    learner = _learner(raw)
    learner.receive_global(learner.initial_slow(), 0)
    slow_steps = []
    original = learner.schedule.optimizers["slow"].step

    def counting_step(*args, **kwargs):
        slow_steps.append(1)
        return original(*args, **kwargs)

    learner.schedule.optimizers["slow"].step = counting_step
    learner.train_round()
    assert len(slow_steps) == 2  # after step 3, then the flush of steps 4-5 at the end of the round


def test_a_malformed_global_version_is_refused():
    learner = _learner()
    good = learner.initial_slow()
    name = next(iter(good))
    with pytest.raises(UpdateError, match="unknown keys"):
        learner.receive_global({**good, "head.weight": np.zeros((3, 16), np.float32)}, 0)
    with pytest.raises(UpdateError, match="shape"):
        learner.receive_global({**good, name: np.zeros((1,), np.float32)}, 0)
    with pytest.raises(UpdateError, match="NaN"):
        learner.receive_global({**good, name: np.full(good[name].shape, np.nan, np.float32)}, 0)


def test_device_state_survives_a_restart(tmp_path):
    learner = _learner()
    learner.receive_global(learner.initial_slow(), 3)
    learner.train_round()
    learner.save(tmp_path / "state.pt")
    restarted = _learner()
    restarted.load(tmp_path / "state.pt")
    assert restarted.global_version == 3
    for (name, a), (_, b) in zip(learner.model.state_dict().items(), restarted.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.tmp"))


def _with_training(**training):
    return {**NESTED, "training": {**NESTED["training"], **training}}


def test_a_device_serving_merged_versions_does_not_change_its_answers_while_it_trains():
    learner = _learner(_with_training(serve_trained=False))
    learner.receive_global(learner.initial_slow(), 0)
    served = {k: v.clone() for k, v in learner.served.state_dict().items()}
    learner.train_round()
    assert all(torch.equal(served[k], v) for k, v in learner.served.state_dict().items())
    assert not all(torch.equal(served[k], v) for k, v in learner.model.state_dict().items())


def test_the_merge_check_keeps_serving_the_previous_version_when_the_merge_is_worse_on_own_data():
    learner = _learner(_with_training(serve_trained=False, merge_check=True, local_epochs=5))
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    trained_slow = state_of(learner.model, learner.shared_names)
    learner.receive_global(trained_slow, 1)  # a good version: the device's own training
    good = learner.served
    garbage = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) * 5 for k, v in trained_slow.items()}
    learner.receive_global(garbage, 2)
    assert learner.served is good  # the garbage version was merged into the working model but not served
    np.testing.assert_array_equal(
        state_of(learner.model, learner.shared_names)[learner.shared_names[0]], garbage[learner.shared_names[0]]
    )


def test_the_merge_check_refuses_only_a_significant_loss_on_own_data():
    from app_custom.nested.learner import significantly_worse

    before = np.array([True] * 16)
    assert not significantly_worse(before, np.array([True] * 15 + [False]))  # one miss of 16: chance
    assert significantly_worse(before, np.array([True] * 10 + [False] * 6))  # six lost, none gained
    old = np.array([True] * 10 + [False] * 6)
    swapped = np.array([False] * 3 + [True] * 7 + [True] * 3 + [False] * 3)  # three lost, three gained
    assert not significantly_worse(old, swapped) and not significantly_worse(old, before)


def test_an_identity_prior_keeps_the_fast_layers_of_a_small_device_near_the_start():
    free = _learner(_with_training(local_epochs=5))
    raw = {**NESTED, "levels": [{**NESTED["levels"][0], "prox": 1e4}, NESTED["levels"][1]]}
    held = _learner({**raw, "training": {**NESTED["training"], "local_epochs": 5}})
    moved = {}
    for name, learner in (("free", free), ("held", held)):
        start = state_of(learner.model, learner.private_names)
        learner.receive_global(learner.initial_slow(), 0)
        learner.train_round()
        end = state_of(learner.model, learner.private_names)
        moved[name] = sum(float(np.abs(end[k] - start[k]).sum()) for k in start)
    assert moved["held"] < 0.5 * moved["free"]


def test_a_state_saved_for_another_layout_is_refused(tmp_path):
    from app_custom.nested.learner import IncompatibleState

    learner = _learner()
    learner.save(tmp_path / "state.pt")
    other = {**NESTED, "model": {"width": 8}}
    with pytest.raises(IncompatibleState, match="saved for model layout"):
        _learner(other).load(tmp_path / "state.pt")


def test_a_restarted_device_trains_exactly_as_if_it_had_not_stopped(tmp_path):
    learner, twin = _learner(), _learner()
    for device in (learner, twin):
        device.receive_global(device.initial_slow(), 0)
        device.train_round()
    learner.save(tmp_path / "state.pt")
    restarted = _learner()
    restarted.load(tmp_path / "state.pt")
    a, b = twin.train_round().slow_delta, restarted.train_round().slow_delta
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_restart_takes_the_learning_rates_of_the_new_configuration(tmp_path):
    learner = _learner()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    learner.save(tmp_path / "state.pt")
    faster = {**NESTED, "levels": [{**NESTED["levels"][0], "lr": 0.5}, NESTED["levels"][1]]}
    restarted = _learner(faster)
    restarted.load(tmp_path / "state.pt")
    assert restarted.schedule.optimizers["fast"].param_groups[0]["lr"] == 0.5


def test_the_refit_after_a_merge_is_served_but_not_trained_on():
    """The fast levels refit to new slow layers in the served copy only: fed into the next round's
    training, adapters refit to 16 samples made the slow layers learn around them (the global model
    of a scarce-data fleet lost 10-40 points)."""
    learner = _learner(_with_training(serve_trained=False, merge_adapt_steps=5))
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    trained_fast = state_of(learner.model, learner.private_names)
    learner.receive_global(state_of(learner.model, learner.shared_names), 1)
    kept = state_of(learner.model, learner.private_names)
    assert all(np.array_equal(trained_fast[k], kept[k]) for k in kept)  # the training model's fast layers
    served = state_of(learner.served, learner.private_names)
    assert not all(np.array_equal(served[k], kept[k]) for k in kept)  # the served copy's, refit
    served_slow = state_of(learner.served, learner.shared_names)
    model_slow = state_of(learner.model, learner.shared_names)
    assert all(np.array_equal(served_slow[k], model_slow[k]) for k in model_slow)


def test_a_device_serves_its_fast_layers_only_when_they_beat_the_shared_model_on_its_own_data():
    from app_custom.nested.slow_delta import install

    learner = _learner(_with_training(serve_trained=False, personalization_check=True, local_epochs=5))
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    merged_slow = state_of(learner.model, learner.shared_names)
    # fast layers that break the model: the shared model alone serves
    broken = {
        k: np.full(v.shape, 7.0, dtype=np.float32) for k, v in state_of(learner.model, learner.private_names).items()
    }
    install(learner.model, broken)
    learner.receive_global(merged_slow, 1)
    served = state_of(learner.served, learner.private_names)
    assert all(np.array_equal(served[k], learner._initial_private[k]) for k in served)
    # the training model keeps the device's fast layers, whatever is served
    kept = state_of(learner.model, learner.private_names)
    assert all(np.array_equal(kept[k], broken[k]) for k in kept)
