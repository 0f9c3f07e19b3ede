"""Models as third parties ship them: free dimensions, token ids, masks, scalars, state inputs, several outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcomp
from helpers import assert_input_error, run_cli
from onnxcomp import data as datasets
from onnxcomp.validate import validate


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, path)
    return str(path)


def image_model() -> onnx.ModelProto:
    """Conv over an image of free height and width: [N, 3, H, W] → [N, 2, H, W]."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.linspace(-1, 1, 6).tolist())
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def token_model(rows: int = 5) -> onnx.ModelProto:
    """Embedding lookup of token ids, masked: out = Gather(table, ids) · mask; also passes the ids through."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [rows, 4], np.arange(rows * 4, dtype=np.float32))
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
             helper.make_node("Mul", ["embedded", "mask3"], ["hidden"]),
             helper.make_node("Identity", ["input_ids"], ["ids_out"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table, helper.make_tensor("axis", TensorProto.INT64, [1], [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def stateful_model() -> onnx.ModelProto:
    """A VAD-like cell: out = x·sum(state) scaled by (rate == 16000); inputs x [N, 4], state [2, N, 3], rate ()."""
    nodes = [helper.make_node("ReduceSum", ["state", "axes"], ["total"], keepdims=0),
             helper.make_node("Transpose", ["total"], ["total_t"], perm=[1, 0]),
             helper.make_node("ReduceSum", ["total_t", "one"], ["per_sample"], keepdims=1),
             helper.make_node("Mul", ["x", "per_sample"], ["y0"]),
             helper.make_node("Equal", ["rate", "sixteen_k"], ["is16k"]),
             helper.make_node("Cast", ["is16k"], ["gate"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y0", "gate"], ["y"]),
             helper.make_node("Identity", ["state"], ["state_out"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 3]),
         helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, None, 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [0]),
         helper.make_tensor("sixteen_k", TensorProto.INT64, [], [16000])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_optimize_without_shapes_writes_the_model_and_says_why_it_was_not_validated(tmp_path):
    model = save(image_model(), tmp_path / "m.onnx")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx").exists()
    assert "pass" in result.stdout and "fuse-bn" in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("validation skipped")]
    assert len(skipped) == 1 and "H, W" in skipped[0] and "--input-shape x:1,3,?,?" in skipped[0]


def test_input_shape_fixes_free_dimensions_for_validation(tmp_path):
    model = save(image_model(), tmp_path / "m.onnx")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--input-shape", "x:2,3,8,6", "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert "validation on random" in result.stdout and "validation skipped" not in result.stdout
    check = run_cli("validate", model, tmp_path / "out.onnx", "--input-shape", "x:1,3,5,5", "--runs", "0")
    assert check.returncode == 0 and "samples" in check.stdout, check.stderr


def test_a_budget_that_cannot_be_checked_fails_before_writing(tmp_path):
    model = save(image_model(), tmp_path / "m.onnx")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--max-latency-ratio", "2")
    assert_input_error(result, "budget", "H, W", "--input-shape")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("shape, keywords", [
    ("y:1,3,4,4", ("'y'", "not an input", "x")),
    ("x:1,3,4", ("3 dimension", "[N, 3, H, W]")),
    ("x:1,3,0,4", ("--input-shape", "positive")),
    ("x:1,2,4,4", ("axis 1", "fixes it at 3")),
    ("x=1,3,4,4", ("--input-shape", "NAME:d1,d2")),
])
def test_bad_input_shapes_are_one_line_errors(tmp_path, shape, keywords):
    model = save(image_model(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--input-shape", shape)
    assert_input_error(result, *keywords)
    assert (tmp_path / "m.onnx").read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_random_token_ids_stay_inside_the_table_and_masks_are_ones():
    model = token_model(rows=5)
    dataset = datasets.random_data(model, input_shapes={"input_ids": (1, 7), "attention_mask": (1, 7)})
    feed = dataset.batch(0, dataset.num_samples)
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() == 4  # 32×7 draws reach the last row
    assert (feed["attention_mask"] == 1).all()
    result = validate(model, model, dataset, latency_runs=0)  # ORT rejects an index past the table
    assert result.providers[0].samples == dataset.num_samples


def test_a_table_in_a_constant_node_bounds_the_random_token_ids_too():
    """Exporters write an embedding table as an initializer or as a Constant node's value."""
    model = token_model(rows=5)
    table = next(t for t in model.graph.initializer if t.name == "table")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["table"], value=table))
    model.graph.initializer.remove(table)
    dataset = datasets.random_data(model, input_shapes={"input_ids": (1, 7), "attention_mask": (1, 7)})
    assert dataset.batch(0, dataset.num_samples)["input_ids"].max() == 4


def test_an_integer_scalar_without_known_values_skips_validation_naming_it(tmp_path):
    model = save(stateful_model(), tmp_path / "m.onnx")
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--input-shape", "x:1,4",
                     "--input-shape", "state:2,1,3")
    assert result.returncode == 0, result.stderr
    assert "validation skipped: input 'rate' is an integer scalar" in result.stdout and "--data" in result.stdout


