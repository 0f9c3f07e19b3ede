"""cleanup: remove what computes nothing, and store identical weights once.

Before:                                         After:
    x ─► Identity ─► Relu ─► y                      x ─► Relu ─► y
    W1 = W2 (same dtype, shape, bytes)              W1 used by both nodes, W2 gone
    nodes whose outputs nobody reads                removed, with the initializers only they used

Initializers that nothing reads in the input model are dropped when the model is imported, before any pass.
An Identity that connects a graph input (or initializer) directly to a graph output is kept: removing it would
rename an input or output of the model. Graph inputs and outputs are never renamed.
"""

from __future__ import annotations

import hashlib

import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult
from onnxcomp.registry import register


@register
class Cleanup(Pass):
    name = "cleanup"
    summary = "remove Identity and dead nodes, unused initializers; store identical initializers once"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        initializers_before = len(graphs.weight_initializers(graph))
        local = {id(node) for node in graph.nodes}  # subgraph nodes read outer tensors by name: leave those
        identities = sum(_remove_identity(graph, node, local) for node in list(graph.nodes)
                         if node.op == "Identity" and graphs.is_standard(node))
        duplicates = _merge_duplicate_initializers(graph, local)
        graph.cleanup(remove_unused_graph_inputs=False)
        stats = {
            "identity_removed": identities,
            "dead_nodes_removed": nodes_before - len(graph.nodes) - identities,
            "duplicate_initializers_merged": duplicates,
            "initializers_removed": (initializers_before - len(graphs.weight_initializers(graph))
                                     + ctx.unused_initializers),
        }
        ctx.unused_initializers = 0  # reported once
        return PassResult(modified=any(stats.values()), stats=stats)


def _remove_identity(graph: gs.Graph, node: gs.Node, local: set[int]) -> bool:
    source, target = node.inputs[0], node.outputs[0]
    readers = graphs.consumers(target)
    if any(id(reader) not in local for reader in readers):
        return False
    if not graphs.is_graph_output(graph, target):
        for reader in readers:
            _replace_input(reader, target, source)
        node.outputs.clear()
        return True
    # The Identity's output is a graph output: let the node that computes `source` write it directly.
    upstream = graphs.producer(source)
    if (upstream is None or graphs.is_graph_output(graph, source)
            or any(id(reader) not in local for reader in graphs.consumers(source))):
        return False
    for reader in graphs.consumers(source):
        if reader is not node:
            _replace_input(reader, source, target)
    node.outputs.clear()
    node.inputs.clear()
    upstream.outputs[upstream.outputs.index(source)] = target
    return True


def _merge_duplicate_initializers(graph: gs.Graph, local: set[int]) -> int:
    keep: dict[tuple, gs.Constant] = {}
    merged = 0
    for tensor in graphs.weight_initializers(graph).values():
        if graphs.is_graph_output(graph, tensor) or any(id(r) not in local for r in graphs.consumers(tensor)):
            continue
        values = tensor.values
        key = (str(values.dtype), values.shape, hashlib.sha1(values.tobytes()).digest())
        first = keep.setdefault(key, tensor)
        if first is tensor:
            continue
        for reader in graphs.consumers(tensor):
            _replace_input(reader, tensor, first)
        merged += 1
    return merged


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for position, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[position] = new
