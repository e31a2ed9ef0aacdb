"""The device classes a release can target, and what each one's software stack accepts.

A class fixes the ONNX opset of the graph shipped to it (TensorRT 8.5, on JetPack 5, parses
opset <= 17; TensorRT 10.3, on JetPack 6, parses 18), the TensorRT versions its engines are
built with, the GPU's compute capability, and the L4T major release. ``x86-64-cpu`` is for
simulated devices and CI machines: onnxruntime only. Extend the table for new hardware; a
release names exactly one class and a device installs only releases for its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceClass:
    name: str
    opset: int
    jetpack: str | None  # JetPack major release, None off Jetson
    l4t_major: int | None  # /etc/nv_tegra_release "R36" -> 36
    tensorrt_min: str | None  # inclusive; None: no TensorRT (onnxruntime)
    tensorrt_below: str | None  # exclusive upper bound
    compute_capability: tuple[str, ...]

    def as_manifest(self) -> dict:
        return asdict(self) | {"compute_capability": list(self.compute_capability)}


DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("jetson-orin-jp6", 18, "6", 36, "10.3", "11", ("8.7",)),
        DeviceClass("jetson-orin-jp5", 17, "5", 35, "8.5", "9", ("8.7",)),
        DeviceClass("jetson-xavier-jp5", 17, "5", 35, "8.5", "9", ("7.2",)),
        DeviceClass("x86-64-cpu", 18, None, None, None, None, ()),
    )
}


def device_class(name: str) -> DeviceClass:
    if name not in DEVICE_CLASSES:
        raise ValueError(f"unknown device class {name!r}; known: {sorted(DEVICE_CLASSES)}")
    return DEVICE_CLASSES[name]
