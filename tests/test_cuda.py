"""The CUDA execution provider path; skipped where onnxruntime-gpu or a GPU is missing (as in CI)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from onnxcomp.validate import validate

pytestmark = pytest.mark.cuda


def test_validation_on_cpu_and_cuda(digits_model, digits_data):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider (install onnxruntime-gpu on a GPU machine)")
    result = validate(str(digits_model), str(digits_model), str(digits_data), providers=("cpu", "cuda"),
                      latency_runs=10)
    assert [p.provider for p in result.providers] == ["cpu", "cuda"]
    cuda = result.providers[1]
    assert cuda.agreement == 100.0 and cuda.reference_accuracy > 97
