"""Weights read from and written to files as they are needed, so a large model is never held whole.

The passes read a model file's weights from the file (manager's `folder`); the models that calibration and
statistics run are written to a temporary folder straight from the graph (graph.runnable). Each case checks the
numbers through ONNX Runtime against the model loaded whole; runtime.ON_DISK_BYTES, 256 MiB, stands in as a
few bytes so that these small models take the large-model path.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from onnxcomp import data as datasets
from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp import model_io, runtime
from onnxcomp.errors import InputError
from onnxcomp.manager import PassManager
from onnxcomp.recipe import parse
from onnxcomp.pass_base import PassContext
from onnxcomp.runner import Runner

import onnxcomp

WIDTH = 64


def matmul_bn_model(layers: int = 3) -> onnx.ModelProto:
    """x [N, 64] → (MatMul → BatchNormalization → Relu) × layers, every weight over 1 KiB."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    for i in range(layers):
        initializers += [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"w{i}")]
        initializers += [numpy_helper.from_array(v.astype(np.float32), f"{name}{i}") for name, v in
                         (("scale", rng.uniform(0.5, 2, WIDTH)), ("bias", rng.standard_normal(WIDTH)),
                          ("mean", rng.standard_normal(WIDTH)), ("var", rng.uniform(0.5, 2, WIDTH)))]
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("BatchNormalization", [f"m{i}", f"scale{i}", f"bias{i}", f"mean{i}", f"var{i}"],
                                   [f"b{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", WIDTH])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)


@pytest.fixture
def small_on_disk_bytes(monkeypatch):
    monkeypatch.setattr(runtime, "ON_DISK_BYTES", 1024)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
@pytest.mark.parametrize("recipe", ["fuse-bn", "fuse-bn,int8", "fuse-bn,fp16", "cleanup"])
def test_passes_reading_weights_from_the_file_give_the_model_of_a_whole_load(tmp_path, small_on_disk_bytes,
                                                                            external, recipe):
    path = tmp_path / "model.onnx"
    model_io.save(matmul_bn_model(), path, external_data=external)
    data = datasets.random_data(matmul_bn_model(), samples=8)
    whole, _ = PassManager(parse(recipe)).run(model_io.load(path), PassContext(calibration_data=data))
    graph_only = model_io.load(path, weights=False)
    assert not any(t.HasField("raw_data") for t in graph_only.graph.initializer if t.name.startswith("w"))
    streamed, _ = PassManager(parse(recipe)).run(graph_only, PassContext(calibration_data=data),
                                                 folder=str(tmp_path))
    assert model_io.external_data_locations(streamed) == []  # every weight is in the result, none refers to a file
    np.testing.assert_array_equal(run_model(streamed, {"x": x()})[0], run_model(whole, {"x": x()})[0])
    if recipe == "cleanup" and not external:  # nothing to change: the input, byte for byte
        assert streamed.SerializeToString() == model_io.load(path).SerializeToString()


def test_a_data_file_shorter_than_its_references_is_refused_when_the_graph_is_read(tmp_path):
    path = tmp_path / "model.onnx"
    model_io.save(matmul_bn_model(), path, external_data=True)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(InputError, match="model.onnx.data.*incomplete"):
        model_io.load(path, weights=False)


def test_a_graph_runs_from_a_temporary_file_and_later_changes_do_not_reach_it(small_on_disk_bytes):
    model = matmul_bn_model(1)
    expected = run_model(model, {"x": x()})[0]
    graph = graphs.import_model(model)
    with graphs.runnable(graph) as on_disk:
        assert isinstance(on_disk, str) and os.path.getsize(on_disk + ".data") >= WIDTH * WIDTH * 4
        weight = graph.tensors()["w0"]
        weight.values = np.zeros_like(weight.values)  # a pass changing the graph inside the block
        outputs = Runner(on_disk, outputs=["r0"]).run({"x": x()})
    assert not os.path.exists(on_disk)
    np.testing.assert_allclose(outputs["r0"], expected, rtol=1e-5, atol=1e-5)  # not the zeroed weight's output


@pytest.mark.parametrize("passes", ["prune:sparsity=0.5", "share:bits=4", "prune:sparsity=0.5,share:bits=4"])
def test_compact_weights_of_a_large_model_are_validated_on_their_decoded_copy(tmp_path, monkeypatch, passes):
    """ONNX Runtime's folding of the compact layouts takes many times the weights' memory: a large candidate's
    sessions open a copy with the weights decoded, whose outputs are those of the folded file, bit for bit."""
    validation = importlib.import_module("onnxcomp.validate")  # the package's `validate` is the function

    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    model_io.save(matmul_bn_model(), path)
    onnxcomp.optimize(str(path), passes, output=out, validate_result=False)
    assert model_io.load(out).functions  # the compact layouts, decoded by functions
    folded = validation.validate(str(path), str(out), latency_runs=0)
    monkeypatch.setattr(validation, "ONE_SESSION_AT_A_TIME_BYTES", 0)  # as if the models were large
    monkeypatch.setattr(encoding, "DECODE_CHUNK", 1)  # a row at a time: blocks start inside the packed bytes
    decoded = validation.validate(str(path), str(out), latency_runs=0)
    assert any("decoded" in note for note in decoded.notes) and not any("decoded" in note for note in folded.notes)
    assert decoded.candidate_bytes == folded.candidate_bytes == model_io.file_size(out)
    for mine, theirs in zip(decoded.providers[0].outputs, folded.providers[0].outputs):
        assert (mine.max_abs_error, mine.sqnr_db) == (theirs.max_abs_error, theirs.sqnr_db)


