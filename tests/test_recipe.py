"""Recipes: `--recipe NAME` takes the named recipes as well as TOML files, and which strengths a budget may search."""

from __future__ import annotations

import pytest

from helpers import assert_input_error, run_cli
from onnxcomp import recipe
from onnxcomp.errors import InputError


def test_a_named_recipe_loads_the_same_passes_as_its_text():
    named = recipe.load("deep-compression")
    written = recipe.parse(recipe.RECIPES["deep-compression"])
    assert [p.describe() for p in named] == [p.describe() for p in written]


def test_cli_recipe_takes_a_name(tmp_path, digits_model):
    output = tmp_path / "out.onnx"
    result = run_cli("optimize", digits_model, "--recipe", "deep-compression", "-o", output, "--no-validate")
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout and "share" in result.stdout
    assert output.stat().st_size < digits_model.stat().st_size / 4


def test_a_file_named_like_a_recipe_is_read_as_the_file(tmp_path, monkeypatch):
    (tmp_path / "deep-compression").write_text('[[pass]]\nname = "fuse-bn"\n')
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in recipe.load("deep-compression")] == ["fuse-bn"]


def test_unknown_recipe_names_the_named_recipes(tmp_path, digits_model):
    result = run_cli("optimize", digits_model, "--recipe", "deep-compresion", "-o", tmp_path / "o.onnx")
    assert_input_error(result, "recipe file not found", "deep-compression")


@pytest.mark.parametrize("text, free", [
    ("fuse-bn,prune,share", {1: "sparsity", 2: "bits"}),
    ("fuse-bn,prune:sparsity=0.5,share", {2: "bits"}),
    ("prune:granularity=tensor,share:bits=4", {0: "sparsity"}),
    ("deep-compression", {2: "sparsity", 3: "bits"}),  # a named recipe's strengths are defaults
    ("fuse-bn,cleanup", {}),
])
def test_free_strengths_of_a_recipe_string(text, free):
    assert recipe.free_strengths(text) == free


def test_free_strengths_of_a_toml_file_and_a_name(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[[pass]]\nname = "prune"\nsparsity = 0.4\n[[pass]]\nname = "share"\nmin-size = 0\n')
    assert recipe.free_strengths(recipe=toml) == {1: "bits"}
    assert recipe.free_strengths(recipe="deep-compression") == {2: "sparsity", 3: "bits"}
    with pytest.raises(InputError, match="not found"):
        recipe.free_strengths(recipe=tmp_path / "missing.toml")
