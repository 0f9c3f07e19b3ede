"""fp16: half-precision weights and arithmetic with float32 islands, checked through ONNX Runtime.

Most graphs are converted with provider=cuda, whose half kernels cover the arithmetic, and run on ORT's CPU
provider. It wraps each half node lacking a CPU kernel in casts to float32 and drops the cast pairs between two
such nodes (and runs a lone half node in float32 too), so values are rounded to half only where two nodes with
CPU half kernels (Max → Min) follow each other: the overflow tests put such a pair there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import assert_input_error, optimized_ops, run_cli, run_model

OPSET = [helper.make_opsetid("", 17)]
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    return model


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _weight(name, shape, scale=1.0):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def mlp() -> onnx.ModelProto:
    """x [N, 16] → MatMul → Add → Relu → MatMul → Add → y [N, 8]."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    weights = [_weight("W1", (16, 128), 0.25), _weight("b1", (128,)), _weight("W2", (128, 8), 0.1),
               _weight("b2", (8,))]
    return _model(nodes, [_float("x", ["N", 16])], [_float("y", ["N", 8])], weights)


def _optimize(model, recipe: str, calib: dict | None):
    optimized, report = onnxcomp.optimize(model, recipe, calib_data=calib, validate_result=False)
    return optimized, report.passes[0].stats


def _types(model: onnx.ModelProto) -> tuple[list[int], list[int]]:
    return ([v.type.tensor_type.elem_type for v in model.graph.input],
            [v.type.tensor_type.elem_type for v in model.graph.output])


def test_half_conversion_keeps_outputs_close_and_halves_the_weights():
    x = RNG.standard_normal((64, 16)).astype(np.float32)
    model = mlp()
    optimized, stats = _optimize(model, "fp16:provider=cuda", {"x": x})
    expected, = run_model(model, {"x": x})
    got, = run_model(optimized, {"x": x})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2 * np.abs(expected).max())
    assert stats["half_nodes"] == 5 and stats["activation_casts"] == 2  # one cast in, one out
    weights = {t.name: t.data_type for t in optimized.graph.initializer}
    assert set(weights.values()) == {TensorProto.FLOAT16}, weights
    assert optimized.ByteSize() < 0.55 * model.ByteSize()


def test_cpu_keeps_arithmetic_in_float32_and_stores_weights_in_half(tmp_path):
    """ORT 1.32's CPU provider has no half MatMul or Add: they stay float32 and read their weights through a
    Cast from float16, which ORT folds when it creates the session: the file halves, the graph it runs has no
    Cast left, and the outputs differ only by the weights' rounding."""
    x = RNG.standard_normal((32, 16)).astype(np.float32)
    model = mlp()
    optimized, stats = _optimize(model, "fp16", {"x": x})
    assert stats["half_nodes"] == 0 and stats["float32:no-kernel"] == 5
    assert all(t.data_type == TensorProto.FLOAT16 for t in optimized.graph.initializer if t.name.startswith("W"))
    expected, = run_model(model, {"x": x})
    got, = run_model(optimized, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-3 * np.abs(expected).max())
    assert optimized_ops(optimized, tmp_path)[1]["Cast"] == 0


