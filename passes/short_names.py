"""short-names: give the weights and intermediate tensors short names, and drop the node names.

Before:                                              After:
    input ─► Conv "layer1.0.conv1" ─► "/layer1/relu"     input ─► Conv ─► "7"
    weights "layer1.0.conv1_fused_weight.indices", …      weights "3", "4", …
    output "logits"                                      output "logits"

A name is stored once where a tensor is defined and again at every node that reads it, so on a small model
whose weights are compressed the names become a large part of the file: about 9 KB of a pruned and shared
ResNet-20's 124 KB. Nothing in ONNX Runtime depends on them. The graph's inputs and outputs keep their names
(callers feed and fetch by them); names used inside subgraphs are left as they are and never given out again.
The layer names are gone afterwards, so run this last, after the passes whose reports name layers.
"""

from __future__ import annotations

import itertools
import string

import onnx_graphsurgeon as gs

from onnxcomp.pass_base import Pass, PassContext, PassResult
from onnxcomp.registry import register

ALPHABET = string.digits + string.ascii_lowercase


@register
class ShortNames(Pass):
    name = "short-names"
    summary = "rename weights and intermediate tensors to short names, drop node names (smaller files)"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        kept = {tensor.name for tensor in list(graph.inputs) + list(graph.outputs)}
        taken = kept | _subgraph_names(graph)
        fresh = (name for name in _short_names() if name not in taken)
        before = after = renamed = 0
        for tensor in graph.tensors().values():
            if tensor.name and tensor.name not in kept:
                before += len(tensor.name)
                tensor.name = next(fresh)
                after += len(tensor.name)
                renamed += 1
        named = sum(1 for node in graph.nodes if node.name)
        for node in graph.nodes:
            node.name = ""
        stats = {"tensors_renamed": renamed, "node_names_dropped": named, "name_characters_before": before,
                 "name_characters_after": after}
        return PassResult(renamed > 0 or named > 0, stats)


def _short_names():
    """0, 1, …, z, 00, 01, …: every string over ALPHABET, shortest first."""
    for length in itertools.count(1):
        for letters in itertools.product(ALPHABET, repeat=length):
            yield "".join(letters)


def _subgraph_names(graph: gs.Graph) -> set[str]:
    """The names of the tensors of every subgraph (If, Loop, Scan bodies), nested ones included."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            for body in value if isinstance(value, list) else [value]:
                if isinstance(body, gs.Graph):
                    names.update(body.tensors().keys())
                    names.update(tensor.name for tensor in list(body.inputs) + list(body.outputs))
                    names |= _subgraph_names(body)
    return names
