"""prune on the shared real models, post-training: top-1 on images not used for calibration, and file size."""

from __future__ import annotations

import onnxcomp
from test_quantize_real import split_accuracy


def test_resnet20_half_pruned_within_1_point_and_file_shrinks(assets, cifar, tmp_path):
    model_path = str(assets / "models/resnet20_cifar10.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels = cifar
    pruned, report = onnxcomp.optimize(model_path, "fuse-bn,prune:sparsity=0.5", calib_data={name: images[:100]},
                                       output=tmp_path / "pruned.onnx", validate_result=False)
    stats = report.passes[1].stats
    assert stats["pruned"] == 18 and abs(stats["sparsity"] - 0.5) <= 0.005
    result = split_accuracy(model_path, str(tmp_path / "pruned.onnx"), name, images, labels, slice(500, 2000))
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0
    pruned_weights = 268336 - 432 - 640  # every weight but the first conv and the classifier (under min-size)
    saved = (tmp_path / "pruned.onnx").stat().st_size - (assets / "models/resnet20_cifar10.onnx").stat().st_size
    assert -saved >= (0.5 * 4 - 0.13) * pruned_weights - 18 * 1500


def test_efficientnet_30_percent_pruned_within_1_point(assets, imagenet, tmp_path):
    model_path = str(assets / "models/efficientnet_lite0_imagenet.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels, calibration, evaluation = imagenet
    _, report = onnxcomp.optimize(model_path, "fuse-bn,prune:sparsity=0.3", calib_data={name: images[calibration]},
                                  output=tmp_path / "pruned.onnx", validate_result=False)
    assert abs(report.passes[1].stats["sparsity"] - 0.3) <= 0.005
    result = split_accuracy(model_path, str(tmp_path / "pruned.onnx"), name, images, labels, evaluation)
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0
