"""Helpers for tests: run the CLI as a user's shell would, and run models under ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `onnxcomp ARGS` in a fresh interpreter, as a user's shell would."""
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def run_model(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray],
              level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL) -> list[np.ndarray]:
    """Outputs of a model under ONNX Runtime with its own graph optimizations off (they would hide our bugs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feed)


def optimized_ops(model: onnx.ModelProto | str | Path, folder: Path):
    """(session, op counts) of the graph ONNX Runtime really runs: ORT_ENABLE_ALL, as written back by ORT."""
    from collections import Counter

    source = folder / "model.onnx"
    if isinstance(model, onnx.ModelProto):
        onnx.save(model, source)
    else:
        source = Path(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 4
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return session, Counter(n.op_type for n in onnx.load(folder / "optimized.onnx").graph.node)


def assert_input_error(result, *keywords: str, status: int = 2, argparse: bool = False) -> None:
    """The CLI's error contract: status, one line on stderr that names the problem, no traceback.

    `argparse`: a usage error found by the argument parser; it also ends with "(see onnxcomp optimize --help)".
    """
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == status, output
    assert result.stderr.startswith("onnxcomp: error:"), output
    if argparse:
        assert "--help)" in result.stderr, output
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, f"not one line: {result.stderr!r}"
    for keyword in keywords:
        assert keyword.lower() in result.stderr.lower(), f"{keyword!r} not in {result.stderr!r}"
