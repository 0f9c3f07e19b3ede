"""int8 on the shared real models: accuracy on images not used for calibration, int8 kernels in ORT."""

from __future__ import annotations

import onnxcomp
from helpers import optimized_ops


def split_accuracy(reference, candidate, name, images, labels, evaluation):
    result = onnxcomp.validate(reference, candidate, {name: images[evaluation], "labels": labels[evaluation]},
                               latency_runs=0)
    return result.providers[0]


def test_resnet20_int8_within_0_3_points(assets, cifar, tmp_path):
    model_path = str(assets / "models/resnet20_cifar10.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels = cifar
    quantized, report = onnxcomp.optimize(model_path, "fuse-bn,int8", calib_data={name: images[:100]},
                                          validate_result=False)
    assert report.passes[1].stats["int8:Conv"] == 19
    onnxcomp.save(quantized, tmp_path / "int8.onnx")
    result = split_accuracy(model_path, str(tmp_path / "int8.onnx"), name, images, labels, slice(500, 2000))
    assert result.candidate_accuracy >= result.reference_accuracy - 0.3
    assert result.agreement >= 97.0


def test_efficientnet_int8_within_0_5_points_with_int8_kernels(assets, imagenet, tmp_path):
    model_path = str(assets / "models/efficientnet_lite0_imagenet.onnx")
    name = onnxcomp.load(model_path).graph.input[0].name
    images, labels, calibration, evaluation = imagenet
    quantized, report = onnxcomp.optimize(model_path, "fuse-bn,int8", calib_data={name: images[calibration]},
                                          validate_result=False)
    onnxcomp.save(quantized, tmp_path / "int8.onnx")
    result = split_accuracy(model_path, str(tmp_path / "int8.onnx"), name, images, labels, evaluation)
    assert result.candidate_accuracy >= result.reference_accuracy - 0.5
    assert result.agreement >= 97.0
    _, ops = optimized_ops(tmp_path / "int8.onnx", tmp_path)
    assert ops["QLinearConv"] == 49 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 9 and ops["Add"] == 0
