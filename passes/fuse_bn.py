"""fuse-bn: fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Before:                                   After:
    x ─► Conv(W, b) ─► BatchNormalization(γ, β, μ, σ²) ─► y       x ─► Conv(W', b') ─► y
    x ─► Gemm(B, C) ─► BatchNormalization ─► y                    x ─► Gemm(B', C') ─► y
    x ─► MatMul(B) [─► Add(c)] ─► BatchNormalization ─► y         x ─► MatMul(B') ─► Add(c') ─► y

with s = γ / √(σ² + ε), W' = s·W per output channel and b' = s·(b − μ) + β. The fold is exact up to float
rounding. It applies when the BatchNormalization runs in inference mode, its parameters and the layer's weights
are constant (initializers or Constant nodes), and the layer's output feeds nothing but the BatchNormalization.
Otherwise the BatchNormalization is left as it is and the reason is counted in the stats.

New weights are always new initializers: a weight shared with another node keeps its value for that node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult, PostconditionError
from onnxcomp.registry import register

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


@dataclass(frozen=True)
class BatchNormParams:
    scale: np.ndarray   # γ / √(σ² + ε), float64
    offset: np.ndarray  # β − μ·scale, float64


@register
class FuseBatchNorm(Pass):
    name = "fuse-bn"
    summary = "fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it (exact)"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        names = graphs.Names(graph)
        types = _types_if_needed(graph)
        for bn in [node for node in graph.nodes if node.op == "BatchNormalization"]:
            plan = _plan(graph, bn, types)
            if isinstance(plan, str):
                skipped[plan] += 1
                ctx.log.info("fuse-bn: kept %s (%s)", bn.name or bn.outputs[0].name, plan)
                continue
            fused[plan(names)] += 1
        stats: dict[str, int | float | str] = {"fused": sum(fused.values()), "skipped": sum(skipped.values())}
        stats.update({f"fused:{op}": count for op, count in sorted(fused.items())})
        stats.update({f"skipped:{reason}": count for reason, count in sorted(skipped.items())})
        return PassResult(modified=bool(fused), stats=stats)

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        types = _types_if_needed(graph)
        for bn in graph.nodes:
            if bn.op == "BatchNormalization" and not isinstance(_plan(graph, bn, types), str):
                raise PostconditionError(f"fuse-bn left a foldable BatchNormalization: {bn.name}")


def _types_if_needed(graph: gs.Graph) -> dict[str, onnx.TypeProto]:
    """Inferred types where a MatMul's input has no stated shape (exports often state none between nodes):
    whether MatMul → BatchNormalization folds depends on the input's rank."""
    has_bn = any(node.op == "BatchNormalization" for node in graph.nodes)
    if has_bn and any(node.op == "MatMul" and node.inputs[0].shape is None for node in graph.nodes):
        return graphs.inferred_types(graph)
    return {}


def _plan(graph: gs.Graph, bn: gs.Node, types: dict[str, onnx.TypeProto]) -> Callable[[graphs.Names], str] | str:
    """A function that performs the fold and returns the layer's op type, or the reason it cannot be done;
    `types` are inferred types for tensors whose shape the model does not state."""
    if not graphs.is_standard(bn):
        return "custom-domain"
    if bn.attrs.get("training_mode", 0) == 1:
        return "training-mode"
    if graph.opset < 7 and bn.attrs.get("is_test", 0) == 0:
        return "training-mode"  # before opset 7, is_test=0 (the default) meant training
    if bn.attrs.get("spatial", 1) == 0:
        return "not-per-channel"
    if any(graphs.consumers(t) or graphs.is_graph_output(graph, t) for t in bn.outputs[1:]):
        return "statistics-outputs-used"
    params = _batch_norm_params(bn)
    if params is None:
        return "non-constant-parameters"
    x = bn.inputs[0]
    layer = graphs.producer(x)
    if layer is None or layer.op not in FOLDABLE or not graphs.is_standard(layer):
        return "nothing-foldable-before"
    if len(graphs.consumers(x)) != 1 or graphs.is_graph_output(graph, x):
        return "layer-output-shared"
    if layer.op in ("Conv", "ConvTranspose"):
        return _plan_conv(graph, bn, layer, params)
    if layer.op == "Gemm":
        return _plan_gemm(graph, bn, layer, params)
    if layer.op == "MatMul":
        return _plan_matmul(graph, bn, layer, None, params, types)
    return _plan_matmul_add(graph, bn, layer, params, types)


def _batch_norm_params(bn: gs.Node) -> BatchNormParams | None:
    if len(bn.inputs) < 5:
        return None
    values = [graphs.constant_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in values):
        return None
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in values)
    if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1
            and gamma.shape == beta.shape == mean.shape == var.shape):
        return None
    epsilon = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + epsilon)
    return BatchNormParams(scale=scale, offset=beta - mean * scale)


