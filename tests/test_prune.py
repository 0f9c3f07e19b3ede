"""prune: selection, exact sparsity, allocation, correction and compact storage, checked through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import run_cli, run_model
from onnxcomp import data as datasets
from onnxcomp import graph as graphs
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import PassContext, PreconditionError
from onnxcomp.passes.layers import find_layers
from onnxcomp.recipe import parse
from test_bad_input import check_rejected

RNG = np.random.default_rng(0)


def net(opset: int = 13) -> onnx.ModelProto:
    """x → Conv(1152) → Relu → Conv(9216, no bias) → Relu → depthwise Conv(288) → pool → Gemm(320)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 4, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32, 32, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 1, 3, 3)).astype(np.float32), "Wd"),
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 32)).astype(np.float32), "Wfc"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "Bfc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "Wd"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=32),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def images(count: int, seed: int) -> np.ndarray:
    """Inputs whose channels are correlated, as real images' are: a low-rank signal plus a little noise."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(4, 2))
    base = rng.normal(size=(count, 2, 8, 8))
    return (np.einsum("cb,nbhw->nchw", mix, base) + 0.1 * rng.normal(size=(count, 4, 8, 8))).astype(np.float32)


def run(model: onnx.ModelProto, passes: str, calibration: np.ndarray | None = None):
    ctx = PassContext()
    if calibration is not None:
        ctx.calibration_data = datasets.open_data({"x": calibration}, model)
    return PassManager(parse(passes)).run(model, ctx)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every weight a node reads, decoded from its compact layout where it has one."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({w.name: w.values for w in onnxcomp.encoding.encoded_weights(model)})
    return values


def sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - candidate) ** 2))


# ---------------------------------------------------------------------------------------------- selection, sparsity

@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsity_reached_exactly_without_data(allocation, sparsity):
    pruned, records = run(net(), f"prune:sparsity={sparsity},allocation={allocation}")
    values = weights(pruned)
    chosen = [values["W1"], values["W2"]]  # the depthwise and the 320-weight Gemm are skipped by default
    zeros = sum(int(np.sum(w == 0)) for w in chosen)
    assert zeros / sum(w.size for w in chosen) == pytest.approx(sparsity, abs=0.005)
    if allocation == "uniform":
        for w in chosen:
            assert np.mean(w == 0) == pytest.approx(sparsity, abs=1 / w.size)
    assert not np.any(values["Wd"] == 0) and not np.any(values["Wfc"] == 0)
    stats = records[0].stats
    assert stats["pruned"] == 2 and stats["skipped:depthwise"] == 1 and stats["skipped:small"] == 1
    assert stats["sparsity"] == pytest.approx(sparsity, abs=0.005)


def test_magnitude_pruning_keeps_the_largest_weights():
    pruned, _ = run(net(), "prune:sparsity=0.5,allocation=uniform,correction=none")
    original = numpy_helper.to_array(next(t for t in net().graph.initializer if t.name == "W2"))
    kept = weights(pruned)["W2"] != 0
    assert np.abs(original[kept]).min() >= np.abs(original[~kept]).max()
    np.testing.assert_array_equal(weights(pruned)["W2"][kept], original[kept])  # no correction: values unchanged


def test_options_choose_what_is_pruned():
    pruned, records = run(net(), "prune:sparsity=0.5,depthwise=true,min-size=0,exclude=conv1")
    values = weights(pruned)
    assert np.mean(values["W1"] == 0) == 0 and np.mean(values["Wd"] == 0) > 0 and np.mean(values["Wfc"] == 0) > 0
    assert records[0].stats["skipped:excluded"] == 1
    pruned, records = run(net(), "prune:sparsity=0.5,include=conv2|W1")  # node or weight names, shell patterns
    assert records[0].stats["pruned"] == 2
    pruned, records = run(net(), "prune:sparsity=0.5,ops=Gemm,min-size=0")
    assert records[0].stats["pruned"] == 1 and np.mean(weights(pruned)["W2"] == 0) == 0


def test_patterns_that_match_nothing_are_named_in_a_warning(tmp_path):
    pruned, records = run(net(), "prune:sparsity=0.5,exclude=conv9|conv2,include=*")
    assert "'conv9'" in records[0].stats["warning"] and "conv2" not in records[0].stats["warning"]
    onnx.save(net(), tmp_path / "net.onnx")
    result = run_cli("optimize", tmp_path / "net.onnx", "--passes", "prune:exclude=nothing*", "-o",
                     tmp_path / "out.onnx", "--no-validate")
    assert result.returncode == 0, result.stderr
    assert "'nothing*' matched no layer it could change" in result.stderr


def test_shared_and_computed_weights_are_skipped():
    model = net()
    model.graph.node.append(helper.make_node("Conv", ["x", "W1"], ["c1b"], name="conv1b", pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("c1b", TensorProto.FLOAT, None))
    pruned, records = run(model, "prune:sparsity=0.5")
    assert records[0].stats["skipped:weight-shared"] == 2 and records[0].stats["pruned"] == 1
    assert np.mean(weights(pruned)["W1"] == 0) == 0


def test_model_without_prunable_weights_is_not_modified(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result, records = run(model, "prune:sparsity=0.5")
    assert not records[0].modified and records[0].stats["pruned"] == 0
    assert result.SerializeToString() == model.SerializeToString()
    onnx.save(model, tmp_path / "relu.onnx")
    cli = run_cli("optimize", tmp_path / "relu.onnx", "--passes", "prune", "-o", tmp_path / "out.onnx",
                  "--no-validate")
    assert cli.returncode == 0 and "prune" in cli.stdout and (tmp_path / "out.onnx").read_bytes() == \
        (tmp_path / "relu.onnx").read_bytes()


@pytest.mark.parametrize("option", ["sparsity=1.0", "sparsity=-0.1", "sparsity=half", "allocation=best",
                                    "correction=magic", "encoding=csr", "ops=Relu", "max-layer-sparsity=1.0"])
def test_bad_options_are_usage_errors(tmp_path, option):
    onnx.save(net(), tmp_path / "net.onnx")
    check_rejected(tmp_path, ["optimize", tmp_path / "net.onnx", "--passes", f"prune:{option}", "-o",
                              tmp_path / "out.onnx", "--no-validate"], "prune", option.split("=")[0])


def test_data_driven_modes_need_calibration_data():
    for option in ("allocation=sensitivity", "correction=reconstruct", "correction=channel"):
        with pytest.raises(PreconditionError, match="calib_data="):
            run(net(), f"prune:{option}")


# ---------------------------------------------------------------------------------------------------- storage

def test_compact_layout_gives_the_outputs_of_the_dense_layout(tmp_path):
    calibration = images(48, seed=1)
    compact, records = run(net(), "prune:sparsity=0.6", calibration)
    dense, _ = run(net(), "prune:sparsity=0.6,encoding=dense", calibration)
    feed = {"x": images(16, seed=2)}
    np.testing.assert_array_equal(run_model(compact, feed)[0], run_model(dense, feed)[0])
    stats = records[0].stats
    assert stats["stored_bytes"] <= ((1 - stats["sparsity"]) * 4 + 0.13) * (1152 + 9216)
    onnx.save(compact, tmp_path / "compact.onnx")
    onnx.save(dense, tmp_path / "dense.onnx")
    saved = (tmp_path / "dense.onnx").stat().st_size - (tmp_path / "compact.onnx").stat().st_size
    assert saved >= (stats["sparsity"] * 4 - 0.13) * 10368 - 2 * 1500  # the decoding nodes: ~1.5 KB per tensor


def test_old_opset_is_raised_for_the_decoding_ops():
    pruned, records = run(net(opset=9), "prune:sparsity=0.5")
    assert records[0].stats["opset"] == "9->11"
    assert {o.version for o in pruned.opset_import if o.domain in ("", "ai.onnx")} == {11}
    onnx.checker.check_model(pruned)
    dense, records = run(net(opset=9), "prune:sparsity=0.5,encoding=dense")
    assert "opset" not in records[0].stats
    feed = {"x": images(4, seed=3)}
    np.testing.assert_array_equal(run_model(pruned, feed)[0], run_model(dense, feed)[0])


def test_pruning_a_pruned_model_again_decodes_it_first():
    once, _ = run(net(), "prune:sparsity=0.3")
    twice, records = run(once, "prune:sparsity=0.6")
    assert records[0].stats["pruned"] == 2 and records[0].stats["sparsity"] == pytest.approx(0.6, abs=0.005)
    assert np.all(weights(twice)["W2"][weights(once)["W2"] == 0] == 0)


# ---------------------------------------------------------------------------------------- layers as rows

def layer_model(node: onnx.NodeProto, weight: np.ndarray, x_shape: list[int], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


CASES = {
    "conv-strided-dilated-grouped": (helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 1], dilations=[1, 2],
                                                      pads=[1, 2, 0, 1], group=2), (6, 2, 3, 2), [2, 4, 7, 9]),
    "conv-same-upper": (helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER"),
                        (4, 3, 3, 3), [1, 3, 8, 7]),
    "gemm": (helper.make_node("Gemm", ["x", "W"], ["y"]), (5, 3), [4, 5]),
    "gemm-transposed": (helper.make_node("Gemm", ["x", "W"], ["y"], transA=1, transB=1), (3, 5), [5, 4]),
    "matmul-3d-input": (helper.make_node("MatMul", ["x", "W"], ["y"]), (5, 3), [2, 4, 5]),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_times_input_vectors_are_the_layer_outputs(case):
    node, shape, x_shape = CASES[case]
    weight = RNG.normal(size=shape).astype(np.float32)
    model = layer_model(node, weight, x_shape)
    x = RNG.normal(size=x_shape).astype(np.float32)
    (expected,) = run_model(model, {"x": x})
    (layer,), _ = find_layers(graphs.import_model(model))
    rows = layer.rows()
    np.testing.assert_array_equal(layer.from_rows(rows), weight)
    vectors = layer.input_vectors(x, 10 ** 6, RNG)  # every vector, in output order
    outputs = np.einsum("pgd,grd->pgr", vectors, rows).reshape(len(vectors), -1)
    if node.op_type == "Conv":
        expected = np.moveaxis(expected, 1, -1).reshape(-1, expected.shape[1])
    else:
        expected = expected.reshape(-1, expected.shape[-1])
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


def test_conv_transpose_rows_round_trip():
    weight = RNG.normal(size=(4, 3, 2, 2)).astype(np.float32)  # (Cin, Cout / group, k, k), group 2
    model = layer_model(helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2), weight, [1, 4, 5, 5])
    (layer,), _ = find_layers(graphs.import_model(model))
    assert layer.rows().shape == (2, 3, 2 * 4)
    np.testing.assert_array_equal(layer.from_rows(layer.rows()), weight)
    pruned, records = run(model, "prune:sparsity=0.5,min-size=0", RNG.normal(size=(16, 4, 5, 5)).astype(np.float32))
    assert records[0].stats["sparsity"] == 0.5


# ------------------------------------------------------------------------------------- allocation, correction

def test_corrections_reduce_the_error_on_new_data():
    calibration, evaluation = images(64, seed=1), images(64, seed=2)
    reference = run_model(net(), {"x": evaluation})[0]
    result = {}
    for correction in ("none", "channel", "reconstruct"):
        pruned, _ = run(net(), f"prune:sparsity=0.7,allocation=uniform,correction={correction}", calibration)
        result[correction] = sqnr(reference, run_model(pruned, {"x": evaluation})[0])
    assert result["channel"] > result["none"] + 1
    assert result["reconstruct"] > result["channel"] + 3, result


def test_bias_is_added_where_a_conv_had_none():
    pruned, _ = run(net(), "prune:sparsity=0.5,correction=channel,allocation=uniform", images(32, seed=1))
    conv2 = next(n for n in pruned.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2]


def loud_and_quiet(channels: int = 16) -> onnx.ModelProto:
    """Two parallel convolutions `loud` and `quiet` of the same size; quiet's output is scaled by 0.01 before
    the sum, so its error barely reaches the output."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(channels, 4, 3, 3)).astype(np.float32), name) for name in "AB"]
    inits.append(numpy_helper.from_array(np.array(0.01, np.float32), "small"))
    nodes = [helper.make_node("Conv", ["x", "A"], ["a"], name="loud", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "B"], ["b"], name="quiet", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["b", "small"], ["bs"]),
             helper.make_node("Add", ["a", "bs"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_sensitivity_allocation_spares_the_layer_that_matters():
    """The quiet layer is pruned much more, and the target is reached exactly."""
    pruned, records = run(loud_and_quiet(), "prune:sparsity=0.5,min-size=0", images(40, seed=1))
    rows = {row["layer"]: row for row in records[0].layers}
    assert rows["quiet"]["sparsity"] > 0.8 > 0.2 > rows["loud"]["sparsity"]
    assert rows["quiet"]["output_gain"] < 0.01 * rows["loud"]["output_gain"]
    assert (rows["quiet"]["sparsity"] + rows["loud"]["sparsity"]) / 2 == pytest.approx(0.5, abs=0.001)
    assert records[0].stats["allocation"] == "sensitivity" and records[0].stats["correction"] == "reconstruct"


def test_sensitivity_allocation_leaves_the_loud_layer_whole_while_the_quiet_one_takes_the_target():
    """Each layer's error curve starts at no pruning, no error: pruning the loud layer is never free."""
    _, records = run(loud_and_quiet(), "prune:sparsity=0.2,min-size=0", images(40, seed=1))
    rows = {row["layer"]: row for row in records[0].layers}
    assert rows["loud"]["sparsity"] == 0 and rows["quiet"]["sparsity"] == pytest.approx(0.4, abs=0.002)


def test_per_layer_report_in_the_cli(tmp_path, digits_model):
    result = run_cli("optimize", digits_model, "--passes", "fuse-bn,prune:sparsity=0.6", "--calib-data",
                     digits_model.parent / "digits_calib.npz", "-o", tmp_path / "out.onnx", "--no-validate")
    assert result.returncode == 0, result.stderr
    assert "prune per layer:" in result.stdout and "output_snr_db" in result.stdout
    inspected = run_cli("inspect", tmp_path / "out.onnx")
    assert "compact weights: 3, 63,488 B dense stored in" in inspected.stdout
    weight_lines = [line for line in inspected.stdout.splitlines() if "_fused_weight" in line and "stored" in line]
    assert len(weight_lines) == 3  # each pruned weight: its sparsity, and its stored next to its dense bytes
    assert (tmp_path / "out.onnx").stat().st_size < 0.6 * digits_model.stat().st_size


def test_weights_computed_from_constants_are_folded_then_pruned():
    """CNTK and Paddle exports compute weights, e.g. Reshape(initializer): they are folded into initializers."""
    model = net()
    flat = next(t for t in model.graph.initializer if t.name == "W2")
    values = numpy_helper.to_array(flat)
    model.graph.initializer.remove(flat)
    model.graph.initializer.extend([numpy_helper.from_array(values.reshape(-1), "W2_flat"),
                                    numpy_helper.from_array(np.array(values.shape, np.int64), "W2_shape")])
    model.graph.node.insert(0, helper.make_node("Reshape", ["W2_flat", "W2_shape"], ["W2"], name="reshape_w2"))
    pruned, records = run(model, "prune:sparsity=0.5,allocation=uniform")
    assert records[0].stats["pruned"] == 2 and "skipped:weight-not-constant" not in records[0].stats
    dense, _ = run(net(), "prune:sparsity=0.5,allocation=uniform")
    feed = {"x": images(4, seed=3)}
    np.testing.assert_array_equal(run_model(pruned, feed)[0], run_model(dense, feed)[0])


def test_damping_descent_finds_the_least_error_without_solving_every_candidate():
    """The candidates are tried from the middle towards the lesser error: 3 of the 4 solved, the least found
    wherever it lies."""
    import math

    from onnxcomp.passes.layers import DAMPINGS, damping_errors

    for best in DAMPINGS:
        tried = []

        def error_of(damping: float) -> float:
            tried.append(damping)
            return (math.log10(damping) - math.log10(best)) ** 2

        errors = damping_errors(error_of)
        assert min(errors, key=errors.get) == best
        assert len(tried) == len(set(tried)) == 3