def test_state_and_scalar_inputs_are_fed_whole_with_every_batch(tmp_path):
    model = save(stateful_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 4)).astype(np.float32),
             state=rng.standard_normal((2, 1, 3)).astype(np.float32), rate=np.array(16000))
    result = run_cli("optimize", model, "-o", tmp_path / "out.onnx", "--data", tmp_path / "d.npz",
                     "--input-shape", "x:1,4", "--input-shape", "state:2,1,3", "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert "cpu       6 " in result.stdout  # six samples, one at a time (the state fixes the batch at 1)


def test_the_summary_row_is_the_worst_output_and_integers_are_compared_exactly():
    reference = token_model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    table = candidate.graph.initializer[0]
    values = onnx.numpy_helper.to_array(table).copy()
    values[2] += 0.5  # token 2's embedding moved: the float output differs, the ids do not
    table.CopyFrom(onnx.numpy_helper.from_array(values, "table"))
    dataset = datasets.random_data(reference, input_shapes={"input_ids": (1, 6), "attention_mask": (1, 6)})
    result = validate(reference, candidate, dataset, latency_runs=0).providers[0]
    ids, hidden = result.outputs
    assert ids.integer and ids.mismatches == 0
    assert hidden.sqnr_db < 60 and result.worst_output is hidden
    assert hidden.agreement_over == "position" and 0 < hidden.agreement <= 100


def test_argmax_agreement_is_per_position_for_sequence_outputs():
    base = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])],
                             [helper.make_tensor("s", TensorProto.FLOAT, [3], [1.0, 1.0, 1.0])])
    reference = helper.make_model(base, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.initializer[0].CopyFrom(helper.make_tensor("s", TensorProto.FLOAT, [3], [1.0, 1.0, -1.0]))
    x = np.array([[[0, 0, 1]] * 2 + [[1, 0, 0]] * 2], dtype=np.float32)  # class 2 at two positions of four
    output = validate(reference, candidate, {"x": x}, latency_runs=0).providers[0].outputs[0]
    assert output.agreement == pytest.approx(50.0) and output.agreement_over == "position"


def test_random_inputs_too_large_to_build_are_an_input_error(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10_000_000_000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10_000_000_000])])
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                 tmp_path / "m.onnx")
    result = run_cli("validate", model, model)
    assert_input_error(result, "GiB")


def test_classifier_with_string_labels_and_a_zipmap_output(tmp_path):
    """An ai.onnx.ml classifier as skl2onnx writes them: string labels, and probabilities as a sequence of maps."""
    classes = ["cat", "dog", "fish"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1, keepdims=0),
             helper.make_node("LabelEncoder", ["index"], ["label"], domain="ai.onnx.ml",
                              keys_int64s=[0, 1, 2], values_strings=classes),
             helper.make_node("ZipMap", ["probabilities"], ["per_class"], domain="ai.onnx.ml",
                              classlabels_strings=classes)]
    per_class = helper.make_map_type_proto(TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    zipmap = helper.make_value_info("per_class", helper.make_sequence_type_proto(per_class))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]), zipmap], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)],
                              ir_version=8)
    path = save(model, tmp_path / "m.onnx")
    result = run_cli("optimize", path, "-o", tmp_path / "out.onnx", "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert "label" in result.stdout and "exact" in result.stdout
    assert "per_class are sequences or maps, not tensors: not compared" in result.stdout


def test_the_library_names_arguments_where_the_cli_names_flags():
    _, report = onnxcomp.optimize(image_model(), validate_result=True, latency_runs=0)
    assert report.validation is None and "input_shapes= x:1,3,?,?" in report.validation_skipped
    assert "--" not in report.validation_skipped


@pytest.mark.parametrize("op, attributes, axis_agreement", [
    ("Concat", {"axis": 1}, None),  # a detector's [N, 4 + classes, anchors]: no class axis
    ("Softmax", {"axis": 1}, 50.0),  # the softmax's own axis, not the last one
])
def test_argmax_agreement_follows_the_op_that_computes_the_output(op, attributes, axis_agreement):
    inputs = ["x", "x"] if op == "Concat" else ["x"]
    channels = 6 if op == "Concat" else 3
    base = helper.make_graph([helper.make_node("Mul", ["x0", "s"], ["x"]), helper.make_node(op, inputs, ["y"],
                                                                                           **attributes)], "g",
                             [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 3, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 4])],
                             [helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4)])
    reference = helper.make_model(base, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    candidate.graph.initializer[0].CopyFrom(helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, -1, -1]))
    x = np.array([[[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]], dtype=np.float32)  # class 2 at every position
    output = validate(reference, candidate, {"x0": x}, latency_runs=0).providers[0].outputs[0]
    assert output.agreement == axis_agreement
