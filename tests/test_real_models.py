"""fuse-bn and validation on the shared real models and real images (ONNXCOMP_ASSETS)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import onnx
import pytest

from helpers import run_cli, run_model
from onnxcomp import data as datasets
from onnxcomp import model_io
from onnxcomp.manager import PassManager
from onnxcomp.recipe import parse

CIFAR = "resize=32,crop=32,scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"
IMAGENET = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128"


def cifar_images(assets, count):
    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        images, labels = archive["images"][:count], archive["labels"][:count]
    return datasets.Preprocess.parse(CIFAR).apply(images), labels


def imagenet_images(assets, model, count):
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET, limit=count)
    return dataset.batch(0, count)[dataset.inputs[0].name]


@pytest.mark.parametrize("name, expected_fused", [("resnet20_cifar10", 19), ("efficientnet_lite0_imagenet", 49)])
def test_fuse_bn_on_real_models_is_exact_on_real_images(assets, name, expected_fused):
    original = model_io.load(assets / f"models/{name}.onnx")
    fused, records = PassManager(parse("fuse-bn")).run(original)
    assert records[0].stats["fused"] == expected_fused
    assert records[0].stats["skipped"] == 0
    assert sum(n.op_type == "BatchNormalization" for n in fused.graph.node) == 0
    if name.startswith("resnet"):
        images, _ = cifar_images(assets, 100)
    else:
        images = imagenet_images(assets, original, 100)
    input_name = original.graph.input[0].name
    for start in range(0, 100, 25):
        feed = {input_name: images[start:start + 25]}
        expected = run_model(original, feed)[0]
        actual = run_model(fused, feed)[0]
        assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
        assert (actual.argmax(1) == expected.argmax(1)).all()


def test_mnist_without_batch_norm_comes_back_unchanged(assets, tmp_path):
    source = assets / "models/mnist-8.onnx"
    output = tmp_path / "mnist.opt.onnx"
    result = run_cli("optimize", source, "--passes", "fuse-bn", "-o", output, "--runs", "5",
                     "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(p["name"], p["modified"]) for p in report["passes"]] == [("fuse-bn", False)]
    assert output.read_bytes() == source.read_bytes()
    assert report["validation"]["providers"][0]["outputs"][0]["max_abs_error"] == 0


def test_validate_mnist_on_real_digits(assets, tmp_path):
    with gzip.open(assets / "data/mnist/t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:200]
    with gzip.open(assets / "data/mnist/t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)[:200]
    data = tmp_path / "mnist.npz"
    np.savez(data, Input3=images.astype(np.float32), labels=labels)
    result = run_cli("validate", assets / "models/mnist-8.onnx", assets / "models/mnist-8.onnx", "--data", data,
                     "--runs", "5", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    provider = json.loads((tmp_path / "r.json").read_text())["validation"]["providers"][0]
    assert provider["samples"] == 200
    assert provider["reference_accuracy"] >= 95.0
    assert provider["agreement"] == 100.0


def test_optimize_real_model_with_image_folder_reports_accuracy(assets, tmp_path):
    output = tmp_path / "effnet.opt.onnx"
    result = run_cli("optimize", assets / "models/efficientnet_lite0_imagenet.onnx", "-o", output,
                     "--data", assets / "data/imagenet/dev500", "--preprocess", IMAGENET, "--limit", "40",
                     "--runs", "10", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    validation = json.loads((tmp_path / "r.json").read_text())["validation"]
    provider = validation["providers"][0]
    assert validation["labelled"] and provider["samples"] == 40
    assert provider["reference_accuracy"] >= 75.0
    assert provider["agreement"] == 100.0
    assert validation["candidate_bytes"] < validation["reference_bytes"]
    onnx.checker.check_model(onnx.load(output))
