"""Bad input through the command line: one clear line, exit status 2, and nothing on disk touched.

Every case runs `onnxcomp` as a user's shell would and checks the CLI contract from onnxcomp.cli:
  * exit status 2 (bad input or usage),
  * stderr is exactly one line, starting with "onnxcomp: error:" and naming the problem,
  * no traceback anywhere,
  * the input model (and every other file in the work folder) is byte-for-byte unchanged, and no output file
    (or temporary file) appeared.
Budgets are the exception: a broken budget exits 1 after the model was written and measured.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_input_error, run_cli

OPSET = [helper.make_opsetid("", 17)]


# ---------------------------------------------------------------------------------------------------- helpers


def _save(model: onnx.ModelProto, path: Path) -> Path:
    if not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.checker.check_model(model)  # the checker would itself refuse the bad external data we test
    path.write_bytes(model.SerializeToString())
    return path


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def matmul_model(input_name: str = "x") -> onnx.ModelProto:
    """x [N, 4] float32 → MatMul(W [4, 3]) → y [N, 3]."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [weight])
    return _make_model(graph)


def int_input_model() -> onnx.ModelProto:
    """ids [N, 4] int64 → Cast(float) → y [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return _make_model(graph)


def two_input_model() -> onnx.ModelProto:
    """x, y [N, 4] float32 → Add → z [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])])
    return _make_model(graph)


def external_weight_model(location: str) -> onnx.ModelProto:
    """matmul_model whose weight W is stored as external data at `location` (offset 0, 48 bytes)."""
    model = matmul_model()
    weight = model.graph.initializer[0]
    length = len(weight.raw_data)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return model


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, digits_model) -> Path:
    """A work folder holding a copy of the digits model as model.onnx (outputs would land beside it)."""
    shutil.copyfile(digits_model, tmp_path / "model.onnx")
    return tmp_path


def check_rejected(folder: Path, args: list, *keywords: str, cwd: Path | None = None, argparse: bool = False):
    """Run the CLI on files in `folder`; assert the error contract and that no file changed or appeared."""
    before = snapshot(folder)
    result = run_cli(*args, cwd=cwd)
    assert_input_error(result, *keywords, argparse=argparse)
    after = snapshot(folder)
    assert sorted(after) == sorted(before), f"files appeared or vanished: {sorted(set(after) ^ set(before))}"
    for name, content in before.items():
        assert after[name] == content, f"{name} was modified"
    return result


# ------------------------------------------------------------------------------------------------ model files


def test_a_model_onnx_runtime_loads_but_cannot_run_is_an_input_error(tmp_path):
    """A Gemm bias that does not broadcast passes onnx.checker and ORT's session creation, and fails at the
    first run. Validation compares outputs before it times anything, so the runner reports it in one line (a
    latency run first made it an internal error, exit 3)."""
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(np.ones((7, 5), np.float32), "w"),
                               numpy_helper.from_array(np.ones(2, np.float32), "b")])
    source = _save(_make_model(graph), tmp_path / "model.onnx")
    before = source.read_bytes()
    result = run_cli("optimize", source, "-o", tmp_path / "out.onnx")
    assert_input_error(result, "could not run", "bias")
    assert source.read_bytes() == before


