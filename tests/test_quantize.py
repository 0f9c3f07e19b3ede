"""int8: QDQ structure on tiny graphs, ONNX Runtime's int8 kernels, calibration methods, exclusions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import optimized_ops, run_cli, run_model
from onnxcomp.errors import InputError
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import PassContext, PreconditionError
from onnxcomp.passes.calibrate import TensorStats, choose_range
from onnxcomp.passes.quantize import weight_levels
from onnxcomp.recipe import parse

RNG = np.random.default_rng(0)


def conv_net() -> onnx.ModelProto:
    """x → Conv → Relu → Conv → Add(x') → GlobalAveragePool → Flatten → Gemm: the shapes of a small CNN."""
    rng = np.random.default_rng(1)  # the same weights on every call
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "B2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "Wd"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 8)).astype(np.float32), "Wfc"),
        numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "Bfc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r1", "Wd"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["c2", "d"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


CALIBRATION = {"x": RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)}
TEST = {"x": RNG.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)}


def quantize(model, recipe="int8", data=CALIBRATION):
    ctx = PassContext(calibration_data=onnxcomp.data.open_data(data, model))
    quantized, records = PassManager(parse(recipe)).run(model, ctx)
    return quantized, records[0]


def sqnr_db(expected, actual):
    return 10 * np.log10(np.sum(expected ** 2) / np.sum((expected - actual) ** 2))


def test_qdq_structure_weights_biases_and_folded_relu():
    quantized, record = quantize(conv_net())
    ops = Counter(n.op_type for n in quantized.graph.node)
    assert ops["Relu"] == 0, "the Relu is folded into conv1's output range"
    assert ops["Conv"] == 3 and ops["Gemm"] == 1 and ops["QuantizeLinear"] >= 4
    assert record.stats["int8:Conv"] == 3 and record.stats["int8:Gemm"] == 1 and record.stats["int8:Add"] == 1
    initializers = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    dequantize = {n.output[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in quantized.graph.node if n.name == "conv1")
    weight_dq, bias_dq = dequantize[conv1.input[1]], dequantize[conv1.input[2]]
    assert initializers[weight_dq.input[0]].dtype == np.int8
    assert initializers[weight_dq.input[1]].shape == (8,), "one scale per output channel"
    assert not initializers[weight_dq.input[2]].any(), "symmetric: zero points are 0"
    assert initializers[bias_dq.input[0]].dtype == np.int32
    input_scale = initializers[dequantize[conv1.input[0]].input[1]]
    np.testing.assert_allclose(initializers[bias_dq.input[1]], input_scale * initializers[weight_dq.input[1]],
                               rtol=1e-6)
    # conv1's output after the folded Relu: uint8 with zero point 0, i.e. clamped at 0 like the Relu
    relu_out = dequantize["r1"]
    assert initializers[relu_out.input[2]].dtype == np.uint8 and initializers[relu_out.input[2]] == 0
    assert [o.name for o in quantized.graph.output] == ["logits"]
    expected, actual = run_model(conv_net(), TEST)[0], run_model(quantized, TEST)[0]
    assert sqnr_db(expected, actual) > 25


def test_onnxruntime_runs_int8_kernels_not_float_ops_in_qdq(tmp_path):
    quantized, _ = quantize(conv_net())
    session, ops = optimized_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0
    assert ops["QLinearGlobalAveragePool"] == 1
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0
    expected = run_model(conv_net(), TEST)[0]
    actual = session.run(None, TEST)[0]
    assert sqnr_db(expected, actual) > 25


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_each_calibration_method_quantizes_closely(method):
    quantized, record = quantize(conv_net(), f"int8:method={method}")
    assert record.stats["method"] == method
    expected, actual = run_model(conv_net(), TEST)[0], run_model(quantized, TEST)[0]
    assert sqnr_db(expected, actual) > 20


def test_exclusions_keep_layers_in_float():
    cases = {"int8:exclude=conv2|fc": {"conv2", "fc"}, "int8:exclude-ops=Conv": {"conv1", "conv2", "depthwise"},
             "int8:keep-first=true,keep-last=true": {"conv1", "fc"}}
    for recipe, floating in cases.items():
        quantized, _ = quantize(conv_net(), recipe)
        produced_by = {o: n for n in quantized.graph.node for o in n.output}
        for node in quantized.graph.node:
            if node.name in {"conv1", "conv2", "depthwise", "fc"}:
                weight_source = produced_by.get(node.input[1])
                is_int8 = weight_source is not None and weight_source.op_type == "DequantizeLinear"
                assert is_int8 == (node.name not in floating), (recipe, node.name)


def test_elementwise_ops_away_from_int8_work_stay_float():
    """A residual Add of two convolutions runs in int8; a tanh-GELU written out in Mul/Add (Magika's classifier),
    whose inputs come from no int8 node, stays float, and so does the output it computes."""
    model = conv_net()
    graph = model.graph
    graph.node.remove(next(n for n in graph.node if n.name == "fc"))
    graph.initializer.extend([numpy_helper.from_array(np.float32(0.044715), "k"),
                              numpy_helper.from_array(np.float32(1.0), "one")])
    graph.node.extend([
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["h"], name="fc", transB=1),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Mul", ["t", "t"], ["t2"], name="square"),  # reads Tanh only: float
        helper.make_node("Mul", ["t2", "k"], ["t3"], name="scaled"),
        helper.make_node("Add", ["t3", "one"], ["logits"], name="plus_one"),
    ])
    quantized, record = quantize(model)
    assert record.stats["int8:Add"] == 1 and "int8:Mul" not in record.stats  # the residual Add alone
    quantized_inputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    for node in quantized.graph.node:
        if node.name in ("square", "scaled", "plus_one"):
            assert not set(node.input) & quantized_inputs, node.name
    (expected,), (actual,) = run_model(model, TEST), run_model(quantized, TEST)
    assert sqnr_db(expected, actual) > 25


