"""share on the shared real models, post-training: top-1 on images not used for calibration at the issue's
average bits, and the file no larger than those bits cost."""

from __future__ import annotations

import onnxcomp
from test_quantize_real import split_accuracy


def shared_weights_and_bits(report) -> tuple[int, float]:
    rows = report.passes[1].layers
    weights = sum(row["weights"] for row in rows)
    return weights, sum(row["weights"] * row["bits"] for row in rows) / weights


def test_resnet20_at_4_bits_average_within_1_point(assets, cifar, tmp_path):
    model_path = str(assets / "models/resnet20_cifar10.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels = cifar
    _, report = onnxcomp.optimize(model_path, "fuse-bn,share:bits=4", calib_data={name: images[:100]},
                                  output=tmp_path / "shared.onnx", validate_result=False)
    stats = report.passes[1].stats
    weights, mean_bits = shared_weights_and_bits(report)
    assert stats["allocation"] == "sensitivity" and mean_bits <= 4.0
    assert stats["stored_bytes"] <= weights * 4 / 8  # codebooks and scales included
    result = split_accuracy(model_path, str(tmp_path / "shared.onnx"), name, images, labels, slice(500, 2000))
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0


def test_efficientnet_at_5_bits_average_within_1_point(assets, imagenet, tmp_path):
    model_path = str(assets / "models/efficientnet_lite0_imagenet.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels, calibration, evaluation = imagenet
    _, report = onnxcomp.optimize(model_path, "fuse-bn,share:bits=5", calib_data={name: images[calibration]},
                                  output=tmp_path / "shared.onnx", validate_result=False)
    weights, mean_bits = shared_weights_and_bits(report)
    assert mean_bits <= 5.0 and report.passes[1].stats["stored_bytes"] <= weights * 5 / 8
    result = split_accuracy(model_path, str(tmp_path / "shared.onnx"), name, images, labels, evaluation)
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0
    assert (tmp_path / "shared.onnx").stat().st_size * 6 <= (assets / "models/efficientnet_lite0_imagenet.onnx").stat().st_size
