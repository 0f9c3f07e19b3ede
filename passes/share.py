"""share: weight sharing, each weight tensor's values replaced by at most 2^bits shared values found by k-means.

Before:
    x ─► Conv(W: 64×32×3×3 float32, 4 bytes per weight) ─► y
After (bits=5):
    W.codebook (32 values), W.scales (one per output channel), W.indices (5 bits per weight)
        ─► decoding ops ─► W ─► Conv(W, b') ─► y

The values are clustered with one-dimensional k-means (passes/kmeans.py: linear initialisation, deterministic),
and the tensor is stored as codebook + indices packed at `bits` bits (onnxcomp/encoding.py), decoded by standard
ops that ONNX Runtime folds when it creates the session: the file shrinks to about bits/8 bytes per weight plus
the codebooks, and inference runs at dense speed.

- Granularity: `row` gives each slice along the weight's first axis (the output channels of Conv, and of Gemm
  with transB) its own codebook; `scaled` divides each slice by its largest magnitude and gives the slices one
  codebook and one scale each (channels whose ranges differ by orders of magnitude, as BN-scaled and depthwise
  filters do, are where one codebook per tensor fails); `tensor` is one codebook. `auto` lets the allocation
  choose per layer, or without it takes `row` where its codebooks cost at most an eighth of the indices.
- Zero stays exactly zero. Where zeros are many (after `prune`), a bit mask places the non-zero values and only
  those carry an index; where they are few (a mask would cost more than it saves), the codebook keeps an exact
  0 entry. A tensor with at most 2^bits distinct values is kept exactly.
- Codebooks and scales are rounded to float16 precision (encoding.compact_table: at most 2^-10 of the table's
  largest value, far below the sharing's error) and stored in float16: 2 bytes per entry. A tensor kept
  exactly keeps its values.
- Bit allocation (`allocation=sensitivity`, the default with calibration data): every layer is clustered at
  1 … 8 bits and each granularity; its relative output error on the calibration data, times its gain (how much
  of it reaches the model's outputs, measured by running the model with the layer shared alone), against its
  stored bytes, gives each layer its options, and one option per layer is chosen with the least summed error
  within the budget (a multiple-choice knapsack, solved by dynamic programming: allocation.choose). The
  budget is `bits`/8 bytes per stored weight, codebooks and scales included, plus the mask: the file is at
  most what `bits` for every weight costs in indices alone, except after prune at about 1 bit, where zeros are
  always masked (so the budget is `bits` per kept weight plus the mask); it may be fractional (bits=2.5).
  `layer-bits=pattern:bits|…` fixes the bits of the layers a pattern matches.
- Importance (`importance=energy`, the default with data): each weight's squared error is weighted by the energy
  E[x²] of the input it multiplies, so clusters follow the weights whose errors reach the output.
- Error feedback (`feedback`, on with data): with the codebooks fixed, each weight's index is chosen column by
  column and the error of each choice is spread over the columns not yet chosen, so that the layer's output on
  the data is kept (GPTQ's updates with the codebook's values as the grid; layers.obs_sweep, shared with
  prune). H is damped by a share chosen on held-out calibration batches, as prune does. Needs the units along
  the weight's first axis (Conv, Gemm with transB); MatMul and ConvTranspose keep the nearest value.
- Restoration (`correction`, on with data): each output unit's spread and mean on the data are restored to the
  unshared layer's, as re-estimating a BatchNormalization would: the spread through the unit's own codebook or
  scale (so the weight stays shared), the mean through the bias. Same layers as error feedback, with `row` or
  `scaled` codebooks.
- Sequential (`sequential`, on with data): layers are shared in waves in graph order, and each wave's inputs are
  measured again on the model with the waves before it shared, next to the unshared model's. Each layer is then
  re-solved to give the unshared layer's outputs from the inputs it now gets (W̃ = W E[x_ref xᵀ] E[x xᵀ]⁻¹, as
  prune's waves do), clustered, fed back and restored from there, so it takes back part of the error of the
  layers before it instead of passing it on (ResNet-20 at 2.8 bits: output SQNR 13.1 → 15.6 dB on held-out
  images). It costs one more pass over the calibration data in total (runner.PrefixRuns).
- Embedding tables (`tables=true`, the default): the constant [V, D] table of a Gather is shared too, at `bits`
  (the whole bits of a fractional budget, which the allocation spends on the layers), one codebook and a scale
  per row where `auto` (a vocabulary's rows differ many-fold in magnitude). In a BERT-family model the word
  table is most of the file (paraphrase-MiniLM-L3: 47 of 69 MB). With calibration data, the rows read in most
  samples ([CLS], [SEP], padding; `exact-rows=true`) stay exact: their error reaches every sentence alike
  (MiniLM's word table at 5 bits: sentence-embedding cosine 0.963, with those rows exact 0.99995).
- `encoding=dense` writes the shared values densely, for runtimes that do not fold constants.

Stats: the bytes of the dense weights, of the stored layout, and of the stored layout with its indices and masks
compressed by zlib (the entropy-coded size Deep Compression reports, as a figure, not as the file format), and
the mean index bits per stored weight. The per-layer table gives each layer's bits, codebooks and output SNR.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp import progress
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes.kmeans import SortedSlices
from onnxcomp.passes.allocation import ModelOutputs, choose
from onnxcomp.passes.layers import (CHECK_EVERY, UNCHECKED_DAMPING, WEIGHTED_OPS, WeightedLayer, damping_errors,
                                    held_out_samples, input_statistics, kept_exact_rows, layer_waves, obs_sweep,
                                    output_error, prepare, select_layers, snr_db, solved, spread_scale, warn)
from onnxcomp.runner import PrefixRuns
from onnxcomp.registry import register

LOST_SNR_DB = 6.0  # a held-out output SNR below this (error energy over a quarter of the signal's) gets a warning
PROBE_SAMPLES = 32  # calibration samples on which each layer's effect on the model's outputs is measured
ROW_CODEBOOK_SHARE = 0.125  # per-row codebooks are used where they cost at most this share of the index bytes
TABLE_ENTRY_BYTES = 2  # a codebook entry or scale as stored: float16 (encoding.compact_table)


@dataclass(frozen=True)
class ShareConfig:
    bits: float = 5                # index bits per weight; with allocation=sensitivity, the budget's average
    allocation: str = "auto"       # auto | uniform | sensitivity; auto: sensitivity with calibration data
    layer_bits: tuple[str, ...] = ()  # "pattern:bits" items: the bits of the layers a pattern matches, fixed
    granularity: str = "auto"      # auto | row | scaled | tensor
    importance: str = "auto"       # auto | energy | none; auto: energy with calibration data
    ops: tuple[str, ...] = WEIGHTED_OPS
    include: tuple[str, ...] = ()  # shell patterns over node and weight names; empty: every layer
    exclude: tuple[str, ...] = ()
    min_size: int = 1024           # weights; smaller tensors are left as they are
    correction: str = "auto"      # auto | channel | none: restore each output unit's mean and spread, as prune's
                                   # channel correction; auto: channel with calibration data
    feedback: str = "auto"         # auto | true | false: choose indices with error feedback (GPTQ-style); auto:
                                   # with calibration data
    samples: int = 128
    batch_size: int = 8
    sequential: bool = True        # with data: measure each layer's inputs after the layers before it are shared
    encoding: str = "compact"      # compact | dense
    tables: bool = True            # embedding tables (Gather on a constant [V, D]) too, at `bits`
    exact_rows: bool = True        # with calibration data: table rows read in most samples kept exact, as in int4

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, not {self.bits}")
        if float(self.bits).is_integer():
            object.__setattr__(self, "bits", int(self.bits))
        elif self.allocation == "uniform":
            raise ValueError(f"bits={self.bits} is an average over layers: it needs allocation=sensitivity; "
                             "uniform sharing takes whole bits")
        if self.allocation not in ("auto", "uniform", "sensitivity"):
            raise ValueError(f"allocation must be auto, uniform or sensitivity, not '{self.allocation}'")
        for item in self.layer_bits:
            pattern, _, bits = item.rpartition(":")
            if not pattern or not bits.strip().isdigit() or not 1 <= int(bits) <= 8:
                raise ValueError(f"layer-bits items are pattern:bits with bits from 1 to 8, not '{item}'")
        if self.granularity not in ("auto", "row", "scaled", "tensor"):
            raise ValueError(f"granularity must be auto, row, scaled or tensor, not '{self.granularity}'")
        if self.importance not in ("auto", "energy", "none"):
            raise ValueError(f"importance must be auto, energy or none, not '{self.importance}'")
        unknown = [op for op in self.ops if op not in WEIGHTED_OPS]
        if unknown:
            raise ValueError(f"ops must be among {', '.join(WEIGHTED_OPS)}, not {', '.join(unknown)}")
        if self.correction not in ("auto", "channel", "none"):
            raise ValueError(f"correction must be auto, channel or none, not '{self.correction}'")
        if self.feedback not in ("auto", "true", "false"):
            raise ValueError(f"feedback must be auto, true or false, not '{self.feedback}'")
        if self.encoding not in ("compact", "dense"):
            raise ValueError(f"encoding must be compact or dense, not '{self.encoding}'")
        if self.samples < 1 or self.batch_size < 1 or self.min_size < 0:
            raise ValueError("samples and batch-size must be at least 1, min-size at least 0")

    @property
    def fixed_bits(self) -> dict[str, int]:
        """layer_bits as {pattern: bits}."""
        return {item.rpartition(":")[0]: int(item.rpartition(":")[2]) for item in self.layer_bits}


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
        config = self.config
        wants = [name for name, wanted in (("importance=energy", config.importance == "energy"),
                                           ("correction=channel", config.correction == "channel"),
                                           ("feedback=true", config.feedback == "true"),
                                           ("allocation=sensitivity", config.allocation == "sensitivity"))
                 if wanted]
        if wants and ctx.calibration_data is None:
            raise PreconditionError(f"share: {' and '.join(wants)} need{'s' if len(wants) == 1 else ''} calibration "
                                    "data: give calib_data=, or use importance=none, correction=none, "
                                    "feedback=false and allocation=uniform")
        if isinstance(config.bits, float) and ctx.calibration_data is None:
            raise PreconditionError(f"share: bits={config.bits} is an average that the bit allocation spends over "
                                    "the layers, measured on calibration data: give calib_data=, or whole bits")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        layers, skipped, stats = prepare(graph, lambda: _select(graph, config), ctx, self.name,
                                         config.encoding == "compact")
        if not layers:
            stats.update({"shared": 0, **{f"skipped:{k}": v for k, v in sorted(skipped.items())}})
            return PassResult(False, stats)
        tables = [layer for layer in layers if layer.is_table]
        layers = [layer for layer in layers if not layer.is_table]
        table_bits = max(1, math.floor(config.bits))  # a fractional budget's bits are spent on the layers
        exact_rows = kept_exact_rows(graph, tables, ctx, self.name, stats, enabled=config.exact_rows,
                                     samples=config.samples, batch_size=config.batch_size)
        with_data = ctx.calibration_data is not None and bool(layers)  # tables are shared without data
        importance = config.importance if config.importance != "auto" else ("energy" if with_data else "none")
        correct = with_data if config.correction == "auto" else config.correction == "channel"
        allocation = config.allocation if config.allocation != "auto" else ("sensitivity" if with_data else "uniform")
        feedback = with_data if config.feedback == "auto" else config.feedback == "true"
        statistics, fits, held_out = _statistics(graph, layers, ctx, config) if with_data else ({}, {}, None)
        weights_of = _importances(layers, statistics) if importance == "energy" else {}
        fixed = _fixed_bits(layers + tables, config)
        plans = {id(layer): Choice(fixed.get(id(layer), config.bits), config.granularity) for layer in layers}
        if allocation == "sensitivity":
            free = [layer for layer in layers if id(layer) not in fixed]
            plans.update(_allocate_bits(graph, free, statistics, weights_of, ctx, config, correct))

        # all at once only where feedback's damping is chosen on them; else one layer at a time, each let go once
        # stored (together they held three times the weights)
        clustered_of = {id(layer): _clustering(layer, plans[id(layer)], None, weights_of, importance)
                        for layer in layers} if feedback and held_out is not None else {}
        if feedback:
            if held_out is None:
                stats["damping"] = UNCHECKED_DAMPING
            else:
                errors = _damping_errors(graph, layers, clustered_of, fits, held_out, ctx, config, correct)
                stats["damping"] = min(errors, key=errors.get)
                stats["held_out_snr_db"] = round(float(snr_db(errors[stats["damping"]])), 1)
                if stats["held_out_snr_db"] < LOST_SNR_DB:
                    warn(stats, ctx, self.name, f"the model's outputs on held-out calibration samples are at "
                         f"{stats['held_out_snr_db']} dB SNR, largely lost at bits={config.bits}: raise bits, "
                         "or heal the model (the heal pass, or distill --heal)")
        names = graphs.Names(graph)
        totals = Counter()
        rows: dict[int, dict] = {}
        damping = feedback and stats["damping"]
        sequential = config.sequential and with_data and (feedback or correct)
        with _Waves(graph, layers, ctx, config, sequential) as waves:
            for wave in waves:
                for index in wave:
                    layer = layers[index]
                    stats_of = waves.statistics(layer, statistics)
                    found = clustered_of.pop(id(layer), None)
                    target = _target(layer, stats_of, damping or UNCHECKED_DAMPING, correct)
                    if found is None or target is not None:
                        found = _clustering(layer, plans[id(layer)], stats_of, weights_of, importance, target)
                    rows[index] = self._share_layer(graph, layer, found, stats_of, damping, correct, plans[id(layer)],
                                                    target, names, totals)
        rows = [rows[index] for index in range(len(layers))]
        for table in tables:
            rows.append(_share_table(graph, table, fixed.get(id(table), table_bits), config, names, totals,
                                     exact_rows.get(id(table.node), [])))
        if tables:
            stats["tables"] = len(tables)
            stats["exact_rows"] = sum(len(found) for found in exact_rows.values())
        stats.update({"shared": len(layers) + len(tables), "bits": config.bits, "allocation": allocation,
                      "mean_bits": round(totals["index_bits"] / max(totals["indices"], 1), 3),
                      "importance": importance, "dense_bytes": totals["dense_bytes"],
                      "stored_bytes": totals["stored_bytes"], "stored_bytes_zlib": totals["zlib_bytes"],
                      "kept_exact": totals["exact"], "corrected": totals["corrected"]})
        stats.update({f"skipped:{k}": v for k, v in sorted(skipped.items())})
        return PassResult(True, stats, rows)

    def _share_layer(self, graph: gs.Graph, layer: WeightedLayer, found: Clustered, stats_of, damping, correct: bool,
                     plan: "Choice", target: np.ndarray | None, names: graphs.Names, totals: Counter) -> dict:
        """Finish one layer's clustering, put it in the graph, and return its report row."""
        clustered, bias_shift = _finished(layer, found, stats_of, damping, correct, target)
        totals["corrected"] += int(correct and _restorable(layer, clustered))
        row = _row(layer, clustered, plan.bits)
        if stats_of is not None:
            row["output_snr_db"] = round(float(snr_db(_error(layer, clustered, stats_of, correct))), 1)
        if not math.isnan(plan.gain):
            row["output_gain"] = round(plan.gain, 3)
        if bias_shift is not None:
            layer.shift_bias(bias_shift, names)
        return {**row, "stored_bytes": _store(graph, layer, clustered, plan.bits, self.config, names, totals)}


