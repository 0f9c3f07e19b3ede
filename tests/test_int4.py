"""int4: weight-only block-wise quantization as ONNX Runtime's MatMulNBits and GatherBlockQuantized.

Each graph pattern is built as the smallest onnx.helper graph and run through ONNX Runtime; its output must be
what numpy computes with the weights decoded from the pass's own codes (the reference is the dequantized
weight, not the float one, so a wrong packing, scale layout or zero point shows as a large difference), and it
must differ from the float output by about what `bits` bits allow.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import assert_input_error, run_cli, run_model
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.int4 import Int4Config, block_grid, pack, quantize_gptq, quantize_rtn
from onnxcomp.passes.layers import InputStatistics, WeightedLayer

OPSET = [helper.make_opsetid("", 17)]
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers), opset_imports=OPSET)
    onnx.checker.check_model(model)
    return model


def matmul_model(k: int, n: int, activation_shape: list) -> tuple[onnx.ModelProto, np.ndarray]:
    """x [..., K] → MatMul(W [K, N]) → y."""
    weight = RNG.normal(size=(k, n)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, activation_shape)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, activation_shape[:-1] + [n])],
                   [numpy_helper.from_array(weight, "W")])
    return model, weight


def gemm_model(k: int, n: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x [M, K] → Gemm(W [N, K], transB=1, C [N]) → y [M, N], as torch exports nn.Linear."""
    weight = RNG.normal(size=(n, k)).astype(np.float32)
    bias = RNG.normal(size=n).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="linear", transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                   [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "C")])
    return model, weight, bias