def test_weights_in_constant_nodes_are_stored_in_half_too():
    weight = numpy_helper.from_array(RNG.standard_normal((16, 8)).astype(np.float32), "Wv")
    nodes = [helper.make_node("Constant", [], ["W"], value=weight), helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = _model(nodes, [_float("x", ["N", 16])], [_float("y", ["N", 8])])
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    optimized, stats = _optimize(model, "fp16", {"x": x})
    constant = next(node for node in optimized.graph.node if node.op_type == "Constant")
    assert constant.attribute[0].t.data_type == TensorProto.FLOAT16 and stats["weight_casts"] == 1
    expected, = run_model(model, {"x": x})
    np.testing.assert_allclose(run_model(optimized, {"x": x})[0], expected, rtol=0, atol=5e-3 * np.abs(expected).max())


def test_cpu_half_nodes_all_have_cpu_kernels(tmp_path):
    """What the pass leaves in half on the CPU provider runs there without the casts ORT inserts around
    nodes lacking a half kernel: the Cast count ORT runs equals the pass's own."""
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("Clip", ["n", "lo", "hi"], ["c"]), helper.make_node("Max", ["c", "x"], ["m"]),
             helper.make_node("Transpose", ["m"], ["t"], perm=[1, 0]), helper.make_node("MatMul", ["t", "W"], ["y"])]
    weights = [_weight("g", (16,)), _weight("b", (16,)), numpy_helper.from_array(np.float32(-1.0), "lo"),
               numpy_helper.from_array(np.float32(1.0), "hi"), _weight("W", (8, 4))]
    model = _model(nodes, [_float("x", [8, 16])], [_float("y", [16, 4])], weights)
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    optimized, stats = _optimize(model, "fp16", {"x": x})
    assert stats["half_nodes"] == 4, stats  # LayerNormalization, Clip, Max, Transpose; MatMul has no CPU kernel
    ours = sum(node.op_type == "Cast" for node in optimized.graph.node)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(optimized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert sum(node.op_type == "Cast" for node in onnx.load(tmp_path / "ort.onnx").graph.node) == ours


def overflow_model() -> onnx.ModelProto:
    """x → Mul(1e4) → Max, Min (of itself) → Div(1e4) → y = x: the products reach 1e5, beyond float16's 65504."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"]), helper.make_node("Max", ["big", "big"], ["same"]),
             helper.make_node("Min", ["same", "same"], ["bigger"]), helper.make_node("Div", ["bigger", "k"], ["y"])]
    return _model(nodes, [_float("x", ["N", 4])], [_float("y", ["N", 4])],
                  [numpy_helper.from_array(np.full((4,), 1e4, np.float32), "k")])


def test_tensor_whose_range_exceeds_float16_stays_float32():
    x = RNG.uniform(1, 10, (16, 4)).astype(np.float32)
    model = overflow_model()
    naive = onnx.ModelProto()
    naive.CopyFrom(model)
    for value in list(naive.graph.input) + list(naive.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    naive.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4,), 1e4, np.float16), "k"))
    assert not np.isfinite(run_model(naive, {"x": x.astype(np.float16)})[0]).all()
    optimized, stats = _optimize(model, "fp16:provider=cuda", {"x": x})
    got, = run_model(optimized, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, x, rtol=1e-6)
    assert stats["float32:range"] == 4 and stats["half_nodes"] == 0


def test_model_inputs_and_outputs_keep_float32_unless_io_half():
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    model = mlp()
    kept, _ = _optimize(model, "fp16:provider=cuda", {"x": x})
    assert _types(kept) == ([TensorProto.FLOAT], [TensorProto.FLOAT])
    half, _ = _optimize(model, "fp16:provider=cuda,io=half", {"x": x})
    assert _types(half) == ([TensorProto.FLOAT16], [TensorProto.FLOAT16])
    assert [v.name for v in half.graph.input] == ["x"] and [v.name for v in half.graph.output] == ["y"]
    got, = run_model(half, {"x": x.astype(np.float16)})
    expected, = run_model(model, {"x": x})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def if_model(inner_scale: float) -> onnx.ModelProto:
    """y = cond ? min(max(x·W·s))/s : x − 1 (= x·W or x − 1), with W and the scale s inside the then-branch."""
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["p"]), helper.make_node("Mul", ["p", "s"], ["q"]),
         helper.make_node("Max", ["q", "q"], ["m"]), helper.make_node("Min", ["m", "m"], ["n"]),
         helper.make_node("Div", ["n", "s"], ["t"])],
        "then", [], [_float("t", ["N", 4])],
        [_weight("W", (4, 4)), numpy_helper.from_array(np.float32(inner_scale), "s")])
    else_branch = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e"])], "else", [],
                                    [_float("e", ["N", 4])], [numpy_helper.from_array(np.float32(1.0), "one")])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    return _model(nodes, [_float("x", ["N", 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                  [_float("y", ["N", 4])])


def _then_branch(model: onnx.ModelProto) -> onnx.GraphProto:
    return next(a.g for node in model.graph.node if node.op_type == "If" for a in node.attribute
                if a.name == "then_branch")


def test_if_subgraph_is_converted():
    x = RNG.standard_normal((8, 4)).astype(np.float32)
    model = if_model(2.0)
    feed = {"x": x, "cond": np.array(True)}
    optimized, stats = _optimize(model, "fp16:provider=cuda", feed)
    branch = _then_branch(optimized)
    assert {t.name: t.data_type for t in branch.initializer}["W_half"] == TensorProto.FLOAT16
    assert any(node.op_type == "Cast" for node in branch.node)
    assert stats["half_nodes"] >= 3
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run_model(optimized, feed)[0], run_model(model, feed)[0], rtol=0, atol=2e-2)


def test_loop_body_is_converted():
    """v ← tanh(v·W) three times; the body reads W from the outer graph and keeps float32 at its borders."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v", "W"], ["p"]), helper.make_node("Tanh", ["p"], ["v_next"]),
         helper.make_node("Identity", ["cond"], ["cond_next"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []), _float("v", ["N", 64])],
        [helper.make_tensor_value_info("cond_next", TensorProto.BOOL, []), _float("v_next", ["N", 64])])
    model = _model([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)], [_float("x", ["N", 64])],
                   [_float("y", ["N", 64])],
                   [_weight("W", (64, 64), 0.2), numpy_helper.from_array(np.array(3, np.int64), "trips")])
    x = RNG.standard_normal((8, 64)).astype(np.float32)
    optimized, stats = _optimize(model, "fp16:provider=cuda", {"x": x})
    loop = next(node for node in optimized.graph.node if node.op_type == "Loop")
    inner = [node.op_type for node in loop.attribute[0].g.node]
    assert stats["half:MatMul"] == 1 and stats["half:Tanh"] == 1 and inner.count("Cast") == 2, inner
    weights = {t.name: t.data_type for t in list(optimized.graph.initializer) + list(loop.attribute[0].g.initializer)}
    assert weights.get("W_half") == TensorProto.FLOAT16 and "W" not in weights, weights
    np.testing.assert_allclose(run_model(optimized, {"x": x})[0], run_model(model, {"x": x})[0], rtol=0, atol=1e-2)


