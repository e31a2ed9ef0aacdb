"""Reference models for the nested learner.

``RobotModel`` has one encoder per configured modality (camera image, audio spectrogram,
IMU/sensor window, navigation state, or a plain feature vector), a fused trunk and a head.
Small per-owner adapters start as the identity: a sensor adapter on each input (channel mixing
and offset: gain, rotated or flipped IMU axes, lighting; for images also column mixing: a
mirrored or shifted camera mount), FiLM on the trunk output, and a residual head
(``adapters.head``, zero at start) whose logits add to the head's. Which parameters are fast or
slow is configuration (name patterns over ``adapters.*``, ``encoders.*``, ``trunk.*``,
``head.*``), never code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import MODALITIES, ModelConfig

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class SensorAdapter(nn.Module):
    """An owner's sensor mount and calibration, identity at start: ``mix`` mixes the input channels
    (IMU axes mounted rotated or flipped, a colour cast), ``shift`` offsets them, and for images
    ``mix_w`` mixes the columns (a mirrored or shifted camera mount)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        channels = shape[0]
        self.mix = nn.Parameter(torch.eye(channels))
        self.shift = nn.Parameter(torch.zeros((channels,) + (1,) * (len(shape) - 1)))
        self.mix_w = nn.Parameter(torch.eye(shape[-1])) if len(shape) == 3 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("oc,bc...->bo...", self.mix, x) + self.shift
        if self.mix_w is not None:
            x = x @ self.mix_w.T
        return x

    @torch.no_grad()
    def standardize(self, x: torch.Tensor) -> None:
        """Start as the standardization of ``x``'s channels (own mean 0, own scale 1): inputs
        arrive as the sensors deliver them, in whatever units, and the owner's own samples say
        how to scale them. Channels that do not vary keep scale 1."""
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims) if x.shape[0] > 1 else torch.ones_like(mean)
        scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std))
        self.mix.copy_(torch.diag(scale))
        self.shift.copy_((-mean * scale).reshape(self.shift.shape))


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (dimension 1): an owner's sensor gain, offset or lighting."""

    def __init__(self, num_channels: int, channel_dims: int) -> None:
        super().__init__()
        shape = (num_channels,) + (1,) * channel_dims
        self.scale = nn.Parameter(torch.ones(shape))
        self.shift = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _zero_linear(width: int, num_classes: int) -> nn.Linear:
    layer = nn.Linear(width, num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _pool_matrix(length: int, out: int) -> torch.Tensor:
    """(length, out): column i averages adaptive average pooling's bin i, ``[floor(i L / out),
    ceil((i + 1) L / out))``."""
    matrix = torch.zeros(length, out)
    for i in range(out):
        start, end = (i * length) // out, -(-(i + 1) * length // out)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix


class AvgPoolTo(nn.Module):
    """Adaptive average pooling to a fixed output size for a fixed input size, as constant matrix
    products. The same numbers as ``nn.AdaptiveAvgPool1d/2d``, but exportable to any ONNX opset
    and TensorRT version (the exporter for opset <= 17 refuses adaptive pooling whose output size
    does not divide the input size)."""

    def __init__(self, in_size: tuple[int, ...], out: int) -> None:
        super().__init__()
        if len(in_size) not in (1, 2):
            raise ValueError(f"AvgPoolTo pools 1 or 2 trailing dimensions, got {in_size}")
        self.register_buffer("pool_w", _pool_matrix(in_size[-1], out), persistent=False)
        self.register_buffer(
            "pool_h", _pool_matrix(in_size[0], out).T.contiguous() if len(in_size) == 2 else None, persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.matmul(x, self.pool_w)
        return torch.matmul(self.pool_h, x) if self.pool_h is not None else x


def _conv_stack(layers: list[nn.Module], shape: tuple[int, ...], out: int, width: int) -> nn.Sequential:
    """Convolutions, then pooling to ``out`` per spatial dimension, flatten, a linear layer to ``width``."""
    convs = nn.Sequential(*layers)
    with torch.no_grad():
        size = tuple(convs(torch.zeros((1,) + shape)).shape[2:])
    channels = layers[-2].out_channels  # the last convolution, before its ReLU
    return nn.Sequential(
        *layers,
        AvgPoolTo(size, out),
        nn.Flatten(),
        nn.Linear(channels * out ** len(size), width),
        nn.ReLU(),
    )


def _encoder(modality: str, shape: tuple[int, ...], width: int) -> nn.Module:
    if modality in ("vision", "audio"):
        if len(shape) != 3:
            raise ValueError(f"{modality} input must be (C, H, W), got {shape}")
        convs = [nn.Conv2d(shape[0], 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()]
        return _conv_stack(convs, shape, 2, width)
    if modality == "imu":
        if len(shape) != 2:
            raise ValueError(f"imu input must be (channels, time), got {shape}")
        convs = [nn.Conv1d(shape[0], 16, 5, stride=2, padding=2), nn.ReLU()]
        convs += [nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.ReLU()]
        return _conv_stack(convs, shape, 4, width)
    if modality in ("nav", "features"):
        if len(shape) != 1:
            raise ValueError(f"{modality} input must be a vector (d,), got {shape}")
        return nn.Sequential(nn.Linear(shape[0], width), nn.ReLU())
    raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES) + ['features']}")


class RobotModel(nn.Module):
    """Multi-modal robot model: adapters -> encoders -> fused trunk -> trunk adapter -> head."""

    def __init__(
        self, modalities: Mapping[str, tuple[int, ...]], num_classes: int, width: int = 64, adapters: bool = True
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("a RobotModel needs at least one modality")
        self.modalities = dict(sorted((name, tuple(shape)) for name, shape in modalities.items()))
        self.encoders = nn.ModuleDict({m: _encoder(m, s, width) for m, s in self.modalities.items()})
        self.trunk = nn.Sequential(nn.Linear(width * len(self.modalities), width), nn.ReLU())
        if adapters:
            self.adapters = nn.ModuleDict(
                {m: SensorAdapter(s) for m, s in self.modalities.items()}
                | {"trunk": ChannelAffine(width, 0), "head": _zero_linear(width, num_classes)}
            )
        else:
            self.adapters = nn.ModuleDict()
        self.head = nn.Linear(width, num_classes)

    def _as_dict(self, x: Inputs) -> Mapping[str, torch.Tensor]:
        if isinstance(x, torch.Tensor):
            if len(self.modalities) != 1:
                raise ValueError(f"model expects inputs for {list(self.modalities)}, got one tensor")
            return {next(iter(self.modalities)): x}
        missing = set(self.modalities) - set(x)
        if missing:
            raise ValueError(f"inputs lack modalities {sorted(missing)}")
        return x

    def features(self, x: Inputs) -> torch.Tensor:
        """The trunk's representation (after the trunk adapter): what the head reads."""
        inputs = self._as_dict(x)
        encoded = []
        for name, encoder in self.encoders.items():
            value = inputs[name]
            if name in self.adapters:
                value = self.adapters[name](value)
            encoded.append(encoder(value))
        z = self.trunk(torch.cat(encoded, dim=1))
        if "trunk" in self.adapters:
            z = self.adapters["trunk"](z)
        return z

    def standardize_inputs(self, x: Inputs) -> None:
        """Set every sensor adapter to standardize its modality by the statistics of ``x``."""
        for name, value in self._as_dict(x).items():
            if name in self.adapters:
                self.adapters[name].standardize(torch.as_tensor(value))

    def forward(self, x: Inputs) -> torch.Tensor:
        z = self.features(x)
        logits = self.head(z)
        if "head" in self.adapters:
            logits = logits + self.adapters["head"](z)
        return logits


class FeatureMLP(RobotModel):
    """MLP for feature vectors: the robot model with a single ``features`` encoder."""

    def __init__(self, input_dim: int, num_classes: int, width: int = 64, adapters: bool = True) -> None:
        super().__init__({"features": (input_dim,)}, num_classes, width, adapters)


def input_spec(x: object) -> dict[str, tuple[int, ...]]:
    """Modalities and per-sample shapes of a data array (or a dict of arrays, one per modality)."""
    if isinstance(x, Mapping):
        return {str(name): tuple(value.shape[1:]) for name, value in x.items()}
    shape = tuple(x.shape[1:])  # type: ignore[attr-defined]
    kinds = {1: "features", 2: "imu", 3: "vision"}
    if len(shape) not in kinds:
        raise ValueError(f"cannot pick a model for samples of shape {shape}: expected (d,), (C, T) or (C, H, W)")
    return {kinds[len(shape)]: shape}


def build_model(config: ModelConfig, spec: Mapping[str, tuple[int, ...]], num_classes: int) -> RobotModel:
    """The reference model that fits the inputs: an MLP for one feature vector, else the robot model."""
    kind = config.kind
    if kind == "auto":
        kind = "mlp" if set(spec) == {"features"} else "robot"
    if kind == "mlp":
        if set(spec) != {"features"}:
            raise ValueError(f"model.kind mlp needs feature vectors (n, d), got modalities {dict(spec)}")
        return FeatureMLP(spec["features"][0], num_classes, config.width, config.adapters)
    return RobotModel(spec, num_classes, config.width, config.adapters)
