"""Budget-driven strength search and the recipe grid search (`onnxcomp search`), on the digits model.

The recipes here leave prune's sparsity and share's bits free but switch off their calibration probes, so a
candidate takes a second; the real-model figures are in the README's search section.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import onnxcomp
from helpers import assert_input_error, run_cli, run_model
from onnxcomp import data as datasets
from onnxcomp import recipe, search
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import PassContext

FAST_PRUNE = "prune:allocation=uniform,correction=none"
FAST_SHARE = "share:allocation=uniform,importance=none,correction=none,feedback=false,min-size=0"
FAST_PIPELINE = f"fuse-bn,{FAST_PRUNE},{FAST_SHARE}"
BUDGET = 5.0  # points of top-1 on 270 digits: a drop must be within it with its standard error (about 1) to spare


# ---------------------------------------------------------------------------------------------------------
# The walk over strengths, on a known feasible region


def test_bisection_finds_the_strongest_feasible_index():
    asked = []

    def feasible(index):
        asked.append(index)
        return index <= 5

    assert search._strongest_feasible(feasible, 9) == 5
    assert len(asked) <= 4  # log2(9) rounded up
    assert search._strongest_feasible(lambda index: False, 9) == -1


def test_edge_walk_finds_each_rows_strongest_column_in_about_rows_plus_columns_steps():
    rows, columns = 5, 5
    limit = {0: 4, 1: 3, 2: 3, 3: 1, 4: -1}  # strongest feasible column per row, falling with the row
    asked = set()

    def feasible(row, column):
        asked.add((row, column))
        return column <= limit[row]

    edge = search._walk_edge(feasible, rows, columns)
    assert edge == [(row, best) for row, best in limit.items() if best >= 0]
    # each row past the first also tries one column past its strongest: not rows × columns
    assert len(asked) <= 2 * (rows - 1) + columns + math.ceil(math.log2(columns + 1))


def test_edge_walk_finds_a_stronger_column_in_a_stronger_row():
    limit = {0: 1, 1: 3, 2: 0}  # the second row takes two columns more than the first (a measured drop is noisy)

    def feasible(row, column):
        return column <= limit[row]

    assert search._walk_edge(feasible, 3, 5) == [(0, 1), (1, 3), (2, 0)]


def test_a_drop_within_the_budget_by_less_than_its_noise_is_over_it():
    """The search picks the strongest setting that looks within the budget, so a drop measured on a few hundred
    samples must be within it with a standard error to spare, or noise decides."""
    lost = np.zeros(400)
    lost[:6] = 1.0  # 6 samples lost, 2 gained: 1 point, paired
    lost[6:8] = -1.0
    error = search._standard_error(lost)
    assert error == pytest.approx(100 * np.std(lost, ddof=1) / 20)  # about 0.71 points
    noisy = search.Candidate("noisy", 100, 80.0, 100 * float(lost.mean()), drop_error=error)
    noisy.check(1.5)
    assert not noisy.within_budget  # 1.0 + 0.71 > 1.5
    noisy.check(2.0)
    assert noisy.within_budget


def test_pareto_front_keeps_the_candidates_nothing_beats():
    def candidate(name, size, accuracy, latency):
        return search.Candidate(name, size, accuracy, 0.0, latency)

    small = candidate("small", 100, 90.0, 1.0)
    accurate = candidate("accurate", 200, 95.0, 1.0)
    beaten = candidate("beaten", 200, 90.0, 1.02)  # as accurate as small, larger; 2 % slower is noise
    fast = candidate("fast", 300, 90.0, 0.5)  # larger and no more accurate, but clearly faster
    front = search.pareto_front([small, accurate, beaten, fast])
    assert [c.recipe for c in front] == ["small", "accurate", "fast"]
    assert not beaten.on_front


def test_the_smallest_within_budget_is_chosen_or_else_the_least_drop():
    a = search.Candidate("a", 100, 0, 2.0, within_budget=False)
    b = search.Candidate("b", 150, 0, 0.5, 2.0, within_budget=True)
    c = search.Candidate("c", 200, 0, 0.1, 1.0, within_budget=True)
    assert search.best_candidate([a, b, c], "size") is b
    assert search.best_candidate([a, b, c], "latency") is c
    assert search.best_candidate([a], "size") is a


def test_split_holds_the_budget_samples_out_of_calibration_spread_over_the_data():
    chosen = search.split(1000, separate_calibration=False)
    calibration, budget = chosen.calibration_indices(), chosen.budget_indices()
    assert len(calibration) == 128 and len(budget) == 872 and not set(calibration) & set(budget)
    # spread evenly: data in class order (10 classes of 100 here) calibrates on every class
    assert np.bincount(calibration // 100).min() >= 12
    assert len(search.split(360, separate_calibration=False).calibration_indices()) == 90
    assert list(search.split(1000, separate_calibration=True).budget_indices()) == list(range(1000))
    assert list(search.split(5, separate_calibration=False).budget_indices()) == list(range(5))


def test_split_selects_its_samples_from_a_dataset():
    dataset = datasets.Dataset("x", 12, [datasets.InputSpec("x", np.dtype(np.int64), ("N",))],
                               lambda a, b: {"x": np.arange(a, b)}, np.arange(12))
    chosen = search.split(12, separate_calibration=False)
    assert list(chosen.calibration_set(dataset).labels) == [0, 4, 8]
    assert list(chosen.budget_set(dataset).batch(0, 9)["x"]) == [1, 2, 3, 5, 6, 7, 9, 10, 11]


# ---------------------------------------------------------------------------------------------------------
# Strength search through optimize


def test_the_pipeline_run_in_stages_gives_the_model_of_one_run(digits_model, digits_data):
    original = onnxcomp.load(digits_model)
    passes = recipe.parse(FAST_PIPELINE)
    free = recipe.free_strengths(FAST_PIPELINE)
    pipeline = search._Pipeline(original, passes, free, PassContext())
    staged, _, text = pipeline.run({1: 0.5, 2: 3})
    pipeline.run({1: 0.5, 2: 4})
    assert len(pipeline.stages) == 2  # fuse-bn once, the pruned model once for both bit widths
    whole, _ = PassManager(recipe.parse(text)).run(original, PassContext())
    feed = {"input": np.load(digits_data)["input"][:16]}
    np.testing.assert_array_equal(run_model(staged, feed)[0], run_model(whole, feed)[0])
    assert staged.ByteSize() == whole.ByteSize()


def test_budget_search_chooses_the_smallest_model_within_the_budget(tmp_path, digits_model, digits_data):
    output = tmp_path / "out.onnx"
    _, report = onnxcomp.optimize(digits_model, FAST_PIPELINE, data=digits_data, max_accuracy_drop=BUDGET,
                                  output=output, latency_runs=0)
    candidates = report.candidates
    assert 2 <= len(candidates) <= len(search.SPARSITIES) + len(search.BITS)
    (chosen,) = [c for c in candidates if c["chosen"]]
    within = [c for c in candidates if c["drop"] + c["drop_error"] <= BUDGET]  # one standard error to spare
    assert chosen in within and chosen["bytes"] == min(c["bytes"] for c in within)
    # the report's validation is the check on the budget samples: the same model, the same drop
    assert report.validation.candidate_bytes == output.stat().st_size == chosen["bytes"]
    assert report.validation.accuracy_drop == pytest.approx(chosen["drop"])
    assert report.validation.providers[0].samples == 270
    assert any("budget checked on 270 of the 360 data samples" in note for note in report.validation.notes)
    # each candidate is its own recipe: written out, it gives the same model
    again, _ = onnxcomp.optimize(digits_model, chosen["recipe"], calib_data={"input": np.load(digits_data)["input"][:90]},
                                 validate_result=False)
    assert again.ByteSize() == chosen["bytes"]


def test_a_strength_the_user_wrote_is_not_searched(digits_model, digits_data):
    _, report = onnxcomp.optimize(digits_model, "fuse-bn,prune:sparsity=0.5,allocation=uniform", data=digits_data,
                                  max_accuracy_drop=BUDGET, latency_runs=0)
    assert report.candidates == []


def test_cli_budget_search_with_optimize_for_latency(tmp_path, digits_model, digits_data):
    report = tmp_path / "report.json"
    result = run_cli("optimize", digits_model, "--passes", FAST_PIPELINE, "--data", digits_data,
                     "--max-accuracy-drop", BUDGET, "--optimize-for", "latency", "--runs", "5", "-o",
                     tmp_path / "out.onnx", "--report", report)
    assert result.returncode == 0, result.stderr
    assert "budget search:" in result.stdout
    import json

    candidates = json.loads(report.read_text())["candidates"]
    assert all(c["latency_ms"] > 0 for c in candidates) and sum(c["chosen"] for c in candidates) == 1


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, quickly


def test_a_budget_without_data_is_refused_before_any_work(tmp_path, digits_model):
    started = time.perf_counter()
    result = run_cli("optimize", digits_model, "--recipe", "deep-compression", "--max-accuracy-drop", "1",
                     "-o", tmp_path / "out.onnx")
    assert_input_error(result, "--max-accuracy-drop", "--data")
    assert time.perf_counter() - started < 30 and not (tmp_path / "out.onnx").exists()
    with pytest.raises(onnxcomp.InputError, match="data="):
        onnxcomp.optimize(digits_model, "deep-compression", max_accuracy_drop=1.0)


def _grid(tmp_path: Path, *recipes: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text("".join(f'[[candidate]]\nrecipe = "{text}"\n' for text in recipes))
    return path


@pytest.mark.parametrize("content, keywords", [
    (None, ["grid file not found"]),
    ('[[candidate]\nrecipe = "fuse-bn"', ["not a valid TOML grid"]),
    ('[[pass]]\nname = "fuse-bn"\n', ["[[candidate]] tables"]),
    ('[[candidate]]\nrecipe = "fuse-bn"\n[[candidate]]\nrecipe = "fuse-bn,no-such-pass"\n',
     ["candidate 2", "no-such-pass"]),
])
def test_bad_grids_are_one_line_errors(tmp_path, digits_model, digits_data, content, keywords):
    grid = tmp_path / "grid.toml"
    if content is not None:
        grid.write_text(content)
    started = time.perf_counter()
    result = run_cli("search", digits_model, "--data", digits_data, "--max-accuracy-drop", "1", "--grid", grid,
                     "--cache", tmp_path / "cache", "-o", tmp_path / "out.onnx")
    assert_input_error(result, *keywords)
    assert time.perf_counter() - started < 30 and not (tmp_path / "out.onnx").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_ray_address_is_a_one_line_error(tmp_path, digits_model, digits_data):
    pytest.importorskip("ray")
    started = time.perf_counter()
    result = run_cli("search", digits_model, "--data", digits_data, "--max-accuracy-drop", "1",
                     "--ray", f"127.0.0.1:{_free_port()}", "--cache", tmp_path / "cache")
    assert_input_error(result, "--ray", "no Ray head")
    assert time.perf_counter() - started < 30


def test_search_without_data_is_a_usage_error(digits_model):
    result = run_cli("search", digits_model, "--max-accuracy-drop", "1")
    assert_input_error(result, "--data", argparse=True)


# ---------------------------------------------------------------------------------------------------------
# Grid search: parallel = serial, the cache, Ray


GRID = (f"fuse-bn,{FAST_PRUNE.replace('prune:', 'prune:sparsity=0.3,')}",
        f"fuse-bn,{FAST_SHARE.replace('share:', 'share:bits=4,')}",
        f"fuse-bn,{FAST_PRUNE.replace('prune:', 'prune:sparsity=0.5,')},{FAST_SHARE.replace('share:', 'share:bits=3,')}",
        "fuse-bn,cleanup")


def _outcome(result: search.RecipeSearch) -> tuple:
    """What must not depend on where the candidates ran: sizes, accuracies, the front and the choice."""
    return ([(c.recipe, c.bytes, round(c.accuracy, 9), round(c.drop, 9)) for c in result.candidates],
            [c.recipe for c in result.front], result.chosen.recipe)


@pytest.fixture(scope="module")
def serial(tmp_path_factory, digits_model, digits_data):
    folder = tmp_path_factory.mktemp("serial")
    grid = _grid(folder, *GRID)
    first = search.search_recipes(str(digits_model), str(digits_data), max_accuracy_drop=BUDGET, grid=str(grid),
                                  workers=1, cache=str(folder / "cache"), latency_runs=0,
                                  output=str(folder / "chosen.onnx"))
    return folder, grid, first


def test_search_writes_the_chosen_candidate(serial):
    folder, _, result = serial
    assert result.chosen.within_budget and (folder / "chosen.onnx").stat().st_size == result.chosen.bytes
    assert result.chosen.bytes == min(c.bytes for c in result.candidates if c.within_budget)
    assert {c.recipe for c in result.front} >= {result.chosen.recipe}
    assert len(result.candidates) == len(GRID) and not any(c.cached for c in result.candidates)


def test_parallel_workers_give_the_serial_results(tmp_path, serial, digits_model, digits_data):
    _, grid, first = serial
    parallel = search.search_recipes(str(digits_model), str(digits_data), max_accuracy_drop=BUDGET,
                                     grid=str(grid), workers=2, cache=str(tmp_path / "cache"), latency_runs=0)
    assert _outcome(parallel) == _outcome(first)


def test_a_second_run_is_served_from_the_cache(serial, digits_model, digits_data):
    folder, grid, first = serial
    again = search.search_recipes(str(digits_model), str(digits_data), max_accuracy_drop=BUDGET, grid=str(grid),
                                  workers=1, cache=str(folder / "cache"), latency_runs=0)
    assert all(c.cached for c in again.candidates)
    assert _outcome(again) == _outcome(first)
    assert again.seconds < first.seconds / 3


def test_the_cache_key_follows_the_recipe_and_the_data(tmp_path, serial, digits_model, digits_data):
    folder, _, first = serial
    grid = _grid(tmp_path, GRID[0], "fuse-bn,prune:sparsity=0.35,allocation=uniform,correction=none")
    fewer = tmp_path / "fewer.npz"
    with np.load(digits_data) as archive:
        np.savez(fewer, input=archive["input"][:200], labels=archive["labels"][:200])
    changed = search.search_recipes(str(digits_model), str(fewer), max_accuracy_drop=BUDGET, grid=str(grid),
                                    workers=1, cache=str(folder / "cache"), latency_runs=0)
    assert not any(c.cached for c in changed.candidates)  # other data: nothing reused
    same = search.search_recipes(str(digits_model), str(digits_data), max_accuracy_drop=BUDGET, grid=str(grid),
                                 workers=1, cache=str(folder / "cache"), latency_runs=0)
    assert [c.cached for c in same.candidates] == [True, False]  # the same recipe reused, a new one measured


@pytest.fixture
def ray_head(tmp_path):
    """A real local Ray head of 2 CPUs, started for the test and stopped after it (only this head: `--block`
    keeps it in one process tree, ended by its id)."""
    pytest.importorskip("ray")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    temp = Path("/tmp") / f"ray{os.getpid()}"
    head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    pytest.fail("the local Ray head did not start")
                time.sleep(1)
        time.sleep(3)  # the GCS answers before the raylet has registered
        yield f"127.0.0.1:{port}"
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # the head drains its processes, then exits
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_search_on_a_local_ray_head_gives_the_serial_front(tmp_path, ray_head, serial, digits_model, digits_data):
    _, grid, first = serial
    on_ray = search.search_recipes(str(digits_model), str(digits_data), max_accuracy_drop=BUDGET, grid=str(grid),
                                   ray_address=ray_head, cache=str(tmp_path / "cache"), latency_runs=0)
    assert not any(c.cached for c in on_ray.candidates)
    assert _outcome(on_ray) == _outcome(first)
