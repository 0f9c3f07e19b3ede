"""prune on the shared real models, post-training: top-1 on images not used for calibration, and file size."""

from __future__ import annotations

import numpy as np

import onnxcomp
from onnxcomp import data as datasets
from test_quantize_real import CIFAR, IMAGENET, split_accuracy


def test_resnet20_half_pruned_within_1_point_and_file_shrinks(assets, tmp_path):
    model_path = str(assets / "models/resnet20_cifar10.onnx")
    model = onnxcomp.load(model_path)
    name = model.graph.input[0].name
    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        images = datasets.Preprocess.parse(CIFAR).apply(archive["images"])
        labels = archive["labels"].astype(np.int64)
    pruned, report = onnxcomp.optimize(model_path, "fuse-bn,prune:sparsity=0.5", calib_data={name: images[:100]},
                                       output=tmp_path / "pruned.onnx", validate_result=False)
    stats = report.passes[1].stats
    assert stats["pruned"] == 18 and abs(stats["sparsity"] - 0.5) <= 0.005
    result = split_accuracy(model_path, str(tmp_path / "pruned.onnx"), name, images, labels, slice(500, 2000))
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0
    pruned_weights = 268336 - 432 - 640  # every weight but the first conv and the classifier (under min-size)
    saved = (tmp_path / "pruned.onnx").stat().st_size - (assets / "models/resnet20_cifar10.onnx").stat().st_size
    assert -saved >= (0.5 * 4 - 0.13) * pruned_weights - 18 * 1500


def test_efficientnet_30_percent_pruned_within_1_point(assets, tmp_path):
    model_path = str(assets / "models/efficientnet_lite0_imagenet.onnx")
    model = onnxcomp.load(model_path)
    name = model.graph.input[0].name
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET)
    images, labels = dataset.batch(0, dataset.num_samples)[name], dataset.labels
    calibration = np.arange(0, len(images), 5)  # every 5th image; the other 400 evaluate
    evaluation = np.setdiff1d(np.arange(len(images)), calibration)
    _, report = onnxcomp.optimize(model_path, "fuse-bn,prune:sparsity=0.3", calib_data={name: images[calibration]},
                                  output=tmp_path / "pruned.onnx", validate_result=False)
    assert abs(report.passes[1].stats["sparsity"] - 0.3) <= 0.005
    result = split_accuracy(model_path, str(tmp_path / "pruned.onnx"), name, images, labels, evaluation)
    assert result.candidate_accuracy >= result.reference_accuracy - 1.0
