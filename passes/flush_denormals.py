"""flush-denormals: denormal float weights become zero.

Before:                                          After:
    W = [0.5, 3e-41, -1e-39, 2.0]  (float32)         W = [0.5, 0, 0, 2.0]
    in initializers, Constant nodes, subgraphs       the same tensors, same names and shapes

A denormal (subnormal) float is non-zero but smaller in magnitude than the type's smallest normal number
(1.18e-38 for float32). x86 CPUs compute with them through a slow microcode path, so a model whose weights
hold many of them runs several times slower in ONNX Runtime; their contribution to any output is below the
rounding error of the normal numbers they are added to. Exporters leave them behind (PaddlePaddle's PP-OCR
detector ships with 10 % of its weights denormal). Exact in practice: the outputs stay identical under ORT.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult
from onnxcomp.registry import register


@register
class FlushDenormals(Pass):
    name = "flush-denormals"
    summary = "set denormal float weights to zero (exact; x86 computes denormals slowly)"
    visits_subgraphs = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        flushed = tensors = 0
        for tensor in graphs.constant_tensors(graph):
            count = flush(tensor)
            flushed += count
            tensors += count > 0
        return PassResult(modified=flushed > 0, stats={"denormals_zeroed": flushed, "tensors": tensors})


def flush(tensor: gs.Constant) -> int:
    """Zero the tensor's denormal values; how many there were."""
    values = tensor.values
    if values.dtype.kind != "f" or values.dtype.itemsize < 2:
        return 0
    values = np.asarray(values)
    denormal = (values != 0) & (np.abs(values) < np.finfo(values.dtype).tiny)
    count = int(np.count_nonzero(denormal))
    if count:
        tensor.values = np.where(denormal, np.zeros((), values.dtype), values).astype(values.dtype)
    return count
