"""equalize: exact in float, balances channel ranges, and helps per-tensor int8."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import run_model
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import PassContext
from onnxcomp.recipe import parse


def chain(activation: str | None = "Relu", depthwise: bool = False, share: bool = False) -> onnx.ModelProto:
    """Conv(W1, b1) → [activation] → Conv(W2) with channel ranges that differ by orders of magnitude."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (6, 3, 3, 3)) * np.logspace(-2, 1, 6)[:, None, None, None]
    w2 = rng.normal(0, 1, (6, 1, 3, 3) if depthwise else (4, 6, 1, 1))
    inits = [numpy_helper.from_array(w1.astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "B1"),
             numpy_helper.from_array(w2.astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="first", pads=[1, 1, 1, 1])]
    source = "a"
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["a"], ["r"]))
        source = "r"
    elif activation == "Clip":
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["r"]))
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        source = "r"
    nodes.append(helper.make_node("Conv", [source, "W2"], ["y"], name="second",
                                  **({"group": 6, "pads": [1, 1, 1, 1]} if depthwise else {})))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if share:  # W1 read by a second convolution too
        nodes.append(helper.make_node("Conv", ["x", "W1"], ["z"], name="other", pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


X = {"x": np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}


def equalize(model):
    out, records = PassManager(parse("equalize")).run(model)
    return out, records[0]


def channel_ranges(model, name):
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == name)
    w = weights[node.input[1]]
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def test_exact_in_float_and_balances_ranges():
    for depthwise in (False, True):
        original = chain(depthwise=depthwise)
        equalized, record = equalize(original)
        assert record.stats["pairs"] == 1
        expected, actual = run_model(original, X)[0], run_model(equalized, X)[0]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        before, after = channel_ranges(original, "first"), channel_ranges(equalized, "first")
        assert after.max() / after.min() < (before.max() / before.min()) / 10


def test_clip_and_shared_weights_are_left_alone():
    for model in (chain(activation="Clip"), chain(share=True)):
        equalized, record = equalize(model)
        assert not record.modified and record.stats["pairs"] == 0


def test_equalization_helps_per_tensor_int8():
    original = chain()
    x = {"x": np.random.default_rng(2).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)}

    def error(recipe):
        ctx = PassContext(calibration_data=onnxcomp.data.open_data(x, original))
        quantized, _ = PassManager(parse(recipe)).run(original, ctx)
        expected = run_model(original, x)[0]
        return np.mean((run_model(quantized, x)[0] - expected) ** 2)

    assert error("equalize,int8:per-channel=false") < error("int8:per-channel=false") / 2
