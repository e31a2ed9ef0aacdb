import pytest
import torch

from app_custom.nested.config import LevelConfig
from app_custom.nested.levels import PartitionError, partition_parameters
from app_custom.nested.models import FeatureMLP, RobotModel


def _levels(*specs):
    return tuple(LevelConfig(name=n, patterns=tuple(p), shared=(n == "slow")) for n, p in specs)


def test_every_parameter_lands_in_exactly_one_level():
    model = RobotModel({"vision": (1, 8, 8), "imu": (6, 50)}, num_classes=4, width=16)
    partition = partition_parameters(
        model, _levels(("fast", ["head.*", "adapters.*"]), ("slow", ["encoders.*", "trunk.*"]))
    )
    names = [n for n, _ in model.named_parameters()]
    assert sorted(partition.level_of) == sorted(names)
    assert all(n.startswith(("head.", "adapters.")) for n in partition.names("fast"))
    assert set(partition.shared_names) == set(partition.names("slow"))
    assert any(n.startswith("encoders.imu") for n in partition.shared_names)


def test_a_pattern_that_matches_nothing_is_named():
    model = FeatureMLP(5, 3, width=8)
    with pytest.raises(PartitionError, match="'decoder.\\*' matches no parameter"):
        partition_parameters(
            model, _levels(("fast", ["head.*", "decoder.*"]), ("slow", ["encoders.*", "trunk.*", "adapters.*"]))
        )


def test_overlapping_levels_name_the_parameters():
    model = FeatureMLP(5, 3, width=8)
    with pytest.raises(PartitionError, match="head.weight <- fast .*slow"):
        partition_parameters(model, _levels(("fast", ["head.*", "adapters.*"]), ("slow", ["*"])))


def test_unassigned_parameters_are_listed():
    model = FeatureMLP(5, 3, width=8)
    with pytest.raises(PartitionError, match="assigned to no level: .*trunk.0.weight"):
        partition_parameters(model, _levels(("fast", ["head.*", "adapters.*"]), ("slow", ["encoders.*"])))


def test_any_torch_module_can_be_partitioned():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    partition = partition_parameters(model, _levels(("fast", ["1.*"]), ("slow", ["0.*"])))
    assert partition.shared_names == ["0.weight", "0.bias"]
