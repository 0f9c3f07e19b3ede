"""int8 with dynamic activations, the int8 pass's mode for transformers (`int8:activations=dynamic`).

Before:                                         After:
    x ─► MatMul(W: float [K, N]) ─► y              x ─► DynamicQuantizeLinear ─► MatMulInteger(W: int8) ─► Cast
    (or Gemm(W, C): the same, then Add(C))          ─► Mul(x scale × W scale per column) ─► y
    ids ─► Gather(E: float [V, D]) ─► e            ids ─► Gather(E: int8) ─► Cast ─► Mul(Gather(row scales)) ─► e

Static int8 fixes each activation's range on calibration data. A transformer's activations have outlier
channels a hundred times larger than the rest after LayerNorm, and sequences whose ranges differ from one input
to the next, so one fixed range either clips the outliers or leaves the other channels a handful of levels:
measured on paraphrase-MiniLM-L3, static int8 keeps a sentence-embedding cosine of about 0.7. Here the range of
each MatMul input is measured on every call (DynamicQuantizeLinear: uint8, asymmetric, per tensor), and the
weights are int8, symmetric, per output column. ONNX Runtime fuses each rewritten MatMul into its
MatMulIntegerToFloat kernel. LayerNormalization, Softmax, GELU and the activation × activation MatMuls of
attention stay in float. No calibration data is needed.

Embedding tables (Gather on a constant 2-D table) are stored as int8 rows, each with its own scale, and decoded
at the gathered rows only, with no float copy of the table. Rows' magnitudes differ forty-fold in MiniLM's
vocabulary, so one scale for the whole table would leave the small rows a handful of levels; but a float scale
per row costs 4 bytes a row (120 KB for a 30522-word vocabulary). So each row's scale is rounded up to one of 16
levels spaced geometrically between the least and the largest row scale and stored as a 4-bit code
(onnxcomp/encoding.py's codebook layout, which ONNX Runtime decodes once when it loads the model): half a byte
a row, and at most (largest / least)^(1/15) times the row's own step (1.28 for MiniLM). The MatMul weights'
per-column scales are stored in float16 where float16's normal range holds them (the weights are rounded
with the stored scale, so nothing is lost), cast back by an op that ONNX Runtime folds. With these the file is
no larger than ONNX Runtime's quantize_dynamic output, which keeps one scale per tensor (paraphrase-MiniLM-L3:
17,436,188 bytes against ORT 1.32's 17,443,487; benchmarks/transformers.py). The new intermediate tensors
declare no type (no value_info entry: ONNX infers them), as encoding's decoded weights do.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.encoding import encode_codebook
from onnxcomp.passes.layers import embedding_table
from onnxcomp.passes.quantize import weight_levels

ROW_SCALE_BITS = 4  # embedding rows' scales: 16 levels, each row's rounded up (MiniLM's 40x spread: at most 1.28x)


def is_transformer(graph: gs.Graph) -> bool:
    """A MatMul between two computed tensors (attention's QKᵀ and weights × V): the mark of a transformer."""
    return any(node.op == "MatMul" and graphs.is_standard(node) and len(node.inputs) == 2
               and all(graphs.constant_value(t) is None for t in node.inputs) for node in graph.nodes)


def quantizable(graph: gs.Graph, config) -> list[gs.Node]:
    """The MatMuls with a constant 2-D float weight (and Gemms that are one plus a bias) and the embedding
    Gathers that the int8 `config` (Int8Config) does not leave in float, in graph order."""
    from onnxcomp.passes.quantize import kept_in_float

    matmuls = [n for n in graph.nodes if matmul_weight(n) is not None]
    candidates = [n for n in graph.nodes if matmul_weight(n) is not None or embedding_table(n) is not None]
    kept = kept_in_float(candidates, matmuls, config)
    return [node for node in candidates if id(node) not in kept]


def quantize_dynamic(graph: gs.Graph, config) -> dict[str, int | float | str]:
    """Rewrite what `quantizable` finds, with the int8 `config`'s weight range; return the stats."""
    names = graphs.Names(graph)
    chosen = quantizable(graph, config)
    matmuls = [n for n in chosen if n.op != "Gather"]  # MatMul, and Gemm as MatMul + bias
    gathers = [n for n in chosen if n.op == "Gather"]
    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    levels = [_rewrite_matmul(graph, node, names, config.weight_range, quantized_inputs) for node in matmuls]
    for node in gathers:
        _rewrite_gather(graph, node, names)
    stats: dict[str, int | float | str] = {"activations": "dynamic", "quantized": len(matmuls) + len(gathers)}
    stats.update({f"int8:{op}": count for op, count in sorted(Counter(n.op for n in matmuls).items())})
    stats["int8:Gather"] = len(gathers)
    excluded = sum(1 for n in graph.nodes if matmul_weight(n) is not None or embedding_table(n) is not None)
    if excluded:
        stats["skipped:excluded"] = excluded
    if levels:
        stats["weight_levels_min"] = int(min(min(level) for level in levels))
    return stats


def matmul_weight(node: gs.Node) -> np.ndarray | None:
    """The [K, N] float weight of a MatMul, or of a Gemm that is one plus a bias (no transA, alpha = beta = 1)."""
    if node.op not in ("MatMul", "Gemm") or not graphs.is_standard(node) or len(node.inputs) < 2:
        return None
    if node.op == "MatMul" and len(node.inputs) != 2:
        return None
    if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0
                              or (gemm_bias(node) is None and len(node.inputs) > 2 and node.inputs[2].name)):
        return None
    weight = graphs.constant_value(node.inputs[1])
    activation = node.inputs[0]
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or graphs.constant_value(activation) is not None:
        return None
    return weight.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else weight


