import numpy as np
import pytest
import torch

from app_custom.nested.models import RobotModel, SensorAdapter


def test_sensor_adapters_start_as_the_identity():
    torch.manual_seed(0)
    model = RobotModel({"vision": (1, 8, 8), "imu": (6, 50)}, num_classes=4)
    x = {"vision": torch.randn(5, 1, 8, 8), "imu": torch.randn(5, 6, 50)}
    for name in ("vision", "imu"):
        assert torch.equal(model.adapters[name](x[name]), x[name]), name
    plain = RobotModel({"vision": (1, 8, 8), "imu": (6, 50)}, num_classes=4, adapters=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("adapters.")})
    assert torch.allclose(model(x), plain(x), atol=1e-6)  # zero residual head, identity FiLM


def test_a_sensor_adapter_can_hold_a_mirrored_camera_and_flipped_imu_axes():
    camera = SensorAdapter((1, 8, 8))
    with torch.no_grad():
        camera.mix_w.copy_(torch.eye(8).flip(0))  # column mixing = a horizontal mirror
    image = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    assert torch.equal(camera(image.flip(-1)), image)

    imu = SensorAdapter((6, 50))
    assert imu.mix_w is None
    flip = np.diag([1.0, -1.0, 1.0, 1.0, 1.0, -1.0]).astype(np.float32)
    with torch.no_grad():
        imu.mix.copy_(torch.from_numpy(flip))
    window = torch.randn(3, 6, 50)
    assert torch.allclose(imu(window * torch.from_numpy(np.diag(flip).copy()).reshape(1, 6, 1)), window)


@pytest.mark.parametrize("size,out", [((13,), 4), ((50,), 4), ((8,), 4), ((4, 4), 2), ((7, 5), 3)])
def test_fixed_pooling_computes_what_adaptive_average_pooling_does(size, out):
    from app_custom.nested.models import AvgPoolTo

    x = torch.randn((3, 5) + size)
    reference = torch.nn.AdaptiveAvgPool1d(out) if len(size) == 1 else torch.nn.AdaptiveAvgPool2d(out)
    torch.testing.assert_close(AvgPoolTo(size, out)(x), reference(x), rtol=1e-5, atol=1e-6)
    assert AvgPoolTo(size, out).state_dict() == {}  # constants, not parameters: saved states are unchanged