def gather_model(vocabulary: int, width: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids [B, T] → Gather(E [V, D]) → e [B, T, D]."""
    table = RNG.normal(size=(vocabulary, width)).astype(np.float32)
    model = _model([helper.make_node("Gather", ["E", "ids"], ["e"], name="embedding")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", "T", width])],
                   [numpy_helper.from_array(table, "E")])
    return model, table


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------- graph patterns


@pytest.mark.parametrize("bits, symmetric, block, k", [
    (4, True, 32, 64), (4, False, 32, 64), (2, True, 16, 64), (8, False, 64, 128), (4, True, 32, 40)])
def test_matmul_3d_activations(bits, symmetric, block, k):
    """[B, T, K] activations (a transformer's) through one MatMulNBits; K = 40 leaves a partial last block."""
    model, weight = matmul_model(k, 24, ["B", "T", k])
    out, _ = onnxcomp.optimize(model, f"int4:bits={bits},symmetric={symmetric},block={block}",
                               validate_result=False)
    assert ops(out) == ["MatMulNBits"]
    node = out.graph.node[0]
    assert node.domain == "com.microsoft"
    assert {a.name: a.i for a in node.attribute} == {"K": k, "N": 24, "bits": bits, "block_size": block}
    x = RNG.normal(size=(2, 5, k)).astype(np.float32)
    (got,) = run_model(out, {"x": x})
    decoded = quantize_rtn(weight.T.copy(), bits, block, symmetric).decoded(k).T
    np.testing.assert_allclose(got, x @ decoded, rtol=1e-4, atol=1e-4)
    error = relative(got, x @ weight)
    assert 0 < error < {2: 0.6, 4: 0.15, 8: 0.01}[bits]


def test_gemm_with_bias_and_trans_b():
    model, weight, bias = gemm_model(64, 16)
    out, report = onnxcomp.optimize(model, "int4", validate_result=False)
    assert ops(out) == ["MatMulNBits"]
    assert len(out.graph.node[0].input) == 6 and out.graph.node[0].input[5]  # the bias rides in the kernel
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    (got,) = run_model(out, {"x": x})
    decoded = quantize_rtn(weight, 4, 32, True).decoded(64)  # transB: W's rows are already the columns of N
    np.testing.assert_allclose(got, x @ decoded.T + bias, rtol=1e-4, atol=1e-4)
    assert report.passes[0].stats["int4:Gemm"] == 1


def test_gemm_that_is_not_matmul_plus_bias_is_left():
    model, _, _ = gemm_model(64, 16)
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    model.graph.node.append(helper.make_node("MatMul", ["y", "W2"], ["z"], name="second"))
    model.graph.initializer.append(numpy_helper.from_array(RNG.normal(size=(16, 32)).astype(np.float32), "W2"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 32]))
    out, report = onnxcomp.optimize(model, "int4", validate_result=False)
    assert ops(out) == ["Gemm", "MatMulNBits"]
    assert report.passes[0].stats["skipped:gemm-not-matmul-plus-bias"] == 1


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (2, False)])
def test_gather_table(bits, symmetric):
    model, table = gather_model(300, 64)
    out, report = onnxcomp.optimize(model, f"int4:bits={bits},symmetric={symmetric}", validate_result=False)
    assert ops(out) == ["GatherBlockQuantized"]
    ids = RNG.integers(0, 300, size=(2, 7))
    (got,) = run_model(out, {"ids": ids})
    decoded = quantize_rtn(table, bits, 32, symmetric).decoded(64)
    np.testing.assert_array_equal(got, decoded[ids])
    assert 0 < relative(got, table[ids]) < {2: 0.6, 4: 0.15, 8: 0.01}[bits]
    stored = {t.name: t for t in out.graph.initializer}
    packed = next(t for t in stored.values() if t.data_type == TensorProto.UINT8 and len(t.dims) == 2
                  and t.dims[0] == 300 and t.dims[1] == 64 * bits // 8)
    assert packed.dims == [300, 64 * bits // 8]  # bits/8 bytes a weight: the table really shrank
    assert report.passes[0].stats["int4:Gather"] == 1
    assert report.passes[0].layers[0]["stored_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in stored.values())


def test_rows_in_most_calibration_samples_are_exact():
    """With calibration data, the rows gathered in most samples (a [CLS] and [SEP]) decode exactly; the others
    as GatherBlockQuantized decodes them."""
    model, table = gather_model(300, 64)
    ids = RNG.integers(3, 300, size=(40, 6))
    ids[:, 0], ids[:, -1] = 1, 2  # in every sample
    out, report = onnxcomp.optimize(model, "int4", calib_data={"ids": ids}, validate_result=False)
    assert report.passes[0].stats["exact_rows"] == 2
    assert "GatherBlockQuantized" in ops(out)
    probe = np.array([[1, 2, 7, 150]])
    (got,) = run_model(out, {"ids": probe})
    np.testing.assert_allclose(got[0, :2], table[[1, 2]], rtol=0, atol=1e-6)
    decoded = quantize_rtn(table, 4, 32, True).decoded(64)
    np.testing.assert_array_equal(got[0, 2:], decoded[[7, 150]])
    assert not np.allclose(decoded[[1, 2]], table[[1, 2]], atol=1e-3)  # without the correction they differ


def test_bias_correction_cancels_the_mean_output_shift():
    """Inputs with a large constant channel (a transformer's outliers after LayerNorm): the rounding error times
    that channel shifts every output alike; with calibration data the bias takes the shift back."""
    model, weight = matmul_model(64, 16, ["N", 64])
    x = RNG.normal(size=(256, 64)).astype(np.float32)
    x[:, 5] += 40.0
    shifts = {}
    for correction in (False, True):
        out, _ = onnxcomp.optimize(model, f"int4:bias-correction={correction}", calib_data={"x": x[:128]},
                                   validate_result=False)
        (got,) = run_model(out, {"x": x[128:]})
        shifts[correction] = np.abs((got - x[128:] @ weight).mean(axis=0)).mean()
    assert len(out.graph.node[0].input) == 6  # the correction rides in MatMulNBits' bias
    assert shifts[True] < 0.2 * shifts[False]


def test_gptq_through_the_pipeline_beats_rounding_on_new_inputs():
    """method=gptq with calibration data: on inputs it did not see (same distribution, correlated channels), the
    MatMulNBits output is closer to the float output than RTN's."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(128, 32)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 128])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 32])],
                   [numpy_helper.from_array(weight, "W")])
    mixing = rng.normal(size=(128, 128)) * 0.3 + np.eye(128)
    x = (rng.normal(size=(96, 8, 128)) @ mixing).astype(np.float32)
    errors = {}
    for method in ("rtn", "gptq"):
        out, report = onnxcomp.optimize(model, f"int4:method={method}", calib_data={"x": x[:64]},
                                        validate_result=False)
        assert ops(out) == ["MatMulNBits"]
        (got,) = run_model(out, {"x": x[64:]})
        errors[method] = relative(got, x[64:] @ weight)
    assert "output_snr_db" in report.passes[0].layers[0]
    assert errors["gptq"] < 0.9 * errors["rtn"], errors  # about 0.8 on such data


def test_table_read_by_another_node_is_left():
    """A table tied to an output projection (read by Gather and, transposed, by MatMul) would be stored twice:
    it stays float, and with nothing else to quantize the pass says so."""
    table = numpy_helper.from_array(RNG.normal(size=(300, 64)).astype(np.float32), "E")
    model = _model([helper.make_node("Gather", ["E", "ids"], ["e"], name="embedding"),
                    helper.make_node("Transpose", ["E"], ["Et"], name="transpose"),
                    helper.make_node("MatMul", ["e", "Et"], ["logits"], name="tied")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 300])], [table])
    with pytest.raises(OnnxcompError, match="no MatMul or Gemm"):
        onnxcomp.optimize(model, "int4", validate_result=False)


def test_keep_first_and_last_at_8_bits():
    """Three MatMuls in a chain: keep_first / keep_last give the end ones 8 bits, the middle one stays at 4."""
    weights = [RNG.normal(size=(64, 64)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", [src, f"W{i}"], [dst], name=f"layer{i}")
             for i, (src, dst) in enumerate([("x", "a"), ("a", "b"), ("b", "y")])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
                   [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)])
    out, report = onnxcomp.optimize(model, "int4:keep-first=true,keep-last=true", validate_result=False)
    bits = [next(a.i for a in node.attribute if a.name == "bits") for node in out.graph.node]
    assert bits == [8, 4, 8]
    assert report.passes[0].stats["kept_8_bits"] == "layer0|layer2"
    x = RNG.normal(size=(4, 64)).astype(np.float32)
    (got,) = run_model(out, {"x": x})
    decoded = [quantize_rtn(w.T.copy(), b, 32, True).decoded(64).T for w, b in zip(weights, bits)]
    np.testing.assert_allclose(got, x @ decoded[0] @ decoded[1] @ decoded[2], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------- the quantizers


def test_pack_puts_the_first_code_in_the_low_bits():
    assert pack(np.array([[1, 2]], np.uint8), 4).tolist() == [[0x21]]
    assert pack(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]


def test_symmetric_grid_reaches_the_largest_magnitude_exactly():
    units = np.array([[0.5, -2.0] + [0.1] * 30, [3.0] + [-1.0] * 31], np.float32)
    blocked = quantize_rtn(units, 4, 32, True)
    decoded = blocked.decoded(32)
    assert decoded[0, 1] == -2.0 and decoded[1, 0] == 3.0
    scales, _, _ = block_grid(units, 4, 32, True)
    assert np.all(np.abs(decoded - units) <= np.abs(scales) / 2 + 1e-6)


def test_asymmetric_grid_spreads_the_block_over_every_code():
    """[min, max] over all 2^bits levels: the ends of an evenly spread block decode exactly."""
    units = np.linspace(-1.0, 2.0, 32, dtype=np.float32)[None]
    blocked = quantize_rtn(units, 4, 32, False)
    assert (blocked.codes.min(), blocked.codes.max()) == (0, 15)
    decoded = blocked.decoded(32)
    assert decoded[0, 0] == pytest.approx(-1.0, abs=1e-6) and decoded[0, -1] == pytest.approx(2.0, abs=1e-6)


def test_gptq_keeps_the_layer_output_better_than_rounding():
    """On correlated inputs GPTQ's error feedback gives a lower output error than round to nearest."""
    rng = np.random.default_rng(2)
    k, n = 64, 32
    mixing = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    x = rng.normal(size=(4000, k)) @ mixing
    weight = rng.normal(size=(k, n)).astype(np.float32)
    node = gs.Node("MatMul", "layer", inputs=[gs.Variable("x"), gs.Constant("W", weight)], outputs=[gs.Variable("y")])
    layer = WeightedLayer(node, node.inputs[1])
    stats = InputStatistics.empty(1, k, False, False)
    stats.add(x[:, None, :], False)
    units = weight.T.copy()
    rtn = quantize_rtn(units, 4, 32, True).decoded(k)
    gptq = quantize_gptq(layer, units, stats, 4, 32, True).decoded(k)
    reference = x @ weight
    assert relative(x @ gptq.T, reference) < 0.85 * relative(x @ rtn.T, reference)


# ------------------------------------------------------------------------------------------------ bad options


@pytest.fixture
def matmul_file(tmp_path):
    model, _ = matmul_model(64, 16, ["N", 64])
    onnx.save(model, tmp_path / "model.onnx")
    return tmp_path


@pytest.mark.parametrize("options, keyword", [
    ("block=48", "power of two"),
    ("block=8", "power of two"),
    ("bits=1", "2 to 8"),
    ("bits=9", "2 to 8"),
    ("bits=3", "runs only 2, 4, 8"),
    ("method=awq", "rtn, gptq"),
])
def test_bad_option_exits_2(matmul_file, options, keyword):
    before = (matmul_file / "model.onnx").read_bytes()
    result = run_cli("optimize", matmul_file / "model.onnx", "-o", matmul_file / "out.onnx",
                     "--passes", f"int4:{options}", "--runs", "0")
    assert_input_error(result, "int4", keyword)
    assert (matmul_file / "model.onnx").read_bytes() == before
    assert not (matmul_file / "out.onnx").exists()


def test_model_without_float_weights_exits_2(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [])
    onnx.save(model, tmp_path / "model.onnx")
    result = run_cli("optimize", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--passes", "int4",
                     "--runs", "0")
    assert_input_error(result, "int4", "no MatMul or Gemm")
    assert not (tmp_path / "out.onnx").exists()


def test_gptq_without_calibration_data_exits_2(matmul_file):
    result = run_cli("optimize", matmul_file / "model.onnx", "-o", matmul_file / "out.onnx",
                     "--passes", "int4:method=gptq", "--runs", "0")
    assert_input_error(result, "gptq", "calibration data")


def test_config_validates_in_the_library_too():
    with pytest.raises(ValueError, match="power of two"):
        Int4Config(block=100)


# --------------------------------------------------------------------------------------------------- real model


@pytest.mark.assets
def test_minilm_int4_keeps_the_sentence_embedding(assets, tmp_path):
    """paraphrase-MiniLM-L3 with int4 (RTN) and 32 SST-2 phrases as calibration data: every MatMul and the
    embedding tables become 4-bit kernels, the file falls under 0.2× and the sentence embeddings of 64 other
    phrases stay close to fp32."""
    from onnxcomp import data as datasets
    from onnxcomp.runner import Runner

    source = assets / "zoo/paraphrase_minilm_l3.onnx"
    tokenizer = assets / "zoo/bert_uncased_tokenizer.json"
    rows = (assets / "data/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    calibration, evaluation = tmp_path / "calibration.tsv", tmp_path / "evaluation.tsv"
    calibration.write_text("\n".join(rows[:32]) + "\n", encoding="utf-8")
    evaluation.write_text("\n".join(rows[32:96]) + "\n", encoding="utf-8")
    out = tmp_path / "int4.onnx"
    optimized, report = onnxcomp.optimize(source, "int4", calib_data=calibration, tokenizer=tokenizer, output=out,
                                          validate_result=False)
    stats = report.passes[0].stats
    assert stats["int4:MatMul"] == 18 and stats["int4:Gather"] == 2 and stats["exact_rows"] > 0
    assert out.stat().st_size <= 0.20 * source.stat().st_size
    dataset = datasets.open_data(evaluation, onnx.load(source), tokenizer=tokenizer)
    output = next(o.name for o in optimized.graph.output if len(datasets.value_dims(o)) == 2)
    reference = Runner(str(source)).stacked(dataset, output=output)
    got = Runner(str(out)).stacked(dataset, output=output)
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.mean() >= 0.98
