"""Compact storage of compressed weights as plain ONNX: small initializers plus standard decoding ops.

An ONNX initializer is dense, so zeros written by pruning cost as much as any other value. A compressed weight
is stored instead as compact initializers and a chain of standard operators that reads nothing else. ONNX
Runtime folds such a chain into a dense constant when it creates the session (constant folding, at
ORT_ENABLE_BASIC and above), so inference runs at the speed of the dense model, and any runtime that executes
standard ONNX computes the same dense values.

Sparse layout, for a weight W of n elements of which k are non-zero:

    W.values  [k]         the non-zero values in row-major order, in W's dtype
    W.mask    [⌈n/8⌉, 1]  uint8; bit j (least significant first) of byte i is set when element 8i + j is non-zero

Before:                       After:
    W ─► Conv                     W.mask ─► BitShift(0..7) ─► Mod 2 ─► Reshape ─► Slice[:n] ─► bits
                                  bits ─► Cast ─► CumSum − 1 ─► Gather(W.values) ─► Where(bits, ·, 0) ─► Reshape ─► W ─► Conv

That is 4 bytes per non-zero value plus 1 bit per weight: (1 − s) × 4 + 0.125 bytes per weight at sparsity s,
plus the decoding nodes' few hundred bytes. The operators need opset 11 (BitShift, CumSum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcomp import graph as graphs

SPARSE_MIN_OPSET = 11


def sparse_bytes(count: int, nonzero: int, itemsize: int = 4) -> int:
    """Bytes of the sparse layout's initializers for `count` weights of which `nonzero` are non-zero."""
    return max(nonzero, 1) * itemsize + (count + 7) // 8


def encode_sparse(graph: gs.Graph, weight: gs.Constant, names: graphs.Names) -> gs.Variable:
    """Replace `weight`, for every node that reads it, by its sparse layout and the nodes that decode it.

    The decoded tensor takes the weight's name, so the nodes that read it and anything that reports it by name
    see no change. The graph's opset must be at least SPARSE_MIN_OPSET.
    """
    dense = np.asarray(weight.values)
    flat = dense.reshape(-1)
    present = flat != 0
    values = flat[present]
    if values.size == 0:  # Gather needs something to index; every position is masked out anyway
        values = np.zeros(1, dtype=dense.dtype)
    mask = np.packbits(present, bitorder="little").reshape(-1, 1)
    name = weight.name
    weight.name = names.new(f"{name}.dense")  # free the name for the decoded tensor; this tensor is dropped
    decoded = gs.Variable(name, dtype=dense.dtype, shape=list(dense.shape))
    for node in graphs.consumers(weight):
        for index, tensor in enumerate(node.inputs):
            if tensor is weight:
                node.inputs[index] = decoded
    graph.outputs = [decoded if out is weight else out for out in graph.outputs]

    def node(op: str, inputs: list, dtype, shape, **attrs) -> gs.Variable:
        out = gs.Variable(names.new(f"{name}.{op.lower()}"), dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node(op, names.new(f"{name}.decode.{op}"), attrs, inputs, [out]))
        return out

    count = flat.size
    packed = names.constant(f"{name}.mask", mask)
    shifted = node("BitShift", [packed, names.constant(f"{name}.shifts", np.arange(8, dtype=np.uint8))],
                   np.uint8, [mask.shape[0], 8], direction="RIGHT")
    bits = node("Mod", [shifted, names.constant(f"{name}.two", np.array(2, dtype=np.uint8))], np.uint8,
                [mask.shape[0], 8])
    bits = node("Reshape", [bits, names.constant(f"{name}.flat", np.array([-1], dtype=np.int64))], np.uint8,
                [mask.size * 8])
    if mask.size * 8 != count:
        bits = node("Slice", [bits, names.constant(f"{name}.start", np.array([0], dtype=np.int64)),
                              names.constant(f"{name}.stop", np.array([count], dtype=np.int64))], np.uint8, [count])
    counted = node("CumSum", [node("Cast", [bits], np.int64, [count], to=onnx.TensorProto.INT64),
                              names.constant(f"{name}.axis", np.array(0, dtype=np.int64))], np.int64, [count])
    positions = node("Sub", [counted, names.constant(f"{name}.one", np.array(1, dtype=np.int64))], np.int64, [count])
    gathered = node("Gather", [names.constant(f"{name}.values", values), positions], dense.dtype, [count])
    present_bool = node("Cast", [bits], np.bool_, [count], to=onnx.TensorProto.BOOL)
    zero = names.constant(f"{name}.zero", np.zeros((), dtype=dense.dtype))
    flat_dense = node("Where", [present_bool, gathered, zero], dense.dtype, [count])
    shape = names.constant(f"{name}.shape", np.array(dense.shape, dtype=np.int64))
    graph.nodes.append(gs.Node("Reshape", names.new(f"{name}.decode.Reshape"), {}, [flat_dense, shape], [decoded]))
    return decoded


@dataclass
class EncodedWeight:
    name: str
    values: np.ndarray   # the dense weight the decoding ops compute
    stored_bytes: int    # bytes of the initializers the decoding ops read
    sources: set[str]    # the names of those initializers


def encoded_weights(model: onnx.ModelProto) -> list[EncodedWeight]:
    """Weights of `model` computed by operators from initializers alone (compressed layouts), decoded.

    Each is a tensor that some node reading non-constant data consumes; its dense value is computed with ONNX
    Runtime, as the session would fold it.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    overridable = {value.name for value in graph.input}
    constant = {name for name in initializers if name not in overridable}
    cones: dict[str, set[str]] = {}  # constant tensor → initializers it is computed from
    for node in graph.node:  # topologically sorted, as ONNX requires
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or not inputs or not all(name in constant for name in inputs):
            continue
        sources = set().union(*({name} if name in initializers else cones[name] for name in inputs))
        for name in node.output:
            constant.add(name)
            cones[name] = sources
    wanted = []
    for node in graph.node:
        if not all(name in constant for name in node.input if name):
            wanted.extend(name for name in node.input if name in cones and name not in wanted)
    if not wanted:
        return []
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    needed = _ancestors(probe.graph, set(wanted))
    kept = [node for node in probe.graph.node if any(out in needed for out in node.output)]
    del probe.graph.node[:]
    probe.graph.node.extend(kept)
    del probe.graph.input[:]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(wanted, {})
    return [EncodedWeight(name, value, sum(_tensor_nbytes(initializers[source]) for source in cones[name]),
                          cones[name]) for name, value in zip(wanted, values)]


def _ancestors(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    needed = set(names)
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            needed.update(node.input)
    return needed


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    return int(numpy_helper.to_array(tensor).nbytes)
