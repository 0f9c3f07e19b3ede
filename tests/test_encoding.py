"""Compact sparse storage: exact decoding by standard ops, folded by ONNX Runtime, and its size on disk."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from helpers import optimized_ops, run_model
from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp.inspection import summarize

RNG = np.random.default_rng(0)


def conv_model(weight: np.ndarray, opset: int = 13) -> onnx.ModelProto:
    channels = weight.shape[1]
    x = gs.Variable("x", np.float32, [1, channels, 6, 6])
    y = gs.Variable("y", np.float32, [1, weight.shape[0], 6, 6])
    conv = gs.Node("Conv", "conv", {"pads": [1, 1, 1, 1]}, [x, gs.Constant("W", weight)], [y])
    return gs.export_onnx(gs.Graph(nodes=[conv], inputs=[x], outputs=[y], opset=opset))


def encoded(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = graphs.import_model(model)
    encoding.encode_sparse(graph, graph.tensors()["W"], graphs.Names(graph))
    result = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(result, full_check=True)
    return result


def pruned_weight(shape, sparsity: float) -> np.ndarray:
    weight = RNG.normal(size=shape).astype(np.float32)
    weight.reshape(-1)[RNG.permutation(weight.size)[:int(round(sparsity * weight.size))]] = 0
    return weight


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (5, 3, 3, 3)])  # 288 weights, and 135: not a multiple of 8
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_decoded_weights_give_the_dense_outputs_exactly(shape, sparsity, wide, monkeypatch):
    monkeypatch.setattr(encoding, "_wide", lambda count: wide)  # int64 is for weights of over 268 M elements
    weight = pruned_weight(shape, sparsity)
    dense = conv_model(weight)
    feed = {"x": RNG.normal(size=(1, shape[1], 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(encoded(dense), feed)[0], run_model(dense, feed)[0])


def test_onnx_runtime_folds_the_decoding_ops_away(tmp_path):
    session, ops = optimized_ops(encoded(conv_model(pruned_weight((16, 8, 3, 3), 0.5))), tmp_path)
    assert "Conv" in ops or "FusedConv" in ops
    assert not {"BitShift", "CumSum", "Gather", "Where", "Mod"} & set(ops), ops


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_bytes_per_weight_within_the_bound(sparsity):
    weight = pruned_weight((64, 64, 3, 3), sparsity)
    dense, compact = conv_model(weight), encoded(conv_model(weight))
    stored = sum(t.ByteSize() for t in compact.graph.initializer)
    assert stored <= ((1 - sparsity) * 4 + 0.13) * weight.size + 200  # decoding constants: a few small tensors
    saved = dense.ByteSize() - compact.ByteSize()
    assert saved >= (sparsity * 4 - 0.13) * weight.size - 2000  # the whole file shrinks, less the nodes


def test_encoded_weights_are_decoded_for_inspection():
    weight = pruned_weight((16, 8, 3, 3), 0.75)
    model = encoded(conv_model(weight))
    (found,) = encoding.encoded_weights(model)
    assert found.name == "W"
    np.testing.assert_array_equal(found.values, weight)
    everything = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert found.stored_bytes == everything  # the mask, the values and the decoding constants
    assert found.stored_bytes <= encoding.sparse_bytes(weight.size, int(np.count_nonzero(weight))) + 100
    (info,) = [w for w in summarize(model).weights if w.name == "W"]
    assert info.encoded and info.dense_bytes == weight.nbytes and info.bytes == found.stored_bytes
    assert info.sparsity == pytest.approx(0.75, abs=1 / weight.size)
    assert not [w for w in summarize(model).weights if w.name.startswith("W.")]  # its parts are not listed


def test_models_without_compact_weights_have_none():
    assert encoding.encoded_weights(conv_model(pruned_weight((4, 2, 3, 3), 0.5))) == []


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_codebook_layout_decodes_exactly_at_every_bit_width(bits, sparse, wide, tmp_path, monkeypatch):
    # int64 positions are for weights of over 268 M elements; the rule is stood in for here
    monkeypatch.setattr(encoding, "_wide", lambda count: wide)
    codebook = np.sort(RNG.normal(size=2 ** bits)).astype(np.float32)
    codebook[codebook == 0] = 1.0  # zeros come from the mask in the sparse layout
    indices = RNG.integers(0, 2 ** bits, size=(6, 4, 3, 3))
    weight = codebook[indices]
    if sparse:
        weight.reshape(-1)[RNG.permutation(weight.size)[:weight.size // 2]] = 0
    model = conv_model(weight)
    graph = graphs.import_model(model)
    kept = indices.reshape(-1)[weight.reshape(-1) != 0] if sparse else indices
    encoding.encode_codebook(graph, graph.tensors()["W"], codebook, kept, bits, graphs.Names(graph), sparse=sparse)
    compact = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(compact, full_check=True)
    assert compact.functions[0].name.endswith("_wide") == wide
    feed = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(compact, feed)[0], run_model(model, feed)[0])
    stored = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in compact.graph.initializer}
    assert stored["W.indices"] == encoding.packed_bytes(kept.size, bits) <= kept.size * bits / 8 + 2
    _, ops = optimized_ops(compact, tmp_path)
    assert not {"Range", "Gather", "Div", "Mod", "Where"} & set(ops), ops


@pytest.mark.parametrize("sparse", [False, True])
def test_one_codebook_per_output_channel(sparse):
    bits = 3
    codebooks = (np.sort(RNG.normal(size=(6, 2 ** bits)), axis=1) * np.arange(1, 7)[:, None]).astype(np.float32)
    indices = RNG.integers(0, 2 ** bits, size=(6, 4, 3, 3))
    weight = np.take_along_axis(codebooks, indices.reshape(6, -1), axis=1).reshape(indices.shape)
    if sparse:
        weight.reshape(-1)[RNG.permutation(weight.size)[:100]] = 0
    model = conv_model(weight)
    graph = graphs.import_model(model)
    kept = indices.reshape(-1)[weight.reshape(-1) != 0] if sparse else indices
    encoding.encode_codebook(graph, graph.tensors()["W"], codebooks, kept, bits, graphs.Names(graph), sparse=sparse)
    compact = gs.export_onnx(graph.cleanup().toposort())
    feed = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(compact, feed)[0], run_model(model, feed)[0])


def test_codebook_that_does_not_give_the_weight_is_refused():
    weight = np.ones((2, 4, 3, 3), np.float32)
    graph = graphs.import_model(conv_model(weight))
    with pytest.raises(ValueError, match="do not give the weight"):
        encoding.encode_codebook(graph, graph.tensors()["W"], np.array([0.5, 2.0]), np.zeros(72, int), 1,
                                 graphs.Names(graph))


def test_one_decoding_function_per_kind_of_layout_and_one_call_per_weight(tmp_path):
    """Three pruned weights: one `Sparse` definition, three calls of about a hundred bytes each, and the decoder
    is gone from the model once a later pass stores the weights densely."""
    from onnxcomp import api

    weights = [pruned_weight((8, 8, 3, 3), 0.5) for _ in range(3)]
    x = gs.Variable("x", np.float32, [1, 8, 6, 6])
    tensors, nodes = [x], []
    for i, weight in enumerate(weights):
        out = gs.Variable(f"y{i}", np.float32, [1, 8, 6, 6])
        nodes.append(gs.Node("Conv", f"conv{i}", {"pads": [1, 1, 1, 1]}, [tensors[-1], gs.Constant(f"W{i}", weight)],
                             [out]))
        tensors.append(out)
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[tensors[-1]], opset=11))
    model.ir_version = 6
    pruned, _ = api.optimize(model, passes="prune:sparsity=0.5,min-size=0", validate_result=False)
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version >= 8  # model-local functions need IR 8
    assert [(f.domain, f.name) for f in pruned.functions] == [(encoding.DOMAIN, "Sparse")]
    calls = [node for node in pruned.graph.node if node.domain == encoding.DOMAIN]
    assert len(calls) == 3 and max(node.ByteSize() for node in calls) < 120
    feed = {"x": RNG.normal(size=(1, 8, 6, 6)).astype(np.float32)}
    _, ops = optimized_ops(pruned, tmp_path)
    assert "Sparse" not in ops and "Where" not in ops, ops
    dense, _ = api.optimize(pruned, passes="prune:sparsity=0.5,min-size=0,encoding=dense",
                            validate_result=False)
    assert not dense.functions and not [o for o in dense.opset_import if o.domain == encoding.DOMAIN]
    np.testing.assert_allclose(run_model(dense, feed)[0], run_model(pruned, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [True, False])
def test_codebooks_and_scales_that_float16_holds_are_stored_in_float16(half, tmp_path):
    bits = 3
    codebook = np.sort(RNG.normal(size=2 ** bits)).astype(np.float32)
    scales = RNG.uniform(0.5, 2.0, size=6).astype(np.float32)
    if half:
        codebook, scales = (encoding.compact_table(table) for table in (codebook, scales))
    indices = RNG.integers(0, 2 ** bits, size=(6, 4 * 3 * 3))
    weight = (codebook[indices] * scales[:, None]).reshape(6, 4, 3, 3)
    model = conv_model(weight)
    graph = graphs.import_model(model)
    encoding.encode_codebook(graph, graph.tensors()["W"], codebook, indices, bits, graphs.Names(graph),
                             scales=scales)
    compact = gs.export_onnx(graph.cleanup().toposort())
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in compact.graph.initializer}
    expected = np.float16 if half else np.float32
    assert stored["W.codebook"].dtype == stored["W.scales"].dtype == expected
    feed = {"x": RNG.normal(size=(1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(compact, feed)[0], run_model(model, feed)[0])
    (layout,) = encoding.layouts(compact)  # what heal trains reads the float16 tables too
    np.testing.assert_array_equal(layout.index, indices)


def test_compact_table_rounds_only_where_float16_keeps_the_values_close():
    table = np.array([-1.0, 0.0, 1e-7, 0.3333333, 2.0], np.float32)
    rounded = encoding.compact_table(table)
    assert rounded.dtype == np.float32
    assert np.abs(rounded - table).max() <= 2.0 * 2 ** -10 and (rounded != 0).tolist() == (table != 0).tolist()
    assert encoding.stored_table(rounded).dtype == np.float16
    for out_of_range in ([1e5, 1.0], [1e-3, 1e-9]):  # overflows float16; a non-zero that would become 0
        table = np.array(out_of_range, np.float32)
        np.testing.assert_array_equal(encoding.compact_table(table), table)
        assert encoding.stored_table(table).dtype == np.float32


def test_positions_are_int32_up_to_the_largest_weight_they_can_address():
    # a codebook weight's bit positions reach 8 per element, and Range's end one index past the last
    assert not encoding._wide(2**28 - 3)
    assert encoding._wide(2**28 - 2) and encoding._wide(2**31)
