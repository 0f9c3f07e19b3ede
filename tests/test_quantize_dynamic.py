"""int8 on transformers: dynamic activations for MatMul weights, int8 embedding rows, chosen from the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import optimized_ops, run_cli, run_model
from onnxcomp.errors import OnnxcompError
from test_quantize import conv_net

rng = np.random.default_rng(0)
VOCABULARY, WIDTH, TOKENS = 300, 32, 6


def attention_model() -> onnx.ModelProto:
    """Embedding → one attention head (Q, K, V projections, softmax(QKᵀ)V) → output projection, with one hidden
    channel 8× larger than the rest, as after a transformer's LayerNorm."""
    table = rng.standard_normal((VOCABULARY, WIDTH)).astype(np.float32)
    table[:, 3] *= 8
    weights = {name: (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
               for name in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]),
             helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "temperature"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["attention"], axis=-1),
             helper.make_node("MatMul", ["attention", "v"], ["mixed"]),
             helper.make_node("MatMul", ["mixed", "wo"], ["y"])]
    initializers = [numpy_helper.from_array(table, "table"),
                    numpy_helper.from_array(np.float32(1 / np.sqrt(WIDTH)), "temperature")]
    initializers += [numpy_helper.from_array(value, name) for name, value in weights.items()]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", WIDTH])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_transformers_get_dynamic_int8_without_calibration_data(tmp_path):
    model = attention_model()
    quantized, report = onnxcomp.optimize(model, "int8", validate_result=False)
    stats = report.passes[0].stats
    assert stats["activations"] == "dynamic" and stats["int8:MatMul"] == 4 and stats["int8:Gather"] == 1
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 4  # x for Q, K, V at once
    assert ops.count("MatMul") == 2  # QKᵀ and attention × V stay in float
    ids = rng.integers(0, VOCABULARY, (64, TOKENS))
    (expected,), (actual,) = run_model(model, {"ids": ids}), run_model(quantized, {"ids": ids})
    cosine = float((expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert cosine > 0.995
    assert quantized.ByteSize() < 0.35 * model.ByteSize()
    _, counts = optimized_ops(quantized, tmp_path)
    # ONNX Runtime runs fused int8 kernels: MatMulIntegerToFloat, or DynamicQuantizeMatMul where it quantizes too
    assert counts["MatMulIntegerToFloat"] + counts["DynamicQuantizeMatMul"] == 4, counts
    assert counts["DynamicQuantizeLinear"] + counts["DynamicQuantizeMatMul"] <= 2, counts  # x quantized once


def test_dynamic_keeps_outlier_channels_that_static_int8_clips():
    model = attention_model()
    ids = rng.integers(0, VOCABULARY, (16, TOKENS))
    calibration = {"ids": rng.integers(0, VOCABULARY, (32, TOKENS))}
    errors = {}
    for mode in ("dynamic", "uint8"):
        quantized, _ = onnxcomp.optimize(model, f"int8:activations={mode}", calib_data=calibration,
                                         validate_result=False)
        (expected,), (actual,) = run_model(model, {"ids": ids}), run_model(quantized, {"ids": ids})
        errors[mode] = float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
    assert errors["dynamic"] < 0.8 * errors["uint8"], errors


def test_convolutional_networks_keep_static_int8():
    model = conv_net()
    calibration = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    quantized, report = onnxcomp.optimize(model, "int8", calib_data=calibration, validate_result=False)
    assert "activations" not in report.passes[0].stats
    assert "QuantizeLinear" in [node.op_type for node in quantized.graph.node]


def test_cli_quantizes_a_transformer_with_no_calibration_data(tmp_path):
    onnx.save(attention_model(), tmp_path / "m.onnx")
    result = run_cli("optimize", tmp_path / "m.onnx", "--passes", "int8", "-o", tmp_path / "q.onnx",
                     "--input-shape", "ids:1,5", "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert "activations=dynamic" in result.stdout and "validation on random" in result.stdout


def attention_classifier(outlier: float) -> onnx.ModelProto:
    """attention_model with its hidden outlier channel `outlier`× larger still, its outputs averaged over the
    tokens into [N, 32] class scores."""
    model = attention_model()
    graph = model.graph
    table = next(init for init in graph.initializer if init.name == "table")
    values = numpy_helper.to_array(table).copy()
    values[:, 3] *= outlier
    table.CopyFrom(numpy_helper.from_array(values, "table"))
    graph.node.append(helper.make_node("ReduceMean", ["y"], ["logits"], axes=[1], keepdims=0))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", WIDTH]))
    return model


def disagreement(model: onnx.ModelProto, quantized: onnx.ModelProto, ids: np.ndarray) -> float:
    (expected,), (actual,) = run_model(model, {"ids": ids}), run_model(quantized, {"ids": ids})
    return 100.0 * float(np.mean(expected.argmax(1) != actual.argmax(1)))


def test_accuracy_budget_leaves_the_most_sensitive_layers_in_float_in_dynamic_mode():
    """The budget of the static mode holds for transformers too: layers go back to float, the most sensitive
    first, until the disagreement on held-back calibration samples is within it; fresh samples agree better."""
    model = attention_classifier(16.0)
    calibration = {"ids": rng.integers(0, VOCABULARY, (200, TOKENS))}
    fresh = rng.integers(0, VOCABULARY, (400, TOKENS))
    plain, _ = onnxcomp.optimize(model, "int8", validate_result=False)
    budgeted, report = onnxcomp.optimize(model, "int8:max-drop=3", calib_data=calibration, validate_result=False)
    stats = report.passes[0].stats
    assert stats["activations"] == "dynamic" and stats["holdout_samples"] == 40
    assert 1 <= stats["kept_float"] < 5 and stats["holdout_drop_points"] <= 3, stats
    assert stats["skipped:excluded"] == stats["kept_float"]
    assert disagreement(model, plain, fresh) > 8  # without the budget, int8 loses this model's top-1 often
    assert disagreement(model, budgeted, fresh) < 0.5 * disagreement(model, plain, fresh)


def test_budget_in_dynamic_mode_needs_calibration_data_to_measure_on():
    with pytest.raises(OnnxcompError, match="calib_data="):
        onnxcomp.optimize(attention_classifier(1.0), "int8:max-drop=1", validate_result=False)


def test_dynamic_mode_leaves_excluded_ops_and_the_last_layer_in_float():
    model = attention_model()
    quantized, report = onnxcomp.optimize(model, "int8:keep-last=true,exclude-ops=Gather", validate_result=False)
    stats = report.passes[0].stats
    assert stats["int8:MatMul"] == 3 and stats["int8:Gather"] == 0 and stats["skipped:excluded"] == 2
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("MatMulInteger") == 3 and ops.count("Gather") == 1 and ops.count("MatMul") == 3


def test_gemm_with_a_bias_becomes_an_int8_matmul_plus_the_bias():
    weight = rng.standard_normal((4, 8)).astype(np.float32)  # [N, K], transB=1 as torch's Linear exports it
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    quantized, report = onnxcomp.optimize(model, "int8:activations=dynamic", validate_result=False)
    assert report.passes[0].stats["int8:Gemm"] == 1
    assert [node.op_type for node in quantized.graph.node].count("MatMulInteger") == 1
    x = rng.standard_normal((16, 8)).astype(np.float32)
    (expected,), (actual,) = run_model(model, {"x": x}), run_model(quantized, {"x": x})
    assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()


def gather_model(table: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"])], "lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", table.shape[1]])],
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_embedding_rows_keep_their_own_scale_at_half_a_byte_a_row(tmp_path):
    vocabulary, width = 2000, 64
    magnitudes = np.geomspace(0.01, 1.0, vocabulary)  # rows a hundred times apart, as a vocabulary's are
    table = (rng.standard_normal((vocabulary, width)) * magnitudes[:, None]).astype(np.float32)
    model = gather_model(table)
    quantized, _ = onnxcomp.optimize(model, "int8:activations=dynamic", validate_result=False)
    ids = np.arange(vocabulary)
    (decoded,) = run_model(quantized, {"ids": ids})
    step = np.abs(table).max(axis=1) / 127
    # each row's scale is its own rounded up to one of 16 levels spaced geometrically over the rows' range
    coarsest = (step.max() / step.min()) ** (1 / 15) * 1.001  # and up to float16
    assert coarsest < 1.5
    assert np.all(np.abs(decoded - table).max(axis=1) <= 0.5 * coarsest * step)
    # one int8 per entry and half a byte of scale code per row, plus the decoder: a quarter of the float table
    assert quantized.ByteSize() < vocabulary * width + vocabulary // 2 + 4000
    _, counts = optimized_ops(quantized, tmp_path)  # the row scales are decoded once, when ORT loads the model
    assert set(counts) <= {"Gather", "Cast", "Unsqueeze", "Mul"}, counts


def test_weight_scales_are_float16_where_it_holds_them_and_float32_where_not():
    for size in (1.0, 1e-9):  # the second's scales are below float16's normal range
        weight = (rng.standard_normal((16, 8)) * size).astype(np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                                  [numpy_helper.from_array(weight, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        quantized, _ = onnxcomp.optimize(model, "int8:activations=dynamic", validate_result=False)
        scale = next(t for t in quantized.graph.initializer if t.name == "w_scale")
        assert scale.data_type == (TensorProto.FLOAT16 if size == 1.0 else TensorProto.FLOAT)
        x = rng.standard_normal((32, 16)).astype(np.float32)
        (expected,), (actual,) = run_model(model, {"x": x}), run_model(quantized, {"x": x})
        assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.assets
def test_minilm_int8_is_no_larger_than_onnxruntime_quantize_dynamic(assets, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxcomp.bench import working_directory

    model = assets / "zoo/paraphrase_minilm_l3.onnx"
    ours = tmp_path / "ours.onnx"
    onnxcomp.optimize(model, "int8", output=ours, validate_result=False)
    with working_directory(tmp_path):
        quantize_dynamic(str(model), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8)
    assert ours.stat().st_size <= (tmp_path / "ort.onnx").stat().st_size
