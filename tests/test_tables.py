"""Embedding tables (Gather on a constant [V, D]) under share and prune: each checked through ONNX Runtime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from helpers import optimized_ops, run_model

RNG = np.random.default_rng(0)
VOCABULARY, WIDTH = 300, 64
FREQUENT = [1, 2]  # a [CLS] and a [SEP]: in every calibration sample


def gather_model(tied: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids [B, T] → Gather(E [V, D]) → e; with `tied`, E is also read by a MatMul (an output projection)."""
    scales = np.geomspace(0.05, 2.0, VOCABULARY).astype(np.float32)[:, None]  # rows differ 40-fold
    table = (RNG.normal(size=(VOCABULARY, WIDTH)) * scales).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embedding")]
    outputs = [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", "T", WIDTH])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["E", "h"], ["logits"], name="projection"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [VOCABULARY, 1]))
        initializers = [numpy_helper.from_array(table, "E"),
                        numpy_helper.from_array(np.ones((WIDTH, 1), np.float32), "h")]
    else:
        initializers = [numpy_helper.from_array(table, "E")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, table


def calibration_ids() -> dict[str, np.ndarray]:
    ids = RNG.integers(3, VOCABULARY, size=(40, 6))
    ids[:, 0], ids[:, -1] = FREQUENT
    return {"ids": ids}


def table_of(model: onnx.ModelProto) -> np.ndarray:
    """The table as ONNX Runtime decodes it: every row looked up."""
    (rows,) = run_model(model, {"ids": np.arange(VOCABULARY)[None]})[:1]
    return rows[0]


def test_share_gives_each_row_a_scale_and_one_codebook_and_shrinks_the_file():
    model, table = gather_model()
    out, report = onnxcomp.optimize(model, "share:bits=4", validate_result=False)
    stats = report.passes[0].stats
    assert stats["tables"] == 1 and stats["shared"] == 1
    (row,) = report.passes[0].layers
    assert row["op"] == "Gather" and row["codebooks"] == 1 and row["bits"] == 4
    decoded = table_of(out)
    assert max(len(np.unique(values)) for values in decoded) <= 2 ** 4  # the codebook times the row's scale
    error = np.linalg.norm(decoded - table, axis=1) / np.linalg.norm(table, axis=1)
    assert error.max() < 0.2 and np.median(error) < 0.1  # small rows kept as well as large ones
    assert out.ByteSize() < 0.2 * model.ByteSize()
    assert "warning" in stats  # no calibration data: the frequent rows could not be kept exact


def test_share_keeps_the_rows_of_most_samples_exact_and_ort_folds_the_restoring(tmp_path):
    model, table = gather_model()
    out, report = onnxcomp.optimize(model, "share:bits=3", calib_data=calibration_ids(), validate_result=False)
    assert report.passes[0].stats["exact_rows"] == len(FREQUENT)
    decoded = table_of(out)
    np.testing.assert_array_equal(decoded[FREQUENT], table[FREQUENT])
    others = np.setdiff1d(np.arange(VOCABULARY), FREQUENT)
    assert not np.allclose(decoded[others], table[others], atol=1e-3)
    _, ran = optimized_ops(out, tmp_path)
    assert ran == Counter({"Gather": 1})  # the decoding and the ScatterND are folded when the session starts
    dense, _ = onnxcomp.optimize(model, "share:bits=3,encoding=dense", calib_data=calibration_ids(),
                                 validate_result=False)
    np.testing.assert_array_equal(table_of(dense), decoded)


def test_prune_zeros_the_smallest_of_each_row_and_leaves_frequent_rows_whole():
    model, table = gather_model()
    out, report = onnxcomp.optimize(model, "prune:sparsity=0.5", calib_data=calibration_ids(),
                                    validate_result=False)
    stats = report.passes[0].stats
    assert stats["tables"] == 1 and stats["exact_rows"] == len(FREQUENT)
    decoded = table_of(out)
    np.testing.assert_array_equal(decoded[FREQUENT], table[FREQUENT])
    others = np.setdiff1d(np.arange(VOCABULARY), FREQUENT)
    assert np.all(np.sum(decoded[others] == 0, axis=1) == WIDTH // 2)  # every row, small or large, at 50 %
    kept = decoded[others] != 0
    np.testing.assert_array_equal(decoded[others][kept], table[others][kept])
    threshold = np.sort(np.abs(table[others]), axis=1)[:, WIDTH // 2 - 1:WIDTH // 2 + 1]
    assert np.all(np.abs(np.where(kept, table[others], np.inf)).min(axis=1) >= threshold[:, 0])
    assert out.ByteSize() < 0.7 * model.ByteSize()


@pytest.mark.parametrize("recipe", ["share:bits=4", "prune:sparsity=0.5"])
def test_tables_false_and_tied_tables_are_left_as_they_are(recipe):
    model, table = gather_model()
    out, report = onnxcomp.optimize(model, f"{recipe},tables=false", validate_result=False)
    assert not report.passes[0].modified
    np.testing.assert_array_equal(table_of(out), table)
    tied, table = gather_model(tied=True)
    out, report = onnxcomp.optimize(tied, recipe, validate_result=False)
    assert report.passes[0].stats["skipped:weight-shared"] == 1  # the table, read by the MatMul too
    np.testing.assert_array_equal(table_of(out), table)