def gemm_bias(node: gs.Node) -> np.ndarray | None:
    """A Gemm's constant bias C when it adds as it is (beta = 1)."""
    if len(node.inputs) < 3 or not node.inputs[2].name or float(node.attrs.get("beta", 1.0)) != 1.0:
        return None
    return graphs.constant_value(node.inputs[2])


def _rewrite_matmul(graph: gs.Graph, node: gs.Node, names: graphs.Names, weight_range: str,
                    quantized_inputs: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]]) -> list[int]:
    """Replace the MatMul; an input read by several (Q, K and V projections) is quantized once."""
    weight = matmul_weight(node)
    bias = gemm_bias(node) if node.op == "Gemm" else None
    columns = np.ascontiguousarray(weight.T)
    levels = weight_levels(columns, weight_range, depthwise=False)
    largest = np.abs(columns).max(axis=1)
    scale = half_where_normal(np.where(largest > 0, largest / levels, 1.0).astype(np.float32))
    quantized = np.clip(np.round(weight / scale.astype(np.float32)), -levels, levels).astype(np.int8)
    base = node.name or node.outputs[0].name
    stored = node.inputs[1].name  # the new weights are named after the one they replace, as ORT names them
    x, y = node.inputs[0], node.outputs[0]
    product_scaled = y if bias is None else gs.Variable(names.new(f"{base}_without_bias"))
    if x.name not in quantized_inputs:
        quantized_inputs[x.name] = (gs.Variable(names.new(f"{x.name}_quantized")),
                                    gs.Variable(names.new(f"{x.name}_scale")),
                                    gs.Variable(names.new(f"{x.name}_zero_point")))
        graph.nodes.append(gs.Node("DynamicQuantizeLinear", names.new(f"{x.name}_DynamicQuantizeLinear"),
                                   inputs=[x], outputs=list(quantized_inputs[x.name])))
    x_q, x_scale, x_zero = quantized_inputs[x.name]
    product = gs.Variable(names.new(f"{base}_int32"))
    product_float = gs.Variable(names.new(f"{base}_int32_float"))
    step = gs.Variable(names.new(f"{base}_step"))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend([
        gs.Node("MatMulInteger", names.new(f"{base}_MatMulInteger"),
                inputs=[x_q, names.constant(f"{stored}_quantized", quantized), x_zero], outputs=[product]),
        gs.Node("Cast", names.new(f"{base}_Cast"), attrs={"to": np.float32}, inputs=[product],
                outputs=[product_float]),
        gs.Node("Mul", names.new(f"{base}_scales"),
                inputs=[x_scale, as_float32(graph, names, names.constant(f"{stored}_scale", scale))],
                outputs=[step]),
        gs.Node("Mul", names.new(f"{base}_dequantize"), inputs=[product_float, step], outputs=[product_scaled]),
    ])
    if bias is not None:
        graph.nodes.append(gs.Node("Add", names.new(f"{base}_bias"),
                                   inputs=[product_scaled, names.constant(f"{base}_bias", bias)], outputs=[y]))
    return levels.tolist()


