"""What a model holds: opset, interface, operators, parameters by op type, and each weight's sparsity."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.data import value_dims, value_type


@dataclass
class WeightInfo:
    name: str
    op_type: str  # op of the first node that reads it
    shape: list[int]
    dtype: str
    bytes: int
    sparsity: float  # fraction of exact zeros
    unique_values: int


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
                lines.append(f"  {w.name:{width}s} {w.op_type:12s} {str(w.shape):18s} {w.dtype:8s} "
                             f"{w.bytes:>10,} B  sparsity {w.sparsity:6.1%}  unique {w.unique_values:,}")
        return "\n".join(lines)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    graph = model.graph
    readers: dict[str, str] = {}
    op_counts: Counter[str] = Counter()
    constants: list[tuple[onnx.TensorProto, str]] = []
    for node in _all_nodes(graph):
        op_counts[node.op_type] += 1
        for name in node.input:
            readers.setdefault(name, node.op_type)
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants.append((attribute.t, node.output[0]))
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"parameters": 0, "bytes": 0})
    weights = []
    for tensor, name in [(t, t.name) for t in graph.initializer] + constants:
        values = numpy_helper.to_array(tensor)
        op = readers.get(name, "(unused)")
        info = WeightInfo(name, op, list(values.shape), str(values.dtype), int(values.nbytes),
                          float(np.mean(values == 0)) if values.size else 0.0,
                          int(np.unique(values).size) if values.dtype.kind in "biuf" else 0)
        weights.append(info)
        by_op[op]["parameters"] += int(values.size)
        by_op[op]["bytes"] += info.bytes
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


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                yield from _all_nodes(subgraph)
