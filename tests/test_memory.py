"""Peak memory of `onnxcomp optimize` grows with the model by at most 2.5 times its weights.

The model: x [N, 2048] → (MatMul → BatchNormalization → Relu) × 10, 168 MB of weights in external data; fuse-bn
replaces every weight. The peak resident memory of the run over that of the same run on a one-layer model of the
same kind (the interpreter and its libraries) must stay under 2.5× the weights the ten layers add. The copies that this bounds:
a loaded copy of the model for the passes, the checker's serialized copies, the export of the whole graph, and
the serialized output (before, the same run took about 6× the weights).
"""

from __future__ import annotations

from pathlib import Path

from onnxcomp.bench import matmul_bn_chain, peak_memory


def peak_bytes(model: Path) -> int:
    output = model.with_name(model.stem + ".opt.onnx")
    return peak_memory("optimize", str(model), "-o", str(output), "--passes", "fuse-bn", "--no-validate",
                       timeout=600)[0]


def test_peak_memory_of_fuse_bn_is_at_most_2_5_times_the_weights(tmp_path):
    (tmp_path / "small").mkdir(), (tmp_path / "large").mkdir()
    small = matmul_bn_chain(tmp_path / "small" / "model.onnx", 1)
    weights = matmul_bn_chain(tmp_path / "large" / "model.onnx", 10) - small
    growth = peak_bytes(tmp_path / "large" / "model.onnx") - peak_bytes(tmp_path / "small" / "model.onnx")
    assert growth <= 2.5 * weights, f"peak grew by {growth / weights:.2f}× the weights ({weights / 2**20:.0f} MiB)"