def test_saturation_safe_weight_levels():
    rows = RNG.normal(0, 1, (32, 72))
    levels = weight_levels(rows, "safe", depthwise=False)
    top_two = -np.sort(-np.abs(rows), axis=1)[:, :2]
    q = np.round(top_two / top_two[:, :1] * levels[:, None])
    assert (255 * q.sum(axis=1) <= 32767).all(), "no pair of weights can saturate a u8s8 pair sum"
    assert (levels >= 64).all() and (levels <= 127).all()
    one_large = np.zeros((1, 72))
    one_large[0, 0], one_large[0, 1] = 1.0, 0.01
    assert weight_levels(one_large, "safe", depthwise=False)[0] == 127
    assert (weight_levels(rows, "safe", depthwise=True) == 127).all()
    assert (weight_levels(rows, "reduced", depthwise=False) == 63).all()


def test_streaming_statistics_match_one_pass_and_stay_small():
    values = RNG.standard_t(3, 200_000).astype(np.float32)
    whole, streamed = TensorStats(), TensorStats()
    whole.update(values)
    for chunk in np.array_split(values * 0.01, 50)[:1] + np.array_split(values, 40):
        streamed.update(chunk)  # a first, small batch forces the range to double many times
    assert streamed.counts.nbytes == whole.counts.nbytes
    assert (streamed.minimum, streamed.maximum) == (whole.minimum, whole.maximum)
    width = streamed.limit / 2048
    for method, tolerance in (("minmax", 0), ("percentile", 4 * width), ("mse", 0.03 * (whole.maximum - whole.minimum))):
        low, high = choose_range(whole, method)
        low2, high2 = choose_range(streamed, method)
        assert abs(high - high2) <= tolerance and abs(low - low2) <= tolerance, method


def test_range_methods_on_a_known_distribution():
    stats = TensorStats()
    stats.update(np.concatenate([RNG.normal(0, 1, 100_000), [40.0]]).astype(np.float32))
    assert choose_range(stats, "minmax")[1] == pytest.approx(40.0)
    low, high = choose_range(stats, "percentile", percentile=99.9)
    assert 3.0 < high < 3.6 and -3.6 < low < -3.0  # the normal's 0.05 % tails
    assert choose_range(stats, "entropy")[1] < 10
    relu = TensorStats()
    relu.update(np.abs(RNG.normal(0, 1, 100_000)).astype(np.float32))
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert choose_range(relu, method)[0] == 0.0


def test_missing_calibration_data_is_a_precondition():
    with pytest.raises(PreconditionError, match="calib_data="):
        PassManager(parse("int8")).run(conv_net(), PassContext())


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="method must be one of"):
        parse("int8:method=kl")
    with pytest.raises(InputError, match="weight-range"):
        parse("int8:weight-range=huge")


