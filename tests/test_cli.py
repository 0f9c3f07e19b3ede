"""The commands a user types: optimize, validate, inspect, passes; the Python API mirrors optimize."""

from __future__ import annotations

import json
import shutil

import onnx

import onnxcomp
from helpers import run_cli


def test_optimize_writes_beside_the_input_and_validates(tmp_path, digits_model, digits_data):
    model = tmp_path / "digits.onnx"
    shutil.copy(digits_model, model)
    original_bytes = model.read_bytes()
    result = run_cli("optimize", model, "--data", digits_data, "--runs", "10", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    output = tmp_path / "digits.opt.onnx"
    assert output.exists() and model.read_bytes() == original_bytes
    assert "fuse-bn" in result.stdout and "fused=4" in result.stdout and "99.72%" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    fuse_bn = next(record for record in report["passes"] if record["name"] == "fuse-bn")
    assert fuse_bn["stats"] == {"fused": 4, "skipped": 0, "fused:Conv": 3, "fused:Gemm": 1}
    provider = report["validation"]["providers"][0]
    assert provider["reference_accuracy"] == provider["candidate_accuracy"] > 99
    assert provider["agreement"] == 100.0
    assert provider["outputs"][0]["max_abs_error"] < 1e-4
    assert provider["reference_latency"]["runs"] == 10
    assert report["validation"]["candidate_bytes"] == output.stat().st_size
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(output).graph.node)
    assert not list(tmp_path.glob(".*tmp")), "no temporary files are left behind"


def test_optimize_with_a_toml_recipe_and_no_data(tmp_path, digits_model):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "fuse-bn"\n[[pass]]\nname = "cleanup"\n')
    output = tmp_path / "out.onnx"
    result = run_cli("optimize", digits_model, "--recipe", recipe, "-o", output, "--runs", "5")
    assert result.returncode == 0, result.stderr
    assert "random inputs were used, so accuracy was NOT measured" in result.stdout
    assert output.exists()


def test_a_toml_recipe_runs_its_own_passes_not_the_default_ones(tmp_path, digits_model):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[pass]]\nname = "prune"\nsparsity = 0.5\n')
    result = run_cli("optimize", digits_model, "--recipe", recipe, "-o", tmp_path / "out.onnx", "--no-validate")
    assert result.returncode == 0, result.stderr
    ran = [line.split()[0] for line in result.stdout.splitlines()[3:] if line.strip()]
    assert ran[0] == "prune" and "fuse-bn" not in ran and "sparsity=0.5" in result.stdout


def test_an_accuracy_budget_that_is_exceeded_exits_1_after_writing(tmp_path, digits_model, digits_data):
    output = tmp_path / "out.onnx"
    result = run_cli("optimize", digits_model, "--passes", "fuse-bn,prune:sparsity=0.95,min-size=0", "-o", output,
                     "--data", digits_data, "--runs", "2", "--max-accuracy-drop", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "top-1 accuracy dropped" in result.stderr and "--max-accuracy-drop" in result.stderr
    assert output.exists()


def test_validate_command_with_budgets(tmp_path, digits_model, digits_data):
    fused, _ = onnxcomp.optimize(digits_model, "fuse-bn", validate_result=False)
    candidate = tmp_path / "fused.onnx"
    onnxcomp.save(fused, candidate)
    result = run_cli("validate", digits_model, candidate, "--data", digits_data, "--runs", "5",
                     "--max-accuracy-drop", "0.5", "--max-latency-ratio", "100")
    assert result.returncode == 0, result.stderr
    assert "agreement" in result.stdout and "100.00%" in result.stdout


def test_inspect_shows_parameters_ops_and_weights(digits_model):
    result = run_cli("inspect", digits_model)
    assert result.returncode == 0, result.stderr
    assert "opset ai.onnx 17" in result.stdout
    assert "BatchNormalization 4" in result.stdout
    assert "parameters: " in result.stdout
    data = json.loads(run_cli("inspect", digits_model, "--json").stdout)
    assert data["op_counts"]["Conv"] == 3
    assert data["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 1, 8, 8]}]
    # every float parameter of the model is counted once
    total = sum(w["bytes"] for w in data["weights"])
    assert data["parameter_bytes"] == total and total > 17_000 * 4


def test_passes_lists_each_pass_on_one_line():
    result = run_cli("passes")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("fuse-bn ") for line in lines)
    assert any(line.startswith("cleanup ") for line in lines)


def test_python_api_returns_model_and_report(tmp_path, digits_model, digits_data):
    output = tmp_path / "api.onnx"
    model, report = onnxcomp.optimize(str(digits_model), "fuse-bn", data=str(digits_data), output=output,
                                      latency_runs=5)
    assert isinstance(model, onnx.ModelProto) and output.exists()
    assert report.passes[0].stats["fused"] == 4
    assert report.validation.accuracy_drop == 0.0
    assert report.validation.size_ratio < 1.0
    assert "validation on" in report.render()


def test_the_report_names_the_model_file_or_says_it_was_in_memory(digits_model):
    """The report's first line and its JSON name the model it was made from."""
    _, from_file = onnxcomp.optimize(str(digits_model), "cleanup", validate_result=False)
    _, from_memory = onnxcomp.optimize(onnxcomp.load(digits_model), "cleanup", validate_result=False)
    assert (from_file.model, from_memory.model) == (str(digits_model), "(in memory)")
