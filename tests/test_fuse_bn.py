"""fuse-bn on the smallest graphs that show each case, checked numerically through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from onnxcomp.manager import PassManager
from onnxcomp.recipe import parse

RNG = np.random.default_rng(0)


def bn_params(prefix: str, channels: int) -> list[onnx.TensorProto]:
    values = {
        "scale": RNG.uniform(0.5, 1.5, channels), "bias": RNG.normal(0, 1, channels),
        "mean": RNG.normal(0, 1, channels), "var": RNG.uniform(0.5, 2.0, channels),
    }
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, epsilon=1e-3, **attrs)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.normal(0, 0.5, shape).astype(np.float32), name)


def model(nodes, initializers, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    """A valid model (so the manager's checker runs on the pass's output too); output shapes are inferred."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              initializer=initializers)
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7 if opset < 15 else 8)
    inferred_graph = onnx.shape_inference.infer_shapes(built).graph
    inferred = {v.name: v for v in list(inferred_graph.value_info) + list(inferred_graph.output)}
    for output in built.graph.output:
        if output.name in inferred:
            output.CopyFrom(inferred[output.name])
    onnx.checker.check_model(built)
    return built


def fuse(original: onnx.ModelProto):
    fused, records = PassManager(parse("fuse-bn")).run(original)
    return fused, records[0]


def op_count(m: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in m.graph.node)


def assert_same_outputs(original, fused, feed):
    expected = run_model(original, feed)
    actual = run_model(fused, feed)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


def image(*shape):
    return {"x": RNG.normal(0, 1, shape).astype(np.float32)}


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 21])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn_folds_exactly_across_opsets(opset, with_bias):
    inits = [weight("W", 4, 3, 3, 3)] + bn_params("bn", 4) + ([weight("B", 4)] if with_bias else [])
    conv = helper.make_node("Conv", ["x", "W"] + (["B"] if with_bias else []), ["c"], pads=[1, 1, 1, 1])
    original = model([conv, bn_node("bn", "c", "y")], inits, [("x", [2, 3, 8, 8])], ["y"], opset)
    fused, record = fuse(original)
    assert record.modified and record.stats["fused"] == 1
    assert op_count(fused, "BatchNormalization") == 0
    assert [o.name for o in fused.graph.output] == ["y"]
    assert fused.opset_import[0].version == opset
    assert_same_outputs(original, fused, image(2, 3, 8, 8))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds_per_output_channel(group):
    # W: [C_in, C_out / group, k, k]; 6 output channels in total
    inits = [weight("W", 4, 6 // group, 3, 3), weight("B", 6)] + bn_params("bn", 6)
    deconv = helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=group, strides=[2, 2])
    original = model([deconv, bn_node("bn", "c", "y")], inits, [("x", [1, 4, 5, 5])], ["y"])
    fused, record = fuse(original)
    assert record.stats == {"fused": 1, "skipped": 0, "fused:ConvTranspose": 1}
    assert op_count(fused, "BatchNormalization") == 0
    assert_same_outputs(original, fused, image(1, 4, 5, 5))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5)])
def test_gemm_bn_folds(trans_b, bias_shape):
    inits = [weight("W", *((5, 7) if trans_b else (7, 5)))] + bn_params("bn", 5)
    inputs = ["x", "W"]
    if bias_shape:
        inits.append(weight("C", *bias_shape))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3)
    original = model([gemm, bn_node("bn", "g", "y")], inits, [("x", [3, 7])], ["y"])
    fused, record = fuse(original)
    assert record.stats["fused:Gemm"] == 1
    assert op_count(fused, "BatchNormalization") == 0
    assert_same_outputs(original, fused, image(3, 7))


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_bn_folds_into_matmul_and_add(with_add):
    inits = [weight("W", 7, 5), weight("c", 5)] + bn_params("bn", 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"])]
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "c"], ["a"]))
    nodes.append(bn_node("bn", "a" if with_add else "m", "y"))
    original = model(nodes, inits, [("x", [3, 7])], ["y"])
    fused, record = fuse(original)
    assert record.stats["fused:MatMul"] == 1
    assert op_count(fused, "BatchNormalization") == 0
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "Add"]
    assert_same_outputs(original, fused, image(3, 7))


def test_matmul_bn_folds_when_the_add_reads_the_bias_first():
    inits = [weight("W", 7, 5), weight("c", 5)] + bn_params("bn", 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["c", "m"], ["a"]),
             bn_node("bn", "a", "y")]
    original = model(nodes, inits, [("x", [3, 7])], ["y"])
    fused, record = fuse(original)
    assert record.stats["fused:MatMul"] == 1
    assert_same_outputs(original, fused, image(3, 7))