class _Waves:
    """The layers' positions in the order they are shared: with `sequential`, in waves (layers.layer_waves), the
    input statistics of every wave after the first measured again on the model with the waves before it shared,
    next to the unshared model's (cross statistics: each layer is then fitted to give the unshared layer's
    outputs from the inputs it now gets); otherwise one wave of every layer, on the unshared model's
    statistics."""

    def __init__(self, graph: gs.Graph, layers: list[WeightedLayer], ctx: PassContext, config: ShareConfig,
                 sequential: bool):
        self.graph, self.layers, self.ctx, self.config = graph, layers, ctx, config
        self.order = layer_waves(graph, layers) if sequential else [list(range(len(layers)))]
        self.measured: dict[int, object] = {}
        self.unshared = None

    def __enter__(self) -> "_Waves":
        if len(self.order) > 1:
            self.unshared = graphs.runnable(self.graph)  # on disk for a large model: not a copy in memory
            self.reference = self.unshared.__enter__()
            samples = min(self.config.samples, self.ctx.calibration_data.num_samples)
            self.prefixes = [PrefixRuns(self.ctx.calibration_data, samples, self.config.batch_size,
                                        provider=self.ctx.provider, role="the model for layer statistics")
                             for _ in range(2)]
        return self

    def __exit__(self, *exc) -> None:
        if self.unshared is not None:
            self.unshared.__exit__(*exc)

    def __iter__(self):
        for number, wave in enumerate(progress.each(self.order, "sharing", unit="wave",
                                                    show=None if len(self.order) > 1 else False)):
            if number > 0:
                self._measure([self.layers[index] for index in wave])
            yield wave

    def _measure(self, layers: list[WeightedLayer]) -> None:
        config, ctx = self.config, self.ctx
        with graphs.runnable(self.graph) as model:
            measured = input_statistics(model, layers, ctx.calibration_data,
                                        samples=min(config.samples, ctx.calibration_data.num_samples),
                                        batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed,
                                        reference=self.reference, prefixes=self.prefixes)
        self.measured.update({key: fit for key, (fit, _) in measured.items()})

    def statistics(self, layer: WeightedLayer, unshared: dict):
        """The layer's input statistics: measured in its wave, or the unshared model's (None without data)."""
        return self.measured.get(id(layer), unshared.get(id(layer)))


