"""The project's own demo model: the shipped files and the script that trains them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import run_model

SCRIPT = Path(__file__).resolve().parent.parent / "models" / "train_digits.py"


def test_shipped_digits_model_keeps_batch_norm_and_is_accurate(digits_model, digits_data):
    model = onnx.load(digits_model)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    with np.load(digits_data) as data:
        logits = run_model(model, {"input": data["input"]})[0]
        assert (logits.argmax(1) == data["labels"]).mean() >= 0.97


def test_training_script_exports_a_model_with_batch_norm(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "2", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model = onnx.load(tmp_path / "digits_cnn.onnx")
    onnx.checker.check_model(model)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    with np.load(tmp_path / "digits_test.npz") as data:
        logits = run_model(model, {"input": data["input"]})[0]
        assert (logits.argmax(1) == data["labels"]).mean() >= 0.8
