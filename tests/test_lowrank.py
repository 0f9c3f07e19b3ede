"""lowrank: two thin factors per layer, fitted to the layer's outputs on calibration data, checked through ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import assert_input_error, run_cli, run_model
from onnxcomp import runtime
from onnxcomp.passes.lowrank import Plan, _whitened_svd

OPSET = [helper.make_opsetid("", 17)]


pytestmark = pytest.mark.usefixtures("avx2_channel_block")  # ranks in steps of 8 on every CPU


def _model(nodes, inputs, output, initializers, rank: int = 2) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])]
    weights = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    return model


def _vector_input(width: int):
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])]


def matmul_add(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """x [N, K] → MatMul(W [K, N]) → Add(b) → y, as transformers export their Linear layers."""
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                  _vector_input(weight.shape[0]), "y", {"W": weight, "b": bias})


def gemm(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """x [N, K] → Gemm(W [N, K] transposed, C, alpha 0.5, beta 2) → y."""
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, alpha=0.5, beta=2.0)
    return _model([node], _vector_input(weight.shape[1]), "y", {"W": weight, "C": bias})


def conv(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """x [N, Cin, 12, 12] → Conv(3×3, stride 2, pads 1, bias) → y."""
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1], 12, 12])]
    return _model([node], inputs, "y", {"W": weight, "B": bias}, rank=4)


def two_layers(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """x → MatMul(W1) → Add(b1) → Relu → MatMul(W2) → Add(b2) → y."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
             helper.make_node("Add", ["h2", "b2"], ["y"])]
    return _model(nodes, _vector_input(first.shape[0]), "y",
                  {"W1": first, "b1": np.full(first.shape[1], 0.1), "W2": second, "b2": np.zeros(second.shape[1])})


def low_rank(rng, rows: int, columns: int, rank: int) -> np.ndarray:
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, columns)) / np.sqrt(rank * rows)


def correlated(rng, samples: int, width: int) -> np.ndarray:
    """Inputs whose energy lies mostly in a few rotated directions, with a non-zero mean, as activations do.
    Calibration and fresh inputs are cut from one call: each call rotates differently."""
    spread = np.exp(-np.arange(width) / 4.0)
    rotation = np.linalg.qr(rng.standard_normal((width, width)))[0]
    return ((rng.standard_normal((samples, width)) * spread) @ rotation + 0.5).astype(np.float32)


