"""share: weight sharing, each weight tensor's values replaced by at most 2^bits shared values found by k-means.

Before:
    x ─► Conv(W: 64×32×3×3 float32, 4 bytes per weight) ─► y
After (bits=5):
    W.codebook (32 values per output channel), W.indices (5 bits per weight) ─► decoding ops ─► W ─► Conv ─► y

The values are clustered with one-dimensional k-means (passes/kmeans.py: linear initialisation, deterministic),
and the tensor is stored as codebook + indices packed at `bits` bits (onnxcomp/encoding.py), decoded by standard
ops that ONNX Runtime folds when it creates the session: the file shrinks to about bits/8 bytes per weight plus
the codebooks, and inference runs at dense speed.

- `granularity=auto` (default) gives each slice along the weight's first axis (the output channels of Conv, and
  of Gemm with transB) its own codebook where the codebooks cost at most a quarter of the indices; elsewhere
  (depthwise filters of 9 weights) the slices, each divided by its largest magnitude, share one codebook and
  keep one scale each (`scaled`). `row`, `scaled` and `tensor` (one codebook) force a choice. Channels whose
  ranges differ by orders of magnitude (BN-scaled filters) are where one codebook per tensor fails.
- Zero stays exactly zero: zeros (from `prune`) are not clustered, a bit mask places the others, and only those
  carry an index. A tensor with at most 2^bits distinct values is kept exactly.
- With calibration data (`importance=auto`), each weight's squared error is weighted by the energy E[x²] of the
  input it multiplies, measured on the data: clusters follow the weights whose errors reach the output.
- With calibration data (`correction`, on by default when there is data), each output unit's spread and mean on the data are restored to the
  unshared layer's, as re-estimating a BatchNormalization would: the spread through the unit's own codebook or
  scale (so the weight stays shared), the mean through the bias. It needs the units along the weight's first
  axis (Conv, Gemm with transB) and per-row or scaled codebooks.
- `encoding=dense` writes the shared values densely, for runtimes that do not fold constants.

Stats: the bytes of the dense weights, of the stored layout, and of the stored layout with its indices and masks
compressed by zlib (the entropy-coded size Deep Compression reports, as a figure, not as the file format).
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes.kmeans import kmeans_1d
from onnxcomp.passes.layers import WEIGHTED_OPS, WeightedLayer, input_statistics, prepare, select_layers
from onnxcomp.registry import register

ROW_CODEBOOK_SHARE = 0.25  # per-row codebooks are used where they cost at most this share of the index bytes


@dataclass(frozen=True)
class ShareConfig:
    bits: int = 5
    granularity: str = "auto"      # auto | row | scaled | tensor
    importance: str = "auto"       # auto | energy | none; auto: energy with calibration data
    ops: tuple[str, ...] = WEIGHTED_OPS
    include: tuple[str, ...] = ()  # shell patterns over node and weight names; empty: every layer
    exclude: tuple[str, ...] = ()
    min_size: int = 1024           # weights; smaller tensors are left as they are
    correction: bool | None = None  # restore each output unit's mean and spread; None: with calibration data
    samples: int = 128
    batch_size: int = 8
    encoding: str = "compact"      # compact | dense

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, not {self.bits}")
        if self.granularity not in ("auto", "row", "scaled", "tensor"):
            raise ValueError(f"granularity must be auto, row, scaled or tensor, not '{self.granularity}'")
        if self.importance not in ("auto", "energy", "none"):
            raise ValueError(f"importance must be auto, energy or none, not '{self.importance}'")
        unknown = [op for op in self.ops if op not in WEIGHTED_OPS]
        if unknown:
            raise ValueError(f"ops must be among {', '.join(WEIGHTED_OPS)}, not {', '.join(unknown)}")
        if self.encoding not in ("compact", "dense"):
            raise ValueError(f"encoding must be compact or dense, not '{self.encoding}'")
        if self.samples < 1 or self.batch_size < 1 or self.min_size < 0:
            raise ValueError("samples and batch-size must be at least 1, min-size at least 0")


@dataclass
class Clustered:
    values: np.ndarray     # the shared weight, in the weight's shape and dtype
    codebook: np.ndarray   # (K,) or (rows, K)
    scales: np.ndarray | None  # (rows,): the codebook is shared by rows scaled to the same range
    indices: np.ndarray    # one per stored element: the non-zero ones when `sparse`, else all
    sparse: bool
    exact: bool            # no more distinct values than levels: nothing was approximated


@register
class Share(Pass):
    name = "share"
    summary = "weight sharing: k-means codebooks per channel or tensor, stored as codebook + packed indices"
    Config = ShareConfig

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration_data is None and (self.config.importance == "energy" or self.config.correction):
            raise PreconditionError("share: importance=energy and correction=true need calibration data: pass "
                                    "--calib-data, or use importance=none and correction=false")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        layers, skipped, stats = prepare(graph, lambda: _select(graph, config), ctx, self.name,
                                         config.encoding == "compact")
        if not layers:
            stats.update({"shared": 0, **{f"skipped:{k}": v for k, v in sorted(skipped.items())}})
            return PassResult(False, stats)
        importance = config.importance if config.importance != "auto" else \
            ("energy" if ctx.calibration_data is not None else "none")
        correct = ctx.calibration_data is not None if config.correction is None else config.correction
        statistics = _statistics(graph, layers, ctx, config) if importance == "energy" or correct else {}
        weights_of = _importances(layers, statistics) if importance == "energy" else {}
        names = graphs.Names(graph)
        totals = Counter()
        rows = []
        for layer in layers:
            clustered = cluster(layer.values, config.bits, config.granularity, weights_of.get(id(layer)))
            if correct:
                totals["corrected"] += _restore_units(layer, clustered, statistics[id(layer)], names)
            layer.weight.values = clustered.values
            dense_bytes = clustered.values.nbytes
            parts = _stored_parts(clustered, config.bits)
            stored = sum(p.nbytes for p in parts)
            totals.update({"dense_bytes": dense_bytes, "stored_bytes": stored,
                           "zlib_bytes": sum(len(zlib.compress(p.tobytes(), 9)) for p in parts),
                           "exact": int(clustered.exact)})
            if config.encoding == "compact":
                encoding.encode_codebook(graph, layer.weight, clustered.codebook, clustered.indices, config.bits,
                                         names, sparse=clustered.sparse, scales=clustered.scales)
            rows.append({"layer": layer.name, "op": layer.node.op, "weights": int(clustered.values.size),
                         "codebooks": 1 if clustered.codebook.ndim == 1 else int(clustered.codebook.shape[0]),
                         "zeros": round(float(np.mean(clustered.values == 0)), 4), "stored_bytes": stored})
        stats.update({"shared": len(layers), "bits": config.bits, "importance": importance,
                      "dense_bytes": totals["dense_bytes"], "stored_bytes": totals["stored_bytes"],
                      "stored_bytes_zlib": totals["zlib_bytes"], "kept_exact": totals["exact"],
                      "corrected": totals["corrected"]})
        stats.update({f"skipped:{k}": v for k, v in sorted(skipped.items())})
        return PassResult(True, stats, rows)


def _select(graph: gs.Graph, config: ShareConfig) -> tuple[list[WeightedLayer], Counter, list[str]]:
    return select_layers(graph, config.ops, include=config.include, exclude=config.exclude,
                         min_size=config.min_size, depthwise=True)


def cluster(weight: np.ndarray, bits: int, granularity: str = "auto",
            importance: np.ndarray | None = None) -> Clustered:
    """The weight with its non-zero values replaced by at most 2^bits shared values.

    `row`: one codebook per slice along the first axis. `scaled`: one codebook for the slices, each divided by
    its largest magnitude, and one scale per slice. `tensor`: one codebook. `auto`: `row` where its codebooks
    cost at most ROW_CODEBOOK_SHARE of the indices, else `scaled`.
    """
    levels = 2 ** bits
    present = weight != 0
    sparse = not present.all()
    rows = weight.shape[0] if weight.ndim >= 2 else 1
    stored = int(present.sum()) if sparse else weight.size
    if granularity == "auto":
        granularity = "row" if rows * levels * weight.itemsize <= ROW_CODEBOOK_SHARE * stored * bits / 8 else "scaled"
    by_row = weight.reshape(rows, -1)
    scales = None
    if granularity == "scaled":
        scales = np.abs(by_row).max(axis=1).astype(weight.dtype)
        scales[scales == 0] = 1
        by_row = by_row / scales[:, None]
    per_row = granularity == "row"
    slices = list(by_row) if per_row else [by_row.reshape(-1)]
    masks = list(present.reshape(rows, -1)) if per_row else [present.reshape(-1)]
    gains = [None] * len(slices) if importance is None else \
        (list(importance.reshape(rows, -1)) if per_row else [importance.reshape(-1)])
    codebooks, indices, shared, exact = [], [], [], True
    for values, mask, gain in zip(slices, masks, gains):
        centroids, index = kmeans_1d(values[mask], levels, None if gain is None else gain[mask])
        exact &= centroids.size == np.unique(values[mask]).size
        book = np.zeros(levels, dtype=weight.dtype)
        book[:centroids.size] = centroids.astype(weight.dtype)
        part = np.zeros(values.shape, dtype=weight.dtype)
        part[mask] = book[index]
        codebooks.append(book)
        indices.append(index)  # of the non-zero values, in order: of all values when none is zero
        shared.append(part)
    codebook = np.stack(codebooks) if per_row else codebooks[0]
    values = np.concatenate(shared).reshape(rows, -1)
    if scales is not None:
        values = values * scales[:, None]  # float32 products, as the decoding Mul computes them
    return Clustered(values.reshape(weight.shape), codebook, scales, np.concatenate(indices), sparse, exact)


def _restore_units(layer: WeightedLayer, clustered: Clustered, stats, names: graphs.Names) -> int:
    """Give each output unit back its spread and mean on calibration data, as prune's `channel` correction does;
    returns 1 when the layer was corrected.

    The spread is restored through the unit's own codebook (`row`) or scale (`scaled`), so the weight stays
    shared; that needs the units along the weight's first axis (Conv, Gemm with transB). The mean shift goes
    into the bias.
    """
    node = layer.node
    units_first = node.op == "Conv" or (node.op == "Gemm" and int(node.attrs.get("transB", 0)))
    if not units_first or layer.diagonal or (clustered.codebook.ndim == 1 and clustered.scales is None):
        return 0
    use_bias = layer.can_take_bias
    moment = stats.moment(centered=use_bias)
    original, shared = layer.rows().astype(np.float64), layer.rows(clustered.values).astype(np.float64)
    spread = ((original @ moment) * original).sum(axis=-1).reshape(-1)
    now = ((shared @ moment) * shared).sum(axis=-1).reshape(-1)
    factor = np.sqrt(np.where(now > 0, spread / np.maximum(now, 1e-30), 1.0)).astype(clustered.values.dtype)
    if clustered.scales is not None:
        clustered.scales = clustered.scales * factor
    else:
        clustered.codebook = clustered.codebook * factor[:, None]
    clustered.values = _decoded(clustered, layer.values.shape)
    if use_bias:
        mean = stats.mean
        corrected = layer.rows(clustered.values).astype(np.float64)
        layer.shift_bias(np.einsum("grd,gd->gr", original - corrected, mean).reshape(-1), names)
    return 1


def _decoded(clustered: Clustered, shape: tuple) -> np.ndarray:
    """The weight the layout gives: codebook values at the indices, times the scales, zeros where the mask says."""
    rows = shape[0] if len(shape) >= 2 else 1
    present = (clustered.values != 0).reshape(rows, -1) if clustered.sparse else \
        np.ones((rows, int(np.prod(shape)) // rows), dtype=bool)
    row_of = np.nonzero(present)[0]
    looked_up = clustered.codebook[row_of, clustered.indices] if clustered.codebook.ndim == 2 else \
        clustered.codebook[clustered.indices]
    if clustered.scales is not None:
        looked_up = looked_up * clustered.scales[row_of]
    values = np.zeros(present.shape, dtype=clustered.values.dtype)
    values[present] = looked_up
    return values.reshape(shape)


def _stored_parts(clustered: Clustered, bits: int) -> list[np.ndarray]:
    """The arrays the compact layout stores: codebook, packed indices, and the packed mask when sparse."""
    parts = [clustered.codebook, encoding.pack_indices(clustered.indices, bits)]
    if clustered.scales is not None:
        parts.append(clustered.scales)
    if clustered.sparse:
        parts.append(np.packbits(clustered.values.reshape(-1) != 0, bitorder="little"))
    return parts


def _statistics(graph: gs.Graph, layers: list[WeightedLayer], ctx: PassContext, config: ShareConfig) -> dict:
    """Each layer's input statistics on the calibration data, by id(layer)."""
    model = gs.export_onnx(graph, do_type_check=False)
    samples = min(config.samples, ctx.calibration_data.num_samples)
    statistics = input_statistics(model, layers, ctx.calibration_data, samples=samples,
                                  batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed)
    return {key: fit for key, (fit, _) in statistics.items()}


def _importances(layers: list[WeightedLayer], statistics: dict) -> dict[int, np.ndarray]:
    """For each layer, E[x²] of the input each weight multiplies, in the weight's shape."""
    result = {}
    for layer in layers:
        stats = statistics[id(layer)]
        second = stats.moment(centered=False)
        energy = second if layer.diagonal else np.einsum("gii->gi", second)
        if layer.diagonal:
            energy = np.repeat(energy, int(np.prod(layer.values.shape[2:])), axis=-1)
        rows = layer.rows()
        result[id(layer)] = layer.from_rows(np.broadcast_to(energy[:, None, :], rows.shape).copy())
    return result