def test_matmul_bias_that_adds_an_axis_is_skipped():
    """A [4, 1, 3] bias makes the Add's output [4, 3, 3]: BatchNormalization's channels (axis 1) are then not
    the MatMul's outputs (the last axis)."""
    inits = [weight("W", 7, 3), weight("c", 4, 1, 3)] + bn_params("bn", 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
             bn_node("bn", "a", "y")]
    original = model(nodes, inits, [("x", [3, 7])], ["y"])
    fused, record = fuse(original)
    assert record.stats["skipped:channel-mismatch"] == 1
    assert_same_outputs(original, fused, image(3, 7))


def test_matmul_on_3d_input_is_skipped_because_channels_differ():
    # BatchNormalization normalises axis 1; a rank-3 MatMul output has its features on axis 2.
    inits = [weight("W", 4, 4)] + bn_params("bn", 4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), bn_node("bn", "m", "y")]
    original = model(nodes, inits, [("x", [2, 4, 4])], ["y"])
    fused, record = fuse(original)
    assert not record.modified
    assert record.stats["skipped:unknown-or-not-2d-input"] == 1
    assert_same_outputs(original, fused, image(2, 4, 4))


@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_input_rank_is_inferred_where_the_model_states_no_shape(rank):
    # Exports often state no shape between nodes: the MatMul after a Relu folds when inference gives rank 2
    # (before, every such layer was skipped as "unknown"), and a rank-3 one is still kept.
    dims = [3, 7] if rank == 2 else [2, 5, 7]  # rank 3: BatchNormalization reads axis 1 (5), not the features
    inits = [weight("W0", 7, 7), weight("W", 7, 5)] + bn_params("bn", 5)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["m"]), bn_node("bn", "m", "y")]
    original = model(nodes, inits, [("x", dims)], ["y"])
    assert not original.graph.value_info
    fused, record = fuse(original)
    assert record.stats.get("fused:MatMul", 0) == (1 if rank == 2 else 0)
    assert_same_outputs(original, fused, image(*dims))


def test_weights_in_constant_nodes_are_folded():
    w = numpy_helper.from_array(RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "Wv")
    params = bn_params("bn", 4)
    nodes = [helper.make_node("Constant", [], ["W"], value=w)]
    nodes += [helper.make_node("Constant", [], [p.name], value=p) for p in params]
    nodes += [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y")]
    original = model(nodes, [], [("x", [1, 3, 6, 6])], ["y"], opset=11)
    fused, record = fuse(original)
    assert record.stats["fused"] == 1
    assert op_count(fused, "BatchNormalization") == 0
    assert op_count(fused, "Constant") == 0, "the Constant nodes only the BN used are dead after the fold"
    assert_same_outputs(original, fused, image(1, 3, 6, 6))


def test_shared_weight_keeps_its_value_for_the_other_user():
    # One weight W used by two convolutions; only the first is followed by a BatchNormalization.
    inits = [weight("W", 3, 3, 3, 3)] + bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], pads=[1, 1, 1, 1]), bn_node("bn", "c1", "b1"),
             helper.make_node("Conv", ["b1", "W"], ["y"], pads=[1, 1, 1, 1])]
    original = model(nodes, inits, [("x", [1, 3, 6, 6])], ["y"])
    fused, record = fuse(original)
    assert record.stats["fused"] == 1
    conv_weights = [n.input[1] for n in fused.graph.node if n.op_type == "Conv"]
    assert conv_weights[1] == "W" and conv_weights[0] != "W"
    assert_same_outputs(original, fused, image(1, 3, 6, 6))


def test_shared_weight_with_two_different_batch_norms():
    inits = [weight("W", 3, 3, 1, 1)] + bn_params("bn1", 3) + bn_params("bn2", 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"]), bn_node("bn1", "c1", "y1"),
             helper.make_node("Conv", ["x", "W"], ["c2"]), bn_node("bn2", "c2", "y2")]
    original = model(nodes, inits, [("x", [1, 3, 4, 4])], ["y1", "y2"])
    fused, record = fuse(original)
    assert record.stats["fused"] == 2
    assert op_count(fused, "BatchNormalization") == 0
    assert_same_outputs(original, fused, image(1, 3, 4, 4))


def test_conv_output_read_by_another_node_is_skipped():
    inits = [weight("W", 3, 3, 1, 1)] + bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "b"),
             helper.make_node("Add", ["b", "c"], ["y"])]
    original = model(nodes, inits, [("x", [1, 3, 4, 4])], ["y"])
    fused, record = fuse(original)
    assert not record.modified
    assert record.stats == {"fused": 0, "skipped": 1, "skipped:layer-output-shared": 1}
    assert op_count(fused, "BatchNormalization") == 1
    assert_same_outputs(original, fused, image(1, 3, 4, 4))


def test_conv_output_that_is_a_graph_output_is_skipped():
    inits = [weight("W", 3, 3, 1, 1)] + bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y")]
    original = model(nodes, inits, [("x", [1, 3, 4, 4])], ["c", "y"])
    fused, record = fuse(original)
    assert record.stats["skipped:layer-output-shared"] == 1
    assert_same_outputs(original, fused, image(1, 3, 4, 4))


