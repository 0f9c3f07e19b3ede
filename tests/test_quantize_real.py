"""int8 on the shared real models: accuracy on images not used for calibration, int8 kernels in ORT."""

from __future__ import annotations

import numpy as np

import onnxcomp
from helpers import optimized_ops
from onnxcomp import data as datasets

CIFAR = "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"
IMAGENET = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128"


def split_accuracy(reference, candidate, name, images, labels, evaluation):
    result = onnxcomp.validate(reference, candidate, {name: images[evaluation], "labels": labels[evaluation]},
                               latency_runs=0)
    return result.providers[0]


def test_resnet20_int8_within_0_3_points(assets, tmp_path):
    model_path = str(assets / "models/resnet20_cifar10.onnx")
    model = onnxcomp.load(model_path)
    name = model.graph.input[0].name
    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        images = datasets.Preprocess.parse(CIFAR).apply(archive["images"])
        labels = archive["labels"].astype(np.int64)
    quantized, report = onnxcomp.optimize(model_path, "fuse-bn,int8", calib_data={name: images[:100]},
                                          validate_result=False)
    assert report.passes[1].stats["int8:Conv"] == 19
    onnxcomp.save(quantized, tmp_path / "int8.onnx")
    result = split_accuracy(model_path, str(tmp_path / "int8.onnx"), name, images, labels, slice(500, 2000))
    assert result.candidate_accuracy >= result.reference_accuracy - 0.3
    assert result.agreement >= 97.0


def test_efficientnet_int8_within_0_5_points_with_int8_kernels(assets, tmp_path):
    model_path = str(assets / "models/efficientnet_lite0_imagenet.onnx")
    model = onnxcomp.load(model_path)
    name = model.graph.input[0].name
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET)
    images, labels = dataset.batch(0, dataset.num_samples)[name], dataset.labels
    calibration = np.arange(0, len(images), 5)  # every 5th image; the other 400 evaluate
    evaluation = np.setdiff1d(np.arange(len(images)), calibration)
    quantized, report = onnxcomp.optimize(model_path, "fuse-bn,int8", calib_data={name: images[calibration]},
                                          validate_result=False)
    onnxcomp.save(quantized, tmp_path / "int8.onnx")
    result = split_accuracy(model_path, str(tmp_path / "int8.onnx"), name, images, labels, evaluation)
    assert result.candidate_accuracy >= result.reference_accuracy - 0.5
    assert result.agreement >= 97.0
    _, ops = optimized_ops(tmp_path / "int8.onnx", tmp_path)
    assert ops["QLinearConv"] == 49 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 9 and ops["Add"] == 0
