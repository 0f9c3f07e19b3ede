"""share: k-means codebooks, exact zeros and few-valued tensors, compact storage equal to the dense layout."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model
from onnxcomp.passes.share import cluster
from test_bad_input import check_rejected
from test_prune import images, loud_and_quiet, net, run, sqnr, weights

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_at_most_2_to_the_bits_values_per_codebook(bits, granularity):
    shared, records = run(net(), f"share:bits={bits},granularity={granularity}")
    w2 = weights(shared)["W2"]
    slices = list(w2.reshape(w2.shape[0], -1)) if granularity == "row" else [w2]
    assert max(np.unique(s).size for s in slices) <= 2 ** bits
    assert records[0].stats["shared"] == 2 and records[0].stats["skipped:small"] == 2


def test_compact_layout_gives_the_outputs_of_the_dense_layout_and_shrinks():
    compact, records = run(net(), "share:bits=4")
    dense, _ = run(net(), "share:bits=4,encoding=dense")
    feed = {"x": images(8, seed=2)}
    np.testing.assert_array_equal(run_model(compact, feed)[0], run_model(dense, feed)[0])
    stats = records[0].stats
    weights_shared = 1152 + 9216
    assert stats["stored_bytes"] <= weights_shared * 4 / 8 + 2 * 32 * 16 * 4 + 16  # indices, codebooks, padding
    assert stats["stored_bytes_zlib"] <= stats["stored_bytes"] + 64
    assert compact.ByteSize() < dense.ByteSize() - 0.8 * (weights_shared * 4 - stats["stored_bytes"])


def test_codebooks_and_scales_are_stored_in_float16_and_tensors_kept_exactly_keep_their_values():
    shared, _ = run(net(), "share:bits=4,granularity=scaled")
    tables = [numpy_helper.to_array(t) for t in shared.graph.initializer if t.name.endswith((".codebook", ".scales"))]
    assert len(tables) == 4 and all(table.dtype == np.float16 for table in tables)
    weight = RNG.choice(np.array([-0.1, 0.30000001, 1.0], np.float32), size=(8, 4, 3, 3))  # not float16 values
    for granularity in ("row", "scaled", "tensor"):
        np.testing.assert_array_equal(cluster(weight, 2, granularity).values, weight)


def test_zeros_stay_zero_after_prune():
    pruned, _ = run(net(), "prune:sparsity=0.6")
    shared, records = run(pruned, "share:bits=3")
    before, after = weights(pruned)["W2"], weights(shared)["W2"]
    np.testing.assert_array_equal(after == 0, before == 0)
    assert np.unique(after[after != 0]).size <= 32 * 8  # 8 values per output channel
    feed = {"x": images(4, seed=3)}
    dense, _ = run(pruned, "share:bits=3,encoding=dense")
    np.testing.assert_array_equal(run_model(shared, feed)[0], run_model(dense, feed)[0])


def test_tensor_with_few_distinct_values_is_kept_exactly():
    weight = RNG.choice(np.array([-0.5, 0.25, 1.0], np.float32), size=(8, 4, 3, 3))
    result = cluster(weight, 2)
    np.testing.assert_array_equal(result.values, weight)
    assert result.exact
    assert not cluster(RNG.normal(size=(8, 4, 3, 3)).astype(np.float32), 2).exact


def test_non_float_weights_are_skipped_and_counted():
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 32])],
                              initializer=[numpy_helper.from_array(np.ones((64, 32), np.int32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result, records = run(model, "share:bits=4")
    assert not records[0].modified and records[0].stats["skipped:not-float"] == 1


def test_importance_from_calibration_data_changes_the_codebooks():
    plain, _ = run(net(), "share:bits=2")
    weighted, records = run(net(), "share:bits=2", images(32, seed=1))
    assert records[0].stats["importance"] == "energy"
    assert not np.array_equal(weights(plain)["W2"], weights(weighted)["W2"])


@pytest.mark.parametrize("option", ["bits=0", "bits=9", "bits=five", "granularity=pixel", "importance=magic",
                                    "allocation=magic", "layer-bits=conv2:9", "layer-bits=conv2"])
def test_bad_options_are_usage_errors(tmp_path, option):
    onnx.save(net(), tmp_path / "net.onnx")
    check_rejected(tmp_path, ["optimize", tmp_path / "net.onnx", "--passes", f"share:{option}", "-o",
                              tmp_path / "out.onnx", "--no-validate"], "share", option.split("=")[0])


def two_bit_variants(passes: str, values: tuple[str, str]) -> dict:
    """{value: (reference outputs, outputs, records, model)} of net() shared at 2 bits with `passes` formatted with
    each value, calibrated and evaluated on different images; every variant keeps at most 4 values per row."""
    calibration, evaluation = images(48, seed=1), images(48, seed=2)
    reference = run_model(net(), {"x": evaluation})[0]
    result = {}
    for value in values:
        shared, records = run(net(), passes.format(value), calibration)
        w2 = weights(shared)["W2"]
        assert max(np.unique(row).size for row in w2.reshape(w2.shape[0], -1)) <= 4
        result[value] = (reference, run_model(shared, {"x": evaluation})[0], records, shared)
    return result


def test_unit_correction_reduces_the_error_on_new_data_and_keeps_the_sharing():
    variants = two_bit_variants("share:bits=2,correction={},importance=none,allocation=uniform", ("none", "channel"))
    error = {key: np.sum((output - reference) ** 2) for key, (reference, output, _, _) in variants.items()}
    _, _, records, shared = variants["channel"]
    assert records[0].stats["corrected"] == 2
    assert error["channel"] < 0.7 * error["none"], error
    conv2 = next(n for n in shared.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3  # the mean shift went into a new bias


def test_data_driven_options_need_calibration_data():
    from onnxcomp.pass_base import PreconditionError

    for option in ("importance=energy", "correction=channel", "allocation=sensitivity"):
        with pytest.raises(PreconditionError, match="calib_data="):
            run(net(), f"share:{option}")


def test_few_zeros_keep_a_zero_entry_instead_of_a_mask():
    weight = RNG.normal(size=(16, 8, 3, 3)).astype(np.float32)
    weight.reshape(-1)[RNG.choice(weight.size, 20, replace=False)] = 0  # 1.7 %: a mask would cost more
    result = cluster(weight, 4, "tensor")
    assert not result.sparse and result.indices.size == weight.size
    np.testing.assert_array_equal(result.values == 0, weight == 0)
    assert np.unique(result.values).size <= 16 and result.codebook[0] == 0
    weight.reshape(-1)[: weight.size // 2] = 0  # half zeros: the mask pays
    result = cluster(weight, 4, "tensor")
    assert result.sparse and result.indices.size == np.count_nonzero(weight)


def test_one_bit_masks_zeros_so_the_non_zeros_keep_both_values():
    # at 1 bit a reserved 0 entry would leave one value for every non-zero weight, whatever their signs
    weight = RNG.normal(size=(16, 8, 3, 3)).astype(np.float32)
    weight[np.abs(weight) < np.quantile(np.abs(weight), 0.8)] = 0  # pruned to 80 %
    for granularity in ("tensor", "row", "scaled"):
        result = cluster(weight, 1, granularity)
        assert result.sparse and result.indices.size == np.count_nonzero(weight)
        np.testing.assert_array_equal(result.values == 0, weight == 0)
        assert sqnr(weight, result.values) > 5, granularity  # signs kept: 10 to 12 dB here; one value: 0 dB


def test_bit_allocation_spends_the_bits_where_the_error_reaches_the_output():
    """Within the bytes of 3 bits per weight, codebooks included, the layer whose error reaches the output gets
    more bits than the one scaled by 0.01, and the output error falls below that of 3 bits everywhere."""
    calibration, evaluation = images(40, seed=1), images(40, seed=2)
    model = loud_and_quiet(channels=64)
    reference = run_model(model, {"x": evaluation})[0]
    uniform, _ = run(model, "share:bits=3,min-size=0,allocation=uniform", calibration)
    allocated, records = run(model, "share:bits=3,min-size=0", calibration)
    stats, rows = records[0].stats, {row["layer"]: row for row in records[0].layers}
    assert stats["allocation"] == "sensitivity"
    assert rows["loud"]["bits"] > 3 > rows["quiet"]["bits"]
    assert stats["stored_bytes"] <= 2 * 2304 * 3 / 8
    assert sqnr(reference, run_model(allocated, {"x": evaluation})[0]) > \
        sqnr(reference, run_model(uniform, {"x": evaluation})[0]) + 3


def test_allocation_chooses_the_least_error_within_the_budget_without_overshooting():
    """One option per layer (bits, granularity), least summed error within the bytes. Here 4 bytes must go:
    layer B's cheapest error per byte is its long step (50 bytes, error 1), but its short one (error 0.1) is
    enough; taking whole hull segments cheapest first would pay the long step."""
    from itertools import product

    from onnxcomp.passes.allocation import choose

    assert choose([np.array([100.0, 10.0]), np.array([100.0, 95.0, 50.0])],
                  [np.array([0.0, 5.0]), np.array([0.0, 0.1, 1.0])], budget=196) == [0, 1]
    rng = np.random.default_rng(0)
    for _ in range(50):  # against every combination, on integer costs with one-byte units
        costs = [rng.integers(1, 40, size=rng.integers(1, 5)).astype(float) for _ in range(4)]
        errors = [rng.random(cost.size) for cost in costs]
        budget = float(sum(cost.min() for cost in costs) + rng.integers(0, 60))
        picked = choose(costs, errors, budget, steps=max(int(budget - sum(c.min() for c in costs)), 1))
        feasible = [sum(e[i] for e, i in zip(errors, combo)) for combo in product(*(range(c.size) for c in costs))
                    if sum(c[i] for c, i in zip(costs, combo)) <= budget]
        assert sum(c[i] for c, i in zip(costs, picked)) <= budget
        assert sum(e[i] for e, i in zip(errors, picked)) == pytest.approx(min(feasible))
    costs = [rng.random(20) * 1000 for _ in range(30)]  # real costs: the budget holds with its rounding
    picked = choose(costs, [rng.random(20) for _ in costs], budget=12000.5)
    assert sum(c[i] for c, i in zip(costs, picked)) <= 12000.5


def test_outputs_lost_on_held_out_samples_are_warned_about(digits_model, caplog):
    import onnxcomp

    calibration = str(digits_model.parent / "digits_calib.npz")
    for bits, lost in ((1, True), (5, False)):
        _, report = onnxcomp.optimize(str(digits_model), f"share:bits={bits}", calib_data=calibration,
                                      validate_result=False)
        stats = [record for record in report.passes if record.name == "share"][0].stats
        assert (stats["held_out_snr_db"] < 6) == lost
        assert ("largely lost at bits=1: raise bits, or heal" in stats.get("warning", "")) == lost
    assert "largely lost" in caplog.text


def test_fractional_bits_are_an_average_the_allocation_keeps():
    model = loud_and_quiet(channels=64)
    _, records = run(model, "share:bits=2.5,min-size=0", images(40, seed=1))
    stats = records[0].stats
    assert stats["bits"] == 2.5 and stats["allocation"] == "sensitivity"
    assert stats["stored_bytes"] <= 2 * 2304 * 2.5 / 8
    _, records = run(model, "share:bits=3.0,min-size=0,allocation=uniform")  # 3.0 is whole bits
    assert records[0].stats["bits"] == 3
    from onnxcomp.errors import InputError
    from onnxcomp.pass_base import PreconditionError

    with pytest.raises(PreconditionError, match="average.*calib_data="):
        run(model, "share:bits=2.5")
    with pytest.raises(InputError, match="needs allocation=sensitivity"):
        run(model, "share:bits=2.5,allocation=uniform", images(40, seed=1))


def test_layer_bits_fix_the_bits_of_matching_layers():
    shared, records = run(net(), "share:bits=2,layer-bits=conv2:6", images(32, seed=1))
    rows = {row["layer"]: row for row in records[0].layers}
    assert rows["conv2"]["bits"] == 6
    assert records[0].stats["allocation"] == "sensitivity"
    w2 = weights(shared)["W2"]
    assert 4 < max(np.unique(row).size for row in w2.reshape(w2.shape[0], -1)) <= 64


def test_deep_compression_recipe_prunes_then_shares(tmp_path, digits_model):
    from helpers import run_cli

    out = tmp_path / "dc.onnx"
    result = run_cli("optimize", digits_model, "--passes", "deep-compression", "-o", out,
                     "--calib-data", digits_model.parent / "digits_calib.npz", "--no-validate")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines() if line.split()[:1] in
            (["fold-constants"], ["fuse-bn"], ["prune"], ["share"], ["short-names"])][:5] == \
        ["fold-constants", "fuse-bn", "prune", "share", "short-names"]
    assert out.stat().st_size < digits_model.stat().st_size / 3.5  # 16 k weights: decoding nodes weigh
    rejected = run_cli("optimize", digits_model, "--passes", "deep-compression,sparsity=0.3", "-o", out)
    assert rejected.returncode == 2 and "write its passes out" in rejected.stderr
    assert "deep-compression" in run_cli("passes").stdout


def test_probes_use_fewer_samples_where_all_of_them_would_take_too_long(monkeypatch):
    """Layer-by-layer probes of a large model are budgeted in time: past it, whole batches down to 4 samples."""
    import onnx_graphsurgeon as gs

    from onnxcomp import data as datasets
    from onnxcomp.pass_base import PassContext
    from onnxcomp.passes import allocation

    model = loud_and_quiet(channels=16)
    data = datasets.open_data({"x": images(32, seed=1)}, model)
    graph = gs.import_onnx(model)
    assert allocation.ModelOutputs(graph, PassContext(), data, 32, 4, probes=1).samples == 32
    monkeypatch.setattr(allocation, "PROBE_SECONDS", 1e-9)
    cheap = allocation.ModelOutputs(graph, PassContext(), data, 32, 4, probes=70)
    assert cheap.samples == allocation.MIN_PROBE_SAMPLES and cheap.run([]).size == cheap.reference.size


def test_sequential_sharing_fits_later_layers_to_the_inputs_the_earlier_shared_layers_give():
    # conv2 reads conv1's shared output: fitted to the unshared conv1's inputs, it passes conv1's error on;
    # re-solved on the inputs it now gets, it takes part of that error back
    variants = two_bit_variants("share:bits=2,allocation=uniform,min-size=0,sequential={}", ("false", "true"))
    quality = {key: sqnr(reference, output) for key, (reference, output, _, _) in variants.items()}
    assert quality["true"] > quality["false"] + 0.5, quality  # measured: 20.3 → 21.6 dB