def _target(layer: WeightedLayer, stats, damping: float, correct: bool) -> np.ndarray | None:
    """The dense weight that best gives the unshared layer's outputs from the inputs the layer gets now (its rows),
    zeros kept zero; None where the layer's inputs are the unshared model's (nothing to re-solve)."""
    if stats is None or stats.reference is None or layer.diagonal:
        return None
    use_bias = correct and layer.can_take_bias
    rows = layer.rows().astype(np.float64)
    target, _ = solved(layer, rows, stats, use_bias, damping, stats.moment(centered=use_bias),
                       stats.cross_moment(centered=use_bias))
    return np.where(rows == 0, 0.0, target)


def _clustering(layer: WeightedLayer, plan: "Choice", stats, weights_of: dict, importance: str,
                target: np.ndarray | None = None) -> Clustered:
    """The layer's weight (or its re-solved `target` rows) clustered at the plan's bits and granularity, each
    weight's error weighted by its input's energy on `stats` where given, else as `weights_of` says."""
    weights = layer.values if target is None else layer.from_rows(target).astype(layer.values.dtype)
    if stats is not None and importance == "energy":
        weights_of = _importances([layer], {id(layer): stats})
    return cluster(weights, plan.bits, plan.granularity, weights_of.get(id(layer)))


@dataclass
class Choice:
    """How one layer is shared."""
    bits: int
    granularity: str
    gain: float = math.nan  # relative error of the model's outputs per unit of the layer's own


