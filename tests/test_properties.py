"""Property tests: randomly generated small valid graphs through the pipelines, random corruptions of a valid
model file through the command line.

Graphs are chains of Conv / BatchNormalization / Relu / residual Add / foldable constant subgraphs with a
Gemm, MatMul(+BatchNormalization) or no head, drawn by Hypothesis (seeded by its database, shrunk on failure).
What must hold:
  * the exact pipelines (the default, and each exact pass alone) keep the outputs within float tolerance;
  * every pass family, lossy ones included, exits 0, 1 or 2 through the command line — never 3 (a bug);
  * a corrupted model file (truncated, flipped bytes, raw_data shorter than the shape, a cycle, a missing
    input, wrong dtypes or dims) is refused with exit 2 and one line on stderr, the input untouched and no
    output written; flipped bytes may leave a still valid model, which then goes through (exit 0).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import assert_input_error, run_cli, run_model

OPSET = 17
EXACT_PIPELINES = ["fold-constants,flush-denormals,fuse-bn,cleanup", "fuse-bn", "fold-constants", "cleanup",
                   "equalize", "short-names", "flush-denormals"]
PASS_FAMILIES = ["prune", "share", "int8", "deep-compression", "prune:sparsity=0.7,encoding=dense",
                 "share:bits=3,per=tensor", "fuse-bn,int8:per-channel=false"]
# Each example costs a fresh interpreter where the CLI is run; these counts keep the file near 60 s.
# The explain phase re-runs a failing CLI case hundreds of times; the shrunk example says enough.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
GRAPHS = settings(max_examples=40, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])
CLI_RUNS = settings(max_examples=14, deadline=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class GraphBuilder:
    """Collects nodes and initializers for one random graph; `rng` draws the weights."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.initializers, self.count = rng, [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def weight(self, shape, scale: float = 0.5, positive: bool = False) -> str:
        values = self.rng.normal(0, scale, shape).astype(np.float32)
        if positive:
            values = np.abs(values) + np.float32(0.5)
        name = self.name("w")
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.name("n"), **attrs))
        return output


