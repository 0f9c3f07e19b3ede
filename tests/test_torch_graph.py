"""ONNX graphs run by torch (onnxcomp.torch_graph): the same outputs as ONNX Runtime, trainable weights by their
ONNX names, and trained weights written back into the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model

torch = pytest.importorskip("torch")
from onnxcomp.errors import InputError  # noqa: E402
from onnxcomp.torch_graph import OnnxModule, with_weights  # noqa: E402

RNG = np.random.default_rng(0)


def one_node_model(node: onnx.NodeProto, x_shape: list[int], inits: dict[str, np.ndarray], opset: int = 13):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check_against_ort(model: onnx.ModelProto, x: np.ndarray, tolerance: float = 1e-5) -> None:
    with torch.no_grad():
        ours = OnnxModule(model)(torch.from_numpy(x))[0].numpy()
    expected = run_model(model, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance)


def f32(*shape) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


CASES = {
    "conv asymmetric pads, strides, groups": (
        helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1], group=2),
        [2, 4, 9, 9], {"W": f32(6, 2, 3, 3), "B": f32(6)}),
    "conv SAME_UPPER strided": (
        helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2]),
        [1, 3, 10, 11], {"W": f32(4, 3, 3, 3)}),
    "conv transpose": (
        helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1]), [1, 4, 5, 5], {"W": f32(4, 3, 3, 3), "B": f32(3)}),
    "gemm transA transB alpha beta": (
        helper.make_node("Gemm", ["x", "W", "B"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0),
        [6, 3], {"W": f32(5, 6), "B": f32(5)}),
    "matmul 3-D": (helper.make_node("MatMul", ["x", "W"], ["y"]), [2, 3, 4], {"W": f32(4, 5)}),
    "max pool with pads, ceil": (
        helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0],
                         ceil_mode=1), [1, 2, 8, 7], {}),
    "average pool excluding pads": (
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), [1, 2, 6, 6], {}),
    "average pool including pads": (
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1),
        [1, 2, 5, 5], {}),
    "clip as relu6": (helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), [2, 8],
                      {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}),
    "reshape with 0 and -1": (helper.make_node("Reshape", ["x", "s"], ["y"]), [2, 3, 4],
                              {"s": np.array([0, -1], np.int64)}),
    "slice with steps": (helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"]), [2, 8, 6],
                         {"st": np.array([1, 0], np.int64), "en": np.array([100, -1], np.int64),
                          "ax": np.array([1, 2], np.int64), "sp": np.array([2, 1], np.int64)}),
    "pad constant": (helper.make_node("Pad", ["x", "p", "v"], ["y"], mode="constant"), [1, 2, 3, 3],
                     {"p": np.array([0, 1, 0, 2, 0, 0, 1, 1], np.int64), "v": np.array(0.5, np.float32)}),
    "flatten axis 2": (helper.make_node("Flatten", ["x"], ["y"], axis=2), [2, 3, 4, 5], {}),
    "transpose": (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1]), [2, 3, 4], {}),
    "softmax": (helper.make_node("Softmax", ["x"], ["y"], axis=1), [3, 7], {}),
    "unsqueeze then squeeze": (helper.make_node("Unsqueeze", ["x", "a"], ["y"]), [3, 4],
                               {"a": np.array([0, -1], np.int64)}),
    "batchnorm inference": (helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3),
                            [2, 3, 4, 4], {"g": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_operators_match_onnx_runtime(case):
    node, shape, inits = CASES[case]
    check_against_ort(one_node_model(node, shape, inits), f32(*shape))


def test_digits_model_matches_and_its_weights_train_and_go_back(digits_model):
    model = onnx.load(digits_model)
    x = np.load(digits_model.parent / "digits_test.npz")["input"][:16]
    check_against_ort(model, x)
    module = OnnxModule(model)
    assert all(name in {t.name for t in model.graph.initializer} for name in module.trainable_names)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.from_numpy(x))[0].square().mean().backward()
    optimizer.step()
    trained = with_weights(model, module.weights())
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(run_model(trained, {"input": x})[0], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(run_model(model, {"input": x})[0], expected, atol=1e-3)
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in model.graph.node]


def test_unsupported_operators_are_named():
    model = one_node_model(helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i"), [2, 3], {})
    with pytest.raises(InputError, match="Einsum"):
        OnnxModule(model)


@pytest.mark.parametrize("name,shape", [("resnet20_cifar10", [4, 3, 32, 32]),
                                        ("efficientnet_lite0_imagenet", [2, 3, 224, 224])])
def test_shared_real_models_match_onnx_runtime(assets, name, shape):
    check_against_ort(onnx.load(str(assets / f"models/{name}.onnx")), f32(*shape), tolerance=1e-4)
