"""cleanup: Identity, dead nodes, unused and duplicate initializers; outputs stay identical."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from onnxcomp.manager import PassManager
from onnxcomp.recipe import parse


def build(nodes, initializers, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 3]) for o in outputs],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def cleanup(model):
    cleaned, records = PassManager(parse("cleanup")).run(model)
    assert len(records) == 1, "cleanup is not run twice"
    return cleaned, records[0]


FEED = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_identity_dead_nodes_and_unused_initializers_are_removed():
    c = numpy_helper.from_array(np.ones(3, np.float32), "c")
    unused = numpy_helper.from_array(np.ones(100, np.float32), "unused")
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Add", ["i", "c"], ["y"]),
             helper.make_node("Relu", ["x"], ["dead"])]
    original = build(nodes, [c, unused])
    cleaned, record = cleanup(original)
    assert [n.op_type for n in cleaned.graph.node] == ["Add"]
    assert [t.name for t in cleaned.graph.initializer] == ["c"]
    assert record.stats["identity_removed"] == 1
    assert record.stats["dead_nodes_removed"] == 1
    assert record.stats["initializers_removed"] == 1
    np.testing.assert_array_equal(run_model(cleaned, FEED)[0], run_model(original, FEED)[0])


def test_identity_feeding_a_graph_output_keeps_the_output_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    cleaned, record = cleanup(build(nodes, []))
    assert [n.op_type for n in cleaned.graph.node] == ["Relu"]
    assert cleaned.graph.node[0].output[0] == "y"
    assert [o.name for o in cleaned.graph.output] == ["y"]
    assert record.stats["identity_removed"] == 1


def test_identity_from_graph_input_to_graph_output_is_kept():
    cleaned, record = cleanup(build([helper.make_node("Identity", ["x"], ["y"])], []))
    assert [n.op_type for n in cleaned.graph.node] == ["Identity"]
    assert not record.modified


def test_identity_between_two_graph_outputs_is_kept():
    """Letting Relu write y directly would take the graph output r away."""
    original = build([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])], [],
                     outputs=("r", "y"))
    cleaned, record = cleanup(original)
    assert [n.op_type for n in cleaned.graph.node] == ["Relu", "Identity"]
    assert not record.modified
    for got, expected in zip(run_model(cleaned, FEED), run_model(original, FEED)):
        np.testing.assert_array_equal(got, expected)


def test_identical_initializers_are_stored_once():
    a = numpy_helper.from_array(np.full(3, 2.0, np.float32), "a")
    b = numpy_helper.from_array(np.full(3, 2.0, np.float32), "b")
    other = numpy_helper.from_array(np.full(3, 2.0, np.float64).astype(np.float32) + 1, "other")
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "b"], ["n"]),
             helper.make_node("Add", ["n", "other"], ["y"])]
    original = build(nodes, [a, b, other])
    cleaned, record = cleanup(original)
    assert record.stats["duplicate_initializers_merged"] == 1
    assert record.stats["initializers_removed"] == 1
    assert sorted(t.name for t in cleaned.graph.initializer) == ["a", "other"]
    np.testing.assert_array_equal(run_model(cleaned, FEED)[0], run_model(original, FEED)[0])


def test_same_bytes_with_another_shape_are_not_merged():
    a = numpy_helper.from_array(np.ones(3, np.float32), "a")
    b = numpy_helper.from_array(np.ones((1, 3), np.float32), "b")
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "b"], ["y"])]
    cleaned, record = cleanup(build(nodes, [a, b]))
    assert record.stats["duplicate_initializers_merged"] == 0
    assert len(cleaned.graph.initializer) == 2


def test_cleanup_alone_removes_an_unused_initializer():
    unused = numpy_helper.from_array(np.ones(1000, np.float32), "unused")
    cleaned, record = cleanup(build([helper.make_node("Relu", ["x"], ["y"])], [unused]))
    assert record.modified and record.stats["initializers_removed"] == 1
    assert len(cleaned.graph.initializer) == 0


def test_clean_model_is_reported_unchanged():
    cleaned, record = cleanup(build([helper.make_node("Relu", ["x"], ["y"])], []))
    assert not record.modified
