"""short-names: smaller files with the same outputs; inputs, outputs and subgraph scopes untouched."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from test_prune import images, net, run


def test_short_names_shrink_the_file_and_keep_outputs_inputs_and_outputs():
    shared, _ = run(net(), "prune:sparsity=0.5,share:bits=4")
    short, records = run(shared, "short-names")
    feed = {"x": images(4, seed=1)}
    np.testing.assert_array_equal(run_model(short, feed)[0], run_model(shared, feed)[0])
    assert [v.name for v in short.graph.input] == [v.name for v in shared.graph.input]
    assert [v.name for v in short.graph.output] == [v.name for v in shared.graph.output]
    assert all(len(t.name) <= 2 for t in short.graph.initializer)
    assert not any(node.name for node in short.graph.node)
    stats = records[0].stats
    assert stats["name_characters_after"] < stats["name_characters_before"]
    assert short.ByteSize() < shared.ByteSize() - (stats["name_characters_before"] - stats["name_characters_after"])
    onnx.checker.check_model(short, full_check=True)


def test_names_inside_subgraphs_are_neither_renamed_nor_reused():
    """The If's branches read the outer tensor `scaled` by name and define `0`, `1` of their own: the outer
    tensor follows its new name into the branches, and the branches' names are not given out again."""
    def branch(name: str, factor: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["scaled", "0"], ["1"])], name, [],
            [helper.make_tensor_value_info("1", TensorProto.FLOAT, [2])],
            [numpy_helper.from_array(np.array(factor, np.float32), "0")])

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["scaled"], name="double"),
         helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch("then", 3.0),
                          else_branch=branch("else", -1.0))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    short, _ = run(model, "short-names")
    onnx.checker.check_model(short, full_check=True)
    names = {t.name for t in short.graph.initializer} | {o for n in short.graph.node for o in n.output}
    assert not names & {"0", "1"} and "scaled" not in names and "two" not in names
    x = np.array([1.0, -2.0], np.float32)
    for flag, factor in ((True, 6.0), (False, -2.0)):
        (y,) = run_model(short, {"x": x, "flag": np.array(flag)})
        np.testing.assert_array_equal(y, x * factor)