def _fixed_bits(layers: list[WeightedLayer], config: ShareConfig) -> dict[int, int]:
    """The bits `layer_bits` fixes, by id(layer): the first pattern matching the node or weight name wins."""
    fixed = {}
    for layer in layers:
        for pattern, bits in config.fixed_bits.items():
            if any(name and fnmatch.fnmatchcase(name, pattern) for name in (layer.node.name, layer.weight.name)):
                fixed[id(layer)] = bits
                break
    return fixed


def _allocate_bits(graph: gs.Graph, layers: list[WeightedLayer], statistics: dict, weights_of: dict,
                   ctx: PassContext, config: ShareConfig, correct: bool) -> dict[int, Choice]:
    """Bits and granularity per layer, within the bytes that `bits` for every layer would store, spending them
    where the model's output error per byte saved is highest.

    Each layer is clustered at every bits (and, with granularity=auto, as `row`, `scaled` and `tensor`); its relative
    output error on calibration data, times its gain (measured by sharing the layer alone at `bits` and running
    the model), against its stored bytes, are the options the allocation chooses from.
    """
    if not layers:
        return {}
    granularities = ("row", "scaled", "tensor") if config.granularity == "auto" else (config.granularity,)
    probe = ModelOutputs(graph, ctx, ctx.calibration_data, min(PROBE_SAMPLES, config.samples,
                                                                ctx.calibration_data.num_samples), config.batch_size,
                         probes=len(layers))
    options, budget, gains = [], 0.0, []
    for layer in progress.each(layers, "sensitivity", unit="layer"):
        stats = statistics[id(layer)]
        error_of = _errors(layer, stats, correct)
        candidates = []  # (stored bytes, relative error, Choice)
        sorted_once: dict = {}
        for bits in range(1, 9):
            for granularity in granularities:
                clustered = cluster(layer.values, bits, granularity, weights_of.get(id(layer)), sorted_once)
                if correct:
                    clustered, _, _ = _restored(layer, clustered, stats)
                candidates.append((sum(p.nbytes for p in _stored_parts(clustered, bits)), error_of(clustered),
                                   Choice(bits, granularity)))
        uniform = cluster(layer.values, round(config.bits), config.granularity, weights_of.get(id(layer)),
                          sorted_once)
        budget += uniform.indices.size * config.bits / 8 + _mask_bytes(uniform)
        if correct:
            uniform, bias_shift, _ = _restored(layer, uniform, stats)
        else:
            bias_shift = None
        own = error_of(uniform)
        gain = probe.relative_error([(layer, uniform.values, bias_shift)]) / own if own > 0 else 1.0
        gains.append(gain)
        options.append(candidates)
    picked = choose([np.array([c[0] for c in candidates], dtype=np.float64) for candidates in options],
                    [np.array([c[1] * gain for c in candidates]) for candidates, gain in zip(options, gains)], budget)
    choices = {}
    for layer, candidates, index, gain in zip(layers, options, picked, gains):
        choice = candidates[index][2]
        choice.gain = float(gain)
        choices[id(layer)] = choice
    return choices