def test_calibration_reader_objects_are_accepted():
    class Reader:  # the shape of onnxruntime.quantization.CalibrationDataReader
        def __init__(self):
            self.batches = iter([{"x": CALIBRATION["x"][i:i + 8]} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.batches, None)

    quantized, record = quantize(conv_net(), data=Reader())
    assert record.stats["samples"] == 64


@pytest.fixture
def saved_net(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_net(), path)
    return path


@pytest.mark.parametrize("arrays, keyword", [
    ({"y": np.zeros((4, 3, 8, 8), np.float32), "z": np.zeros((4, 3, 8, 8), np.float32)}, "model's inputs are [x]"),
    ({"x": np.zeros((4, 3, 9, 8), np.float32)}, "axis 2 is 9, not 8"),
    ({"x": np.zeros((4, 3, 8, 8), np.complex64)}, "convert the data"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "holds no samples"),
])
def test_bad_calibration_data_exits_2(saved_net, tmp_path, arrays, keyword):
    np.savez(tmp_path / "calib.npz", **arrays)
    result = run_cli("optimize", saved_net, "--passes", "int8", "--calib-data", tmp_path / "calib.npz",
                     "-o", tmp_path / "out.onnx", "--no-validate")
    assert result.returncode == 2, result.stderr
    assert keyword in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_int8_without_calibration_data_exits_2(saved_net, tmp_path):
    result = run_cli("optimize", saved_net, "--passes", "int8", "-o", tmp_path / "out.onnx", "--no-validate")
    assert result.returncode == 2 and "--calib-data" in result.stderr


def outlier_net(width: int = 8) -> onnx.ModelProto:
    """Input channel 0 is huge and unused; the answer lives in channels 1–3, which per-tensor int8 wipes out."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(0, 1, (width, 4, 1, 1)).astype(np.float32)
    w1[:, 0] = 0.0
    inits = [numpy_helper.from_array(w1, "W1"),
             numpy_helper.from_array(rng.normal(0, 1, (width, width, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 1, (5, width)).astype(np.float32), "Wfc")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="mix"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "Wfc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_accuracy_aware_mode_keeps_the_fewest_layers_in_float():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.05, (120, 4, 4, 4)).astype(np.float32)
    x[:, 0] *= 4000
    labels = run_model(outlier_net(), {"x": x})[0].argmax(1)  # the float model is right by definition
    data = {"x": x, "labels": labels}
    plain, record = quantize(outlier_net(), data=data)
    held_back = {"x": x[-24:]}
    plain_agreement = np.mean(run_model(plain, held_back)[0].argmax(1) == labels[-24:])
    assert plain_agreement < 0.8, "the case must actually hurt without the budget"
    fitted, record = quantize(outlier_net(), "int8:max-drop=5", data=data)
    assert record.stats["kept_float_layers"] == "mix"
    assert record.stats["holdout_drop_points"] <= 5
    assert record.stats["int8:Conv"] == 1 and record.stats["int8:Gemm"] == 1
    fitted_agreement = np.mean(run_model(fitted, held_back)[0].argmax(1) == labels[-24:])
    assert fitted_agreement >= 0.95


def outlier_data(width: int = 8) -> dict:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.05, (120, 4, 4, 4)).astype(np.float32)
    x[:, 0] *= 4000
    return {"x": x, "labels": run_model(outlier_net(width), {"x": x})[0].argmax(1)}  # the float model is right


def test_float_layers_keeps_the_layers_whose_int8_error_reaches_the_outputs_most():
    data = outlier_data()
    one, record = quantize(outlier_net(), "int8:float-layers=1", data=data)
    assert record.stats["kept_float_layers"] == "mix" and record.stats["int8:Conv"] == 1
    held_back = {"x": data["x"][-24:]}
    assert np.mean(run_model(one, held_back)[0].argmax(1) == data["labels"][-24:]) >= 0.95
    _, record = quantize(outlier_net(), "int8:float-layers=0", data=data)
    assert "kept_float_layers" not in record.stats and record.stats["int8:Conv"] == 2
    every, record = quantize(outlier_net(), "int8:float-layers=4", data=data)  # more than the model has
    assert record.stats["quantized"] == 0 and record.stats["kept_float"] == 3
    np.testing.assert_allclose(run_model(every, held_back)[0], run_model(outlier_net(), held_back)[0], rtol=1e-5)
    with pytest.raises(InputError, match="float-layers must be 0 or more"):
        parse("int8:float-layers=-1")


def test_float_layers_ranks_by_output_error_on_models_without_class_scores():
    """A feature map as the output: no top-1 to measure, but the order by output error needs none."""
    model = conv_net()
    del model.graph.node[-3:]  # ends at the Add: (N, 8, 8, 8)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8, 8, 8]))
    _, record = quantize(model, "int8:float-layers=1")
    assert record.stats["kept_float"] == 1 and record.stats["kept_float_layers"] in ("conv1", "conv2", "depthwise")


def test_a_budget_search_chooses_int8s_layers_in_float_and_ranks_them_once(monkeypatch):
    from onnxcomp.passes import quantize as int8

    measured = []
    ranked = int8._Trials.ranked

    def counting(self, candidates, error=None):
        order = ranked(self, candidates, error)
        measured.append(len(self.ctx.memo))
        return order

    monkeypatch.setattr(int8._Trials, "ranked", counting)
    # wide enough that int8 is the smaller file (at 8 channels the Q/DQ nodes outweigh the weights saved)
    _, report = onnxcomp.optimize(outlier_net(64), "int8", data=outlier_data(64), max_accuracy_drop=5.0,
                                  latency_runs=0)
    tried = {c["recipe"]: c for c in report.candidates}
    assert len(tried) >= 2 and all("int8:float-layers=" in text for text in tried)
    (chosen,) = [c for c in report.candidates if c["chosen"]]
    # all in int8 loses most of the samples; the mixing layer in float keeps them
    assert chosen["recipe"].endswith("int8:float-layers=1") and chosen["drop"] + chosen["drop_error"] <= 5.0
    assert tried["int8:float-layers=0"]["drop"] > 20
    assert measured and measured[-1] == 1, "one layer order, measured once for every candidate"


def test_without_evaluation_data_int8_fits_the_budget_itself():
    data = outlier_data()
    model, report = onnxcomp.optimize(outlier_net(), "int8", calib_data=data, max_accuracy_drop=5.0,
                                      validate_result=False)
    assert report.candidates == []
    assert report.passes[0].stats["kept_float_layers"] == "mix"


def test_bias_correction_cancels_the_mean_shift_of_weight_rounding():
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "one_conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 4, 4])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.normal(3.0, 1.0, (64, 8, 6, 6)).astype(np.float32)  # inputs with a large mean
    expected = run_model(model, {"x": x})[0]

    def mean_shift(recipe):
        quantized, _ = quantize(model, recipe, data={"x": x})
        return np.abs((run_model(quantized, {"x": x})[0] - expected).mean(axis=(0, 2, 3)))

    without = mean_shift("int8:weight-range=reduced,bias-correction=false")
    corrected = mean_shift("int8:weight-range=reduced")
    assert corrected.mean() < without.mean() / 3


def test_old_opset_and_computed_weights_are_handled():
    # opset 11 (per-axis Q/DQ needs 13) and a MatMul weight computed by Reshape from an initializer
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.normal(0, 1, 48).astype(np.float32), "flat"),
             numpy_helper.from_array(np.array([12, 4], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), "bias")]
    nodes = [helper.make_node("Reshape", ["flat", "shape"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "bias"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    x = rng.normal(0, 1, (64, 12)).astype(np.float32)
    quantized, record = quantize(model, data={"x": x})
    assert record.stats["opset"] == "11->13" and quantized.opset_import[0].version == 13
    assert record.stats["int8:MatMul"] == 1 and record.stats["int8:Add"] == 1
    assert sqnr_db(run_model(model, {"x": x})[0], run_model(quantized, {"x": x})[0]) > 25


def test_concat_pooling_mul_and_resize_run_as_int8_kernels(tmp_path):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32), "W3"),
             numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "W3"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["e"]),
             helper.make_node("AveragePool", ["e"], ["f"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Resize", ["f", "roi", "scales"], ["g"], mode="nearest"),
             helper.make_node("GlobalAveragePool", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 1, 1])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    quantized, record = quantize(model, data={"x": x})
    for op in ("Concat", "MaxPool", "Mul", "AveragePool", "Resize"):
        assert record.stats[f"int8:{op}"] == 1, op
    session, ops = optimized_ops(quantized, tmp_path)
    assert ops["QLinearConcat"] == 1 and ops["QLinearMul"] == 1 and ops["QLinearAveragePool"] == 1
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0 and ops["Concat"] == 0 and ops["Mul"] == 0
    assert sqnr_db(run_model(model, {"x": x[:8]})[0], session.run(None, {"x": x[:8]})[0]) > 30


def _dense(nodes, inits, outputs=("y",), input_shape=("N", 12)):
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


DENSE_X = {"x": np.random.default_rng(8).normal(0, 1, (64, 12)).astype(np.float32)}


def test_per_tensor_weights_keep_the_weight_layout():
    rng = np.random.default_rng(9)
    w = numpy_helper.from_array(rng.normal(0, 1, (12, 6)).astype(np.float32), "W")  # [K, N]: axis 1 = channels
    for node in (helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Gemm", ["x", "W"], ["y"])):
        model = _dense([node], [w])
        quantized, _ = quantize(model, "int8:per-channel=false", data=DENSE_X)
        assert sqnr_db(run_model(model, DENSE_X)[0], run_model(quantized, DENSE_X)[0]) > 25, node.op_type


def test_graph_output_read_by_a_quantized_node_keeps_full_precision():
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["y"])]
    model = _dense(nodes, [numpy_helper.from_array(rng.normal(0, 1, (12, 4)).astype(np.float32), "W")], ("s", "y"))
    quantized, record = quantize(model, data=DENSE_X)
    assert record.stats["int8:MatMul"] == 1
    np.testing.assert_array_equal(run_model(quantized, DENSE_X)[0], run_model(model, DENSE_X)[0])


def test_gemm_with_a_broadcast_scalar_bias_and_alpha():
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (4, 12)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0.5], np.float32), "C")]
    model = _dense([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, alpha=2.5)], inits)
    for recipe in ("int8", "int8:bias-correction=false"):
        quantized, _ = quantize(model, recipe, data=DENSE_X)
        assert sqnr_db(run_model(model, DENSE_X)[0], run_model(quantized, DENSE_X)[0]) > 25, recipe


def test_integer_shape_arithmetic_is_not_quantized():
    # Reshape(x, Concat(Shape(x)[0], [-1])): Concat of int64 shapes must not get QuantizeLinear
    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest"),
             numpy_helper.from_array(rng.normal(0, 1, (12, 4)).astype(np.float32), "W")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["batch"]),
             helper.make_node("Concat", ["batch", "rest"], ["new_shape"], axis=0),
             helper.make_node("Reshape", ["x", "new_shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["y"])]
    model = _dense(nodes, inits)
    quantized, record = quantize(model, data=DENSE_X)
    assert "int8:Concat" not in record.stats and record.stats["int8:MatMul"] == 1
    assert sqnr_db(run_model(model, DENSE_X)[0], run_model(quantized, DENSE_X)[0]) > 25


def test_nan_in_calibration_data_is_an_input_error():
    x = DENSE_X["x"].copy()
    x[3, 5] = np.nan
    model = _dense([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])],
                   [numpy_helper.from_array(np.ones((12, 4), np.float32), "W")])
    with pytest.raises(InputError, match="NaN or infinite"):
        quantize(model, data={"x": x})


def test_accuracy_budget_needs_class_scores():
    model = _dense([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [numpy_helper.from_array(np.ones((12, 1), np.float32), "W")])
    with pytest.raises(InputError, match="class scores"):
        quantize(model, "int8:max-drop=1", data=DENSE_X)


def test_fixed_batch_models_calibrate_and_report():
    model = _dense([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [numpy_helper.from_array(np.ones((12, 4), np.float32), "W")], input_shape=(16, 12))
    quantized, record = quantize(model, data=DENSE_X)
    assert record.stats["int8:MatMul"] == 1 and record.stats["samples"] == 64


def test_denormal_weights_are_zeroed_before_calibration():
    """Denormal weights (PP-OCR's detector ships 10 % of them) are zeroed, counted, and the model still
    quantizes as closely: the float model calibrates at normal speed."""
    model = conv_net()
    for tensor in model.graph.initializer:
        if tensor.name in ("W2", "Bfc"):
            values = numpy_helper.to_array(tensor).copy()
            values.reshape(-1)[::3] = 1e-40  # denormal float32
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    quantized, record = quantize(model)
    assert record.stats["denormals_zeroed"] == 8 * 8 * 9 // 3 + 2
    kept = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert not any(((v != 0) & (np.abs(v) < np.finfo(np.float32).tiny)).any() for v in kept.values()
                   if v.dtype == np.float32)
    expected, actual = run_model(model, TEST)[0], run_model(quantized, TEST)[0]
    assert sqnr_db(expected, actual) > 20
    _, plain = quantize(conv_net())
    assert "denormals_zeroed" not in plain.stats


@pytest.mark.parametrize("holdout", ["0", "1"])
def test_int8_holdout_must_leave_samples_on_both_sides(holdout):
    """passes/quantize.py: `0.0 < holdout` → `0.0 <= holdout`, and `holdout < 1.0` → `holdout < 2.0`."""
    with pytest.raises(InputError, match="holdout"):
        parse(f"int8:holdout={holdout}")


def test_int8_leaves_sequence_values_untyped():
    """passes/quantize.py: a value that shape inference types as a sequence was given elem_type 1 (float), and
    the quantized model declared it a float tensor, which ONNX Runtime refuses."""
    weight = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("SequenceConstruct", ["r", "r"], ["pair"]),
             helper.make_node("ConcatFromSequence", ["pair"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    quantized, _ = onnxcomp.optimize(model, "int8", calib_data={"x": x}, validate_result=False)
    got, = run_model(quantized, {"x": x})
    expected, = run_model(model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.05 * np.abs(expected).max())
