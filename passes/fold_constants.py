"""fold-constants: compute once what depends only on constants, and store the result as a weight.

Before:                                              After:
    C = ConstantOfShape([64]) ─┐                         W' = initializer (the product)
    W16 ─► Cast(float) ─► Mul ─┴─► Conv ─► BN            W' ─► Conv ─► BN     (fuse-bn can now fold BN)
    Constant(value=[1, 64, 1, 1]) ─► Reshape            the shape as an initializer

A node of the default domain whose inputs are all constant (initializers, Constant nodes, or results of other
such nodes) is evaluated once with ONNX's reference evaluator and its result stored as an initializer under the
same tensor name, as onnx-simplifier does. Exporters leave such subgraphs behind: weights built from
ConstantOfShape, fp16 weights cast back to float32, weights reshaped or scaled by constants. Until they are
folded, the weight-rewriting passes (fuse-bn, prune, share, int8) see no constant weight and skip the layer.

Size guard: a result larger than the constants it is computed from (ConstantOfShape of a big shape, a Cast
of fp16 weights to float32, an Expand) would grow the file, so it is folded only where a later pass needs it
as a constant: a BatchNormalization parameter, or a Conv/ConvTranspose/Gemm/MatMul weight or bias whose layer
feeds a BatchNormalization. Otherwise the folding stops one node earlier and that node stays.

Not folded: random ops, If/Loop/Scan and other nodes with subgraphs, nodes inside subgraphs, other domains,
graph outputs, and values the evaluator cannot compute (counted in the stats).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.errors import first_line
from onnxcomp.pass_base import Pass, PassContext, PassResult
from onnxcomp.registry import register

NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
GROWTH_ALLOWANCE = 1024  # bytes: small shape tensors may grow without a reason


@register
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate constant subgraphs once and store their results as weights (exact)"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        foldable = _foldable_nodes(graph)
        if not foldable:
            return PassResult(modified=False, stats={})
        outputs = {id(node): node for node in foldable}
        frontier = [t for node in foldable for t in node.outputs
                    if not graphs.is_graph_output(graph, t)
                    and any(id(reader) not in outputs for reader in graphs.consumers(t))]
        values = _evaluate(graph, [t for node in foldable for t in node.outputs], ctx)
        chosen, kept_for_size = _choose(frontier, outputs, values)
        for tensor in chosen:
            tensor.inputs.clear()  # detaches the producing node; cleanup removes what no one reads any more
            tensor.to_constant(np.array(values[tensor.name], order="C"))
        missing = sum(t.name not in values for t in frontier)
        stats = {"folded": len(chosen), "kept_for_size": kept_for_size, "skipped:not-evaluable": missing}
        return PassResult(modified=bool(chosen), stats=stats)


def _foldable_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes of the main graph (in order) whose inputs are all constant, directly or through other such nodes."""
    constant: set[int] = set()
    found = []
    for node in graph.toposort(recurse_subgraphs=False, mode="nodes").nodes:
        if (not graphs.is_standard(node) or node.op in NONDETERMINISTIC
                or any(isinstance(v, gs.Graph) for v in node.attrs.values())):
            continue
        inputs = [t for t in node.inputs if t.name]  # "" marks an omitted optional input
        if all(isinstance(t, gs.Constant) or id(t) in constant for t in inputs):
            found.append(node)
            constant.update(id(t) for t in node.outputs)
    return found


def _choose(frontier: list[gs.Tensor], foldable: dict[int, gs.Node],
            values: dict[str, np.ndarray]) -> tuple[list[gs.Tensor], int]:
    """The tensors to replace by their values: the frontier, stepping back past results that would grow or
    could not be computed."""
    chosen, kept, seen = [], 0, set()
    pending = list(frontier)
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = graphs.producer(tensor)
        value = values.get(tensor.name)
        if value is not None and (value.nbytes <= _leaf_bytes(node, foldable) + GROWTH_ALLOWANCE
                                  or _needed_constant(tensor)):
            chosen.append(tensor)
            continue
        kept += value is not None
        pending.extend(t for t in node.inputs if not isinstance(t, gs.Constant) and t.name
                       and id(graphs.producer(t)) in foldable)
    return chosen, kept


def _leaf_bytes(node: gs.Node, foldable: dict[int, gs.Node]) -> int:
    """Bytes of the stored constants a foldable node's result is computed from (each counted once)."""
    leaves: dict[int, int] = {}
    pending = [node]
    while pending:
        current = pending.pop()
        if current.op == "Constant":
            value = graphs.constant_value(current.outputs[0])
            leaves[id(current)] = 0 if value is None else value.nbytes
        for tensor in current.inputs:
            if isinstance(tensor, gs.Constant):
                leaves[id(tensor)] = tensor.values.nbytes
            elif graphs.producer(tensor) is not None and id(graphs.producer(tensor)) in foldable:
                pending.append(graphs.producer(tensor))
    return sum(leaves.values())


def _needed_constant(tensor: gs.Tensor) -> bool:
    """A later pass needs this value as a constant: a BN parameter, or the weight of a layer BN follows."""
    for reader in graphs.consumers(tensor):
        if reader.op == "BatchNormalization" and reader.inputs and reader.inputs[0] is not tensor:
            return True
        if reader.op in WEIGHTED and reader.inputs[0] is not tensor and reader.outputs:
            if any(after.op == "BatchNormalization" for after in graphs.consumers(reader.outputs[0])):
                return True
    return False


def _evaluate(graph: gs.Graph, tensors: list[gs.Tensor], ctx: PassContext) -> dict[str, np.ndarray]:
    """Values of `tensors`, computed by ONNX's reference evaluator over the constant subgraph alone."""
    if not tensors:
        return {}
    wanted = {t.name for t in tensors}
    sub = graph.copy()
    sub.outputs = [t for name, t in sub.tensors().items() if name in wanted]
    sub.inputs = []
    sub.cleanup(remove_unused_graph_inputs=True)
    model = gs.export_onnx(sub, do_type_check=False)
    from onnx.reference import ReferenceEvaluator

    values = {}
    try:
        results = ReferenceEvaluator(model).run(None, {})
    except Exception as exc:  # noqa: BLE001 - the evaluator raises whatever its op implementations raise
        ctx.log.info("fold-constants: the constant subgraph could not be evaluated (%s); folding one by one",
                     first_line(exc))
        return _evaluate_each(graph, tensors, ctx) if len(tensors) > 1 else {}
    for output, value in zip(model.graph.output, results):
        if isinstance(value, np.ndarray):
            values[output.name] = value
    return values


def _evaluate_each(graph: gs.Graph, tensors: list[gs.Tensor], ctx: PassContext) -> dict[str, np.ndarray]:
    values = {}
    for tensor in tensors:
        values.update(_evaluate(graph, [tensor], ctx))
    return values