def _select(graph: gs.Graph, config: ShareConfig) -> tuple[list[WeightedLayer], Counter, list[str]]:
    return select_layers(graph, config.ops, include=config.include, exclude=config.exclude,
                         min_size=config.min_size, depthwise=True, tables=config.tables)


def _store(graph: gs.Graph, layer: WeightedLayer, clustered: Clustered, bits: int, config: ShareConfig,
           names: graphs.Names, totals: Counter) -> int:
    """Put the shared values in the graph, in the compact layout unless encoding=dense; count them in `totals`;
    return the bytes the compact layout stores."""
    layer.weight.values = clustered.values
    parts = _stored_parts(clustered, bits)
    stored = sum(p.nbytes for p in parts)
    totals.update({"dense_bytes": clustered.values.nbytes, "stored_bytes": stored,
                   "zlib_bytes": sum(len(zlib.compress(p.tobytes(), 9)) for p in parts),
                   "exact": int(clustered.exact), "index_bits": bits * clustered.indices.size,
                   "indices": clustered.indices.size})
    if config.encoding == "compact":
        encoding.encode_codebook(graph, layer.weight, clustered.codebook, clustered.indices, bits, names,
                                 sparse=clustered.sparse, scales=clustered.scales)
    return stored


def _share_table(graph: gs.Graph, table: WeightedLayer, bits: int, config: ShareConfig, names: graphs.Names,
                 totals: Counter, exact: list[int]) -> dict:
    """Share an embedding table's values: one row per token, so `auto` granularity gives its rows, whose
    magnitudes differ many-fold across a vocabulary, one codebook and a scale each. A row has no input to weigh
    its errors by and no bias or spread to restore; the rows in `exact` are written back as they were, by a
    ScatterND after the decoding that ONNX Runtime folds with it. Its report row."""
    original = table.values[exact]
    clustered = cluster(table.values, bits, config.granularity)
    stored = _store(graph, table, clustered, bits, config, names, totals)
    if exact and config.encoding == "dense":
        values = table.values.copy()
        values[exact] = original
        table.weight.values = values
    elif exact:
        decoded = table.node.inputs[0]
        restored = gs.Variable(names.new(f"{decoded.name}.exact"))
        positions = names.constant(f"{decoded.name}.exact_rows", np.array(exact, np.int64)[:, None])
        graph.nodes.append(gs.Node("ScatterND", names.new(f"{decoded.name}_exact_rows"),
                                   inputs=[decoded, positions, names.constant(f"{decoded.name}.exact_values",
                                                                              original)], outputs=[restored]))
        table.node.inputs[0] = restored
        stored += original.nbytes + positions.values.nbytes
        totals["stored_bytes"] += original.nbytes + positions.values.nbytes
    return {**_row(table, clustered, bits), "exact_rows": len(exact), "stored_bytes": stored}