def lowrank(model: onnx.ModelProto, passes: str, calibration: np.ndarray):
    """(factorized model, the pass's stats, its per-layer rows)."""
    result, report = onnxcomp.optimize(model, passes, calib_data={"x": calibration}, validate_result=False)
    (record,) = [record for record in report.passes if record.name == "lowrank"]
    return result, record.stats, record.layers


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sum((got - expected) ** 2) / np.sum(expected ** 2))


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
def test_rank_r_weight_is_reproduced_exactly(kind):
    """A weight of rank 8 factorized at rank 8 gives the original outputs on any input, not only calibration."""
    rng = np.random.default_rng(0)
    if kind == "matmul":
        model = matmul_add(low_rank(rng, 64, 64, 8), rng.standard_normal(64))
        calibration, fresh = rng.standard_normal((64, 64)), rng.standard_normal((16, 64))
    elif kind == "gemm":
        model = gemm(low_rank(rng, 64, 48, 8), rng.standard_normal(64))
        calibration, fresh = rng.standard_normal((64, 48)), rng.standard_normal((16, 48))
    else:
        model = conv(low_rank(rng, 32, 72, 8).reshape(32, 8, 3, 3), rng.standard_normal(32))
        calibration, fresh = rng.standard_normal((16, 8, 12, 12)), rng.standard_normal((4, 8, 12, 12))
    result, stats, layers = lowrank(model, "lowrank:rank=8", calibration.astype(np.float32))
    assert stats["factorized"] == 1 and layers[0]["rank"] == 8
    assert ops(result) == {"matmul": ["MatMul", "MatMul", "Add"], "gemm": ["MatMul", "Gemm"],
                           "conv": ["Conv", "Conv"]}[kind]
    feed = {"x": fresh.astype(np.float32)}
    (expected,), (got,) = run_model(model, feed), run_model(result, feed)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_full_rank_factors_give_the_weight_back():
    """At full rank the un-whitened factors multiply back to the weight, whatever the input statistics."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((24, 40))
    inputs = correlated(rng, 200, 24).astype(np.float64)
    plan = Plan(layer=None, bias=None, weight=weight, moment=inputs.T @ inputs / len(inputs))
    _whitened_svd(plan, damping=0.01)
    first, second = plan.factors(24)
    np.testing.assert_allclose(first @ second, weight, atol=1e-9)
    assert plan.relative_error(24) < 1e-20


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    """At the same rank, fitting the factors to the inputs loses far less output than plain SVD of the weight."""
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((64, 64)) / 8, rng.standard_normal(64)
    calibration, fresh = np.split(correlated(rng, 768, 64), [512])
    result, stats, layers = lowrank(matmul_add(weight, bias), "lowrank:rank=16", calibration)
    assert stats["factorized"] == 1 and layers[0]["rank"] == 16
    left, singular, right = np.linalg.svd(weight)
    plain = matmul_add((left[:, :16] * singular[:16]) @ right[:16], bias)
    (expected,) = run_model(matmul_add(weight, bias), {"x": fresh})
    whitened_error = relative_error(run_model(result, {"x": fresh})[0], expected)
    plain_error = relative_error(run_model(plain, {"x": fresh})[0], expected)
    assert whitened_error < 0.01 * plain_error, (whitened_error, plain_error)


def test_flops_target_is_met_with_ranks_on_multiples_of_8():
    rng = np.random.default_rng(3)
    model = two_layers(rng.standard_normal((64, 128)) / 8, rng.standard_normal((128, 64)) / 11)
    calibration, fresh = np.split(correlated(rng, 384, 64), [256])
    result, stats, layers = lowrank(model, "lowrank:flops=0.5", calibration)
    assert stats["flops_ratio"] <= 0.5 and stats["target_flops"] == 0.5
    assert stats["factorized"] == 2 and all(row["rank"] % 8 == 0 and row["rank"] > 0 for row in layers)
    kept = sum(row["rank"] * (row["inputs"] + row["outputs"]) for row in layers)
    assert stats["flops_ratio"] == pytest.approx(kept / (2 * 64 * 128), abs=1e-4)
    assert ops(result).count("MatMul") == 4
    (expected,), (got,) = run_model(model, {"x": fresh}), run_model(result, {"x": fresh})
    assert relative_error(got, expected) < 0.01


@pytest.mark.parametrize("block, options", [(16, "lowrank:flops=0.5"), (8, "lowrank:flops=0.5"),
                                            (4, "lowrank:flops=0.5,multiple=4")])
def test_ranks_follow_the_machine_s_channel_block(monkeypatch, block, options):
    """ORT's CPU kernels run widths in blocks (16 floats with AVX-512): rank 120 costs what 128 does, so the ranks
    tried are multiples of the machine's block, or of `multiple=`."""
    monkeypatch.setattr(runtime, "channel_block", lambda: 16 if block == 4 else block)
    rng = np.random.default_rng(3)
    model = two_layers(rng.standard_normal((64, 128)) / 8, rng.standard_normal((128, 64)) / 11)
    _, stats, layers = lowrank(model, options, correlated(rng, 256, 64))
    ranks = [row["rank"] for row in layers]
    assert stats["factorized"] == 2 and all(rank % block == 0 for rank in ranks), ranks
    assert any(rank % (2 * block) for rank in ranks) or block == 16, ranks  # the finer steps are used