def test_missing_model_file(tmp_path):
    result = check_rejected(tmp_path, ["optimize", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx"],
                            "no such file")
    assert "nope.onnx" in result.stderr


def test_missing_model_file_inspect(tmp_path):
    check_rejected(tmp_path, ["inspect", tmp_path / "nope.onnx"], "no such file")


def test_model_path_is_a_folder(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    check_rejected(tmp_path, ["optimize", tmp_path / "dir.onnx", "-o", tmp_path / "out.onnx"], "folder")


def test_text_file_is_not_a_model(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_text("this is a README, not a model\nsecond line\n", encoding="utf-8")
    check_rejected(tmp_path, ["optimize", model], "ONNX model")


def test_random_bytes_are_not_a_model(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    check_rejected(tmp_path, ["optimize", model], "ONNX model")


def test_empty_file_is_not_a_model(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    check_rejected(tmp_path, ["optimize", model], "ONNX model")


def test_truncated_model(tmp_path, digits_model):
    content = digits_model.read_bytes()
    model = tmp_path / "model.onnx"
    model.write_bytes(content[: len(content) // 2])
    check_rejected(tmp_path, ["optimize", model], "ONNX model")


def test_truncated_model_inspect(tmp_path, digits_model):
    content = digits_model.read_bytes()
    model = tmp_path / "model.onnx"
    model.write_bytes(content[: len(content) // 2])
    check_rejected(tmp_path, ["inspect", model], "ONNX model")


@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_external_data_at_absolute_path_is_refused(tmp_path, command):
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.ones(12, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = _save(external_weight_model(str(secret)), folder / "model.onnx")
    result = check_rejected(tmp_path, [command, model], "external data", "absolute")
    assert "refusing" in result.stderr


@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_external_data_above_model_folder_is_refused(tmp_path, command):
    (tmp_path / "x.data").write_bytes(np.ones(12, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = _save(external_weight_model("../x.data"), folder / "model.onnx")
    result = check_rejected(tmp_path, [command, model], "external data", "../x.data")
    assert "refusing" in result.stderr


def test_external_data_going_up_and_back_is_refused(tmp_path):
    # "sub/../../x.data" starts inside the folder but ends outside it
    (tmp_path / "x.data").write_bytes(np.ones(12, np.float32).tobytes())
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    model = _save(external_weight_model("sub/../../x.data"), folder / "model.onnx")
    check_rejected(tmp_path, ["optimize", model], "external data")


def test_external_data_file_missing(tmp_path):
    model = _save(external_weight_model("weights.data"), tmp_path / "model.onnx")
    check_rejected(tmp_path, ["optimize", model], "external data")


def test_external_data_file_too_short(tmp_path):
    (tmp_path / "weights.data").write_bytes(b"\0" * 8)  # the tensor needs 48 bytes
    model = _save(external_weight_model("weights.data"), tmp_path / "model.onnx")
    check_rejected(tmp_path, ["optimize", model], "external data")


# ------------------------------------------------------------------------------------------------ output path


def test_output_equal_to_input_is_refused(work):
    model = work / "model.onnx"
    check_rejected(work, ["optimize", model, "-o", model, "--runs", "0"], "input model")


def test_output_equal_to_input_spelled_differently_is_refused(work):
    (work / "dir").mkdir()
    check_rejected(work, ["optimize", "model.onnx", "-o", "./dir/../model.onnx", "--runs", "0"], "input model",
                   cwd=work)


def test_output_equal_to_input_absolute_vs_relative_is_refused(work):
    check_rejected(work, ["optimize", "model.onnx", "-o", work / "model.onnx", "--runs", "0"], "input model",
                   cwd=work)


def test_output_symlink_to_input_is_refused(work):
    os.symlink(work / "model.onnx", work / "link.onnx")
    check_rejected(work, ["optimize", work / "model.onnx", "-o", work / "link.onnx", "--runs", "0"],
                   "input model")


def test_output_over_input_external_data_is_refused(tmp_path):
    model = matmul_model()
    (tmp_path / "weights.data").write_bytes(numpy_helper.to_array(model.graph.initializer[0]).tobytes())
    source = _save(external_weight_model("weights.data"), tmp_path / "model.onnx")
    check_rejected(tmp_path, ["optimize", source, "-o", tmp_path / "weights.data", "--runs", "0"], "input model")


def test_output_is_a_folder(work):
    (work / "out").mkdir()
    check_rejected(work, ["optimize", work / "model.onnx", "-o", work / "out", "--runs", "0"], "folder")


def test_output_folder_missing(work):
    check_rejected(work, ["optimize", work / "model.onnx", "-o", work / "missing" / "out.onnx", "--runs", "0"],
                   "does not exist")


# ---------------------------------------------------------------------------------------------- passes, recipes


def test_unknown_pass_lists_valid_passes(work):
    result = check_rejected(work, ["optimize", work / "model.onnx", "--passes", "fuse-bn,no-such-pass"],
                            "unknown pass", "no-such-pass")
    assert "fuse-bn" in result.stderr and "cleanup" in result.stderr


def test_unknown_pass_option_lists_valid_options(work):
    result = check_rejected(work, ["optimize", work / "model.onnx", "--passes", "fuse-bn:foo=1"],
                            "fuse-bn", "'foo'")
    assert "valid options" in result.stderr


@pytest.mark.parametrize("passes, keyword", [
    ("fuse-bn:foo", "key=value"),       # an option without a value
    ("foo=1,fuse-bn", "before any pass"),  # an option before any pass
    (",", "no pass"),                    # no pass at all
])
def test_malformed_pass_option(work, passes, keyword):
    check_rejected(work, ["optimize", work / "model.onnx", "--passes", passes], keyword)


def test_passes_and_recipe_together(work):
    recipe = work / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "fuse-bn"\n', encoding="utf-8")
    check_rejected(work, ["optimize", work / "model.onnx", "--passes", "fuse-bn", "--recipe", recipe],
                   "not allowed with", argparse=True)


def test_recipe_not_valid_toml(work):
    recipe = work / "recipe.toml"
    recipe.write_text('[[pass]\nname = "fuse-bn\n', encoding="utf-8")
    check_rejected(work, ["optimize", work / "model.onnx", "--recipe", recipe], "TOML")


def test_recipe_names_unknown_pass(work):
    recipe = work / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "fuse-bn"\n\n[[pass]]\nname = "no-such-pass"\n', encoding="utf-8")
    result = check_rejected(work, ["optimize", work / "model.onnx", "--recipe", recipe],
                            "unknown pass", "no-such-pass")
    assert "fuse-bn" in result.stderr  # the valid passes are listed


def test_recipe_unknown_option(work):
    recipe = work / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "fuse-bn"\nfoo = 1\n', encoding="utf-8")
    result = check_rejected(work, ["optimize", work / "model.onnx", "--recipe", recipe], "'foo'")
    assert "valid options" in result.stderr


@pytest.mark.parametrize("text, keyword", [
    ('[[pass]]\nsparsity = 0.5\n', "no name"),          # a table without a name
    ('title = "mine"\n', "[[pass]]"),                    # no pass tables at all
    ('pass = ["fuse-bn", "cleanup"]\n', "[[pass]]"),    # a list of names instead of tables
])
def test_recipe_without_pass_tables(work, text, keyword):
    recipe = work / "recipe.toml"
    recipe.write_text(text, encoding="utf-8")
    check_rejected(work, ["optimize", work / "model.onnx", "--recipe", recipe], keyword)


def test_recipe_file_missing(work):
    check_rejected(work, ["optimize", work / "model.onnx", "--recipe", work / "nope.toml"], "not found")


# -------------------------------------------------------------------------------------------------------- data


def test_data_array_named_wrong(tmp_path):
    model = _save(two_input_model(), tmp_path / "model.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 4), np.float32), z=np.zeros((4, 4), np.float32))
    result = check_rejected(tmp_path, ["optimize", model, "--data", data, "--runs", "0"], "inputs")
    assert "[x, y]" in result.stderr  # names the model's inputs


def test_data_array_wrong_shape(work):
    data = work / "data.npz"
    np.savez(data, input=np.zeros((10, 1, 7, 7), np.float32))
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "shape", "input")


def test_data_array_wrong_rank(work):
    data = work / "data.npz"
    np.savez(data, input=np.zeros((10, 64), np.float32))
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "shape")


def test_data_float_into_int_input(tmp_path):
    model = _save(int_input_model(), tmp_path / "model.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, ids=np.full((4, 4), 1.5, np.float32))
    check_rejected(tmp_path, ["optimize", model, "--data", data, "--runs", "0"], "float32", "int64")


def test_data_strings_into_float_input(work):
    data = work / "data.npz"
    np.savez(data, input=np.full((4, 1, 8, 8), "a"))
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "float32")


@pytest.mark.parametrize("bad", ["short", "float"])
def test_data_labels_wrong(work, digits_data, bad):
    with np.load(digits_data) as archive:
        images, labels = archive["input"], archive["labels"]
    labels = labels[:-1] if bad == "short" else labels.astype(np.float32) + 0.5
    data = work / "data.npz"
    np.savez(data, input=images, labels=labels)
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "labels",
                   str(len(images)))


def test_data_object_array_is_refused(work):
    data = work / "data.npz"
    objects = np.empty((4, 1, 8, 8), dtype=object)
    objects[...] = 0.5
    np.savez(data, input=objects)  # pickled: never unpickled from a user's file
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "data.npz")


def test_data_npz_with_no_arrays(work):
    data = work / "data.npz"
    np.savez(data)
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "none")


def test_data_with_no_samples(work):
    data = work / "data.npz"
    np.savez(data, input=np.zeros((0, 1, 8, 8), np.float32))
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "no samples")


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_data_file_of_zero_bytes(work, suffix):
    data = work / f"data{suffix}"
    data.write_bytes(b"")
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "data")


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_data_file_not_numpy(work, suffix):
    data = work / f"data{suffix}"
    data.write_text("input,label\n1,2\n", encoding="utf-8")
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "data")


def test_data_file_missing(work):
    check_rejected(work, ["optimize", work / "model.onnx", "--data", work / "nope.npz", "--runs", "0"],
                   "not found")


def test_data_unknown_format(work):
    data = work / "data.csv"
    data.write_text("1,2,3\n", encoding="utf-8")
    check_rejected(work, ["optimize", work / "model.onnx", "--data", data, "--runs", "0"], "format")


@pytest.mark.parametrize("command", ["optimize", "validate"])
def test_unknown_preprocess_key(work, digits_data, command):
    models = [work / "model.onnx"] if command == "optimize" else [work / "model.onnx", work / "model.onnx"]
    result = check_rejected(work, [command, *models, "--data", digits_data, "--preprocess", "size=8",
                                   "--runs", "0"], "preprocess", "'size'")
    assert "resize" in result.stderr  # the valid keys are listed


def test_unknown_preprocess_key_without_data(work):
    # A typo in --preprocess is an error even when no data is given (random inputs), not silently ignored.
    check_rejected(work, ["validate", work / "model.onnx", work / "model.onnx", "--preprocess", "size=8",
                          "--runs", "0"], "preprocess", "'size'")


def test_malformed_preprocess_value(work, digits_data):
    check_rejected(work, ["optimize", work / "model.onnx", "--data", digits_data, "--preprocess", "resize=big",
                          "--runs", "0"], "resize=big")


# -------------------------------------------------------------------------------- providers, validation, budgets


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="the CUDA execution provider is installed here")
def test_cuda_provider_missing(work):
    check_rejected(work, ["optimize", work / "model.onnx", "--providers", "cuda", "--runs", "0"],
                   "onnxruntime-gpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="the CUDA execution provider is installed here")
def test_cuda_provider_missing_validate(work):
    check_rejected(work, ["validate", work / "model.onnx", work / "model.onnx", "--providers", "cuda",
                          "--runs", "0"], "onnxruntime-gpu")


def test_unknown_provider(work):
    result = check_rejected(work, ["optimize", work / "model.onnx", "--providers", "tpu"], "'tpu'")
    assert "cuda" in result.stderr  # the valid providers are listed


def test_validate_models_with_different_inputs(tmp_path):
    reference = _save(matmul_model("x"), tmp_path / "a.onnx")
    candidate = _save(matmul_model("features"), tmp_path / "b.onnx")
    result = check_rejected(tmp_path, ["validate", reference, candidate, "--runs", "0"], "same inputs")
    assert "features" in result.stderr


def test_validate_missing_candidate(work):
    check_rejected(work, ["validate", work / "model.onnx", work / "nope.onnx"], "no such file")


def test_max_accuracy_drop_without_data(work):
    check_rejected(work, ["optimize", work / "model.onnx", "--max-accuracy-drop", "1", "--runs", "5"],
                   "--max-accuracy-drop", "data")


def test_max_accuracy_drop_without_data_validate(work):
    check_rejected(work, ["validate", work / "model.onnx", work / "model.onnx", "--max-accuracy-drop", "1",
                          "--runs", "5"], "--max-accuracy-drop", "data")


@pytest.mark.parametrize("extra, keyword", [
    (["--limit", "0"], "--limit"),
    (["--runs", "-1"], "--runs"),
    (["--runs", "0", "--max-latency-ratio", "2"], "--runs 0"),
    (["--no-validate", "--max-accuracy-drop", "1"], "--no-validate"),
    (["--no-validate", "--max-latency-ratio", "2"], "--no-validate"),
])
def test_bad_validation_options(work, extra, keyword):
    check_rejected(work, ["optimize", work / "model.onnx", *extra], keyword)


@pytest.mark.parametrize("extra, keyword", [
    (["--ort-opt", "max"], "--ort-opt"),
    (["--runs", "many"], "--runs"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors(work, extra, keyword):
    check_rejected(work, ["optimize", work / "model.onnx", *extra], keyword, argparse=True)


def test_latency_budget_exceeded_exits_1_after_writing(work, digits_data):
    model, output = work / "model.onnx", work / "out.onnx"
    original = model.read_bytes()
    result = run_cli("optimize", model, "-o", output, "--data", digits_data, "--runs", "5",
                     "--max-latency-ratio", "0.0001")
    assert_input_error(result, "latency", "--max-latency-ratio", status=1)
    assert model.read_bytes() == original
    # the model was produced and measured: it is on disk, complete, and the report was printed
    assert onnx.load(str(output)).graph.output[0].name == "logits"
    assert "validation" in result.stdout
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "out.onnx"]  # no temporary files


def test_generous_budgets_exit_0(work, digits_data):
    model, output = work / "model.onnx", work / "out.onnx"
    original = model.read_bytes()
    result = run_cli("optimize", model, "-o", output, "--data", digits_data, "--runs", "5",
                     "--max-latency-ratio", "1000", "--max-accuracy-drop", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr and "Traceback" not in result.stderr
    assert model.read_bytes() == original
    assert output.is_file()


# ------------------------------------------------------------------------------------ found in review

def test_report_path_equal_to_input_is_refused(work):
    check_rejected(work, ["optimize", work / "model.onnx", "--no-validate", "--report", work / "model.onnx"],
                   "report")


def test_report_path_equal_to_output_is_refused(work):
    check_rejected(work, ["optimize", work / "model.onnx", "-o", work / "out.onnx", "--report", work / "out.onnx"],
                   "report")


def test_report_to_a_device_writes_into_it_without_replacing_it(work):
    result = run_cli("optimize", work / "model.onnx", "--runs", "3", "--report", "/dev/null")
    assert result.returncode == 0, result.stderr
    assert Path("/dev/null").is_char_device()


def test_fixed_batch_larger_than_the_data(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])])
    model = _save(_make_model(graph), tmp_path / "fixed4.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((3, 3), np.float32))
    check_rejected(tmp_path, ["validate", model, model, "--data", tmp_path / "d.npz"], "batches of exactly 4")


def test_random_data_cannot_guess_free_spatial_dims(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    model = _save(_make_model(graph), tmp_path / "dyn.onnx")
    check_rejected(tmp_path, ["validate", model, model], "H, W", "--input-shape x:1,3,?,?", "give data")


def test_data_the_model_rejects_at_run_time(tmp_path):
    # Gather over a 5-row table with indices up to 9: only ONNX Runtime can tell, while running.
    table = numpy_helper.from_array(np.ones((5, 2), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=[table])
    model = _save(_make_model(graph), tmp_path / "gather.onnx")
    np.savez(tmp_path / "ids.npz", ids=np.arange(10))
    check_rejected(tmp_path, ["validate", model, model, "--data", tmp_path / "ids.npz"], "could not run")


def test_preprocess_std_zero_and_wrong_mean_length(work, digits_data):
    check_rejected(work, ["validate", work / "model.onnx", work / "model.onnx", "--preprocess", "std=0"], "std=0")
    folder = work / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a.png")
    check_rejected(work, ["validate", work / "model.onnx", work / "model.onnx", "--data", folder,
                          "--preprocess", "channels=RGB,mean=0.5|0.5"], "mean has 2 values")


def _invalid_models() -> dict[str, tuple[onnx.ModelProto, str]]:
    """Models that onnx.checker and ONNX Runtime both reject, with a word the error must name."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    short = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32).tobytes(), raw=True)
    short.raw_data = short.raw_data[:20]
    graphs = {
        "short-raw-data": (helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [short]),
                           "raw_data size"),
        "cycle": (helper.make_graph([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                                     helper.make_node("Identity", ["a"], ["y"])], "g", [x], [y]), "acyclic"),
        "missing-tensor": (helper.make_graph([helper.make_node("Add", ["x", "nothere"], ["y"])], "g", [x], [y]),
                           "nothere"),
        "unknown-op": (helper.make_graph([helper.make_node("FooBar", ["x"], ["y"])], "g", [x], [y]), "FooBar"),
    }
    return {name: (_make_model(graph), word) for name, (graph, word) in graphs.items()}


@pytest.mark.parametrize("case", sorted(_invalid_models()))
@pytest.mark.parametrize("passes", ["fold-constants,flush-denormals,fuse-bn,cleanup", "prune", "share"])
def test_invalid_models_are_one_line_input_errors_before_any_pass(tmp_path, case, passes):
    model, word = _invalid_models()[case]
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(model.SerializeToString())
    check_rejected(tmp_path, ["optimize", path, "-o", tmp_path / "out.onnx", "--passes", passes],
                   "not valid ONNX", word)