def _plan_conv(graph, bn, conv, params: BatchNormParams):
    weight = graphs.constant_value(conv.inputs[1], keep=False) if len(conv.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        return "non-constant-weight"
    has_bias = len(conv.inputs) > 2 and conv.inputs[2].name != ""
    bias = graphs.constant_value(conv.inputs[2]) if has_bias else np.zeros(0)
    if bias is None:
        return "non-constant-bias"
    group = int(conv.attrs.get("group", 1))
    channels = params.scale.shape[0]
    if conv.op == "Conv":
        if weight.shape[0] != channels:
            return "channel-mismatch"
        # W[m, c, k...] scales by s[m]
        scale_shape = (channels,) + (1,) * (weight.ndim - 1)
        new_weight = weight * params.scale.reshape(scale_shape)
    else:
        # ConvTranspose: W[c_in, m/group, k...]; output channel m = g·(m/group) + j for input group g
        per_group = weight.shape[1]
        if per_group * group != channels or weight.shape[0] % group:
            return "channel-mismatch"
        grouped = weight.reshape((group, weight.shape[0] // group, per_group) + weight.shape[2:])
        scale_shape = (group, 1, per_group) + (1,) * (weight.ndim - 2)
        new_weight = (grouped * params.scale.reshape(scale_shape)).reshape(weight.shape)
    if has_bias and bias.shape != (channels,):
        return "channel-mismatch"
    new_bias = (bias if has_bias else 0.0) * params.scale + params.offset

    return _fold_into(conv, bn, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype))


def _plan_gemm(graph, bn, gemm, params: BatchNormParams):
    weight = graphs.constant_value(gemm.inputs[1], keep=False)
    if weight is None or weight.ndim != 2:
        return "non-constant-weight"
    trans_b = int(gemm.attrs.get("transB", 0))
    outputs = weight.shape[0] if trans_b else weight.shape[1]
    if outputs != params.scale.shape[0]:
        return "channel-mismatch"
    has_bias = len(gemm.inputs) > 2 and gemm.inputs[2].name != ""
    bias = graphs.constant_value(gemm.inputs[2]) if has_bias else np.zeros(())
    if bias is None:
        return "non-constant-bias"
    beta = float(gemm.attrs.get("beta", 1.0))
    new_weight = weight * (params.scale[:, None] if trans_b else params.scale[None, :])
    try:
        new_bias = beta * bias * params.scale + params.offset
    except ValueError:  # bias that does not broadcast against the output channels
        return "channel-mismatch"

    return _fold_into(gemm, bn, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype), {"beta": 1.0})


def _plan_matmul_add(graph, bn, add, params: BatchNormParams, types):
    """MatMul(x, B) → Add(·, c) → BatchNormalization, the usual export of Linear + BatchNorm1d."""
    for position in (0, 1):
        bias = graphs.constant_value(add.inputs[1 - position])
        matmul = graphs.producer(add.inputs[position])
        if bias is not None and matmul is not None and matmul.op == "MatMul":
            if len(graphs.consumers(add.inputs[position])) != 1 or graphs.is_graph_output(graph, add.inputs[position]):
                return "layer-output-shared"
            return _plan_matmul(graph, bn, matmul, (add, 1 - position, bias), params, types)
    return "nothing-foldable-before"


def _plan_matmul(graph, bn, matmul, add_and_bias, params: BatchNormParams, types):
    weight = graphs.constant_value(matmul.inputs[1], keep=False)
    if weight is None or weight.ndim != 2:
        return "non-constant-weight"
    if weight.shape[1] != params.scale.shape[0]:
        return "channel-mismatch"
    # BatchNormalization normalises axis 1; MatMul's output channels are its last axis. They coincide only
    # for rank-2 outputs, which needs a rank-2 input.
    if graphs.inferred_rank(matmul.inputs[0], types) != 2:
        return "unknown-or-not-2d-input"
    if add_and_bias is not None:
        add, bias_position, bias = add_and_bias
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, params.scale.shape[0])):
            return "channel-mismatch"
        new_bias = bias * params.scale + params.offset
    else:
        new_bias = params.offset
    new_weight = weight * params.scale[None, :]

    def fold(names: graphs.Names) -> str:
        base = matmul.name or matmul.outputs[0].name
        matmul.inputs[1] = names.constant(f"{base}_fused_weight", new_weight.astype(weight.dtype))
        bias_tensor = names.constant(f"{base}_fused_bias", new_bias.astype(weight.dtype))
        if add_and_bias is not None:
            add.inputs[bias_position] = bias_tensor
            _take_output(add, bn)
        else:
            y = bn.outputs[0]
            bn.outputs.clear()
            bn.inputs.clear()
            graph.nodes.append(gs.Node("Add", name=names.new(f"{base}_fused_add"),
                                       inputs=[matmul.outputs[0], bias_tensor], outputs=[y]))
        return "MatMul"

    return fold


def _fold_into(layer: gs.Node, bn: gs.Node, weight: np.ndarray, bias: np.ndarray, attrs: dict | None = None):
    """The fold for layers that take (x, weight, bias): new weight and bias tensors, then the BN's output."""

    def fold(names: graphs.Names) -> str:
        base = layer.name or layer.outputs[0].name
        layer.inputs[1] = names.constant(f"{base}_fused_weight", weight)
        bias_tensor = names.constant(f"{base}_fused_bias", bias)
        if len(layer.inputs) > 2:
            layer.inputs[2] = bias_tensor
        else:
            layer.inputs.append(bias_tensor)
        layer.attrs.update(attrs or {})
        _take_output(layer, bn)
        return layer.op

    return fold


def _take_output(layer: gs.Node, bn: gs.Node) -> None:
    """Make `layer` produce the BatchNormalization's output tensor, so names and graph outputs stay."""
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    layer.outputs[0] = y
