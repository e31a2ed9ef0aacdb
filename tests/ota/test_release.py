import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ota.bundle import (
    BundleError,
    DeviceProfile,
    NonFiniteWeights,
    check_compatible,
    load_golden,
    load_slow,
    personalize,
    read_manifest,
    verify_files,
)
from ota.release import ReleaseError, build_release
from tests.ota_fixtures import model_for


def test_a_bundle_holds_one_verified_onnx_file_at_the_class_opset_that_reproduces_the_model(archive, tmp_path):
    import onnx

    archive, config, trained = archive
    for device_class, opset in [("jetson-xavier-jp5", 17), ("x86-64-cpu", 18)]:
        out = tmp_path / device_class
        manifest = build_release(archive.root, out, device_class)
        assert manifest["global_version"] == 1 and manifest["release"] == f"v000001-{device_class}"
        assert sorted(p.name for p in out.iterdir()) == [
            "golden.safetensors",
            "manifest.json",
            "model.onnx",
            "slow.safetensors",
        ]
        assert read_manifest(out) == json.loads((out / "manifest.json").read_text())
        verify_files(out, manifest)
        graph = onnx.load(str(out / "model.onnx"))
        assert {op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")} == {opset}
        assert manifest["compatibility"]["opset"] == opset
        # the shipped graph on the golden inputs gives the golden outputs, here through onnxruntime
        inputs, expected = load_golden(out, manifest)
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(["logits"], inputs)[0], expected, rtol=1e-3, atol=1e-4)
        assert manifest["validation"]["p50_ms"] > 0
        slow = load_slow(out, manifest)
        assert all(np.array_equal(slow[name], trained[name]) for name in trained)


def test_a_device_installs_its_own_fast_layers_into_the_graph_and_gets_its_own_model(archive, tmp_path):
    archive, config, trained = archive
    out = tmp_path / "bundle"
    manifest = build_release(archive.root, out, "x86-64-cpu")
    # a device whose fast layers moved away from the identity during its own training
    device = model_for(config)
    with torch.no_grad():
        for name, p in device.named_parameters():
            if name in trained:
                p.copy_(torch.from_numpy(trained[name]))
            else:
                p.add_(0.1 * torch.randn_like(p))
    private = {name: p.detach().numpy().copy() for name, p in device.named_parameters() if name not in trained}
    assert sorted(private) == manifest["model"]["private_names"] and private
    graph = personalize(out, manifest, private)
    inputs, reference = load_golden(out, manifest)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], inputs)[0]
    with torch.no_grad():
        want = device.eval()({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert not np.allclose(got, reference, atol=1e-3)  # personal, not the reference model
    name = next(iter(private))
    with pytest.raises(BundleError, match="missing"):
        personalize(out, manifest, {k: v for k, v in private.items() if k != name})
    with pytest.raises(BundleError, match="unknown"):
        personalize(out, manifest, private | {"head.weight": private[name]})
    with pytest.raises(BundleError, match="shape"):
        personalize(out, manifest, private | {name: np.zeros((3, 3, 3), np.float32)})
    with pytest.raises(NonFiniteWeights, match="NaN"):
        personalize(out, manifest, private | {name: np.full_like(private[name], np.nan)})


def test_only_accepted_trained_versions_of_a_described_archive_are_released(archive, tmp_path):
    archive, _, _ = archive
    with pytest.raises(ReleaseError, match="rejected by the validation gate"):
        build_release(archive.root, tmp_path / "b2", "x86-64-cpu", version=2)
    with pytest.raises(ReleaseError, match="untrained initial"):
        build_release(archive.root, tmp_path / "b0", "x86-64-cpu", version=0)
    with pytest.raises(ValueError, match="unknown device class 'toaster'"):
        build_release(archive.root, tmp_path / "bt", "toaster")
    with pytest.raises(ReleaseError, match="median .* > 1e-06 ms"):
        build_release(archive.root, tmp_path / "slow", "x86-64-cpu", max_validation_ms=1e-6)
    assert not (tmp_path / "slow").exists()
    build_release(archive.root, tmp_path / "b1", "x86-64-cpu")
    with pytest.raises(ReleaseError, match="never overwritten"):
        build_release(archive.root, tmp_path / "b1", "x86-64-cpu")
    (archive.root / "model.json").unlink()
    with pytest.raises(ReleaseError, match="no model.json"):
        build_release(archive.root, tmp_path / "b3", "x86-64-cpu")
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_a_corrupt_tampered_incomplete_or_foreign_bundle_is_refused(archive, tmp_path):
    archive, _, _ = archive
    good = tmp_path / "good"
    manifest = build_release(archive.root, good, "jetson-orin-jp6")

    def copy(name):
        target = tmp_path / name
        shutil.copytree(good, target)
        return target

    corrupt = copy("corrupt")
    (corrupt / "manifest.json").write_text('{"format": 1, "release": ')
    with pytest.raises(BundleError, match="corrupt manifest"):
        read_manifest(corrupt)
    no_golden = copy("no_golden")
    edited = json.loads((no_golden / "manifest.json").read_text())
    del edited["files"]["golden.safetensors"]
    (no_golden / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(BundleError, match="no golden data"):
        read_manifest(no_golden)
    tampered = copy("tampered")
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        verify_files(tampered, read_manifest(tampered))
    orin = DeviceProfile("jetson-orin-jp6", "0.1.0", l4t_major=36, tensorrt="10.3.0")
    assert check_compatible(manifest, orin) == []
    assert "onnxruntime" in check_compatible(manifest, DeviceProfile("jetson-orin-jp6", "0.1.0", 36, None))[0]
    for profile, message in [
        (DeviceProfile("jetson-xavier-jp5", "0.1.0", 35, "8.5.2"), "is for jetson-orin-jp6"),
        (DeviceProfile("jetson-orin-jp6", "0.1.0", 36, "8.6.1"), "TensorRT >= 10.3"),
        (DeviceProfile("jetson-orin-jp6", "0.1.0", 35, "10.3.0"), "L4T R36"),
        (DeviceProfile("jetson-orin-jp6", "0.0.9", 36, "10.3.0"), "runtime >= 0.1.0"),
    ]:
        with pytest.raises(BundleError, match=message):
            check_compatible(manifest, profile)


def test_the_build_command_makes_a_bundle_or_says_in_one_line_why_not(archive, tmp_path, capsys):
    from simulator.cli import main

    archive, _, _ = archive
    out = tmp_path / "cli-bundle"
    assert (
        main(["ota", "build", "--archive", str(archive.root), "--device-class", "x86-64-cpu", "--out", str(out)]) == 0
    )
    assert "built v000001-x86-64-cpu" in capsys.readouterr().out
    verify_files(out, read_manifest(out))
    args = ["ota", "build", "--archive", str(archive.root), "--device-class", "x86-64-cpu", "--version", "7"]
    assert main(args + ["--out", str(tmp_path / "none")]) == 1
    assert "version 7 is not in" in capsys.readouterr().err