def _row(layer: WeightedLayer, clustered: Clustered, bits: int) -> dict:
    """The start of a layer's report row."""
    return {"layer": layer.name, "op": layer.node.op, "weights": int(clustered.values.size), "bits": bits,
            "codebooks": 1 if clustered.codebook.ndim == 1 else int(clustered.codebook.shape[0]),
            "zeros": round(float(np.mean(clustered.values == 0)), 4)}


def cluster(weight: np.ndarray, bits: int, granularity: str = "auto",
            importance: np.ndarray | None = None, sorted_once: dict | None = None) -> Clustered:
    """The weight with its non-zero values replaced by at most 2^bits shared values.

    `row`: one codebook per slice along the first axis. `scaled`: one codebook for the slices, each divided by
    its largest magnitude, and one scale per slice. `tensor`: one codebook. `auto`: `row` where its codebooks
    cost at most ROW_CODEBOOK_SHARE of the indices, else `scaled`. `sorted_once`, a dict kept by the caller
    across calls for the same weight and importance, keeps the sorted values for the other bits.
    """
    sorted_once = {} if sorted_once is None else sorted_once
    levels = 2 ** bits
    zeros = weight == 0
    # a bit mask over all weights pays for itself when it saves more index bits than it costs; otherwise zeros
    # keep an exact 0 entry in the codebook of the slices that have them. At 1 bit that entry would leave a
    # single value for every non-zero weight, so zeros are masked there whatever the mask costs
    masked = bool(zeros.any()) and (int(zeros.sum()) * bits > weight.size or bits == 1)
    rows = weight.shape[0] if weight.ndim >= 2 else 1
    stored = weight.size - int(zeros.sum()) if masked else weight.size
    if granularity == "auto":
        granularity = auto_granularity(rows, stored, bits)
    by_row = weight.reshape(rows, -1)
    scales = None
    if granularity == "scaled":
        scales = np.abs(by_row).max(axis=1).astype(weight.dtype)
        scales[scales == 0] = 1
        by_row = by_row / scales[:, None]
    per_row = granularity == "row"
    slices = list(by_row) if per_row else [by_row.reshape(-1)]
    zero_slices = list(zeros.reshape(rows, -1)) if per_row else [zeros.reshape(-1)]
    gains = [None] * len(slices) if importance is None else \
        (list(importance.reshape(rows, -1)) if per_row else [importance.reshape(-1)])
    # entry 0 of a slice's codebook is the exact zero where the slice has zeros and no mask
    reserves = [int(not masked and zero.any()) for zero in zero_slices]
    groups = {}  # reserve → (the slices with it, their non-zero values sorted)
    for reserve in (0, 1):  # slices with a reserved entry get one centroid less
        chosen = [i for i, r in enumerate(reserves) if r == reserve]
        if (granularity, tuple(chosen)) not in sorted_once:
            sorted_once[granularity, tuple(chosen)] = SortedSlices(
                [slices[i][~zero_slices[i]] for i in chosen],
                None if importance is None else [gains[i][~zero_slices[i]] for i in chosen])
        groups[reserve] = chosen, sorted_once[granularity, tuple(chosen)]
    # nothing was approximated: every slice has no more distinct non-zero values than its centroids
    exact = all(bool(np.all(values.distinct <= levels - reserve)) for reserve, (_, values) in groups.items())
    codebooks, indices = [], []
    for reserve, (chosen, values) in groups.items():
        found = values.kmeans(levels - reserve)
        for i, (centroids, index) in zip(chosen, found):
            entries = np.concatenate([np.zeros(reserve), centroids]).astype(weight.dtype)
            book = np.full(levels, entries[-1] if entries.size else 0, dtype=weight.dtype)  # unused: repeat one
            book[:entries.size] = entries
            # zeros: entry 0, which is 0 when reserved; the smallest integers that hold every index (int64 took
            # twice a float32 weight's memory)
            full = np.zeros(slices[i].size, dtype=np.min_scalar_type(levels - 1))
            full[~zero_slices[i]] = index + reserve
            codebooks.append((i, book))
            indices.append((i, full))
    codebooks = [book for _, book in sorted(codebooks, key=lambda item: item[0])]
    indices = [full for _, full in sorted(indices, key=lambda item: item[0])]
    codebook = np.stack(codebooks) if per_row else codebooks[0]
    index = np.stack(indices) if per_row else indices[0].reshape(rows, -1)
    return _assemble(codebook, scales, index, zeros.reshape(rows, -1), masked, exact, weight.shape)


