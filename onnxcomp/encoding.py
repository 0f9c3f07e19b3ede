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

Codebook layout (weight sharing), for a weight whose values all come from a codebook of at most 2^b values:

    W.codebook [K]   the shared values
    W.indices  [⌈n·b/8⌉ + 1] uint8: the index of each element into the codebook, b bits each, back to back

decoded by Range → Div/Mod 8 (byte and bit offset of each index) → Gather two bytes → Div by 2^offset → Mod 2^b
→ Gather(W.codebook). With `sparse`, only the non-zero elements carry an index and the mask of the sparse layout
places them, so pruning and sharing compose: b/8 bytes per kept weight plus 1 bit per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcomp import graph as graphs

SPARSE_MIN_OPSET = 11
HELPER_SIZE = 8  # constants of at most this many values are decoding helpers, named `decode.*`


def sparse_bytes(count: int, nonzero: int, itemsize: int = 4) -> int:
    """Bytes of the sparse layout's initializers for `count` weights of which `nonzero` are non-zero."""
    return max(nonzero, 1) * itemsize + (count + 7) // 8


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` indices of `bits` bits packed back to back, plus the one byte the decoder reads past."""
    return (count * bits + 7) // 8 + 1


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """`indices` (each below 2**bits) as one bit stream, least significant bit first: index i occupies bits
    i·bits … i·bits + bits − 1. A zero byte is appended, so reading two bytes at the last index stays inside."""
    flat = np.asarray(indices, dtype=np.uint32).reshape(-1)
    stream = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1)
    return np.concatenate([np.packbits(stream, bitorder="little"), np.zeros(1, np.uint8)])


def encode_sparse(graph: gs.Graph, weight: gs.Constant, names: graphs.Names) -> gs.Variable:
    """Replace `weight`, for every node that reads it, by its sparse layout and the nodes that decode it.

    The decoded tensor takes the weight's name, so the nodes that read it and anything that reports it by name
    see no change. The graph's opset must be at least SPARSE_MIN_OPSET.
    """
    decoder = _Decoder(graph, weight, names)
    present = decoder.dense.reshape(-1) != 0
    values = decoder.dense.reshape(-1)[present]
    if values.size == 0:  # Gather needs something to index; every position is masked out anyway
        values = np.zeros(1, dtype=decoder.dense.dtype)
    return decoder.finish(decoder.scatter(present, decoder.constant("values", values), values.dtype)[0])


def encode_codebook(graph: gs.Graph, weight: gs.Constant, codebook: np.ndarray, indices: np.ndarray, bits: int,
                    names: graphs.Names, *, sparse: bool = False, scales: np.ndarray | None = None) -> gs.Variable:
    """Replace `weight` by a codebook and `bits`-bit indices into it, and the nodes that decode them.

    `codebook` is one vector for the whole tensor, or one row per slice along the weight's first axis
    (shape (weight.shape[0], K)). With `scales` (one per slice along the first axis), the looked-up values are
    multiplied by their slice's scale. The weight must equal the codebook looked up at `indices` (times the
    scale), element by element; with `sparse`, `indices` cover only its non-zero elements (row-major order) and
    a bit mask says where they go. The graph's opset must be at least SPARSE_MIN_OPSET.
    """
    decoder = _Decoder(graph, weight, names)
    flat = decoder.dense.reshape(-1)
    codebook = np.asarray(codebook, dtype=flat.dtype)
    present = flat != 0
    stored = present if sparse else np.ones(flat.size, dtype=bool)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    row_size = flat.size // max(decoder.dense.shape[0], 1) if decoder.dense.ndim else 1
    per_row = codebook.ndim == 2
    if not 1 <= bits <= 8 or indices.size != int(stored.sum()) or (indices.size and indices.max() >= 2 ** bits) \
            or (per_row and (codebook.shape[0] != decoder.dense.shape[0] or codebook.shape[1] > 2 ** bits)):
        raise ValueError("the codebook, the indices and the bits do not give the weight")
    rows = np.arange(flat.size)[stored] // row_size
    looked_up = codebook[rows, indices] if per_row else codebook[indices]
    if scales is not None:
        scales = np.asarray(scales, dtype=flat.dtype).reshape(-1, 1)
        looked_up = looked_up * scales[rows, 0]
    if not np.array_equal(looked_up, flat[stored]):
        raise ValueError("the codebook, the indices and the bits do not give the weight")
    count, levels = flat.size, (codebook.shape[-1] if codebook.size else 1)
    index = decoder.unpack(indices, bits)
    if sparse:
        index, present_bool = decoder.scatter(present, index, np.int32)
    if per_row:  # the row's codebook starts at row · K in the flattened codebooks
        index = decoder.node("Add", [index, _row_offsets(decoder, count, row_size, levels)])
    values = decoder.node("Gather", [decoder.constant("codebook", codebook.reshape(-1)), index])
    if scales is not None:
        by_row = decoder.constant("by_row", np.array([scales.shape[0], -1], np.int64))
        by_row = decoder.node("Reshape", [values, by_row])
        scaled = decoder.node("Mul", [by_row, decoder.constant("scales", scales)])
        values = decoder.node("Reshape", [scaled, decoder.constant("flat_values", np.array([-1], np.int64))])
    if sparse:
        values = decoder.node("Where", [present_bool, values, decoder.constant("zero_value", np.zeros((), flat.dtype))])
    return decoder.finish(values)


def _row_offsets(decoder: "_Decoder", count: int, row_size: int, levels: int) -> gs.Variable:
    """(i // row_size) · levels for every element i, computed from three scalars."""
    i64 = np.int64
    position = decoder.node("Range", [decoder.constant("zero_position", np.array(0, i64)),
                                      decoder.constant("elements", np.array(count, i64)),
                                      decoder.constant("step_one", np.array(1, i64))])
    row = decoder.node("Div", [position, decoder.constant("row_size", np.array(row_size, i64))])
    offset = decoder.node("Mul", [row, decoder.constant("levels_per_row", np.array(levels, i64))])
    return decoder.node("Cast", [offset], to=onnx.TensorProto.INT32)


class _Decoder:
    """Builds the decoding nodes of one weight. The decoded tensor replaces the weight under its name."""

    def __init__(self, graph: gs.Graph, weight: gs.Constant, names: graphs.Names):
        self.graph, self.names, self.name = graph, names, weight.name
        self.dense = np.asarray(weight.values)
        self.count = self.dense.size
        weight.name = names.new(f"{self.name}.dense")  # free the name for the decoded tensor; this one is dropped
        self.decoded = gs.Variable(self.name, dtype=self.dense.dtype, shape=list(self.dense.shape))
        for reader in graphs.consumers(weight):
            for index, tensor in enumerate(reader.inputs):
                if tensor is weight:
                    reader.inputs[index] = self.decoded
        graph.outputs = [self.decoded if out is weight else out for out in graph.outputs]

    # The decoding nodes go unnamed, and their outputs and the constants of a few values (shifts, sizes, shapes)
    # get short names: a model of a few hundred thousand weights has hundreds of decoding nodes, and names
    # derived from the weight's made up a sixth of a shared ResNet-20's file. Larger constants keep the weight's
    # name: `W.indices`, `W.codebook`, `W.mask`, ….
    def constant(self, part: str, values: np.ndarray) -> gs.Constant:
        small = np.asarray(values).size <= HELPER_SIZE  # the same for many weights: cleanup merges the copies
        return self.names.constant(f"decode.{part}" if small else f"{self.name}.{part}", values)

    def node(self, op: str, inputs: list, **attrs) -> gs.Variable:
        out = gs.Variable(self.names.new("decode"))  # no type or shape: no value_info entry in the file
        self.graph.nodes.append(gs.Node(op, "", attrs, inputs, [out]))
        return out

    def scatter(self, present: np.ndarray, values: gs.Tensor, dtype) -> tuple[gs.Variable, gs.Variable]:
        """(`values` at the positions the packed bit mask of `present` marks and 0 elsewhere, the mask as bool)."""
        mask = np.packbits(present, bitorder="little").reshape(-1, 1)
        count = self.count
        shifted = self.node("BitShift", [self.constant("mask", mask),
                                         self.constant("shifts", np.arange(8, dtype=np.uint8))], direction="RIGHT")
        bits = self.node("Mod", [shifted, self.constant("two", np.array(2, dtype=np.uint8))])
        bits = self.node("Reshape", [bits, self.constant("flat", np.array([-1], dtype=np.int64))])
        if mask.size * 8 != count:
            bits = self.node("Slice", [bits, self.constant("start", np.array([0], dtype=np.int64)),
                                       self.constant("stop", np.array([count], dtype=np.int64))])
        counted = self.node("CumSum", [self.node("Cast", [bits], to=onnx.TensorProto.INT64),
                                       self.constant("axis", np.array(0, dtype=np.int64))])
        positions = self.node("Sub", [counted, self.constant("one", np.array(1, dtype=np.int64))])
        gathered = self.node("Gather", [values, positions])
        present_bool = self.node("Cast", [bits], to=onnx.TensorProto.BOOL)
        zero = self.constant("zero", np.zeros((), dtype=dtype))
        return self.node("Where", [present_bool, gathered, zero]), present_bool

    def unpack(self, indices: np.ndarray, bits: int) -> gs.Variable:
        """The indices (int32), stored packed at `bits` bits each (pack_indices).

        Index i starts at bit p = i·bits, in byte p // 8 at offset p % 8, and never reaches past the next byte:
        it is (byte[p // 8] + 256 · byte[p // 8 + 1]) // 2^(p % 8) mod 2^bits.
        """
        count = max(indices.size, 1)
        if indices.size == 0:
            indices = np.zeros(1, dtype=np.int64)
        i64 = np.int64
        stream = self.constant("indices", pack_indices(indices, bits))
        position = self.node("Range", [self.constant("first", np.array(0, i64)),  # i · bits for i < count
                                       self.constant("end", np.array(count * bits, i64)),
                                       self.constant("bits", np.array(bits, i64))])
        byte = self.node("Div", [position, self.constant("eight", np.array(8, i64))])
        offset = self.node("Mod", [position, self.constant("eight_", np.array(8, i64))])
        wide = self.node("Cast", [stream], to=onnx.TensorProto.INT32)
        low = self.node("Gather", [wide, byte])
        high = self.node("Gather", [wide, self.node("Add", [byte, self.constant("next", np.array(1, i64))])])
        word = self.node("Add", [low, self.node("Mul", [high, self.constant("byte", np.array(256, np.int32))])])
        scale = self.node("Gather", [self.constant("powers", (2 ** np.arange(8)).astype(np.int32)), offset])
        shifted = self.node("Div", [word, scale])
        return self.node("Mod", [shifted, self.constant("levels", np.array(2 ** bits, np.int32))])

    def finish(self, flat: gs.Tensor) -> gs.Variable:
        shape = self.constant("shape", np.array(self.dense.shape, dtype=np.int64))
        self.graph.nodes.append(gs.Node("Reshape", "", {}, [flat, shape], [self.decoded]))
        return self.decoded


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


@dataclass
class Layout:
    """How a compact weight is stored, recovered from the model: what training it in place may change (the
    values, codebooks and scales) and what it must keep (which elements are present, each one's index)."""
    name: str                  # the decoded weight
    present: np.ndarray        # bool in the weight's shape: elements that are stored (all, without a mask)
    values: str | None = None  # sparse layout: the initializer of the stored values, row-major
    codebook: str | None = None    # codebook layout: the initializer of the codebook(s), flattened
    scales: str | None = None      # … and of the per-row scales, (rows, 1)
    index: np.ndarray | None = None  # … each element's index into its row's codebook, (rows, row size); 0 if absent
    levels: int = 0                # … entries per codebook


def layouts(model: onnx.ModelProto) -> list[Layout]:
    """The layouts of the compact weights of `model` (sparse and codebook), checked by decoding each with numpy
    and comparing with what ONNX Runtime computes; weights whose initializers serve several decoders are left
    out (changing one would change the others)."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, position))
    decoded = encoded_weights(model)
    roles_of = [_roles({s: numpy_helper.to_array(initializers[s]) for s in w.sources}, readers) for w in decoded]
    owners: dict[str, int] = {}
    for roles in roles_of:
        for source in roles.values():
            owners[source] = owners.get(source, 0) + 1
    found = []
    for weight, roles in zip(decoded, roles_of):
        if any(owners[source] > 1 for source in roles.values()):
            continue  # the decoding helpers are shared by design; the payload must not be
        arrays = {role: numpy_helper.to_array(initializers[name]) for role, name in roles.items()}
        layout = _layout(weight, roles, arrays)
        if layout is not None:
            found.append(layout)
    return found


def _roles(arrays: dict[str, np.ndarray], readers: dict) -> dict[str, str]:
    """{role: initializer name} of a decoder's payload: mask, packed indices, scales, and the table (the
    codebook, or the sparse layout's values)."""
    roles: dict[str, str] = {}
    for name, array in arrays.items():
        reads = readers.get(name, [])
        if array.dtype == np.uint8 and ("BitShift", 0) in reads:
            roles["mask"] = name
        elif array.dtype == np.uint8 and ("Cast", 0) in reads:
            roles["packed"] = name
        elif array.dtype.kind == "f" and any(op == "Mul" for op, _ in reads):
            roles["scales"] = name
        elif array.dtype.kind == "f" and ("Gather", 0) in reads:
            roles["table"] = name
    return roles


def _layout(weight: EncodedWeight, roles: dict[str, str], arrays: dict[str, np.ndarray]) -> Layout | None:
    arrays = {role: arrays[role] for role in roles}
    dense = weight.values
    present = np.ones(dense.size, dtype=bool)
    if "mask" in roles:
        present = np.unpackbits(arrays["mask"].reshape(-1), bitorder="little")[:dense.size].astype(bool)
    present = present.reshape(dense.shape)
    if "table" not in roles:
        return None
    table = arrays["table"].reshape(-1)
    if "packed" not in roles:  # sparse layout
        rebuilt = np.zeros(dense.size, dtype=dense.dtype)
        rebuilt[present.reshape(-1)] = table[:int(present.sum())]
        return Layout(weight.name, present, values=roles["table"]) if np.array_equal(rebuilt, dense.reshape(-1)) \
            else None
    packed, count = arrays["packed"], int(present.sum())
    rows = dense.shape[0] if dense.ndim >= 2 else 1
    scales = arrays["scales"].reshape(-1) if "scales" in roles else None
    for bits in range(1, 9):
        if packed.size != (count * bits + 7) // 8 + 1:
            continue
        stream = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits).astype(np.int64)
        stored = stream @ (1 << np.arange(bits))
        levels = 2 ** bits
        per_row = rows > 1 and table.size == rows * levels
        row_of = np.nonzero(present.reshape(rows, -1))[0]
        if stored.size and stored.max() >= (levels if per_row else table.size):
            continue
        looked_up = table.reshape(rows, levels)[row_of, stored] if per_row else table[stored]
        if scales is not None:
            looked_up = looked_up * scales[row_of]
        rebuilt = np.zeros(dense.size, dtype=dense.dtype)
        rebuilt[present.reshape(-1)] = looked_up
        if np.array_equal(rebuilt, dense.reshape(-1)):
            index = np.zeros(dense.size, dtype=np.int64)
            index[present.reshape(-1)] = stored
            return Layout(weight.name, present, codebook=roles["table"], scales=roles.get("scales"),
                          index=index.reshape(rows, -1), levels=levels if per_row else table.size)
    return None
