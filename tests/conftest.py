"""Shared fixtures: paths to the shared real-model assets, and running the CLI as a user would."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared assets folder (ONNXCOMP_ASSETS); tests that need it skip without it."""
    location = os.environ.get("ONNXCOMP_ASSETS")
    if not location or not Path(location).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared assets, but ONNXCOMP_ASSETS={location!r} is not a folder")
        pytest.skip("ONNXCOMP_ASSETS is not set to the shared assets folder")
    return Path(location)


@pytest.fixture
def avx2_channel_block(monkeypatch):
    """Channel counts and ranks in steps of 8 (the AVX2 block) whatever this machine's: the small graphs of the
    structure tests count those steps. Each pass's own test of the default sets the block itself."""
    from onnxcomp import runtime

    monkeypatch.setattr(runtime, "channel_block", lambda: 8)


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return PROJECT / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_data() -> Path:
    return PROJECT / "models" / "digits_test.npz"


CIFAR_PREPROCESS = "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"
IMAGENET_PREPROCESS = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128"


@pytest.fixture(scope="session")
def cifar(assets):
    """ResNet-20's 2000 CIFAR-10 test images, preprocessed, and their labels.

    Lossy passes calibrate on images 0..99 and are judged on images 500..1999.
    """
    from onnxcomp import data as datasets

    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        images = datasets.Preprocess.parse(CIFAR_PREPROCESS).apply(archive["images"])
        labels = archive["labels"].astype(np.int64)
    return images, labels


@pytest.fixture(scope="session")
def imagenet(assets):
    """EfficientNet-Lite0's 500 dev images, preprocessed, their labels, and the split lossy passes use:
    calibration on every 5th image (in labels.csv order, which is sorted), evaluation on the other 400."""
    import onnxcomp
    from onnxcomp import data as datasets
    from onnxcomp.bench import effnet_split

    model = onnxcomp.load(assets / "models/efficientnet_lite0_imagenet.onnx")
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET_PREPROCESS)
    images = dataset.batch(0, dataset.num_samples)[model.graph.input[0].name]
    return (images, dataset.labels, *effnet_split(len(images)))