def _assemble(codebook: np.ndarray, scales: np.ndarray | None, index: np.ndarray, zeros: np.ndarray, masked: bool,
              exact: bool, shape: tuple) -> Clustered:
    """The Clustered weight from every element's codebook index (rows, row size); `zeros` stay zero. In the
    masked layout only the elements that decode to non-zero keep an index: a value whose centroid is exactly
    zero joins the zeros of the mask."""
    rows = index.shape[0]
    if not exact:  # an exactly kept tensor keeps its values
        codebook = encoding.compact_table(codebook)
        scales = None if scales is None else encoding.compact_table(scales)
    looked_up = codebook[np.arange(rows)[:, None], index] if codebook.ndim == 2 else codebook[index]
    if scales is not None:
        looked_up = looked_up * scales[:, None]  # float32 products, as the decoding Mul computes them
    values = np.where(zeros, 0, looked_up).astype(codebook.dtype)
    kept = values != 0 if masked else np.ones(values.shape, dtype=bool)
    return Clustered(values.reshape(shape), codebook, scales, index[kept], masked, exact)


def auto_granularity(rows: int, stored: int, bits: int) -> str:
    """`row` where one codebook per row costs at most ROW_CODEBOOK_SHARE of the `stored` indices, else `scaled`."""
    return "row" if rows * 2 ** bits * TABLE_ENTRY_BYTES <= ROW_CODEBOOK_SHARE * stored * bits / 8 else "scaled"


def _restored(layer: WeightedLayer, clustered: Clustered, stats) -> tuple[Clustered, np.ndarray | None, bool]:
    """(clustered with each output unit's spread on calibration data restored, the bias shift that restores its
    mean or None, whether the layer could be restored), as prune's `channel` correction does.

    The spread is restored through the unit's own codebook (`row`) or scale (`scaled`), so the weight stays
    shared; that needs the units along the weight's first axis (Conv, Gemm with transB). The mean shift goes
    into the bias.
    """
    if not _restorable(layer, clustered):
        return clustered, None, False
    use_bias = layer.can_take_bias
    reference = stats.reference or stats  # the unshared layer's inputs, where they differ from its inputs now
    original, shared = layer.rows().astype(np.float64), layer.rows(clustered.values).astype(np.float64)
    factor = spread_scale(layer, original, reference.moment(centered=use_bias), shared,
                          stats.moment(centered=use_bias)).reshape(-1).astype(clustered.values.dtype)
    compact = (lambda table: table) if clustered.exact else encoding.compact_table
    if clustered.scales is not None:
        restored = replace(clustered, scales=compact(clustered.scales * factor))
    else:
        restored = replace(clustered, codebook=compact(clustered.codebook * factor[:, None]))
    restored.values = _decoded(restored, layer.values.shape)
    if not use_bias:
        return restored, None, True
    corrected = layer.rows(restored.values).astype(np.float64)
    shift = np.einsum("grd,gd->gr", original, reference.mean) - np.einsum("grd,gd->gr", corrected, stats.mean)
    return restored, shift.reshape(-1), True


def _error_feedback(layer: WeightedLayer, clustered: Clustered, stats, damping: float, use_bias: bool,
                    target: np.ndarray | None = None) -> Clustered:
    """The same codebooks with each weight's index chosen column by column, the error of each choice spread over
    the columns not yet chosen so that the layer's output on calibration data is kept (layers.obs_sweep: GPTQ's
    updates, here rounding to the codebook's values instead of a uniform grid), starting from the `target` rows
    where given (the re-solved weight), else the layer's. Zeros stay zero. Needs the units along the weight's
    first axis."""
    rows = layer.rows().astype(np.float64) if target is None else target
    groups, units, _ = rows.shape
    present = rows != 0
    book = clustered.codebook.reshape(-1, clustered.codebook.shape[-1]).astype(np.float64)
    allowed = np.broadcast_to(book, (groups * units, book.shape[1])).copy()
    if clustered.scales is not None:
        allowed *= clustered.scales.astype(np.float64)[:, None]
    allowed = allowed.reshape(groups, units, -1)
    moment = stats.moment(centered=use_bias)
    _, upper = solved(layer, rows, stats, use_bias, damping, moment, stats.cross_moment(centered=use_bias))
    chosen = np.zeros(rows.shape, dtype=np.int64)
    visited = 0

    def nearest(block: np.ndarray, diagonal: np.ndarray):
        nonlocal visited
        first, visited = visited, visited + block.shape[-1]

        def round_column(values: np.ndarray, column: np.ndarray) -> np.ndarray:
            index = np.abs(values[:, :, None] - allowed).argmin(axis=-1)
            chosen[:, :, first + column] = index
            return np.where(present[:, :, first + column],
                            np.take_along_axis(allowed, index[:, :, None], axis=-1)[..., 0], 0.0)
        return round_column

    obs_sweep(rows, upper, nearest)
    shape = clustered.values.shape
    index = layer.from_rows(chosen).reshape(shape[0] if len(shape) >= 2 else 1, -1)
    zeros = (layer.values == 0).reshape(index.shape)
    return _assemble(clustered.codebook, clustered.scales, np.where(zeros, 0, index), zeros, clustered.sparse,
                     clustered.exact, shape)