def test_layer_left_where_factors_would_not_be_cheaper():
    """64×8: rank 8 would cost 8·(64 + 8) = 576 multiply-adds per row against 512 dense, so it stays one MatMul."""
    rng = np.random.default_rng(4)
    model = two_layers(rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 8)) / 8)
    result, stats, layers = lowrank(model, "lowrank:rank=8,min-size=0", correlated(rng, 128, 64))
    assert stats["factorized"] == 1 and stats["skipped:not-cheaper"] == 1
    assert [row["inputs"] for row in layers] == [64]
    initializers = {t.name: t for t in result.graph.initializer}
    assert "W2" in initializers and list(initializers["W2"].dims) == [64, 8]
    assert ops(result).count("MatMul") == 3


def test_nothing_factorizable_is_reported_and_unchanged(tmp_path):
    rng = np.random.default_rng(5)
    model = matmul_add(rng.standard_normal((64, 8)), np.zeros(8))
    path, calibration = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(calibration, x=rng.standard_normal((16, 64)).astype(np.float32))
    result = run_cli("optimize", path, "--passes", "lowrank:min-size=0", "--calib-data", calibration,
                     "-o", tmp_path / "out.onnx", "--no-validate", "--report", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (stats,) = [record["stats"] for record in report["passes"] if record["name"] == "lowrank"]
    assert stats["factorized"] == 0 and stats["skipped:not-cheaper"] == 1 and "unchanged" in stats["warning"]
    assert ops(onnx.load(tmp_path / "out.onnx")) == ["MatMul", "Add"]


@pytest.mark.parametrize("options, keyword", [("flops=0", "flops"), ("flops=1.5", "flops"), ("flops=-0.2", "flops"),
                                              ("rank=0", "rank"), ("flops=0.5,rank=16", "not both")])
def test_bad_options_exit_2(tmp_path, options, keyword):
    rng = np.random.default_rng(6)
    path, calibration = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(matmul_add(rng.standard_normal((64, 64)), np.zeros(64)), path)
    np.savez(calibration, x=rng.standard_normal((16, 64)).astype(np.float32))
    before = path.read_bytes()
    result = run_cli("optimize", path, "--passes", f"lowrank:{options}", "--calib-data", calibration,
                     "-o", tmp_path / "out.onnx")
    assert_input_error(result, "lowrank", keyword)
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_without_calibration_data_exits_2(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(matmul_add(np.ones((64, 64)), np.zeros(64)), path)
    result = run_cli("optimize", path, "--passes", "lowrank", "-o", tmp_path / "out.onnx")
    assert_input_error(result, "lowrank", "calib")
    assert not (tmp_path / "out.onnx").exists()


def test_unreachable_flops_target_is_reported():
    """flops=0.01 asks for less than rank 8 everywhere costs: every layer gets rank 8 and the stats say so."""
    rng = np.random.default_rng(7)
    model = two_layers(rng.standard_normal((64, 128)) / 8, rng.standard_normal((128, 64)) / 11)
    _, stats, layers = lowrank(model, "lowrank:flops=0.01", correlated(rng, 128, 64))
    assert [row["rank"] for row in layers] == [8, 8]
    assert stats["flops_ratio"] == pytest.approx(8 * 192 / (64 * 128)) and "below" in stats["warning"]


def test_errors_are_measured_on_calibration_samples_the_factors_were_not_fitted_to():
    # a classifier after global pooling sees one vector per sample: with fewer samples than inputs, any rank
    # reproduces the fitted samples, and judged on them the layer would look free to factorize
    rng = np.random.default_rng(3)
    model = matmul_add(rng.standard_normal((128, 128)) / np.sqrt(128), np.zeros(128))
    calibration = rng.standard_normal((40, 128)).astype(np.float32)  # 5 batches of 8: the last is held out
    _, _, layers = lowrank(model, "lowrank:rank=32", calibration)
    fresh = {"x": rng.standard_normal((64, 128)).astype(np.float32)}
    (expected,), (got,) = run_model(model, fresh), run_model(lowrank(model, "lowrank:rank=32", calibration)[0], fresh)
    true_snr = -10 * np.log10(relative_error(got, expected))
    assert true_snr < 3.0  # 32 fitted vectors say little about the other directions
    assert abs(layers[0]["output_snr_db"] - true_snr) < 2.0, (layers[0], true_snr)
