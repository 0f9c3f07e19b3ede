"""equalize: cross-layer equalization of consecutive convolutions (Nagel et al. 2019), exact in float.

Before:                                        After:
    x ─► Conv(W₁, b₁) ─► [Relu] ─► Conv(W₂)        x ─► Conv(W₁/s, b₁/s) ─► [Relu] ─► Conv(W₂·s)

Output channel i of the first layer is divided by sᵢ > 0 and the matching input channel of the second is
multiplied by it; Relu(x/s) = Relu(x)/s, so the result is unchanged. With sᵢ = √(r₁ᵢ / r₂ᵢ), where r are the
largest |weight| of the channel in each layer, both channels end with range √(r₁ᵢ·r₂ᵢ): the depthwise filters
and pointwise columns that per-tensor int8 would round to nothing get their share of the range. Run it after
fuse-bn and before int8.

Applies to a Conv whose output feeds nothing but one Conv (group 1 or depthwise), directly or through a Relu.
Not through Clip (ReLU6): clip(x/s, 0, 6) is not clip(x, 0, 6)/s. Shared weights are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult
from onnxcomp.registry import register


@dataclass(frozen=True)
class EqualizeConfig:
    iterations: int = 2  # chains of three or more layers settle after a few sweeps

    def __post_init__(self):
        if not 1 <= self.iterations <= 20:
            raise ValueError("iterations must be from 1 to 20")


@register
class Equalize(Pass):
    name = "equalize"
    summary = "cross-layer equalization of Conv→[Relu]→Conv weight ranges (exact); helps per-tensor int8"
    Config = EqualizeConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        pairs = [pair for pair in (_pair(graph, node) for node in graph.nodes if node.op == "Conv") if pair]
        if not pairs:
            return PassResult(False, {"pairs": 0})
        names = graphs.Names(graph)
        largest_ratio = 1.0
        for _ in range(self.config.iterations):
            for first, second in pairs:
                largest_ratio = max(largest_ratio, _equalize(first, second, names))
        return PassResult(True, {"pairs": len(pairs), "largest_range_ratio_before": round(largest_ratio, 1)})


def _pair(graph: gs.Graph, first: gs.Node) -> tuple[gs.Node, gs.Node] | None:
    """(first, second) when `first`'s output channels feed `second`'s input channels one to one."""
    if not graphs.is_standard(first) or not _private_constant(first, 1):
        return None
    if len(first.inputs) > 2 and first.inputs[2].name and not _private_constant(first, 2):
        return None
    tensor = first.outputs[0]
    readers = graphs.consumers(tensor)
    if graphs.is_graph_output(graph, tensor) or len(readers) != 1:
        return None
    second, source = readers[0], tensor
    if second.op == "Relu" and graphs.is_standard(second):  # Relu(x/s) = Relu(x)/s for s > 0
        source = second.outputs[0]
        readers = graphs.consumers(source)
        if graphs.is_graph_output(graph, source) or len(readers) != 1:
            return None
        second = readers[0]
    if second.op != "Conv" or not graphs.is_standard(second) or not _private_constant(second, 1):
        return None
    if second.inputs[0] is not source:
        return None
    channels = graphs.constant_value(first.inputs[1]).shape[0]
    w2 = graphs.constant_value(second.inputs[1])
    group = int(second.attrs.get("group", 1))
    depthwise = group == channels and w2.shape[0] == channels and w2.shape[1] == 1
    if not (depthwise or (group == 1 and w2.shape[1] == channels)):
        return None
    return first, second


def _private_constant(node: gs.Node, position: int) -> bool:
    """The input is a constant that no other node reads, so changing it changes only this node."""
    if len(node.inputs) <= position:
        return False
    tensor = node.inputs[position]
    return graphs.constant_value(tensor) is not None and len(graphs.consumers(tensor)) == 1


def _equalize(first: gs.Node, second: gs.Node, names: graphs.Names) -> float:
    """Rescale one pair in place (with new tensors); return the largest channel range ratio before."""
    w1 = graphs.constant_value(first.inputs[1]).astype(np.float64)
    w2 = graphs.constant_value(second.inputs[1]).astype(np.float64)
    depthwise = w2.shape[1] == 1 and int(second.attrs.get("group", 1)) == w1.shape[0] and w1.shape[0] > 1
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    columns = w2.reshape(w2.shape[0], -1) if depthwise else np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)
    r2 = np.abs(columns).max(axis=1)
    usable = (r1 > 0) & (r2 > 0)
    scale = np.ones_like(r1)
    scale[usable] = np.sqrt(r1[usable] / r2[usable])
    scale = np.clip(scale, 1e-3, 1e3)  # a nearly dead channel must not blow up its partner
    ratio = float((r1[usable] / r2[usable]).max() / (r1[usable] / r2[usable]).min()) if usable.any() else 1.0
    dtype = graphs.constant_value(first.inputs[1]).dtype
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    first.inputs[1] = names.constant(f"{first.name or first.outputs[0].name}_equalized_weight",
                                     (w1 / scale.reshape(shape1)).astype(dtype))
    if len(first.inputs) > 2 and first.inputs[2].name:
        bias = graphs.constant_value(first.inputs[2]).astype(np.float64)
        first.inputs[2] = names.constant(f"{first.name or first.outputs[0].name}_equalized_bias",
                                         (bias / scale).astype(dtype))
    shape2 = (-1,) + (1,) * (w2.ndim - 1) if depthwise else (1, -1) + (1,) * (w2.ndim - 2)
    second.inputs[1] = names.constant(f"{second.name or second.outputs[0].name}_equalized_weight",
                                      (w2 * scale.reshape(shape2)).astype(dtype))
    return ratio
