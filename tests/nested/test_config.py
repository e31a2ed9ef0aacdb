import pytest

from app_custom.nested.config import ConfigError, NestedConfig

from ..conftest import NESTED


def _with(**changes):
    raw = {**NESTED, **changes}
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"levels": []}, "levels: expected a non-empty list"),
        (_with(levels=[{"name": "fast", "patterns": []}]), r"levels\[0\].patterns"),
        (_with(levels=[{"name": "fast", "patterns": ["*"], "period": 0}]), r"period: expected >= 1"),
        (_with(levels=[{"name": "fast", "patterns": ["*"], "lr": -1}]), r"lr: expected > 0"),
        (_with(levels=[{"name": "a", "patterns": ["x"]}, {"name": "a", "patterns": ["y"]}]), "repeated"),
        (_with(training={"schedule": "random"}), r"training.schedule: expected one of"),
        (_with(training={"batch_size": "32"}), r"training.batch_size: expected an integer"),
        (_with(model={"kind": "transformer"}), r"model.kind"),
        (
            _with(training={"personalize": "select", "holdout": 0.2}),
            r"personalize: 'select' needs serve_trained: false",
        ),
        (_with(training={"serve_trained": False, "personalize": "select"}), r"training.holdout: .*expected > 0"),
        (_with(training={"serve_trained": False, "personalize": "best"}), r"training.personalize: expected one of"),
        (_with(training={"holdout": 0.5}), r"training.holdout: expected < 0.5"),
        (_with(training={"serve_trained": False, "personalize": "ditto"}), r"training.personal_epochs: .*>= 1"),
        (_with(training={"serve_trained": False, "personalize": "finetune"}), r"training.finetune_epochs: .*>= 1"),
        (_with(training={"mix_grid": [0.5, 1.0]}), r"training.mix_grid: expected a list of numbers strictly between"),
        (_with(training={"serve_trained": 1}), r"training.serve_trained: expected true or false"),
        (_with(extra=1), r"unknown key\(s\) \['extra'\]"),
        ("levels: fast", "expected a mapping"),
    ],
)
def test_malformed_configs_get_an_error_that_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        NestedConfig.from_dict(raw)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("levels: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        NestedConfig.from_yaml(path)


def test_slow_level_is_shared_by_default(nested_config):
    assert [level.name for level in nested_config.shared_levels] == ["slow"]
    assert [level.name for level in nested_config.private_levels] == ["fast"]