def test_a_model_reached_through_a_link_reads_the_weights_of_the_file_linked_to(tmp_path):
    # a download cache keeps blobs under their hashes and links to them by name from elsewhere
    (tmp_path / "blobs").mkdir(), (tmp_path / "snapshot").mkdir()
    model_io.save(matmul_bn_model(), tmp_path / "blobs" / "3f2a")
    (tmp_path / "blobs" / "model.onnx").write_bytes(b"another file of the link's name")
    (tmp_path / "snapshot" / "model.onnx").symlink_to(tmp_path / "blobs" / "3f2a")
    out = tmp_path / "out.onnx"
    onnxcomp.optimize(str(tmp_path / "snapshot" / "model.onnx"), "fuse-bn", output=out, validate_result=False)
    np.testing.assert_allclose(run_model(out, {"x": x()})[0], run_model(matmul_bn_model(), {"x": x()})[0],
                               rtol=1e-4, atol=1e-4)


def if_model() -> onnx.ModelProto:
    """y = If(c, x @ W_then, x + W_else): weights of over 1 KiB inside the branches."""
    rng = np.random.default_rng(2)
    branches = []
    for op, name in (("MatMul", "then"), ("Add", "else")):
        weight = numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"w_{name}")
        branches.append(helper.make_graph([helper.make_node(op, ["x", f"w_{name}"], [f"y_{name}"])], name, [],
                                          [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None)],
                                          [weight]))
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])],
                              "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [WIDTH, WIDTH]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [WIDTH, WIDTH])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_weights_of_subgraphs_in_external_data_are_read_with_the_graph(tmp_path, caplog):
    path = tmp_path / "model.onnx"
    onnx.save_model(if_model(), str(path), save_as_external_data=True, location="model.data", size_threshold=1024)
    graph_only = model_io.load(path, weights=False)
    result, _ = PassManager(parse("fuse-bn,cleanup")).run(graph_only, PassContext(), folder=str(tmp_path))
    assert "onnx.checker" not in caplog.text  # the checks see the branches' weights, as in a whole load
    feed = {"x": x().repeat(16, axis=0), "c": np.array(True)}
    np.testing.assert_array_equal(run_model(result, feed)[0], run_model(if_model(), feed)[0])


def test_an_ir3_model_runs_from_a_temporary_file(small_on_disk_bytes):
    # IR 3 lists every initializer among the graph's inputs; a cut of the temporary model must not ask for them
    model = matmul_bn_model(2)
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    graph = graphs.import_model(model)
    with graphs.runnable(graph) as on_disk:
        outputs = Runner(on_disk, outputs=["m0"]).run({"x": x()})  # not w1: the cut drops it
    np.testing.assert_allclose(outputs["m0"], run_model(with_output(model, "m0"), {"x": x()})[0], rtol=1e-4,
                               atol=1e-4)


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.ValueInfoProto(name=name))
    del copy.graph.output[0]
    return copy


def test_weights_of_types_numpy_does_not_buffer_are_written_as_their_bytes():
    import ml_dtypes

    values = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    header, data = model_io.array_weight("w", values)
    assert header.data_type == TensorProto.BFLOAT16 and list(header.dims) == [3, 4]
    assert bytes(data) == values.tobytes()


def test_a_data_file_removed_during_a_run_is_an_input_error(tmp_path):
    path = tmp_path / "model.onnx"
    model_io.save(matmul_bn_model(), path, external_data=True)
    graph_only = model_io.load(path, weights=False)
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(InputError, match="external data of tensor 'w0'"):
        model_io.read_tensor(graph_only.graph.initializer[0], tmp_path)


def test_a_model_file_rewritten_during_the_run_is_refused_not_mixed_in(tmp_path):
    # the passes read the input's weights from its file as they need them: a file written over meanwhile would
    # give the old graph new weights
    path = tmp_path / "model.onnx"
    model_io.save(matmul_bn_model(), path, external_data=True)
    graph = graphs.import_model(model_io.load(path, weights=False), str(tmp_path))
    first = graph.tensors()["w0"]._values.load()
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[::-1])  # same size, other bytes
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="changed during the run"):
        graph.tensors()["w0"]._values.load()
    assert first.shape == (WIDTH, WIDTH)
