import numpy as np
import pytest
import torch

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import DeviceData, LabelledSet
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


SELECT = {
    "serve_trained": False,
    "personalize": "select",
    "holdout": 0.25,
    "personal_epochs": 2,
    "finetune_epochs": 1,
    "local_epochs": 3,
}


def _selecting(seed=0, n=160):
    return NestedLearner(
        NestedConfig.from_dict(_with_training(**SELECT)), make_device(seed, n=n), num_classes=3, device_seed=seed
    )


def test_a_merge_never_replaces_the_served_model_with_one_worse_on_the_devices_held_out_samples():
    learner = _selecting()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    learner.receive_global(state_of(learner.model, learner.shared_names), 1)  # a good version: its own training
    good, serving = learner.served, learner.serving
    garbage = {
        k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) * 5
        for k, v in learner.initial_slow().items()
    }
    report = learner.receive_global(garbage, 2)
    # the garbage version was merged into the working model (training goes on from it) but not served
    assert learner.served is good and learner.serving == serving and learner.decision["kept"]
    assert report.metrics()["serving_kept"] == 1.0
    name = learner.shared_names[0]
    np.testing.assert_array_equal(state_of(learner.model, learner.shared_names)[name], garbage[name])


def test_the_held_out_samples_are_never_trained_on_and_cover_every_class_with_whole_recordings():
    from app_custom.nested.device_data import DeviceData, LabelledSet
    from app_custom.nested.learner import split_holdout

    y = np.repeat([0, 0, 1, 1, 1, 2], 5)  # six recordings of five windows, three classes
    groups = np.repeat(np.arange(6), 5)
    x = np.arange(30, dtype=np.float32)[:, None]
    train, held = split_holdout(DeviceData(LabelledSet(x, y, groups=groups), LabelledSet(x, y)), 0.34, seed=1)
    assert set(held.y) == {0, 1}  # class 2 has one recording: all of it is for training
    assert not set(train.groups) & set(held.groups)  # whole recordings on one side
    assert len(train) + len(held) == 30
    learner = _selecting()
    trained_on = {tuple(row) for row in learner._x.numpy()}
    assert not any(tuple(row) in trained_on for row in learner.holdout.x)


def test_without_held_out_samples_the_device_serves_the_merged_model():
    learner = NestedLearner(
        NestedConfig.from_dict(_with_training(**SELECT)), make_device(0, n=4), num_classes=3, device_seed=0
    )
    assert learner.holdout is None  # two training samples: nothing to spare
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    learner.receive_global(learner.initial_slow(), 1)
    assert learner.serving == "nested" and learner.decision["holdout_samples"] == 0


def test_decisions_use_models_that_never_saw_the_held_out_samples_and_the_served_twin_saw_every_sample():
    learner = _selecting()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    assert learner.personal is not None and learner.personal_full is not None
    twin = learner._serving_twin("personal", learner.model, learner.personal)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), learner.personal_full.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(learner.personal.parameters(), twin.parameters()))
    mix = learner._serving_twin("mix50", learner.model, learner.personal)
    for (name, m), p, f in zip(mix.named_parameters(), learner.model.parameters(), learner.personal_full.parameters()):
        torch.testing.assert_close(m, 0.5 * p + 0.5 * f, msg=name)


def test_the_switch_test_counts_a_recordings_windows_as_one():
    from app_custom.nested.learner import lower_loss_p

    current = np.ones(12)
    other = np.ones(12) * 0.5
    assert lower_loss_p(current, other) == 0.0  # every sample better by the same amount
    one_recording = np.zeros(12, dtype=int)
    assert lower_loss_p(current, other, one_recording) == 1.0  # one unit: no evidence
    noisy = other + np.random.default_rng(0).normal(0, 0.05, 12)
    assert lower_loss_p(current, noisy) < 0.01
    assert lower_loss_p(current, noisy, np.repeat(np.arange(2), 6)) > lower_loss_p(current, noisy)


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


def test_a_device_stops_serving_fast_layers_its_held_out_samples_say_are_broken():
    from app_custom.nested.slow_delta import install

    learner = _selecting()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    merged_slow = state_of(learner.model, learner.shared_names)
    broken = {
        k: np.full(v.shape, 7.0, dtype=np.float32) for k, v in state_of(learner.model, learner.private_names).items()
    }
    install(learner.model, broken)
    learner.receive_global(merged_slow, 1)
    assert learner.serving != "nested"  # another kind, significantly better on its held-out samples
    served = state_of(learner.served, learner.private_names)
    assert not all(np.array_equal(served[k], broken[k]) for k in served)
    # the training model keeps the device's fast layers, whatever is served
    kept = state_of(learner.model, learner.private_names)
    assert all(np.array_equal(kept[k], broken[k]) for k in kept)


def test_sensor_adapters_start_as_the_standardization_of_the_devices_own_samples():
    device = make_device(0, n=80)
    scaled = DeviceData(
        LabelledSet(device.train.x * 50.0 + 300.0, device.train.y), LabelledSet(device.test.x, device.test.y)
    )
    learner = NestedLearner(NestedConfig.from_dict(NESTED), scaled, num_classes=3)
    adapter = learner.model.adapters["features"]
    with torch.no_grad():
        seen = adapter(torch.from_numpy(scaled.train.x)).numpy()
    np.testing.assert_allclose(seen.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(seen.std(axis=0, ddof=1), 1.0, atol=1e-3)


def test_the_personal_model_and_the_serving_choice_survive_a_restart(tmp_path):
    learner = _selecting()
    learner.receive_global(learner.initial_slow(), 0)
    learner.train_round()
    learner.receive_global(state_of(learner.model, learner.shared_names), 1)
    learner.save(tmp_path / "state.pt")
    restarted = _selecting()
    restarted.load(tmp_path / "state.pt")
    assert restarted.serving == learner.serving
    for model, again in ((learner.personal, restarted.personal), (learner.personal_full, restarted.personal_full)):
        for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
            assert torch.equal(a, b), name
    for k, v in learner._initial_private.items():
        np.testing.assert_array_equal(restarted._initial_private[k], v)
