"""Peak memory of `onnxcomp optimize` grows with the model by at most 2.5 times its weights.

The model: x [N, 2048] → (MatMul → BatchNormalization → Relu) × 10, 168 MB of weights in external data; fuse-bn
replaces every weight. The peak resident memory of the run over that of the same run on a one-layer model of the
same kind (the interpreter and its libraries) must stay under 2.5× the weights the ten layers add. The copies that this bounds:
a loaded copy of the model for the passes, the checker's serialized copies, the export of the whole graph, and
the serialized output (before, the same run took about 6× the weights).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 2048
# VmHWM, the process's own peak: getrusage's ru_maxrss keeps the parent's peak across fork and exec.
PEAK_SCRIPT = """
import runpy, sys
sys.argv = ["onnxcomp"] + sys.argv[1:]
try:
    runpy.run_module("onnxcomp.cli", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def matmul_bn_chain(path: Path, layers: int) -> int:
    """The model described above, saved with its weights in external data; returns the weights' bytes."""
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array(
            rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.float32(WIDTH ** 0.5), f"w{i}"))
        for name, values in (("s", np.ones(WIDTH)), ("b", np.zeros(WIDTH)), ("m", rng.normal(0, 0.1, WIDTH)),
                             ("v", np.ones(WIDTH))):
            weights.append(numpy_helper.from_array(values.astype(np.float32), f"{name}{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("BatchNormalization", [f"mm{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"bn{i}"]),
                  helper.make_node("Relu", [f"bn{i}"], [f"r{i}"])]
        current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return sum(t.ByteSize() for t in weights)


def peak_bytes(model: Path) -> int:
    output = model.with_name(model.stem + ".opt.onnx")
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "optimize", str(model), "-o", str(output),
                             "--passes", "fuse-bn", "--no-validate"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_memory_of_fuse_bn_is_at_most_2_5_times_the_weights(tmp_path):
    (tmp_path / "small").mkdir(), (tmp_path / "large").mkdir()
    small = matmul_bn_chain(tmp_path / "small" / "model.onnx", 1)
    weights = matmul_bn_chain(tmp_path / "large" / "model.onnx", 10) - small
    growth = peak_bytes(tmp_path / "large" / "model.onnx") - peak_bytes(tmp_path / "small" / "model.onnx")
    assert growth <= 2.5 * weights, f"peak grew by {growth / weights:.2f}× the weights ({weights / 2**20:.0f} MiB)"
