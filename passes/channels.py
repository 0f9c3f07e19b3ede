"""Channel dependency groups of a graph, and the surgery that removes whole channels (prune:structure=channel).

Each output channel of a Conv, ConvTranspose, Gemm or MatMul is followed forward through the ops that keep
channels apart (BatchNormalization, activations, pools, Resize, Pad, Slice on other axes, Concat, Split,
Flatten/Reshape into a Gemm …) to the layers that read it. Channels that an op ties together are one
*component* (union-find over every channel of every followed tensor): a residual Add ties channel k of both
inputs and of its output, a depthwise Conv ties its input and output channel k, a Concat maps its inputs'
channels to its output's at their offsets. Removing a component removes its channel from every tensor it
touches: the producers lose weight rows, the readers weight columns, BatchNormalization and per-channel
constants their entries, Split and Pad their sizes. Components touching the same tensors form a *group*
(DepGraph, Fang et al. 2023), the unit the allocation works on.

Before (a residual pair, 16 channels each):
    x ─► Conv(W1: 16×16×3×3) ─► Relu ─► Conv(W2: 16×16×3×3) ─► Add(x) ─►
After (the block's inner 8 channels removed; the residual's 16 tied to x and kept):
    x ─► Conv(W1: 8×16×3×3) ─► Relu ─► Conv(W2: 16×8×3×3) ─► Add(x) ─►

A component is *fixed* (never removed) when it reaches a graph output, a graph input, a weight shared by
several nodes, or an op this module does not follow; `ChannelGraph.fixed_reasons` says which.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs

# Ops that map channel k of their first input to channel k of their output, whatever the axis.
ELEMENTWISE = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Identity",
    "Dropout", "Erf", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Cast"})
# Ops over the spatial axes of an N×C×… tensor: channel k in, channel k out (channel axis 1 only).
SPATIAL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                     "GlobalLpPool", "Resize", "Upsample"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow"})
# Inputs per channel of normalization ops (sliced with the channels).
PER_CHANNEL_INPUTS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(eq=False)
class Followed:
    """A tensor whose channels are followed: channel c along `axis` is id `base + c`; after a Flatten each
    channel is `block` consecutive values."""

    tensor: gs.Tensor
    axis: int
    base: int
    size: int
    rank: int
    block: int = 1

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass(eq=False)
class Layer:
    """A weighted node and how its weight meets the followed channels: `out` are the tensors whose channels
    are its weight's rows (None when not followed), `reads` its followed input (None when not followed)."""

    node: gs.Node
    out: Followed | None
    reads: Followed | None
    depthwise: bool = False


@dataclass
class Edit:
    """One change that channel removal makes to a node: slice a constant input along an axis (`slice`), set
    the group of a depthwise Conv (`group`), rewrite Split sizes (`split`), Pad amounts (`pad`), a Reshape's
    target (`reshape`) or a Resize's sizes (`sizes`)."""

    kind: str
    node: gs.Node
    followed: Followed
    index: int = 0                       # the input to rewrite
    axis: int = 0                        # the constant's axis that runs over the channels
    parts: list[Followed] = field(default_factory=list)  # Split outputs, or Pad's (front, back) channels


@dataclass
class ChannelGroup:
    """Components that touch the same tensors: they go or stay as one kind of channel."""

    components: list[int]
    tensors: list[str]


