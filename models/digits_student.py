"""A small student for the digits model (models/digits_cnn.onnx, ~17 k parameters): ~2.6 k parameters.

    onnxcomp distill models/digits_cnn.onnx --student models/digits_student.py:small_student --data train.npz \\
        -o student.onnx
"""

from __future__ import annotations

from torch import nn


def small_student() -> nn.Module:
    """Conv(1→8) ReLU, Conv(8→16, stride 2) ReLU, Conv(16→16) ReLU, global average pool, Linear(16→10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


if __name__ == "__main__":
    print(sum(p.numel() for p in small_student().parameters()), "parameters")