def _conv(b: GraphBuilder, x: str, channels: int, out: int, kernel: int, bias: bool,
          depthwise: bool) -> tuple[str, int]:
    group = channels if depthwise else 1
    out = channels if depthwise else out
    inputs = [x, b.weight((out, channels // group, kernel, kernel))] + ([b.weight((out,))] if bias else [])
    return b.node("Conv", inputs, kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4, group=group), out


def _batchnorm(b: GraphBuilder, x: str, channels: int) -> str:
    params = [b.weight((channels,), positive=True), b.weight((channels,)), b.weight((channels,), 0.2),
              b.weight((channels,), positive=True)]
    return b.node("BatchNormalization", [x, *params], epsilon=1e-5)


def _constant_subgraph(b: GraphBuilder, x: str, channels: int) -> str:
    """x + Constant·Constant: a subgraph fold-constants evaluates once."""
    first = b.node("Constant", [], value=numpy_helper.from_array(
        b.rng.normal(0, 1, (channels, 1, 1)).astype(np.float32)))
    second = b.node("Constant", [], value=numpy_helper.from_array(np.float32(b.rng.uniform(0.5, 2))))
    return b.node("Add", [x, b.node("Mul", [first, second])])


@st.composite
def graphs(draw) -> onnx.ModelProto:
    """A valid model: x [N, C, S, S] → blocks → head → y."""
    b = GraphBuilder(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    channels, size = draw(st.integers(1, 4)), draw(st.integers(3, 5))
    current, seen, in_channels = "x", {channels: ["x"]}, channels
    for kind in draw(st.lists(st.sampled_from(["conv", "conv-bn", "bn", "relu", "residual", "constant"]),
                              min_size=1, max_size=6)):
        if kind in ("conv", "conv-bn"):
            current, channels = _conv(b, current, channels, draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])),
                                      draw(st.booleans()), draw(st.booleans()))
            if kind == "conv-bn":
                current = _batchnorm(b, current, channels)
        elif kind == "bn":
            current = _batchnorm(b, current, channels)
        elif kind == "relu":
            current = b.node("Relu", [current])
        elif kind == "residual" and seen.get(channels):
            current = b.node("Add", [current, draw(st.sampled_from(seen[channels]))])
        elif kind == "constant":
            current = _constant_subgraph(b, current, channels)
        seen.setdefault(channels, []).append(current)
    head = draw(st.sampled_from(["gemm", "matmul", "matmul-bn", "none"]))
    features, out_shape = channels * size * size, ["N", channels, size, size]
    if head != "none":
        flat = b.node("Flatten", [current], axis=1)
        classes = draw(st.integers(1, 5))
        if head == "gemm":
            trans = draw(st.integers(0, 1))
            weight = b.weight((classes, features) if trans else (features, classes))
            current = b.node("Gemm", [flat, weight, b.weight((classes,))], transB=trans)
        else:
            current = b.node("MatMul", [flat, b.weight((features, classes))])
            if head == "matmul-bn":
                current = _batchnorm(b, current, classes)
        out_shape = ["N", classes]
    b.nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", in_channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feed(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(1).normal(0, 1, (batch, *dims)).astype(np.float32)}


# ------------------------------------------------------------------------------------------- exact pipelines


@GRAPHS
@given(model=graphs(), passes=st.sampled_from(EXACT_PIPELINES))
def test_exact_pipelines_keep_the_outputs(model, passes):
    optimized, _ = onnxcomp.optimize(model, passes, validate_result=False)
    onnx.checker.check_model(optimized)
    feed = _feed(model)
    (expected,), (actual,) = run_model(model, feed), run_model(optimized, feed)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------- every family, CLI codes


@CLI_RUNS
@given(model=graphs(), passes=st.sampled_from(PASS_FAMILIES + EXACT_PIPELINES[:1]))
def test_every_pass_family_exits_0_1_or_2_never_3(tmp_path_factory, model, passes):
    folder = tmp_path_factory.mktemp("family")
    source, output = folder / "model.onnx", folder / "out.onnx"
    source.write_bytes(model.SerializeToString())
    result = run_cli("optimize", source, "-o", output, "--passes", passes, "--calib-data", "random",
                     "--runs", "0", "--limit", "8")
    assert result.returncode in (0, 1, 2), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert source.read_bytes() == model.SerializeToString()
    if result.returncode == 2:
        assert_input_error(result)
        assert not output.exists()
    else:
        (produced,) = run_model(output, _feed(model))
        assert np.isfinite(produced).all()


# --------------------------------------------------------------------------------------- corrupted model files


def _truncate(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    return data[:draw(st.integers(0, len(data) - 1))]


def _short_raw_data(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
    tensor.raw_data = tensor.raw_data[:draw(st.integers(0, len(tensor.raw_data) - 1))]
    return model.SerializeToString()


def _cycle(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    """The first node that reads the graph input reads the last node's output instead."""
    first = next(node for node in model.graph.node if "x" in node.input)
    first.input[list(first.input).index("x")] = model.graph.node[-1].output[0]
    return model.SerializeToString()


def _missing_input(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    del model.graph.input[:]
    model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1]))
    return model.SerializeToString()


def _wrong_input_dtype(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    model.graph.input[0].type.tensor_type.elem_type = draw(st.sampled_from([TensorProto.INT64, TensorProto.STRING,
                                                                            TensorProto.BOOL]))
    return model.SerializeToString()


def _wrong_weight_dtype(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    """A weight declared int32: Conv / Gemm / MatMul / BatchNormalization take no int32 beside a float input."""
    tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
    tensor.data_type = TensorProto.INT32
    return model.SerializeToString()


def _wrong_weight_dims(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    """A weight's dims say more values than its raw data holds."""
    tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
    tensor.dims[0] += draw(st.integers(1, 3))
    return model.SerializeToString()


def _flip_bytes(data: bytes, model: onnx.ModelProto, draw) -> bytes:
    flipped = bytearray(data)
    for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
        flipped[position] ^= draw(st.integers(1, 255))
    return bytes(flipped)


CORRUPTIONS = {"truncated": _truncate, "short-raw-data": _short_raw_data, "cycle": _cycle,
               "missing-input": _missing_input, "wrong-input-dtype": _wrong_input_dtype,
               "wrong-weight-dtype": _wrong_weight_dtype, "wrong-weight-dims": _wrong_weight_dims,
               "flipped-bytes": _flip_bytes}


def _with_weights(model: onnx.ModelProto) -> bool:
    return len(model.graph.initializer) > 0


@CLI_RUNS
@given(model=graphs().filter(_with_weights), kind=st.sampled_from(sorted(CORRUPTIONS)), draw=st.data())
def test_corrupted_model_files_are_one_line_input_errors(tmp_path_factory, model, kind, draw):
    folder = tmp_path_factory.mktemp("corrupt")
    data = CORRUPTIONS[kind](model.SerializeToString(), _copy(model), lambda strategy: draw.draw(strategy))
    source, output = folder / "model.onnx", folder / "out.onnx"
    source.write_bytes(data)
    result = run_cli("optimize", source, "-o", output, "--runs", "0", "--limit", "4")
    assert source.read_bytes() == data
    if kind == "flipped-bytes" and result.returncode == 0:
        return  # the flips left a valid model (a weight's bits, a name): it is optimized like any other
    assert_input_error(result)
    assert sorted(os.listdir(folder)) == ["model.onnx"], "an output or temporary file was left"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_the_generator_covers_every_block_kind():
    """The strategies above reach each operator the pipelines handle (a guard against a generator that
    silently stops producing some case)."""
    seen: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(model=graphs())
    def collect(model):
        seen.update(node.op_type for node in model.graph.node)

    collect()
    assert {"Conv", "BatchNormalization", "Relu", "Add", "Gemm", "MatMul", "Constant", "Mul"} <= seen


# ------------------------------------------------------------------------ the defects these properties found


def _matmul_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def assert_refused_before_writing(folder, data: bytes, *keywords: str) -> None:
    """`data` as a model file in `folder`: optimize refuses it in one line, before any pass writes an output."""
    source = folder / "model.onnx"
    source.write_bytes(data)
    result = run_cli("optimize", source, "-o", folder / "out.onnx", "--runs", "0")
    assert_input_error(result, *keywords)
    assert sorted(os.listdir(folder)) == ["model.onnx"]


def test_a_name_that_is_not_utf8_is_an_input_error(tmp_path):
    """A flipped byte inside a name: protobuf hands it over as bytes, and the first pass to copy it crashed."""
    model = _matmul_model()
    model.producer_name = "ABCDEFGH"
    data = model.SerializeToString().replace(b"ABCDEFGH", b"AB\xadDEFGH")
    assert_refused_before_writing(tmp_path, data, "UTF-8")


def test_a_type_error_is_refused_before_any_pass_writes(tmp_path):
    """An int64 input into MatMul with a float weight passes the plain checker; it was optimized and written,
    and only validation refused it."""
    model = _matmul_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    assert_refused_before_writing(tmp_path, model.SerializeToString(), "not valid ONNX", "type")


def test_a_shape_error_is_refused_before_any_pass_writes(tmp_path):
    """[N, 4] times a [5, 4] weight: the plain checker and lenient shape inference let it through."""
    model = _matmul_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((5, 4), np.float32), "w"))
    assert_refused_before_writing(tmp_path, model.SerializeToString(), "not valid ONNX", "Incompatible dimensions")


def test_a_type_no_kernel_takes_is_refused_before_any_pass_writes(tmp_path):
    """Sigmoid of int64, cast to float: the types agree from node to node; only the operator's type constraints
    (shape inference's type check) refuse it."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    assert_refused_before_writing(tmp_path, model.SerializeToString(), "not valid ONNX", "unsupported type")


@GRAPHS
@given(model=graphs(), passes=st.sampled_from(["short-names", "fuse-bn,short-names", "cleanup"]))
def test_the_input_model_is_never_changed(model, passes):
    """The passes read the input's weights in place (no copy of the model): renaming or replacing them must
    leave the caller's model as it was, byte for byte."""
    before = model.SerializeToString()
    onnxcomp.optimize(model, passes, validate_result=False)
    assert model.SerializeToString() == before


def test_a_large_initializer_with_short_raw_data_is_an_input_error(tmp_path):
    """Large weights are checked apart from onnx.checker, which reads the model without them."""
    model = _matmul_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 512), np.float32), "w"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 512
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:4096]
    assert_refused_before_writing(tmp_path, model.SerializeToString(), "not valid ONNX", "raw_data size")