class ChannelGraph:
    """The channel dependency structure of a graph (see the module docstring)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.followed: dict[str, Followed] = {}
        self.parent: list[int] = []
        self.fixed: set[int] = set()
        self.fixed_reasons: Counter = Counter()
        self.edits: list[Edit] = []
        self.layers: list[Layer] = []
        self.shapes = inferred_shapes(graph)
        self._readers = Counter(id(t) for node in graph.nodes for t in node.inputs)
        for node in graph.toposort(mode="nodes").nodes:
            self._visit(node)
        for tensor in graph.outputs:
            self._fix(self.followed.get(tensor.name), "graph-output")

    # ---- union-find over channel ids --------------------------------------------------------------
    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _new(self, tensor: gs.Tensor, axis: int, size: int, rank: int, block: int = 1) -> Followed:
        followed = Followed(tensor, axis, len(self.parent), size, rank, block)
        self.parent.extend(range(len(self.parent), len(self.parent) + size))
        self.followed[tensor.name] = followed
        return followed

    def _link(self, a: Followed, b: Followed, offset: int = 0, count: int | None = None) -> None:
        """Tie channel c of `a` to channel offset + c of `b`."""
        for c in range(a.size if count is None else count):
            self._union(a.base + c, b.base + offset + c)

    def _fix(self, followed: Followed | None, reason: str) -> None:
        if followed is not None:
            self.fixed.update(range(followed.base, followed.base + followed.size))
            self.fixed_reasons[reason] += 1

    # ---- following ops ----------------------------------------------------------------------------
    def _shape(self, tensor: gs.Tensor) -> list | None:
        return self.shapes.get(tensor.name)

    def _visit(self, node: gs.Node) -> None:
        inputs = [self.followed.get(t.name) for t in node.inputs]
        if not graphs.is_standard(node):
            for followed in inputs:
                self._fix(followed, f"op:{node.domain}.{node.op}")
            return
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            self._weighted(node, inputs)
            return
        if not any(inputs):
            return
        handled = self._follow(node, inputs)
        if not handled:
            for followed in inputs:
                self._fix(followed, f"op:{node.op}")
            for tensor in node.outputs:
                self.followed.pop(tensor.name, None)

    def _follow(self, node: gs.Node, inputs: list[Followed | None]) -> bool:
        first = inputs[0]
        if any(f is not None and f.block > 1 for f in inputs) and node.op not in ELEMENTWISE:
            return False
        if node.op in ELEMENTWISE or node.op in PER_CHANNEL_INPUTS or node.op in SPATIAL:
            if first is None or any(inputs[1:]) or not node.outputs:
                return False
            spatial = node.op in SPATIAL or node.op in PER_CHANNEL_INPUTS
            if spatial and first.axis != 1:
                return False
            if node.op == "Resize" and not self._resize_sizes(node, first):
                return False
            out = self._new(node.outputs[0], first.axis, first.size, first.rank, first.block)
            self._link(first, out)
            for index in PER_CHANNEL_INPUTS.get(node.op, ()):
                if index < len(node.inputs) and node.inputs[index].name:
                    if graphs.constant_value(node.inputs[index]) is None:
                        return False
                    self.edits.append(Edit("slice", node, first, index, 0))
            return True
        if node.op in BINARY:
            return self._binary(node, inputs)
        if node.op == "Concat":
            return self._concat(node, inputs)
        if node.op == "Split":
            return self._split(node, first)
        if node.op == "Slice":
            return self._slice(node, first, inputs)
        if node.op == "Pad":
            return self._pad(node, first, inputs)
        if node.op in ("Flatten", "Reshape"):
            return self._flatten(node, first, inputs)
        return False

    def _binary(self, node: gs.Node, inputs: list[Followed | None]) -> bool:
        shape = self._shape(node.outputs[0])
        lead = next(f for f in inputs if f is not None)
        if shape is None or len(shape) != lead.rank:
            return False
        slices = []
        for index, (tensor, followed) in enumerate(zip(node.inputs, inputs)):
            if followed is not None:
                if followed.rank != lead.rank or followed.axis != lead.axis or followed.size != lead.size:
                    return False
                continue
            dims = self._shape(tensor)
            if dims is None:
                return False
            at = lead.axis - (lead.rank - len(dims))
            if at < 0 or dims[at] == 1:
                continue  # broadcast over the channels: nothing to slice
            if dims[at] != lead.size or graphs.constant_value(tensor) is None:
                return False  # a computed tensor with channels of its own: not followed
            slices.append(Edit("slice", node, lead, index, at))
        out = self._new(node.outputs[0], lead.axis, lead.size, lead.rank)
        for followed in inputs:
            if followed is not None:
                self._link(followed, out)
        self.edits.extend(slices)
        return True

    def _concat(self, node: gs.Node, inputs: list[Followed | None]) -> bool:
        lead = next(f for f in inputs if f is not None)
        axis = int(node.attrs.get("axis", 0)) % lead.rank
        shapes = [self._shape(t) for t in node.inputs]
        if any(s is None or len(s) != lead.rank for s in shapes):
            return False
        if axis != lead.axis:  # joined along another axis: the channels of every input are the same ones
            if any(f is None or f.axis != lead.axis or f.size != lead.size for f in inputs):
                return False
            out = self._new(node.outputs[0], lead.axis, lead.size, lead.rank)
            for followed in inputs:
                self._link(followed, out)
            return True
        sizes = [s[axis] for s in shapes]
        if not all(isinstance(s, int) for s in sizes):
            return False
        out = self._new(node.outputs[0], axis, sum(sizes), lead.rank)
        offset = 0
        for followed, size in zip(inputs, sizes):
            if followed is None or followed.block > 1:  # channels from elsewhere: kept as they are
                self.fixed.update(range(out.base + offset, out.base + offset + size))
                self.fixed_reasons["concat-input-not-followed"] += 1
            else:
                self._link(followed, out, offset)
            offset += size
        return True

    def _split(self, node: gs.Node, first: Followed | None) -> bool:
        if first is None or any(self.followed.get(t.name) for t in node.inputs[1:]):
            return False
        axis = int(node.attrs.get("axis", 0)) % first.rank
        if axis != first.axis:
            for tensor in node.outputs:
                self._link(first, self._new(tensor, first.axis, first.size, first.rank))
            return True
        shapes = [self._shape(t) for t in node.outputs]
        if any(s is None or not isinstance(s[axis], int) for s in shapes):
            return False
        if len(node.inputs) > 1 and node.inputs[1].name and graphs.constant_value(node.inputs[1]) is None:
            return False
        parts, offset = [], 0
        for tensor, shape in zip(node.outputs, shapes):
            part = self._new(tensor, axis, shape[axis], first.rank)
            self._link(part, first, offset)
            parts.append(part)
            offset += shape[axis]
        self.edits.append(Edit("split", node, first, parts=parts))
        return True

    def _slice(self, node: gs.Node, first: Followed | None, inputs: list[Followed | None]) -> bool:
        if first is None or any(inputs[1:]):
            return False
        axes = graphs.constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if len(node.inputs) > 1:
            starts = graphs.constant_value(node.inputs[1])
            if starts is None:
                return False
            axes = np.arange(len(starts)) if axes is None else axes
        else:  # opset < 10: attributes
            axes = node.attrs.get("axes", list(range(len(node.attrs.get("starts", [])))))
        if any(int(a) % first.rank == first.axis for a in np.asarray(axes).ravel()):
            return False
        self._link(first, self._new(node.outputs[0], first.axis, first.size, first.rank))
        return True

    def _pad(self, node: gs.Node, first: Followed | None, inputs: list[Followed | None]) -> bool:
        if first is None or any(inputs[1:]) or node.attrs.get("mode", "constant") != "constant":
            return False
        pads = _pad_amounts(node)
        if pads is None or len(pads) != 2 * first.rank or (len(node.inputs) > 3 and node.inputs[3].name):
            return False  # unknown amounts, or amounts only over some axes
        front, back = int(pads[first.axis]), int(pads[first.axis + first.rank])
        if front < 0 or back < 0:
            return False
        out = self._new(node.outputs[0], first.axis, front + first.size + back, first.rank)
        self._link(first, out, front)
        if front or back:  # the added (constant) channels become channels of their own
            padding = [Followed(node.outputs[0], first.axis, out.base, front, first.rank),
                       Followed(node.outputs[0], first.axis, out.base + front + first.size, back, first.rank)]
            self.edits.append(Edit("pad", node, out, parts=padding))
        return True

    def _flatten(self, node: gs.Node, first: Followed | None, inputs: list[Followed | None]) -> bool:
        """N×C×… into N×(C·…) with the channels outermost: followed as blocks, for a Gemm or MatMul."""
        if first is None or any(inputs[1:]) or first.axis != 1:
            return False
        shape_in, shape_out = self._shape(node.inputs[0]), self._shape(node.outputs[0])
        if shape_in is None or shape_out is None or len(shape_out) != 2:
            return False
        if node.op == "Flatten" and int(node.attrs.get("axis", 1)) % len(shape_in) != 1:
            return False
        inner = shape_in[2:]
        if not all(isinstance(d, int) for d in inner) or (shape_out[0] != shape_in[0] and node.op == "Reshape"):
            return False
        block = int(np.prod(inner, dtype=np.int64)) * first.block
        out = self._new(node.outputs[0], 1, first.size, 2, block)
        self._link(first, out)
        if node.op == "Reshape":
            target = graphs.constant_value(node.inputs[1])
            if target is None or len(target) != 2:
                return False
            if int(target[1]) > 0:
                self.edits.append(Edit("reshape", node, out, 1))
        return True

    def _resize_sizes(self, node: gs.Node, first: Followed) -> bool:
        """A Resize given target sizes names the channel count: that entry is rewritten."""
        if len(node.inputs) < 4 or not node.inputs[3].name:
            return True
        if graphs.constant_value(node.inputs[3]) is None:
            return False
        self.edits.append(Edit("sizes", node, first, 3))
        return True

    def _weighted(self, node: gs.Node, inputs: list[Followed | None]) -> None:
        """A weighted node: reads its followed input through weight columns; its output channels are new."""
        weight = graphs.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        for followed in inputs[1:]:
            self._fix(followed, f"{node.op}-weight-or-bias-computed")
        if weight is None:
            self._fix(inputs[0], f"{node.op}-weight-not-constant")
            return
        shared = self._readers[id(node.inputs[1])] > 1 or not isinstance(node.inputs[1], gs.Constant)
        reads, depthwise = inputs[0], False
        group = int(node.attrs.get("group", 1))
        op = node.op
        if op == "Conv" and group > 1:
            depthwise = reads is not None and group == reads.size == weight.shape[0] and weight.shape[1] == 1
            if not depthwise or shared or reads.block > 1:
                self._fix(reads, "grouped-conv" if not shared else "weight-shared")
                reads = None
                depthwise = False
        if op in ("Gemm", "MatMul") and not self._reads_rows(node, reads, weight):
            self._fix(reads, f"{op}-input-layout")
            reads = None
        if reads is not None and (shared or (op in ("Conv", "ConvTranspose") and reads.axis != 1)):
            self._fix(reads, "weight-shared" if shared else f"{op}-input-layout")
            reads = None
        if op == "ConvTranspose" and group != 1:
            self._fix(reads, "grouped-conv")
            reads = None
        out = self._output(node, weight, reads if depthwise else None)
        if out is None:
            self._fix(reads, f"{op}-output-shape-unknown")
            return
        if depthwise:
            self._link(reads, out)
            self.edits.append(Edit("slice", node, out, 1, 0))
            self.edits.append(Edit("group", node, out))
        elif shared or group != 1:  # a grouped conv's outputs are split evenly among its groups
            self._fix(out, "weight-shared" if shared else "grouped-conv")
        else:
            self.edits.append(Edit("slice", node, out, 1, _output_axis(node)))
        if len(node.inputs) > 2 and node.inputs[2].name and (depthwise or not shared):
            bias = graphs.constant_value(node.inputs[2])
            if bias is None:
                self._fix(out, f"{op}-bias-computed")
            elif bias.ndim >= 1 and bias.shape[-1] == out.size:
                self.edits.append(Edit("slice", node, out, 2, bias.ndim - 1))
        elif op != "MatMul":  # a re-solve may give the layer a bias (one value per output channel) later
            self.edits.append(Edit("slice", node, out, 2, 0))
        if reads is not None and not depthwise:
            self.edits.append(Edit("slice", node, reads, 1, _input_axis(node)))
        self.layers.append(Layer(node, out, reads, depthwise))

    def _reads_rows(self, node: gs.Node, reads: Followed | None, weight: np.ndarray) -> bool:
        if reads is None:
            return True
        if weight.ndim != 2 or reads.axis != reads.rank - 1:
            return False
        return not (node.op == "Gemm" and int(node.attrs.get("transA", 0)))

    def _output(self, node: gs.Node, weight: np.ndarray, linked: Followed | None) -> Followed | None:
        op = node.op
        shape = self._shape(node.outputs[0])
        if op in ("Conv", "ConvTranspose"):
            size = weight.shape[0] if op == "Conv" else weight.shape[1] * int(node.attrs.get("group", 1))
            rank = len(weight.shape)
            return self._new(node.outputs[0], 1, size, rank)
        if weight.ndim != 2 or shape is None:
            return None
        size = weight.shape[0] if op == "Gemm" and int(node.attrs.get("transB", 0)) else weight.shape[1]
        return self._new(node.outputs[0], len(shape) - 1, size, len(shape))

    # ---- groups and removal -----------------------------------------------------------------------
    def components(self, followed: Followed) -> np.ndarray:
        """The component (root id) of each channel of a followed tensor."""
        return np.array([self.find(followed.base + c) for c in range(followed.size)], dtype=np.int64)

    def groups(self) -> list[ChannelGroup]:
        """Groups of removable components: not fixed, and holding output channels of some weighted layer."""
        fixed = {self.find(i) for i in self.fixed}
        produced = {int(c) for layer in self.layers if layer.out is not None and not layer.depthwise
                    for c in self.components(layer.out)}
        touches: dict[int, list[str]] = {}
        for followed in self.followed.values():
            for component in dict.fromkeys(self.components(followed).tolist()):
                touches.setdefault(component, []).append(followed.name)
        by_tensors: dict[tuple, list[int]] = {}
        for component, names in touches.items():
            if component not in fixed and component in produced:
                by_tensors.setdefault(tuple(names), []).append(component)
        return [ChannelGroup(components, list(names)) for names, components in by_tensors.items()]

    def kept(self, removed: set[int]) -> dict[str, np.ndarray]:
        """For each followed tensor, the channels kept when the components in `removed` go."""
        return {name: np.flatnonzero([c not in removed for c in self.components(f)])
                for name, f in self.followed.items()}

    def remove(self, removed: set[int]) -> None:
        """Remove the channels of the components in `removed` from the graph."""
        kept = self.kept(removed)
        names = graphs.Names(self.graph)
        for edit in self.edits:
            _apply(edit, kept, names)
        for name, followed in self.followed.items():
            shape = followed.tensor.shape
            if len(kept[name]) != followed.size and shape is not None and len(shape) == followed.rank:
                shape = list(shape)
                shape[followed.axis] = len(kept[name]) * followed.block
                followed.tensor.shape = shape


def _apply(edit: Edit, kept: dict[str, np.ndarray], names: graphs.Names) -> None:
    node, followed = edit.node, edit.followed
    keep = kept[followed.name]
    if len(keep) == followed.size and edit.kind != "pad":
        return
    if edit.kind == "slice":
        if edit.index >= len(node.inputs) or not node.inputs[edit.index].name:
            return  # an optional input (a bias) the node does not have
        value = graphs.constant_value(node.inputs[edit.index])
        block = followed.block if edit.index == 1 and node.op in ("Gemm", "MatMul") else 1
        columns = (keep[:, None] * block + np.arange(block)[None, :]).ravel()
        node.inputs[edit.index] = names.constant(node.inputs[edit.index].name,
                                                 np.take(value, columns, axis=edit.axis))
    elif edit.kind == "group":
        node.attrs["group"] = len(keep)
    elif edit.kind == "split":
        sizes = np.array([len(kept[part.name]) for part in edit.parts], dtype=np.int64)
        if "split" in node.attrs:
            node.attrs["split"] = sizes.tolist()
        else:
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs[1] = names.constant(f"{node.name or 'split'}_sizes", sizes)
            node.attrs.pop("num_outputs", None)
    elif edit.kind == "pad":
        _set_pads(node, followed, edit.parts, kept, names)
    elif edit.kind in ("reshape", "sizes"):
        value = graphs.constant_value(node.inputs[edit.index]).copy()
        value[followed.axis] = len(keep) * (followed.block if edit.kind == "reshape" else 1)
        node.inputs[edit.index] = names.constant(node.inputs[edit.index].name, value)


def _set_pads(node: gs.Node, out: Followed, parts: list[Followed], kept: dict[str, np.ndarray],
              names: graphs.Names) -> None:
    keep = set(kept[out.name].tolist())
    front = sum(1 for c in range(parts[0].size) if c in keep)
    back = sum(1 for c in range(out.size - parts[1].size, out.size) if c in keep)
    pads = np.array(_pad_amounts(node), dtype=np.int64)
    pads[out.axis], pads[out.axis + out.rank] = front, back
    if "pads" in node.attrs:
        node.attrs["pads"] = pads.tolist()
    else:
        node.inputs[1] = names.constant(node.inputs[1].name, pads)


def _pad_amounts(node: gs.Node) -> np.ndarray | None:
    if "pads" in node.attrs:
        return np.array(node.attrs["pads"])
    return graphs.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None


def _output_axis(node: gs.Node) -> int:
    """The weight axis that runs over the node's output channels."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return 0
    return 1  # ConvTranspose (Cin, Cout, …), Gemm without transB and MatMul (K, N)


def _input_axis(node: gs.Node) -> int:
    """The weight axis that runs over the node's input channels."""
    if node.op == "Conv":
        return 1
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return 1
    return 0


def inferred_shapes(graph: gs.Graph) -> dict[str, list]:
    """Tensor name → dims (ints, or strings for free dims) from ONNX shape inference."""
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference fails on some custom ops: what it could not infer is unknown
        pass
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                  for d in value.type.tensor_type.shape.dim]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes
