"""Residual blocks that can be removed whole, for prune:structure=channel with `depth=true`.

A block is y = Add(x, f(x)) where the branch f reads nothing but x and constants, only the Add reads its output,
and x and f(x) have the same shape (an identity shortcut: no projection, no broadcast). Removing the block
makes y = x:

Before:
    x ─► Conv ─► Relu ─► Conv ─► Add ─► y ─► …
    └────────────────────────────┘
After:
    x (named y) ─► …

At batch 1 a small model's latency is mostly per-node overhead, which only fewer nodes remove (ResNet-56 at
a quarter of its FLOPs by width alone still takes 0.69 of its time); a block whose branch adds little to its
input is the cheapest way to drop nodes. The skip tensor takes the Add's output name, so that the layers after
the block read the tensor of the same name as in the original model (the sequential re-solve pairs tensors by
name, and so makes the next layers reproduce the original's outputs, block included).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.passes.layers import WEIGHTED_OPS

MAX_BRANCH_NODES = 64  # a longer branch is not a block but most of a network


@dataclass(eq=False)
class ResidualBlock:
    add: gs.Node
    skip: gs.Tensor           # x
    branch: list[gs.Node]     # f's nodes

    @property
    def name(self) -> str:
        return self.add.name


def residual_blocks(graph: gs.Graph, shapes: dict[str, list]) -> list[ResidualBlock]:
    """The removable blocks of the graph (not of its subgraphs), in graph order; `shapes`: tensor name → dims."""
    outputs = {id(tensor) for tensor in graph.outputs}
    blocks = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or len(node.outputs) != 1 or id(node.outputs[0]) in outputs:
            continue
        for skip, out in (node.inputs, node.inputs[::-1]):
            branch = _branch(skip, out, node, outputs)
            if branch is not None and _same_shape(shapes, skip, out):
                blocks.append(ResidualBlock(node, skip, branch))
                break
    return blocks


def _branch(skip: gs.Tensor, out: gs.Tensor, add: gs.Node, graph_outputs: set[int]) -> list[gs.Node] | None:
    """The nodes computing `out` from `skip` and constants alone, each output read only inside them (or, for
    `out`, only by `add`); None when there are none such, or no weighted layer among them."""
    if out is skip or isinstance(out, gs.Constant) or graphs.producer(out) is None:
        return None
    found: dict[int, gs.Node] = {}
    pending = [graphs.producer(out)]
    reads_skip = False
    while pending:
        node = pending.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        if len(found) > MAX_BRANCH_NODES or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None
        for tensor in node.inputs:
            if tensor is skip:
                reads_skip = True
            elif isinstance(tensor, gs.Constant) or not tensor.name:
                continue
            elif graphs.producer(tensor) is None:
                return None  # a graph input other than x
            else:
                pending.append(graphs.producer(tensor))
    if not reads_skip or not any(node.op in WEIGHTED_OPS for node in found.values()):
        return None
    if graphs.producer(skip) is not None and id(graphs.producer(skip)) in found:
        return None
    for node in found.values():
        for tensor in node.outputs:
            if id(tensor) in graph_outputs:
                return None
            readers = graphs.consumers(tensor)
            if tensor is out:
                if readers != [add]:
                    return None
            elif any(id(reader) not in found for reader in readers):
                return None
    return list(found.values())


def _same_shape(shapes: dict[str, list], first: gs.Tensor, second: gs.Tensor) -> bool:
    a, b = shapes.get(first.name), shapes.get(second.name)
    return a is not None and a == b and "?" not in a


def remove(graph: gs.Graph, block: ResidualBlock) -> None:
    """y = x: the Add's readers read x, which takes y's name unless it is a graph input or output; the branch
    and the Add are left without outputs for cleanup."""
    output = block.add.outputs[0]
    for reader in graphs.consumers(output):
        for position, tensor in enumerate(reader.inputs):
            if tensor is output:
                reader.inputs[position] = block.skip
    block.add.outputs.clear()
    block.add.inputs.clear()
    for node in block.branch:  # dead: nothing of them is read (an Add inside the branch is no block any more)
        node.outputs.clear()
        node.inputs.clear()
    if not any(tensor is block.skip for tensor in graph.inputs + graph.outputs):
        block.skip.name = output.name
