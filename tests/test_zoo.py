"""Third-party models exactly as their packages ship them (ONNXCOMP_ASSETS/zoo): the headline command works."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import run_cli

# The flags a user adds to validate each model: its free dimensions fixed, and a real value where the graph
# cannot tell one (Silero's sample rate).
ZOO = {
    "magika_standard_v3_3": [],
    "nudenet_320n": ["--input-shape", "images:1,3,320,320"],
    "paraphrase_minilm_l3": ["--input-shape", "input_ids:1,12", "--input-shape", "attention_mask:1,12"],
    "ppocrv6_det_small": ["--input-shape", "x:1,3,160,320"],
    "ppocrv6_rec_small": ["--input-shape", "x:1,3,48,160"],
    "silero_vad": ["--input-shape", "input:1,512", "--input-shape", "state:2,1,128", "--data", "{vad}"],
}


def vad_data(folder) -> str:
    rng = np.random.default_rng(0)
    path = folder / "vad.npz"
    np.savez(path, input=(0.1 * rng.standard_normal((8, 512))).astype(np.float32),
             state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000, np.int64))
    return str(path)


@pytest.mark.assets
@pytest.mark.parametrize("name", sorted(ZOO))
def test_default_pipeline_is_exact_on_every_zoo_model(assets, tmp_path, name):
    model = assets / "zoo" / f"{name}.onnx"
    before = model.read_bytes()
    bare = run_cli("optimize", model, "-o", tmp_path / "bare.onnx", "--runs", "0")
    assert bare.returncode == 0, bare.stderr
    assert (tmp_path / "bare.onnx").exists() and bare.stderr == ""
    flags = [flag.format(vad=vad_data(tmp_path)) for flag in ZOO[name]]
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--runs", "0", "--report",
                     tmp_path / "r.json", *flags)
    assert result.returncode == 0, result.stderr
    assert model.read_bytes() == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation_skipped"] is None
    (provider,) = report["validation"]["providers"]
    for output in provider["outputs"]:
        if output["integer"]:
            assert output["mismatches"] == 0, output
        else:
            assert output["max_abs_error"] <= 1e-4 * max(output["max_abs_reference"], 1e-30), output


@pytest.mark.assets
def test_denormal_weights_of_the_ocr_detector_are_flushed_with_identical_outputs(assets, tmp_path):
    result = run_cli("optimize", assets / "zoo/ppocrv6_det_small.onnx", "-o", tmp_path / "out.onnx", "--runs", "0",
                     "--input-shape", "x:1,3,96,96", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    flush = next(record for record in report["passes"] if record["name"] == "flush-denormals")
    assert flush["stats"]["denormals_zeroed"] == 255_958
    (output,) = report["validation"]["providers"][0]["outputs"]
    assert output["max_abs_error"] == 0
