"""Compact storage of compressed weights as plain ONNX: small initializers plus standard decoding ops.

An ONNX initializer is dense, so zeros written by pruning cost as much as any other value. A compressed weight
is stored instead as compact initializers and a chain of standard operators that reads nothing else. ONNX
Runtime folds such a chain into a dense constant when it creates the session (constant folding, at
ORT_ENABLE_BASIC and above), so inference runs at the speed of the dense model, and any runtime that executes
standard ONNX computes the same dense values.

The decoding ops of each kind of layout form one model-local function (domain `onnxcomp.decode`, ONNX IR 8),
defined once per model and called once per weight: the call reads only the weight's payload and its shape, and
every size is derived from those. ONNX Runtime inlines the calls when it loads the model, then folds them.
Decoding chains written out per weight made up a fifth of a pruned and shared ResNet-20's file.

Sparse layout, for a weight W of n elements of which k are non-zero:

    W.values  [k]         the non-zero values in row-major order, in W's dtype
    W.mask    [⌈n/8⌉, 1]  uint8; bit j (least significant first) of byte i is set when element 8i + j is non-zero

Before:                       After:
    W ─► Conv                     (W.values, W.mask, shape) ─► onnxcomp.decode.Sparse ─► W ─► Conv

    Sparse: mask ─► BitShift(0..7) ─► Mod 2 ─► Reshape ─► Slice[:n] ─► bits ─► Cast ─► CumSum − 1
            ─► Gather(values) ─► Where(bits, ·, 0) ─► Reshape(shape)

That is 4 bytes per non-zero value plus 1 bit per weight: (1 − s) × 4 + 0.125 bytes per weight at sparsity s,
plus a call of about a hundred bytes. The operators need opset 11 (BitShift, CumSum).

Codebook layout (weight sharing), for a weight whose values all come from codebooks of at most 2^b values:

    W.codebook [R, K]                  the shared values: one codebook (R = 1) or one per output channel
    W.indices  [⌈n·b/8⌉ + 1] uint8     the index of each element into its codebook, b bits each, back to back
    decode.bits                        b, a scalar
    W.scales   [R, 1]                  (ScaledCodebook) a scale per output channel

The codebooks and scales are stored in float16 where float16 holds them exactly (share rounds them so:
compact_table), and cast to the weight's dtype inside the decoder: 2 bytes per entry instead of 4.

decoded (Codebook) by Range → Div/Mod 8 (byte and bit offset of each index) → Gather two bytes → Div by
2^offset → Mod 2^b → GatherElements(W.codebook, the indices as R rows). With the mask (SparseCodebook), only the non-zero
elements carry an index and the mask places them, so pruning and sharing compose: b/8 bytes per kept weight
plus 1 bit per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcomp import graph as graphs
from onnxcomp import model_io

SPARSE_MIN_OPSET = 11
DOMAIN = "onnxcomp.decode"  # of the decoding functions, model-local functions (ONNX IR 8) defined here
SHARED_ROLES = ("shape", "bits")  # decoder inputs that many weights have in common, named `decode.*`


def sparse_bytes(count: int, nonzero: int, itemsize: int = 4) -> int:
    """Bytes of the sparse layout's initializers for `count` weights of which `nonzero` are non-zero."""
    return max(nonzero, 1) * itemsize + (count + 7) // 8


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` indices of `bits` bits packed back to back, plus the one byte the decoder reads past."""
    return (count * bits + 7) // 8 + 1


def compact_table(values: np.ndarray) -> np.ndarray:
    """`values` (a codebook or scales) rounded to float16 precision, in their own dtype, where that moves none by
    more than 2^-10 of the largest magnitude and keeps zeros and non-zeros apart; else unchanged. The stored
    table then takes 2 bytes per entry (stored_table), a rounding far below the sharing's own error."""
    values = np.asarray(values)
    if values.dtype.itemsize <= 2 or values.dtype.kind != "f" or values.size == 0:
        return values
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float16).astype(values.dtype)
    largest = float(np.abs(values).max())
    if not np.all(np.isfinite(rounded)) or np.any((rounded == 0) != (values == 0)) \
            or float(np.abs(rounded - values).max()) > largest * 2 ** -10:
        return values
    return rounded


def stored_table(values: np.ndarray) -> np.ndarray:
    """A codebook or scales as the file stores them: float16 where float16 holds every value exactly."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and values.dtype.itemsize > 2:
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if np.array_equal(half.astype(values.dtype), values):
            return half
    return values


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """`indices` (each below 2**bits) as one bit stream, least significant bit first: index i occupies bits
    i·bits … i·bits + bits − 1. A zero byte is appended, so reading two bytes at the last index stays inside."""
    flat = np.asarray(indices, dtype=np.uint32).reshape(-1)
    stream = np.empty((flat.size, bits), np.uint8)
    for bit in range(bits):  # one bit of every index at a time: all at once took 5·bits bytes per index
        stream[:, bit] = (flat >> bit) & 1
    return np.concatenate([np.packbits(stream.reshape(-1), bitorder="little"), np.zeros(1, np.uint8)])


def encode_sparse(graph: gs.Graph, weight: gs.Constant, names: graphs.Names) -> gs.Variable:
    """Replace `weight`, for every node that reads it, by its sparse layout and a call that decodes it.

    The decoded tensor takes the weight's name, so the nodes that read it and anything that reports it by name
    see no change. The graph's opset must be at least SPARSE_MIN_OPSET.
    """
    dense = np.asarray(weight.values)
    present = dense.reshape(-1) != 0
    values = dense.reshape(-1)[present]
    if values.size == 0:  # Gather needs something to index; every position is masked out anyway
        values = np.zeros(1, dtype=dense.dtype)
    decoder = _decoder(graph, dense.dtype, codebook=False, scaled=False, sparse=True, wide=_wide(dense.size))
    return _call(graph, weight, names, decoder,
                 {"values": values, "mask": pack_mask(present), "shape": np.array(dense.shape, np.int64)})


def encode_codebook(graph: gs.Graph, weight: gs.Constant, codebook: np.ndarray, indices: np.ndarray, bits: int,
                    names: graphs.Names, *, sparse: bool = False, scales: np.ndarray | None = None) -> gs.Variable:
    """Replace `weight` by a codebook and `bits`-bit indices into it, and a call that decodes them.

    `codebook` is one vector for the whole tensor, or one row per slice along the weight's first axis
    (shape (weight.shape[0], K)). With `scales` (one per slice along the first axis), the looked-up values are
    multiplied by their slice's scale. The weight must equal the codebook looked up at `indices` (times the
    scale), element by element; with `sparse`, `indices` cover only its non-zero elements (row-major order) and
    a bit mask says where they go. The graph's opset must be at least SPARSE_MIN_OPSET.
    """
    dense = np.asarray(weight.values)
    flat = dense.reshape(-1)
    codebook = np.asarray(codebook, dtype=flat.dtype)
    present = flat != 0
    stored = present if sparse else np.ones(flat.size, dtype=bool)
    indices = np.asarray(indices).reshape(-1)  # as small an integer type as the caller keeps them in
    row_size = flat.size // max(dense.shape[0], 1) if dense.ndim else 1
    per_row = codebook.ndim == 2
    if not 1 <= bits <= 8 or indices.size != int(stored.sum()) or (indices.size and indices.max() >= 2 ** bits) \
            or (per_row and (codebook.shape[0] != dense.shape[0] or codebook.shape[1] > 2 ** bits)):
        raise ValueError("the codebook, the indices and the bits do not give the weight")
    rows = np.arange(flat.size)[stored] // row_size
    looked_up = codebook[rows, indices] if per_row else codebook[indices]
    if scales is not None:
        scales = np.asarray(scales, dtype=flat.dtype).reshape(-1, 1)
        looked_up = looked_up * scales[rows, 0]
    if not np.array_equal(looked_up, flat[stored]):
        raise ValueError("the codebook, the indices and the bits do not give the weight")
    if indices.size == 0:  # the decoder gathers from the indices; every position is masked out anyway
        indices = np.zeros(1, dtype=np.int64)
    parts = {"indices": pack_indices(indices, bits), "bits": np.array(bits, np.int64),
             "codebook": stored_table(codebook if per_row else codebook.reshape(1, -1))}
    if scales is not None:
        parts["scales"] = stored_table(scales)
    if sparse:
        parts["mask"] = pack_mask(present)
    parts["shape"] = np.array(dense.shape, np.int64)
    function = _decoder(graph, dense.dtype, codebook=True, scaled=scales is not None, sparse=sparse,
                        wide=_wide(dense.size))
    return _call(graph, weight, names, function, parts)


def _wide(count: int) -> bool:
    """Whether decoding a weight of `count` elements needs int64 positions: bit positions in the packed indices
    reach 8 per element. Below that, int32: ONNX Runtime holds every intermediate tensor of its constant
    folding until the folding ends, and the positions are tensors of one element per weight."""
    return count * 8 + 16 >= 2**31


def pack_mask(present: np.ndarray) -> np.ndarray:
    """The stored layout's mask of `present` (bool): bit j of byte i, least significant first, is element 8i + j."""
    return np.packbits(np.asarray(present).reshape(-1), bitorder="little").reshape(-1, 1)


def _call(graph: gs.Graph, weight: gs.Constant, names: graphs.Names, function: gs.Function,
          parts: dict[str, np.ndarray]) -> gs.Variable:
    """Replace `weight` by a call of `function` on `parts` (by input name), under the weight's name.

    The payload keeps the weight's name (`W.indices`, `W.codebook`, `W.mask`, …); the shape and the bits get
    short names, and cleanup merges the copies that many weights share. The decoded tensor has no declared
    type or shape (no value_info entry): ONNX infers them through the function.
    """
    name = weight.name
    weight.name = names.new(f"{name}.dense")  # free the name for the decoded tensor; this one is dropped
    decoded = gs.Variable(name)
    for reader in graphs.consumers(weight):
        for index, tensor in enumerate(reader.inputs):
            if tensor is weight:
                reader.inputs[index] = decoded
    graph.outputs = [decoded if out is weight else out for out in graph.outputs]
    inputs = [names.constant(f"decode.{role}" if role in SHARED_ROLES else f"{name}.{role}", parts[role])
              for role in (tensor.name for tensor in function.inputs)]
    graph.nodes.append(gs.Node(function.name, "", {}, inputs, [decoded], domain=DOMAIN))
    return decoded


def _decoder(graph: gs.Graph, dtype, *, codebook: bool, scaled: bool, sparse: bool, wide: bool) -> gs.Function:
    """The graph's decoding function of this kind, defined on first use.

    Its inputs, by name: `indices` (packed, pack_indices), `bits` and `codebook` (rows × entries: one row, or
    one per slice along the weight's first axis) for a codebook, else `values` (the non-zero values,
    row-major); `scales` (rows × 1) when scaled (codebooks and scales in the weight's dtype or float16);
    `mask` (bit j of byte i set when element 8i + j is stored) when sparse; `shape`, the weight's. Every size
    is derived from these, so one definition serves every weight of its kind. Positions and indices are int32,
    or int64 where `wide` (a weight too large for int32 positions, _wide).
    """
    dtype = np.dtype(dtype)
    name = ("Sparse" if sparse else "") + ("Scaled" if scaled else "") + ("Codebook" if codebook else "")
    name += ("" if dtype == np.float32 else f"_{dtype.name}") + ("_wide" if wide else "")
    for function in graph.functions:
        if function.domain == DOMAIN and function.name == name:
            return function
    roles = (["indices", "bits", "codebook"] if codebook else ["values"]) + (["scales"] if scaled else []) \
        + (["mask"] if sparse else []) + ["shape"]
    body = _Body(roles)
    i64 = np.int64
    position_type = np.int64 if wide else np.int32
    element_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    count = body.node("ReduceProd", [body["shape"]], keepdims=0)  # the weight's elements
    if sparse:
        shifted = body.node("BitShift", [body["mask"], np.arange(8, dtype=np.uint8)], direction="RIGHT")
        flags = body.node("Reshape", [body.node("Mod", [shifted, np.array(2, np.uint8)]), np.array([-1], i64)])
        flags = body.node("Slice", [flags, np.array([0], i64), body.node("Reshape", [count, np.array([1], i64)])])
        counted = body.node("CumSum", [body.node("Cast", [flags], to=_tensor_type(position_type)),
                                       np.array(0, i64)])
        positions = body.node("Sub", [counted, np.array(1, position_type)])  # of each element among the stored
    if codebook:
        index = _unpack(body, position_type)
        index = body.node("Gather", [index, positions]) if sparse else \
            body.node("Slice", [index, np.array([0], i64), body.node("Reshape", [count, np.array([1], i64)])])
        # Row r of the codebook serves the r-th of R equal runs of elements: the indices, as R rows, pick from
        # their own row (GatherElements). Computing each element's row and flat offset instead took 5 more
        # int64 tensors of one element per weight, which ONNX Runtime holds until its constant folding ends.
        table = body.node("Cast", [body["codebook"]], to=element_type)  # a no-op unless stored in float16
        by_table_row = body.node("Concat", [body.node("Slice", [body.node("Shape", [body["codebook"]]),
                                                                np.array([0], i64), np.array([1], i64)]),
                                            np.array([-1], i64)], axis=0)
        picked = body.node("GatherElements", [table, body.node("Reshape", [index, by_table_row])], axis=1)
        values = body.node("Reshape", [picked, np.array([-1], i64)])
    else:
        values = body.node("Gather", [body["values"], positions])
    if scaled:
        by_row = body.node("Concat", [body.node("Slice", [body.node("Shape", [body["scales"]]), np.array([0], i64),
                                                          np.array([1], i64)]), np.array([-1], i64)], axis=0)
        scales = body.node("Cast", [body["scales"]], to=element_type)
        scaled_rows = body.node("Mul", [body.node("Reshape", [values, by_row]), scales])
        values = body.node("Reshape", [scaled_rows, np.array([-1], i64)])
    if sparse:
        present = body.node("Cast", [flags], to=onnx.TensorProto.BOOL)
        values = body.node("Where", [present, values, np.zeros((), dtype)])
    body.node("Reshape", [values, body["shape"]], output="weight")
    function = gs.Function(name, domain=DOMAIN, nodes=body.nodes, inputs=list(body.inputs.values()),
                           outputs=[body.outputs["weight"]], opset=graph.opset)
    graph.functions.append(function)
    return function


def _tensor_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _unpack(body: "_Body", position_type) -> gs.Variable:
    """The indices (of `position_type`) packed in `indices` at `bits` bits each (pack_indices), as many as it
    holds.

    Index i starts at bit p = i·bits, in byte p // 8 at offset p % 8, and never reaches past the next byte:
    it is (byte[p // 8] + 256 · byte[p // 8 + 1]) // 2^(p % 8) mod 2^bits. The stream ends with a spare byte,
    so it holds ⌊(bytes − 1) · 8 / bits⌋ indices, the stored ones first.
    """
    it, to = position_type, _tensor_type(position_type)
    stream = body["indices"]
    bits = body.node("Cast", [body["bits"]], to=to)
    size = body.node("Cast", [body.node("Size", [stream])], to=to)
    held = body.node("Div", [body.node("Mul", [body.node("Sub", [size, np.array(1, it)]), np.array(8, it)]), bits])
    position = body.node("Range", [np.array(0, it), body.node("Mul", [held, bits]), bits])
    byte = body.node("Div", [position, np.array(8, it)])
    offset = body.node("Mod", [position, np.array(8, it)])
    wide = body.node("Cast", [stream], to=to)
    low = body.node("Gather", [wide, byte])
    high = body.node("Gather", [wide, body.node("Add", [byte, np.array(1, it)])])
    word = body.node("Add", [low, body.node("Mul", [high, np.array(256, it)])])
    shifted = body.node("Div", [word, body.node("Gather", [(2 ** np.arange(8)).astype(it), offset])])
    return body.node("Mod", [shifted, body.node("Gather", [(2 ** np.arange(9)).astype(it), bits])])


class _Body:
    """The nodes of a decoding function; inputs by name, array arguments become constants."""

    def __init__(self, inputs: list[str]):
        self.inputs = {name: gs.Variable(name) for name in inputs}
        self.outputs: dict[str, gs.Variable] = {}
        self.nodes: list[gs.Node] = []
        self.constants: dict[tuple, gs.Constant] = {}  # one Constant node per distinct value

    def __getitem__(self, name: str) -> gs.Variable:
        return self.inputs[name]

    def constant(self, values) -> gs.Constant:
        array = np.array(values)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = gs.Constant(f"c{len(self.constants)}", array)
        return self.constants[key]

    def node(self, op: str, inputs: list, output: str | None = None, **attrs) -> gs.Variable:
        inputs = [x if isinstance(x, gs.Tensor) else self.constant(x) for x in inputs]
        out = gs.Variable(output or f"t{len(self.nodes)}")
        if output:
            self.outputs[output] = out
        self.nodes.append(gs.Node(op, None, attrs, inputs, [out]))
        return out


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
    codebook: str | None = None    # codebook layout: the initializer of the codebooks, (1 or rows, entries)
    scales: str | None = None      # … and of the per-row scales, (rows, 1)
    index: np.ndarray | None = None  # … each element's index into its row's codebook, (rows, row size); 0 if absent


def layouts(model: onnx.ModelProto) -> list[Layout]:
    """The layouts of the compact weights of `model` (sparse and codebook), checked by decoding each with numpy
    and comparing with what ONNX Runtime computes; weights whose payload other nodes read too are left out
    (changing one would change the others)."""
    initializers = {t.name: t for t in model.graph.initializer}
    reads: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    decoded = {weight.name: weight for weight in encoded_weights(model)}
    found = []
    for node, function in _calls_on_initializers(model):
        roles = dict(zip(function.input, node.input))
        payload = [roles[role] for role in ("values", "codebook", "scales", "indices", "mask") if role in roles]
        if node.output[0] not in decoded or any(reads[name] > 1 for name in payload):
            continue
        arrays = {role: numpy_helper.to_array(initializers[name]) for role, name in roles.items()}
        layout = _layout(decoded[node.output[0]], roles, arrays)
        if layout is not None:
            found.append(layout)
    return found


def _layout(weight: EncodedWeight, roles: dict[str, str], arrays: dict[str, np.ndarray]) -> Layout | None:
    name, dense = weight.name, weight.values
    decoded = _decode(arrays, dense.dtype)
    if decoded is None or not np.array_equal(decoded[0], dense):
        return None
    _, present, stored = decoded
    if stored is None:  # sparse layout
        return Layout(name, present.reshape(dense.shape), values=roles["values"])
    rows = dense.shape[0] if dense.ndim >= 2 else 1
    index = np.zeros(dense.size, dtype=np.int64)
    index[present] = stored
    return Layout(name, present.reshape(dense.shape), codebook=roles["codebook"], scales=roles.get("scales"),
                  index=index.reshape(rows, -1))


def _decode(arrays: dict[str, np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """What a call of a decoding function computes from its inputs (`arrays`, by role), with numpy: (the weight,
    which of its elements are stored (flat, bool), each stored element's codebook index or None for the sparse
    layout); None where the arrays do not make a weight of this layout."""
    shape = tuple(int(d) for d in np.asarray(arrays["shape"]).reshape(-1))
    size = int(np.prod(shape, dtype=np.int64))
    present = np.ones(size, dtype=bool)
    if "mask" in arrays:
        present = np.unpackbits(arrays["mask"].reshape(-1), bitorder="little")[:size].astype(bool)
    if present.size != size:
        return None
    rebuilt = np.zeros(size, dtype=dtype)
    count = int(present.sum())
    if "values" in arrays:  # sparse layout
        values = arrays["values"].reshape(-1)[:count]
        if values.size != count:
            return None
        rebuilt[present] = values
        return rebuilt.reshape(shape), present, None
    bits, table = int(arrays["bits"]), arrays["codebook"].astype(dtype)
    rows = shape[0] if len(shape) >= 2 else 1
    by_row = present.reshape(rows, -1)
    if table.ndim != 2 or (table.shape[0] > 1 and table.shape[0] != rows) or \
            arrays["indices"].size * 8 < count * bits:
        return None
    stored_per_row = by_row.sum(axis=1)
    ends = np.cumsum(stored_per_row)
    scales = arrays["scales"].astype(dtype).reshape(-1) if "scales" in arrays else None
    stored = np.empty(count, dtype=np.uint16)
    out = rebuilt.reshape(rows, -1)
    block = max(1, DECODE_CHUNK // max(by_row.shape[1], 1))
    for first in range(0, rows, block):  # a block of rows at a time: all at once took 21 times the weight
        last = min(rows, first + block)
        begin, end = (int(ends[first - 1]) if first else 0), int(ends[last - 1])
        index = _unpacked(arrays["indices"], bits, begin, end)
        if index.size and index.max() >= table.shape[1]:
            return None
        row_of = np.repeat(np.arange(first, last, dtype=np.int32), stored_per_row[first:last])
        looked_up = table[row_of if table.shape[0] > 1 else 0, index]
        if scales is not None:
            looked_up = looked_up * scales[row_of]
        out[first:last][by_row[first:last]] = looked_up
        stored[begin:end] = index
    return rebuilt.reshape(shape), present, stored


DECODE_CHUNK = 1 << 22  # elements decoded at a time by _decode


def _unpacked(stream: np.ndarray, bits: int, begin: int, end: int) -> np.ndarray:
    """Indices begin … end − 1 of `stream` (pack_indices: `bits` bits each, least significant first)."""
    first_bit, last_bit = begin * bits, end * bits
    planes = np.unpackbits(stream[first_bit // 8:-(-last_bit // 8)], bitorder="little")
    planes = planes[first_bit % 8:first_bit % 8 + last_bit - first_bit].reshape(-1, bits)
    index = np.zeros(end - begin, dtype=np.uint16)
    for bit in range(bits):
        index |= planes[:, bit].astype(np.uint16) << bit
    return index


def without_decoding(model: onnx.ModelProto, read) -> tuple[onnx.ModelProto, Iterator[tuple[str, np.ndarray]]]:
    """(`model` without its decoding calls on initializers, nor the payloads only they read; the weights those
    calls decode, (name, array), decoded with numpy one at a time as the iterator is consumed). The weights go
    back into the model as initializers of those names: it then computes what ONNX Runtime runs once it has
    folded the calls, without the folding, which holds every intermediate tensor until it ends (9 to 26 times
    the weights, benchmarks/README.md). `read(tensor)` gives an initializer's array (its values may lie in a
    file)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    calls = _calls_on_initializers(model)
    called = {id(node) for node, _ in calls}
    kept_nodes = [node for node in graph.node if id(node) not in called]
    read_by_kept = {name for node in kept_nodes for name in graphs.node_reads(node)} | \
        {value.name for value in graph.output}
    skeleton = onnx.ModelProto()  # field by field: a copy of the model would copy the payloads it drops
    model_io.copy_fields(model, skeleton, skip="graph")
    model_io.copy_fields(graph, skeleton.graph, skip=("node", "initializer"))
    skeleton.graph.node.extend(kept_nodes)
    skeleton.graph.initializer.extend(t for t in graph.initializer if t.name in read_by_kept)

    def decoded() -> Iterator[tuple[str, np.ndarray]]:
        for node, function in calls:
            arrays = {role: read(initializers[name]) for role, name in zip(function.input, node.input)}
            result = _decode(arrays, _element_type(function.name, arrays))
            if result is None:
                raise ValueError(f"the compact weight '{node.output[0]}' does not decode")
            yield node.output[0], result[0]

    return skeleton, decoded()


def _calls_on_initializers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.FunctionProto]]:
    """(call, the decoding function it calls) for each call in the main graph that reads initializers alone:
    the compact weights as stored."""
    initializers = {t.name for t in model.graph.initializer}
    functions = {f.name: f for f in model.functions if f.domain == DOMAIN}
    return [(node, functions[node.op_type]) for node in model.graph.node
            if node.domain == DOMAIN and node.op_type in functions and initializers.issuperset(node.input)]


def _element_type(function_name: str, arrays: dict[str, np.ndarray]) -> np.dtype:
    """The dtype a decoding function gives (see _decoder's names): the stored values' for the sparse layout, else
    the one its name states, float32 unless named."""
    if "values" in arrays:
        return arrays["values"].dtype
    named = function_name.removesuffix("_wide").partition("_")[2]
    return np.dtype(named or np.float32)
