"""What a model holds: opset, interface, operators, parameters by op type, and each weight's sparsity.

Weights stored in a compact layout (onnxcomp/encoding.py: pruned or shared weights decoded by standard ops) are
listed once, decoded, with their stored bytes next to their dense bytes; their parts are not listed apart.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp.data import value_dims, value_type


@dataclass
class WeightInfo:
    name: str
    op_type: str  # op of the first node that reads it
    shape: list[int]
    dtype: str
    bytes: int          # bytes on disk
    sparsity: float     # fraction of exact zeros
    unique_values: int
    dense_bytes: int = 0  # bytes of the dense tensor, when it is stored in a compact layout (else = bytes)

    @property
    def encoded(self) -> bool:
        return self.dense_bytes != self.bytes


@dataclass
class ModelSummary:
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[dict]
    outputs: list[dict]
    op_counts: dict[str, int]
    parameters_by_op: dict[str, dict[str, int]]  # op → {"parameters": n, "bytes": b}
    weights: list[WeightInfo] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(v["parameters"] for v in self.parameters_by_op.values())

    @property
    def parameter_bytes(self) -> int:
        return sum(v["bytes"] for v in self.parameters_by_op.values())

    def to_dict(self) -> dict:
        result = asdict(self)
        result["parameters"] = self.parameters
        result["parameter_bytes"] = self.parameter_bytes
        return result

    def render(self, top: int = 20) -> str:
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items())
        lines = [f"IR {self.ir_version}, opset {opsets}, producer {self.producer or '-'}"]
        for kind, values in (("input", self.inputs), ("output", self.outputs)):
            for value in values:
                lines.append(f"{kind:6s} {value['name']}: {value['dtype']} {value['shape']}")
        lines.append(f"parameters: {self.parameters:,} ({self.parameter_bytes:,} bytes)")
        lines.append("operators: " + ", ".join(f"{op} {n}" for op, n in
                                                sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))))
        for op, totals in sorted(self.parameters_by_op.items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"  {op:24s} {totals['parameters']:>12,} params {totals['bytes']:>14,} bytes")
        shown = sorted(self.weights, key=lambda w: -w.bytes)[:top]
        if shown:
            lines.append(f"largest weights ({len(shown)} of {len(self.weights)}):")
            width = max(len(w.name) for w in shown)
            for w in shown:
                stored = f"  stored {w.bytes:,} B ({w.bytes / w.dense_bytes:.2f}x)" if w.encoded else ""
                lines.append(f"  {w.name:{width}s} {w.op_type:12s} {str(w.shape):18s} {w.dtype:8s} "
                             f"{w.dense_bytes:>10,} B  sparsity {w.sparsity:6.1%}  unique {w.unique_values:,}{stored}")
        encoded = [w for w in self.weights if w.encoded]
        if encoded:
            dense, stored = sum(w.dense_bytes for w in encoded), sum(w.bytes for w in encoded)
            lines.append(f"compact weights: {len(encoded)}, {dense:,} B dense stored in {stored:,} B "
                         f"({stored / dense:.3f}x)")
        return "\n".join(lines)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    graph = model.graph
    readers: dict[str, str] = {}
    op_counts: Counter[str] = Counter()
    constants: list[tuple[onnx.TensorProto, str]] = []
    for node in graphs.all_nodes(graph):
        op_counts[node.op_type] += 1
        for name in node.input:
            readers.setdefault(name, node.op_type)
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants.append((attribute.t, node.output[0]))
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"parameters": 0, "bytes": 0})
    weights = []
    compact = encoding.encoded_weights(model)
    parts = set().union(*(w.sources for w in compact)) if compact else set()
    for tensor, name in [(t, t.name) for t in graph.initializer if t.name not in parts] + constants:
        values = numpy_helper.to_array(tensor)
        weights.append(_info(name, readers.get(name, "(unused)"), values, int(values.nbytes)))
    weights += [_info(w.name, readers.get(w.name, "(unused)"), w.values, w.stored_bytes) for w in compact]
    for info in weights:
        by_op[info.op_type]["parameters"] += int(np.prod(info.shape))
        by_op[info.op_type]["bytes"] += info.bytes
    initializers = {t.name for t in graph.initializer}
    inputs = [{"name": v.name, "dtype": value_type(v), "shape": value_dims(v)} for v in graph.input
              if v.name not in initializers]
    outputs = [{"name": v.name, "dtype": value_type(v), "shape": value_dims(v)} for v in graph.output]
    return ModelSummary(
        ir_version=model.ir_version,
        opsets={entry.domain: entry.version for entry in model.opset_import},
        producer=" ".join(filter(None, [model.producer_name, model.producer_version])),
        inputs=inputs,
        outputs=outputs, op_counts=dict(op_counts), parameters_by_op=dict(by_op), weights=weights)


def _info(name: str, op: str, values: np.ndarray, stored_bytes: int) -> WeightInfo:
    return WeightInfo(name, op, list(values.shape), str(values.dtype), stored_bytes,
                      float(np.mean(values == 0)) if values.size else 0.0,
                      int(np.unique(values).size) if values.dtype.kind in "biuf" else 0, int(values.nbytes))