def test_subgraph_that_overflows_in_half_goes_back_to_float32():
    """Inside a branch ranges cannot be fetched: the converted model is run again, and a branch whose output
    turns infinite in half is converted back."""
    x = RNG.standard_normal((8, 4)).astype(np.float32)
    model = if_model(3e4)  # representable in float16, but x·W·s is not
    feed = {"x": x, "cond": np.array(True)}
    optimized, stats = _optimize(model, "fp16:provider=cuda", feed)
    assert stats["float32_subgraphs"] == "y"
    got, = run_model(optimized, feed)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run_model(model, feed)[0], rtol=1e-2, atol=1e-2)


def test_without_calibration_data_the_stats_say_random_inputs():
    fixed = mlp()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    _, stats = _optimize(fixed, "fp16:provider=cuda", None)
    assert stats["ranges_from"] == "random inputs" and "random" in stats["warning_data"]


def test_bfloat16_for_cuda_is_a_valid_model_with_bfloat16_precision():
    """ORT's CPU provider has no bfloat16 arithmetic, so the model is checked with ONNX's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    x = RNG.standard_normal((8, 16)).astype(np.float32)
    model = mlp()
    optimized, stats = _optimize(model, "fp16:type=bfloat16,provider=cuda", {"x": x})
    onnx.checker.check_model(optimized, full_check=True)
    assert stats["half_nodes"] == 5
    assert {t.data_type for t in optimized.graph.initializer} == {TensorProto.BFLOAT16}
    expected, = run_model(model, {"x": x})
    got, = ReferenceEvaluator(optimized).run(None, {"x": x})
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-4 < error < 2e-2  # bfloat16 keeps 8 significant bits: about 0.4 % per rounding


# ---------------------------------------------------------------------------------------------- command line


def _check_rejected(folder: Path, passes: str, *keywords: str) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = run_cli("optimize", folder / "model.onnx", "--passes", passes, "-o", folder / "out.onnx")
    assert_input_error(result, *keywords)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("passes, keywords", [
    ("fp16:type=float8", ("type", "float16", "bfloat16")),
    ("fp16:io=double", ("io", "float or half")),
    ("fp16:provider=tpu", ("provider", "cpu or cuda")),
    ("fp16:headroom=0.5", ("headroom",)),
    ("fp16:type=bfloat16", ("bfloat16", "cpu", "kernels")),
])
def test_bad_options_exit_2(tmp_path, passes, keywords):
    onnx.save(mlp(), tmp_path / "model.onnx")
    _check_rejected(tmp_path, passes, *keywords)


def test_model_without_float_weights_exits_2(tmp_path):
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    model = _model([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], [ids], [_float("y", ["N", 4])])
    onnx.save(model, tmp_path / "model.onnx")
    _check_rejected(tmp_path, "fp16", "no float32 weights")


# ------------------------------------------------------------------------------------------------ real models


@pytest.mark.assets
def test_minilm_embeddings_stay_within_cosine_0_9999_in_half_the_file(assets, tmp_path):
    from onnxcomp import data as datasets
    from onnxcomp.runner import Runner

    model, tokenizer = assets / "zoo/paraphrase_minilm_l3.onnx", assets / "zoo/bert_uncased_tokenizer.json"
    rows = (assets / "data/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    calib, evaluate = tmp_path / "calib.tsv", tmp_path / "eval.tsv"
    calib.write_text("\n".join(rows[:16]) + "\n", encoding="utf-8")
    evaluate.write_text("\n".join(rows[4200:4232]) + "\n", encoding="utf-8")
    out = tmp_path / "fp16.onnx"
    onnxcomp.optimize(model, "fp16", calib_data=calib, tokenizer=tokenizer, output=out, validate_result=False)
    graph = onnx.load(model)
    embedding = next(o.name for o in graph.graph.output  # the sentence embedding [N, 384]
                     if datasets.value_type(o) == "float32" and len(datasets.value_dims(o)) == 2)
    data = datasets.open_data(evaluate, graph, tokenizer=tokenizer)
    expected = Runner(str(model)).stacked(data, output=embedding).astype(np.float64)
    got = Runner(str(out)).stacked(data, output=embedding).astype(np.float64)
    assert np.isfinite(got).all()
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.mean() >= 0.9999
    assert out.stat().st_size <= 0.51 * model.stat().st_size


def test_fp16_stores_a_weight_of_zeros_and_ones_in_half():
    """passes/fp16.py: `values[values != 0]` → `values[values != 1]`: the non-zero values that decide whether a
    weight survives half precision became the zeros, and a 0/1 weight stayed float32."""
    mask = numpy_helper.from_array(RNG.integers(0, 2, (16, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [mask])
    optimized, _ = onnxcomp.optimize(helper.make_model(graph, opset_imports=OPSET, ir_version=8), "fp16",
                                     validate_result=False)
    assert [t.data_type for t in optimized.graph.initializer] == [TensorProto.FLOAT16]


def test_fp16_keeps_max_pool_indices_int64_in_a_half_max_pool():
    """passes/fp16.py: the formal parameter of an output past the schema's last was read one too early, and
    MaxPool's Indices (type I) were given the half type of its Y (type T)."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["doubled"]),
             helper.make_node("MaxPool", ["doubled"], ["y", "indices"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2]),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 2, 2, 2])],
                              [numpy_helper.from_array(np.full((1, 2, 1, 1), 2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    optimized, report = onnxcomp.optimize(model, "fp16:provider=cuda", validate_result=False)
    onnx.checker.check_model(optimized, full_check=True)
    assert report.passes[0].stats["half_nodes"] == 2
    x = RNG.permutation(32).reshape(1, 2, 4, 4).astype(np.float32)  # whole numbers: exact in half, no ties
    np.testing.assert_array_equal(run_model(optimized, {"x": x})[1], run_model(model, {"x": x})[1])
