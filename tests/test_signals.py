"""Interrupts, kills and concurrent runs of `onnxcomp optimize`, as separate processes.

What a user relies on:
  * Ctrl-C (SIGINT) ends the run with exit 130 and the single line "onnxcomp: interrupted", whether it lands
    in a pass or in validation; a model not yet saved is not written at all, a saved one is complete;
  * SIGKILL at any moment, even while the output is being written, never leaves a partial file at the output
    path (saving writes a hidden temporary file and renames it) and never touches the input;
  * two runs from the same input at once both succeed, to different outputs or to the same one, which then
    holds one complete model.
Each test waits for an event it can see (a log line, a temporary file, the saved output) instead of sleeping
for a guessed time, so a slow or busy machine changes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import run_model

WAIT_S = 240


def matmul_chain(path: Path, width: int, layers: int) -> Path:
    """x [N, width] → (MatMul → Relu) × layers → y; its weights take width² × layers × 4 bytes."""
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for index in range(layers):
        weights.append(numpy_helper.from_array(rng.normal(0, 0.05, (width, width)).astype(np.float32), f"w{index}"))
        nodes += [helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"]),
                  helper.make_node("Relu", [f"m{index}"], [f"r{index}"])]
        current = f"r{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], weights)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def start(*args) -> subprocess.Popen:
    # SIGINT at its default in the child, as in a terminal: a suite started in the background (`cmd &` in a
    # script) ignores SIGINT, the children inherit that, and Python then installs no KeyboardInterrupt at all
    return subprocess.Popen([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"waited {WAIT_S} s for {what}")
        time.sleep(0.005)


def leftovers(folder: Path, *expected: str) -> list[str]:
    return sorted(set(os.listdir(folder)) - set(expected))


def assert_complete(path: Path, source: Path) -> None:
    """A whole model: it passes the checker and computes what the input computes (the default passes are exact)."""
    onnx.checker.check_model(onnx.load(path))
    width = onnx.load(source).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    feed = {"x": np.random.default_rng(1).normal(size=(2, width)).astype(np.float32)}
    np.testing.assert_allclose(run_model(path, feed)[0], run_model(source, feed)[0], rtol=1e-5, atol=1e-6)


def test_sigint_in_a_pass_exits_130_with_one_line_and_writes_nothing(tmp_path):
    source = matmul_chain(tmp_path / "model.onnx", 1024, 2)
    before = source.read_bytes()
    process = start("-v", "optimize", source, "-o", tmp_path / "out.onnx", "--passes", "cleanup,share:bits=8",
                    "--no-validate")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    # -v logs each pass as it ends: after cleanup's line the run is inside share's k-means
    wait_for(lambda: any(line.startswith("cleanup:") for line in lines), process, "cleanup's log line")
    process.send_signal(signal.SIGINT)
    assert process.wait(WAIT_S) == 130
    reader.join(WAIT_S)
    assert lines[-1] == "onnxcomp: interrupted\n", lines
    assert not any("Traceback" in line for line in lines), lines
    assert leftovers(tmp_path, "model.onnx") == []
    assert source.read_bytes() == before


def test_sigint_in_validation_exits_130_with_one_line_and_a_complete_output(tmp_path):
    source = matmul_chain(tmp_path / "model.onnx", 64, 2)
    output = tmp_path / "out.onnx"
    process = start("optimize", source, "-o", output, "--runs", "1000000")  # validation times 10⁶ runs
    wait_for(output.exists, process, "the output")  # saved before validation starts
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130
    assert stderr == "onnxcomp: interrupted\n"
    assert leftovers(tmp_path, "model.onnx", "out.onnx") == []
    assert_complete(output, source)


def test_sigkill_while_saving_leaves_no_output_and_the_input_untouched(tmp_path):
    """Killed the moment the temporary file of the output appears, i.e. while the model is being written."""
    source = matmul_chain(tmp_path / "model.onnx", 2048, 6)  # 100 MB: writing it takes a while
    before = source.read_bytes()
    output = tmp_path / "out.onnx"
    process = start("optimize", source, "-o", output, "--passes", "fuse-bn,cleanup", "--no-validate")
    writing = lambda: any(name.startswith(".out.onnx.") for name in os.listdir(tmp_path))  # noqa: E731
    wait_for(writing, process, "the output's temporary file")
    process.kill()
    process.wait(WAIT_S)
    process.stdout.close(), process.stderr.close()
    assert not output.exists(), "a partial output was left at the output path"
    assert source.read_bytes() == before
    # what a kill leaves is only the hidden temporary file, which no reader takes for a model
    assert all(name.startswith(".out.onnx.") and name.endswith(".tmp") for name in leftovers(tmp_path, "model.onnx"))


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigkill_at_any_moment_leaves_no_partial_output(tmp_path, delay):
    source = matmul_chain(tmp_path / "model.onnx", 1024, 6)
    before = source.read_bytes()
    output = tmp_path / "out.onnx"
    process = start("optimize", source, "-o", output, "--runs", "5")
    time.sleep(delay)
    process.kill()
    process.communicate(timeout=WAIT_S)
    assert source.read_bytes() == before
    if output.exists():
        assert_complete(output, source)


def test_two_runs_from_one_input_to_different_outputs_both_succeed(tmp_path):
    source = matmul_chain(tmp_path / "model.onnx", 256, 3)
    runs = [start("optimize", source, "-o", tmp_path / f"out{i}.onnx", "--runs", "5") for i in range(2)]
    for process in runs:
        stdout, stderr = process.communicate(timeout=WAIT_S)
        assert process.returncode == 0, stderr
    assert (tmp_path / "out0.onnx").read_bytes() == (tmp_path / "out1.onnx").read_bytes()
    assert_complete(tmp_path / "out0.onnx", source)
    assert leftovers(tmp_path, "model.onnx", "out0.onnx", "out1.onnx") == []


def test_two_runs_writing_the_same_output_leave_one_complete_model(tmp_path):
    source = matmul_chain(tmp_path / "model.onnx", 256, 3)
    output = tmp_path / "out.onnx"
    runs = [start("optimize", source, "-o", output, "--no-validate") for _ in range(2)]
    for process in runs:
        stdout, stderr = process.communicate(timeout=WAIT_S)
        assert process.returncode == 0, stderr
    assert_complete(output, source)
    assert leftovers(tmp_path, "model.onnx", "out.onnx") == []
