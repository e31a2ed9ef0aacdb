"""Engine selection: TensorRT where it works, onnxruntime otherwise with the reason; the engine cache key."""

import numpy as np
import onnxruntime as ort

from ota.engines import EngineKey, l4t_release, prepare_engine, tensorrt_status


def test_without_tensorrt_the_graph_runs_on_onnxruntime_and_the_reason_is_given(bundle, tmp_path):
    trt, reason = tensorrt_status()
    assert trt is None and "TensorRT" in reason  # this machine has no TensorRT (see the README)
    engine, note = prepare_engine(bundle / "model.onnx", {"imu": (6, 50), "vision": (1, 8, 8)}, tmp_path / "cache")
    assert engine.name == "onnxruntime" and note.startswith("onnxruntime: TensorRT is not installed")
    feeds = {"imu": np.zeros((2, 6, 50), np.float32), "vision": np.ones((2, 1, 8, 8), np.float32)}
    reference = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(engine.run(feeds), reference.run(None, feeds)[0], rtol=1e-5)


def test_the_engine_cache_key_changes_with_everything_an_engine_is_tied_to(tmp_path):
    base = EngineKey("10.3.0", "8.7", "36.3.0", "12.6", "ab" * 32, "fp16", 8)
    changed = [
        EngineKey("10.4.0", "8.7", "36.3.0", "12.6", "ab" * 32, "fp16", 8),
        EngineKey("10.3.0", "7.2", "36.3.0", "12.6", "ab" * 32, "fp16", 8),
        EngineKey("10.3.0", "8.7", "36.4.0", "12.6", "ab" * 32, "fp16", 8),
        EngineKey("10.3.0", "8.7", "36.3.0", "12.6", "cd" * 32, "fp16", 8),
        EngineKey("10.3.0", "8.7", "36.3.0", "12.6", "ab" * 32, "fp32", 8),
    ]
    assert len({base.digest(), *(k.digest() for k in changed)}) == 6
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    assert l4t_release(str(release)) == "36.3.0" and l4t_release(str(tmp_path / "none")) == "none"