def test_matmul_output_that_is_a_graph_output_is_skipped():
    """Folding into the MatMul's weight would change the output m as well."""
    inits = [weight("W", 7, 5), weight("c", 5)] + bn_params("bn", 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
             bn_node("bn", "a", "y")]
    original = model(nodes, inits, [("x", [3, 7])], ["m", "y"])
    fused, record = fuse(original)
    assert record.stats["skipped:layer-output-shared"] == 1
    assert_same_outputs(original, fused, image(3, 7))


def test_training_mode_batch_norm_is_skipped():
    inits = [weight("W", 3, 3, 1, 1)] + bn_params("bn", 3)
    training = bn_node("bn", "c", "y", training_mode=1)
    training.output.extend(["running_mean", "running_var"])  # training mode has three outputs, or ORT refuses it
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), training]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])], initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    fused, record = fuse(original)
    assert not record.modified
    assert record.stats["skipped:training-mode"] == 1
    assert op_count(fused, "BatchNormalization") == 1


def test_batch_norm_with_nothing_foldable_before_is_left_alone():
    inits = bn_params("bn", 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("bn", "r", "y")]
    original = model(nodes, inits, [("x", [1, 3, 4, 4])], ["y"])
    fused, record = fuse(original)
    assert not record.modified
    assert record.stats["skipped:nothing-foldable-before"] == 1
    assert fused.graph.node[1].op_type == "BatchNormalization"
    assert_same_outputs(original, fused, image(1, 3, 4, 4))


def test_conv_weight_computed_at_run_time_is_skipped():
    inits = bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("bn", "c", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fused, record = fuse(original)
    assert record.stats["skipped:non-constant-weight"] == 1
    assert op_count(fused, "BatchNormalization") == 1


def test_gemm_weight_computed_at_run_time_is_skipped():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"]), bn_node("bn", "g", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [7, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=bn_params("bn", 5))
    fused, record = fuse(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert record.stats["skipped:non-constant-weight"] == 1
    assert op_count(fused, "BatchNormalization") == 1


def test_input_model_is_not_modified():
    inits = [weight("W", 4, 3, 3, 3)] + bn_params("bn", 4)
    original = model([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y")], inits,
                     [("x", [1, 3, 8, 8])], ["y"])
    before = original.SerializeToString()
    fuse(original)
    assert original.SerializeToString() == before


def test_ir3_model_lists_new_initializers_as_inputs():
    # IR 3 (opset 8 era) requires every initializer to be a graph input as well.
    inits = [weight("W", 4, 3, 3, 3)] + bn_params("bn", 4)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
        + [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(original)
    fused, record = fuse(original)
    assert record.stats["fused"] == 1 and fused.ir_version == 3
    onnx.checker.check_model(fused)
    assert {t.name for t in fused.graph.initializer} <= {i.name for i in fused.graph.input}
    assert_same_outputs(original, fused, image(1, 3, 6, 6))


def test_overridable_weight_is_not_folded_and_stays_an_input():
    # From IR 4 on, an initializer listed as a graph input is a default the caller may replace at run time.
    inits = [weight("W", 3, 3, 1, 1), weight("V", 3, 3, 1, 1)] + bn_params("bn1", 3) + bn_params("bn2", 3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"]), bn_node("bn1", "c1", "b1"),
             helper.make_node("Conv", ["b1", "V"], ["c2"]), bn_node("bn2", "c2", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fused, record = fuse(original)
    assert record.stats == {"fused": 1, "skipped": 1, "fused:Conv": 1, "skipped:non-constant-weight": 1}
    assert [i.name for i in fused.graph.input] == ["x", "W"]
    assert "W" in {t.name for t in fused.graph.initializer}
    assert_same_outputs(original, fused, image(1, 3, 4, 4))
    other_w = {"W": RNG.normal(0, 1, (3, 3, 1, 1)).astype(np.float32)}
    assert_same_outputs(original, fused, {**image(1, 3, 4, 4), **other_w})


def test_new_names_do_not_collide_with_names_inside_subgraphs():
    def branch(value: float) -> onnx.GraphProto:
        constant = numpy_helper.from_array(np.full(4, value, np.float32), "v")
        return helper.make_graph([helper.make_node("Constant", [], ["c_fused_weight"], value=constant)], "branch",
                                 [], [helper.make_tensor_value_info("c_fused_weight", TensorProto.FLOAT, [4])])

    inits = [weight("W", 4, 3, 1, 1)] + bn_params("bn", 4)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y"),
         helper.make_node("If", ["flag"], ["z"], then_branch=branch(1.0), else_branch=branch(2.0))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])], initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(original)
    fused, record = fuse(original)
    assert record.stats["fused"] == 1
    assert_same_outputs(original, fused, {**image(1, 3, 4, 4), "flag": np.array(True)})
