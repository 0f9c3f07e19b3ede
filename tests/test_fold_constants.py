"""fold-constants and flush-denormals: exact passes of the default pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import run_model

rng = np.random.default_rng(0)


def model_of(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def computed_weights_model(channels: int = 8) -> onnx.ModelProto:
    """Conv → BN → Conv → BN whose weights are computed from constants, as some exporters leave them:
    an fp16 weight cast back to float32, BN scale from ConstantOfShape, a bias reshaped from a Constant."""
    w1 = rng.standard_normal((channels, 3, 3, 3)).astype(np.float16)
    w2 = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["w1_half"], ["w1"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("ConstantOfShape", ["channels"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["ones", "gamma_scale"], ["gamma"]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Constant", [], ["w2_flat"], value=numpy_helper.from_array(w2.ravel(), "w2_flat")),
        helper.make_node("Reshape", ["w2_flat", "w2_shape"], ["w2"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(w1, "w1_half"),
        numpy_helper.from_array(np.array([channels], np.int64), "channels"),
        numpy_helper.from_array(np.array(1.5, np.float32), "gamma_scale"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var"),
        numpy_helper.from_array(np.array(w2.shape, np.int64), "w2_shape"),
    ]
    return model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 8, 8])], initializers)


def test_default_pipeline_folds_every_batchnorm_whose_weights_are_computed_from_constants():
    model = computed_weights_model()
    optimized, report = onnxcomp.optimize(model, validate_result=False)
    ops = [node.op_type for node in optimized.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2, ops
    assert not {"Cast", "ConstantOfShape", "Reshape", "Constant", "Mul"} & set(ops), ops
    fuse = next(r for r in report.passes if r.name == "fuse-bn")
    assert fuse.stats["fused"] == 2
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    (before,), (after,) = run_model(model, {"x": x}), run_model(optimized, {"x": x})
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()


def test_a_result_much_larger_than_its_inputs_is_not_stored():
    """ConstantOfShape of a large shape stays a node: storing its result would grow the file."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
             helper.make_node("Add", ["x", "zeros"], ["y"]),
             helper.make_node("Constant", [], ["small"], value=numpy_helper.from_array(np.float32(2.0), "s")),
             helper.make_node("Mul", ["y", "small"], ["z"])]
    model = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 64])],
                     [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64, 64, 64])],
                     [numpy_helper.from_array(np.array([1, 64, 64, 64], np.int64), "shape")])
    optimized, report = onnxcomp.optimize(model, "fold-constants", validate_result=False)
    ops = [node.op_type for node in optimized.graph.node]
    assert ops == ["ConstantOfShape", "Add", "Mul"]  # the Constant became an initializer; the big value did not
    assert report.passes[0].stats["kept_for_size"] == 1
    assert optimized.ByteSize() < 10_000
    x = rng.standard_normal((1, 64, 64, 64)).astype(np.float32)
    assert np.array_equal(run_model(model, {"x": x})[0], run_model(optimized, {"x": x})[0])


def test_random_ops_and_graph_outputs_are_not_folded():
    nodes = [helper.make_node("RandomUniform", [], ["noise"], shape=[2], seed=1.0),
             helper.make_node("Add", ["x", "noise"], ["y"]),
             helper.make_node("Mul", ["two", "two"], ["four"])]
    model = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                      helper.make_tensor_value_info("four", TensorProto.FLOAT, [])],
                     [numpy_helper.from_array(np.float32(2.0), "two")])
    optimized, _ = onnxcomp.optimize(model, "fold-constants", validate_result=False)
    assert [node.op_type for node in optimized.graph.node] == ["RandomUniform", "Add", "Mul"]


def denormal_model() -> tuple[onnx.ModelProto, int]:
    """Denormal weights in an initializer, a Constant node and an If branch."""
    tiny = np.finfo(np.float32).tiny
    weight = rng.standard_normal((4, 4)).astype(np.float32)
    weight[0, :3] = [tiny / 4, -tiny / 1000, tiny / 2]
    bias = np.array([1.0, tiny / 8, 0.0, -2.0], np.float32)
    branch_value = np.array([tiny / 16, 1.0, 1.0, 1.0], np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(branch_value, "kv")),
         helper.make_node("Mul", ["h", "k"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", 4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(bias, "bv")),
             helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                             helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                     [numpy_helper.from_array(weight, "w")])
    return model, 5


def test_flush_denormals_zeroes_them_everywhere_and_changes_outputs_by_less_than_a_normal_float():
    model, count = denormal_model()
    optimized, report = onnxcomp.optimize(model, "flush-denormals", validate_result=False)
    assert report.passes[0].stats["denormals_zeroed"] == count
    tiny = np.finfo(np.float32).tiny
    remaining = [v for v in _all_float_values(optimized) if ((v != 0) & (np.abs(v) < tiny)).any()]
    assert not remaining
    x = rng.standard_normal((3, 4)).astype(np.float32)
    for flag in (True, False):
        feed = {"x": x, "flag": np.array(flag)}
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            before, after = run_model(model, feed, level)[0], run_model(optimized, feed, level)[0]
            assert np.abs(before - after).max() < tiny  # the then-branch scales one column by a denormal
            assert np.array_equal(before[:, 1:], after[:, 1:])


def _all_float_values(model: onnx.ModelProto) -> list[np.ndarray]:
    values = [numpy_helper.to_array(t) for t in model.graph.initializer]
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        values += [numpy_helper.to_array(t) for t in graph.initializer]
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    values.append(numpy_helper.to_array(attribute.t))
                pending += list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
    return [v for v in values if v.dtype.kind == "f"]


def test_passes_that_do_not_enter_subgraphs_say_how_many_nodes_they_left_there():
    model, _ = denormal_model()  # an If with 2 nodes in one branch and 1 in the other
    _, report = onnxcomp.optimize(model, "fuse-bn,flush-denormals", validate_result=False)
    fuse, flush = report.passes[:2]
    assert fuse.stats["skipped:inside-subgraphs"] == 3
    assert "skipped:inside-subgraphs" not in flush.stats


def test_deep_compression_reaches_batchnorm_parameters_behind_identity_nodes():
    """TorchScript exports without constant folding pass BN parameters through Identity nodes."""
    channels = 4
    params = {name: rng.uniform(0.5, 1.5, channels).astype(np.float32) for name in ("g", "b", "m", "v")}
    nodes = [helper.make_node("Identity", [name], [f"{name}_id"]) for name in params]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"]),
              helper.make_node("BatchNormalization", ["c", "g_id", "b_id", "m_id", "v_id"], ["y"])]
    initializers = [numpy_helper.from_array(value, name) for name, value in params.items()]
    initializers.append(numpy_helper.from_array(rng.standard_normal((channels, 3, 1, 1)).astype(np.float32), "w"))
    model = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 4, 4])], initializers)
    alone, _ = onnxcomp.optimize(model, "fuse-bn", validate_result=False)
    assert "BatchNormalization" in [node.op_type for node in alone.graph.node]
    optimized, _ = onnxcomp.optimize(model, "deep-compression", validate_result=False)
    assert "BatchNormalization" not in [node.op_type for node in optimized.graph.node]