def _finished(layer: WeightedLayer, clustered: Clustered, stats, damping: float | bool,
              correct: bool, target: np.ndarray | None = None) -> tuple[Clustered, np.ndarray | None]:
    """The clustered layer with its indices chosen with error feedback (when `damping`; from the `target` rows
    where given) and its units restored (when `correct`), and the bias shift that restoring their means asks
    for."""
    if damping and _restorable(layer, clustered):
        clustered = _error_feedback(layer, clustered, stats, float(damping), correct and layer.can_take_bias,
                                    target)
    if not correct:
        return clustered, None
    clustered, bias_shift, _ = _restored(layer, clustered, stats)
    return clustered, bias_shift


def _damping_errors(graph: gs.Graph, layers: list[WeightedLayer], clustered_of: dict, fits: dict, held_out,
                    ctx: PassContext, config: ShareConfig, correct: bool) -> dict[float, float]:
    """For each candidate damping, the relative error of the model's outputs on the held-out calibration
    samples, with every layer's indices chosen and units restored on the other samples."""
    outputs = ModelOutputs(graph, ctx, held_out, held_out.num_samples, config.batch_size)

    def error_of(damping: float) -> float:
        changes = []
        for layer in layers:
            clustered, bias_shift = _finished(layer, clustered_of[id(layer)], fits[id(layer)], damping, correct)
            changes.append((layer, clustered.values, bias_shift))
        return outputs.relative_error(changes)

    return damping_errors(error_of)


def _restorable(layer: WeightedLayer, clustered: Clustered) -> bool:
    node = layer.node
    units_first = node.op == "Conv" or (node.op == "Gemm" and int(node.attrs.get("transB", 0)))
    return units_first and not layer.diagonal and (clustered.codebook.ndim == 2 or clustered.scales is not None)


def _error(layer: WeightedLayer, clustered: Clustered, stats, corrected: bool) -> float:
    """The layer's relative output error on calibration data with the shared weight (after restoration, the
    bias absorbing the mean shift when `corrected`)."""
    return _errors(layer, stats, corrected)(clustered)


def _errors(layer: WeightedLayer, stats, corrected: bool):
    """_error of the layer as a function of the clustered weight, the unshared layer's terms computed once."""
    rows = layer.rows().astype(np.float64)
    measures = {}

    def error(clustered: Clustered) -> float:
        use_bias = corrected and layer.can_take_bias and _restorable(layer, clustered)
        if use_bias not in measures:
            measures[use_bias] = output_error(layer, rows, stats, use_bias)
        return measures[use_bias](layer.rows(clustered.values).astype(np.float64))

    return error


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


def _mask_bytes(clustered: Clustered) -> int:
    return (clustered.values.size + 7) // 8 if clustered.sparse else 0


def _stored_parts(clustered: Clustered, bits: int) -> list[np.ndarray]:
    """The arrays the compact layout stores: codebook, packed indices, and the packed mask when sparse."""
    parts = [encoding.stored_table(clustered.codebook), encoding.pack_indices(clustered.indices, bits)]
    if clustered.scales is not None:
        parts.append(encoding.stored_table(clustered.scales))
    if clustered.sparse:
        parts.append(encoding.pack_mask(clustered.values != 0))
    return parts


def _statistics(graph: gs.Graph, layers: list[WeightedLayer], ctx: PassContext, config: ShareConfig):
    """(each layer's input statistics on the calibration data, the same without the held-out batches, the
    held-out samples or None), the statistics by id(layer)."""
    samples = min(config.samples, ctx.calibration_data.num_samples)
    with graphs.runnable(graph) as model:
        statistics = input_statistics(model, layers, ctx.calibration_data, samples=samples,
                                      batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed,
                                      check_every=CHECK_EVERY)
    every = {key: fit + check if check is not None else fit for key, (fit, check) in statistics.items()}
    fits = {key: fit for key, (fit, _) in statistics.items()}
    return every, fits, held_out_samples(ctx.calibration_data, samples, config.batch_size)


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