def _rewrite_gather(graph: gs.Graph, node: gs.Node, names: graphs.Names) -> None:
    table = embedding_table(node)
    levels, codes = row_scale_levels(np.abs(table).max(axis=1))
    row_scale = levels.astype(np.float32)[codes]
    quantized = np.clip(np.round(table / row_scale[:, None]), -127, 127).astype(np.int8)
    base, stored = node.name or node.outputs[0].name, node.inputs[0].name
    ids, out = node.inputs[1], node.outputs[0]
    rows, rows_float, scale, scale_column = (gs.Variable(names.new(f"{base}_{role}"))
                                             for role in ("rows_int8", "rows_float", "row_scale", "row_scale_column"))
    scales = names.constant(f"{stored}_row_scales", row_scale)
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend([
        gs.Node("Gather", names.new(f"{base}_quantized_rows"), attrs={"axis": 0},
                inputs=[names.constant(f"{stored}_quantized", quantized), ids], outputs=[rows]),
        gs.Node("Cast", names.new(f"{base}_Cast"), attrs={"to": np.float32}, inputs=[rows], outputs=[rows_float]),
        gs.Node("Gather", names.new(f"{base}_row_scales"), attrs={"axis": 0}, inputs=[scales, ids], outputs=[scale]),
        gs.Node("Unsqueeze", names.new(f"{base}_Unsqueeze"),
                inputs=[scale, names.constant(f"{base}_last_axis", np.array([-1], np.int64))],
                outputs=[scale_column]),
        gs.Node("Mul", names.new(f"{base}_dequantize"), inputs=[rows_float, scale_column], outputs=[out]),
    ])
    encode_codebook(graph, scales, levels, codes, ROW_SCALE_BITS, names)


def row_scale_levels(largest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2^ROW_SCALE_BITS scales spaced geometrically between the rows' least and largest, int8 code of each row).

    Each row takes the least level at or above its own scale (its largest magnitude / 127), so none clips; the
    levels are rounded up to float16 where they lie in its normal range, and stored so.
    """
    needed = largest.astype(np.float64) / 127
    positive = needed[needed > 0]
    if positive.size == 0:
        return np.ones(1, dtype=np.float32), np.zeros(len(largest), dtype=np.int64)
    exact = np.geomspace(positive.min(), positive.max(), 2 ** ROW_SCALE_BITS)
    stored = half_where_normal(exact.astype(np.float32))
    below = stored.astype(np.float64) < exact  # rounded down: the next representable value up
    stored[below] = np.nextafter(stored[below], np.array(np.inf, stored.dtype))
    levels = np.unique(stored)
    codes = np.minimum(np.searchsorted(levels.astype(np.float64), needed, side="left"), len(levels) - 1)
    return levels, codes


def half_where_normal(values: np.ndarray) -> np.ndarray:
    """float32 `values` as float16 where each is a normal float16 (relative rounding at most 2^-11), else as
    they are. The caller quantizes with the returned values, so the rounding changes a step, not a result."""
    half = values.astype(np.float16)
    finfo = np.finfo(np.float16)
    if np.all((np.abs(values) >= finfo.tiny) & (np.abs(values) <= finfo.max)):
        return half
    return values


def as_float32(graph: gs.Graph, names: graphs.Names, stored: gs.Constant) -> gs.Tensor:
    """A constant stored in float16 cast to float32 (ONNX Runtime folds the Cast when it loads the model)."""
    if stored.values.dtype == np.float32:
        return stored
    wide = gs.Variable(names.new(f"{stored.name}_float"))
    graph.nodes.append(gs.Node("Cast", names.new(f"{stored.name}_Cast"), attrs={"to": np.float32},
                               inputs=[stored], outputs=[wide]))
    return wide
