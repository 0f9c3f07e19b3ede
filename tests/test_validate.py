"""Validation metrics on tiny models whose differences are known exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.validate import validate


def scaled(factor: float, offset: float = 0.0) -> onnx.ModelProto:
    """y = x·factor + offset on [N, 4] inputs."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "f"], ["m"]), helper.make_node("Add", ["m", "o"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.array(factor, np.float32), "f"),
                     numpy_helper.from_array(np.array([offset, 0, 0, 0], np.float32), "o")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_identical_models_have_zero_error_and_full_agreement():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    result = validate(scaled(2.0), scaled(2.0), {"x": x, "labels": x.argmax(1)}, latency_runs=5)
    provider = result.providers[0]
    assert provider.samples == 50
    assert provider.outputs[0].max_abs_error == 0 and provider.outputs[0].sqnr_db == float("inf")
    assert provider.agreement == 100.0
    assert provider.reference_accuracy == provider.candidate_accuracy == 100.0
    assert provider.reference_latency.runs == 5 and provider.latency_ratio > 0


def test_error_metrics_match_a_known_difference():
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    result = validate(scaled(1.0), scaled(1.1), {"x": x}, latency_runs=0, batch_size=10)
    out = result.providers[0].outputs[0]
    assert out.max_abs_error == pytest.approx(0.1 * np.abs(x).max(), rel=1e-5)
    assert out.mean_abs_error == pytest.approx(0.1 * np.abs(x).mean(), rel=1e-5)
    assert out.sqnr_db == pytest.approx(20.0, abs=1e-3)  # 10·log10(1 / 0.1²)
    assert out.cosine == pytest.approx(1.0, abs=1e-6)  # a scaled copy points the same way
    assert result.providers[0].agreement == 100.0
    assert result.notes == ["the data has no labels: accuracy was not measured, agreement with the reference was"]


def test_disagreement_and_accuracy_drop():
    # The offset on class 0 makes the candidate pick class 0 where the reference's margin is small.
    x = np.random.default_rng(2).normal(size=(200, 4)).astype(np.float32)
    labels = x.argmax(1)
    result = validate(scaled(1.0), scaled(1.0, offset=0.5), {"x": x, "labels": labels}, latency_runs=0)
    provider = result.providers[0]
    changed = (x + np.array([0.5, 0, 0, 0], np.float32)).argmax(1) != labels
    assert provider.agreement == pytest.approx(100.0 * (1 - changed.mean()))
    assert provider.accuracy_drop == pytest.approx(100.0 * changed.mean())
    assert result.accuracy_drop == provider.accuracy_drop


def test_large_models_are_validated_one_session_at_a_time_with_the_same_figures(monkeypatch):
    # Above ONE_SESSION_AT_A_TIME_BYTES the reference's session is let go before the candidate's opens (two
    # sessions of a large model at once were most of validation's peak memory); the comparison is unchanged.
    import gc
    import importlib
    import weakref

    validation = importlib.import_module("onnxcomp.validate")  # the package's `validate` is the function

    x = np.random.default_rng(2).normal(size=(100, 4)).astype(np.float32)
    data = {"x": x, "labels": x.argmax(1)}
    side_by_side = validate(scaled(1.0), scaled(1.0, offset=0.5), data, latency_runs=3, batch_size=16)
    opened, most_alive = [], []

    class CountedRunner(validation.Runner):
        def __init__(self, *args, **kwargs):
            gc.collect()
            most_alive.append(1 + sum(ref() is not None for ref in opened))
            super().__init__(*args, **kwargs)
            opened.append(weakref.ref(self))

    monkeypatch.setattr(validation, "Runner", CountedRunner)
    monkeypatch.setattr(validation, "ONE_SESSION_AT_A_TIME_BYTES", 0)
    one_at_a_time = validate(scaled(1.0), scaled(1.0, offset=0.5), data, latency_runs=3, batch_size=16)
    assert most_alive == [1, 1]
    before, after = side_by_side.providers[0], one_at_a_time.providers[0]
    assert (after.agreement, after.accuracy_drop, after.samples) == (before.agreement, before.accuracy_drop, 100)
    assert after.outputs[0].max_abs_error == before.outputs[0].max_abs_error
    assert after.reference_latency.runs == after.candidate_latency.runs == 3
    assert any("one after the other" in note for note in one_at_a_time.notes)
    assert not any("one after the other" in note for note in side_by_side.notes)


def test_random_inputs_say_accuracy_was_not_measured():
    result = validate(scaled(1.0), scaled(1.0), None, latency_runs=0)
    assert result.random_data
    assert "accuracy was NOT measured" in result.notes[0]
    assert result.providers[0].reference_accuracy is None


def test_nan_in_the_candidate_is_reported_not_hidden():
    log_abs = helper.make_model(helper.make_graph(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    log_only = helper.make_model(helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    out = validate(log_abs, log_only, {"x": x}, latency_runs=0).providers[0].outputs[0]
    assert np.isnan(out.max_abs_error) and np.isnan(out.sqnr_db)


def test_outputs_that_are_not_one_row_per_sample_give_no_accuracy():
    # ReduceMean over the batch: one row per batch, not per sample; top-1 would compare the wrong rows.
    reduce = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.random.default_rng(4).normal(size=(100, 4)).astype(np.float32)
    provider = validate(reduce, reduce, {"x": x, "labels": x.argmax(1)}, latency_runs=0).providers[0]
    assert provider.reference_accuracy is None and provider.agreement is None


def test_optimize_can_let_the_saved_model_go_before_validating(tmp_path):
    # The CLI's way (return_model=False): the optimized model is not held while ONNX Runtime opens the two files.
    from onnxcomp import api
    from onnxcomp.errors import InputError

    source = tmp_path / "model.onnx"
    onnx.save(scaled(2.0), str(source))
    kept, _ = api.optimize(str(source), "fold-constants", output=tmp_path / "kept.onnx", latency_runs=0)
    dropped, report = api.optimize(str(source), "fold-constants", output=tmp_path / "out.onnx", latency_runs=0,
                                   return_model=False)
    assert dropped is None and kept is not None
    assert onnx.load(str(tmp_path / "out.onnx")) == kept
    assert report.validation.providers[0].outputs[0].max_abs_error == 0
    with pytest.raises(InputError, match="needs output="):
        api.optimize(str(source), "fold-constants", return_model=False)
