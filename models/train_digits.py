"""Train a small Conv+BatchNorm CNN on scikit-learn's digits and export it to ONNX.

What it builds
    A ~17k-parameter CNN for the 8x8 handwritten digits that ship with
    scikit-learn (``sklearn.datasets.load_digits``: 1797 real images from the
    UCI "Optical Recognition of Handwritten Digits" set, no download needed):

        Conv(1->16, 3x3, no bias)  + BatchNorm + ReLU
        Conv(16->32, 3x3, bias)    + BatchNorm + ReLU
        MaxPool 2x2
        Conv(32->32, 3x3, no bias) + BatchNorm + ReLU
        GlobalAveragePool -> Flatten
        Linear(32->64)             + BatchNorm1d + ReLU
        Linear(64->10)

    Both conv flavours (with and without a bias) and a Linear+BatchNorm1d pair
    are there on purpose, so a BN-folding pass has each case to handle.

Why BatchNormalization is kept
    The onnxcomp demo shows the ``fuse-bn`` pass folding BatchNormalization into
    the preceding Conv/Gemm. With its default constant folding, PyTorch's ONNX
    exporter already folds every BN that follows a Conv in eval mode (only the
    BatchNorm1d after the Linear survives), leaving little to demonstrate. Exporting with
    the TorchScript exporter (``dynamo=False``) and ``do_constant_folding=False``
    keeps every BN as a real ``BatchNormalization`` node; the script counts them
    and fails if any went missing.

Outputs (written atomically into --out-dir, default: next to this script)
    digits_cnn.onnx   opset 17, input "input" float32 [N,1,8,8] (pixels / 16),
                      output "logits" float32 [N,10], dynamic batch dim "N".
    digits_test.npz   held-out test split: "input" float32 [N,1,8,8], "labels" int64 [N].
    digits_calib.npz  100 training images for int8 calibration, same keys.

After export the model is run with onnxruntime (all graph optimizations off)
and its logits are checked against PyTorch's to within 1e-4.

Usage
    python models/train_digits.py [--epochs N] [--out-dir DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OPSET = 17
N_CALIB = 100
SPLIT_SEED = 0  # the train/test split never changes, whatever --seed says
ATOL = 1e-4


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=True),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # exports as GlobalAveragePool
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(32, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # identical float reductions from run to run


def load_split():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N,1,8,8] in [0,1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    batch = 64
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:  # BatchNorm1d cannot train on a batch of one
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):.4f}")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file in path's directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use normal file permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(2, 1, 8, 8)

    def write(tmp: str) -> None:
        torch.onnx.export(
            model,
            (dummy,),
            tmp,
            dynamo=False,  # TorchScript exporter; the dynamo one needs onnxscript
            do_constant_folding=False,  # keep BatchNormalization un-fused
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
        m = onnx.load(tmp)
        onnx.checker.check_model(m, full_check=True)

    atomic_write(path, write)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write the .onnx and .npz files (default: this script's folder)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for weights, shuffling and the calibration pick (default 0); "
                         "the 80/20 split is always random_state=0")
    args = ap.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(args.seed)
    x_train, x_test, y_train, y_test = load_split()
    print(f"train {len(x_train)}  test {len(x_test)}")

    model = DigitsCNN()
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    train(model, x_train, y_train, args.epochs, args.seed)

    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)

    calib_idx = np.random.default_rng(args.seed).choice(len(x_train), N_CALIB, replace=False)
    calib_idx.sort()
    # tmp names end in ".npz", so np.savez writes exactly there (no suffix added).
    atomic_write(out / "digits_test.npz",
                 lambda tmp: np.savez(tmp, input=x_test, labels=y_test))
    atomic_write(out / "digits_calib.npz",
                 lambda tmp: np.savez(tmp, input=x_train[calib_idx], labels=y_train[calib_idx]))

    # Verify the exported graph against PyTorch with onnxruntime's optimizer off,
    # so ORT's own BN fusion does not hide an export problem.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())

    graph = onnx.load(str(onnx_path)).graph
    ops = Counter(n.op_type for n in graph.node)
    n_bn = ops["BatchNormalization"]
    n_bn_torch = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    print(f"torch test accuracy: {accuracy(torch_logits, y_test):.4f}")
    print(f"onnx  test accuracy: {accuracy(ort_logits, y_test):.4f}")
    print(f"max |onnx - torch| logits: {max_diff:.2e}")
    print(f"BatchNormalization nodes: {n_bn} (torch model has {n_bn_torch})")
    print("op histogram: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes)")

    if max_diff > ATOL:
        raise SystemExit(f"onnx/torch mismatch: {max_diff:.2e} > {ATOL}")
    if n_bn != n_bn_torch:
        raise SystemExit(f"expected {n_bn_torch} BatchNormalization nodes, found {n_bn}")


if __name__ == "__main__":
    main()
