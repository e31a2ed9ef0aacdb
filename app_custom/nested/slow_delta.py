"""Slow deltas: what a device sends (trained slow weights minus received slow weights), the
checks every incoming tensor set passes, and the merge that installs new global slow layers
while keeping the device's own fast layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

Tensors = dict[str, np.ndarray]


class UpdateError(ValueError):
    """A set of named tensors does not match what was expected (keys, shapes, finiteness)."""


def state_of(model: torch.nn.Module, names: Iterable[str]) -> Tensors:
    """Copies of the named parameters as float32 numpy arrays."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().numpy().astype(np.float32, copy=True) for name in names}


def check_tensors(tensors: Mapping[str, object], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise ``UpdateError`` unless ``tensors`` has exactly the expected keys, shapes and finite values."""
    if not isinstance(tensors, Mapping):
        raise UpdateError(f"{where}: expected a mapping of named arrays, got {type(tensors).__name__}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UpdateError(f"{where}: unknown keys {unknown}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UpdateError(f"{where}: missing keys {missing}")
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise UpdateError(f"{where}: {name} is {type(value).__name__}, not a numpy array")
        if tuple(value.shape) != tuple(expected[name]):
            raise UpdateError(f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name])}")
        if not np.issubdtype(value.dtype, np.floating):
            raise UpdateError(f"{where}: {name} has dtype {value.dtype}, expected floating point")
        # finite as float32, the precision it is used in: 1e300 is finite in float64 but inf here
        if not np.isfinite(value.astype(np.float32)).all():
            raise UpdateError(f"{where}: {name} contains NaN or inf (or values beyond float32's range)")


def param_shapes(model: torch.nn.Module, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named parameters, read without copying them."""
    params = dict(model.named_parameters())
    return {name: tuple(params[name].shape) for name in names}


def shapes_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in tensors.items()}


def slow_delta(received: Tensors, trained: Tensors) -> Tensors:
    """``trained - received`` for every slow parameter (the only thing that leaves a device)."""
    check_tensors(trained, shapes_of(received), "trained slow weights")
    return {name: (trained[name] - received[name]).astype(np.float32) for name in received}


def install(model: torch.nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy named arrays into the model's parameters in place (nothing else changes)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def merge_slow(model: torch.nn.Module, global_slow: Mapping[str, np.ndarray], slow_names: list[str]) -> None:
    """Install new global slow layers; the device's fast layers stay exactly as they were."""
    check_tensors(global_slow, param_shapes(model, slow_names), "global slow weights")
    install(model, global_slow)
