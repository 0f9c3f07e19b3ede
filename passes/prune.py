"""prune: zero the least important weights of Conv, ConvTranspose, Gemm and MatMul, and store them compactly.

Before:
    x ─► Conv(W: 64×32×3×3 float, dense) ─► y
After (sparsity 0.5):
    W.mask (1 bit per weight), W.values (the 9216 weights kept) ─► decoding ops ─► W ─► Conv(W, b') ─► y

ONNX Runtime folds the decoding ops into the dense W when it creates the session (onnxcomp/encoding.py), so the
file shrinks to about (1 − s) × 4 + 0.125 bytes per weight and inference runs at dense speed.

What is pruned: the constant float weights of the layers in `ops`, except weights shared by several nodes,
depthwise convolutions (unless `depthwise`), and tensors under `min_size` weights: those are a small share of the
bytes and a large share of the error. `include` / `exclude` take shell patterns over node and weight names.
`sparsity` is the share of zeros over all pruned tensors together, reached exactly.

How many weights each layer loses (`allocation`):
- `uniform`: every tensor at the target sparsity (the default without calibration data);
- `global`: one magnitude threshold over all tensors;
- `sensitivity` (the default with calibration data): each layer's relative output error is measured on
  calibration data at sparsities 0, 10 … 90 %, and weighted by the layer's gain: how much relative error of the
  model's outputs one unit of the layer's own brings, measured by pruning the layer alone (a residual branch is
  diluted by its skip connection, the convolution opening a stage is not). The per-layer sparsities that reach
  the target with the least total are chosen: the lower convex hull of each curve, cheapest steps first.

What is done about the error (`correction`):
- `none`: the smallest magnitudes are zeroed (the default without calibration data);
- `channel`: the same, then each output unit's mean and spread on calibration data are restored to the unpruned
  layer's through a per-unit scale and the bias, as re-estimating a BatchNormalization would;
- `reconstruct` (the default with calibration data): the weights to zero are chosen and the kept ones re-solved
  so that the layer's output on calibration data is reproduced, min ‖W x − W' x‖² over the mask (optimal brain
  surgeon updates, column by column with a shared inverse Hessian, as in SparseGPT, Frantar & Alistarh 2023),
  then each unit's mean and spread are restored as with `channel`. H is damped by a share of its mean
  diagonal chosen on held-out calibration batches among layers.DAMPINGS: a few images of many classes need a large
  one (the fit tends to magnitude pruning), data that covers what the model sees a small one.
- With `sequential` (the default), layers are pruned in waves in graph order and each wave's inputs are
  measured again on the partly pruned model, next to the unpruned model's: the kept weights are solved to give
  the unpruned outputs from the inputs the layer now gets, W̃ = W E[x_ref xᵀ] E[x xᵀ]⁻¹, which also undoes
  the error of the layers before. It costs one more pair of calibration runs per wave.

Embedding tables (`tables=true`, the default): the constant [V, D] table of a Gather loses the `sparsity` share
of the smallest magnitudes of each row (a row is a token; one threshold for the whole table would empty the rows
of rare tokens). With calibration data, the rows read in most samples ([CLS], [SEP], padding; `exact-rows=true`)
stay whole: their error would reach every input alike. The layers' `sparsity` statistic counts the layers alone.

`encoding=dense` keeps the dense layout for runtimes that do not fold constants.

`structure=channel` removes whole channels instead, to `flops=F` (share of the MACs to keep) or `latency=R`
(ORT latency ratio at `batch`, timed by the pass; with it, whole residual blocks may go too, `depth=true` by
default): the model gets faster, not only smaller. See
passes/prune_channels.py (allocation, re-solved readers, latency search) and passes/channels.py (dependency
groups and graph surgery).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp import progress
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.runner import PrefixRuns
from onnxcomp.passes.allocation import ModelOutputs, allocate, round_to_total
from onnxcomp.passes.layers import (CHECK_EVERY, UNCHECKED_DAMPING, WEIGHTED_OPS, InputStatistics, layer_waves,
                                    WeightedLayer, damping_errors, expand_diagonal, held_out_samples, kept_exact_rows,
                                    input_statistics, obs_sweep, output_error, prepare, select_layers, snr_db,
                                    solved, unit_energy)
from onnxcomp.passes.prune_channels import prune_channels
from onnxcomp.registry import register

ALLOCATIONS = ("uniform", "global", "sensitivity")
STRUCTURES = ("element", "channel")
CORRECTIONS = ("none", "channel", "reconstruct")
LEVELS = np.round(np.arange(0.0, 0.91, 0.1), 2)  # sparsities at which each layer's sensitivity is measured
DAMPING = 0.01  # share of the mean diagonal added to H, as in OBS / SparseGPT: keeps the inverse well-posed
PROBE_SAMPLES = 32  # calibration samples on which each layer's effect on the model's outputs is measured
STACK_BYTES = 64 << 20  # rows swept together when one layer is pruned to several counts


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.5
    allocation: str = "auto"        # uniform | global | sensitivity; auto: sensitivity with calibration data
    correction: str = "auto"        # none | channel | reconstruct; auto: reconstruct with calibration data
    ops: tuple[str, ...] = WEIGHTED_OPS
    include: tuple[str, ...] = ()   # shell patterns over node and weight names; empty: every layer
    exclude: tuple[str, ...] = ()
    min_size: int = 1024            # weights; smaller tensors are left dense
    depthwise: bool = False         # prune depthwise convolutions too
    max_layer_sparsity: float = 0.95  # no layer loses more than this with sensitivity allocation
    samples: int = 128
    batch_size: int = 8
    sequential: bool = True         # measure each layer's inputs after the layers before it are pruned
    encoding: str = "compact"       # compact | dense, as in share
    structure: str = "element"      # element: single weights zeroed; channel: whole channels removed
    tables: bool = True             # embedding tables (Gather on a constant [V, D]) too, each row at `sparsity`
    exact_rows: bool = True         # with calibration data: table rows read in most samples left whole
    flops: float | None = None      # structure=channel: share of the MACs to keep, in (0, 1]
    latency: float | None = None    # structure=channel: ORT latency ratio to reach, measured at `batch`
    batch: int = 1                  # batch size at which latency is measured
    multiple: int | None = None     # kept channel counts are multiples of this in groups wider than it; None:
                                    # with latency, the CPU kernels' channel block (8 or 16); with flops, 8
    depth: bool | None = None       # structure=channel: remove whole residual blocks too; None: with `latency`

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be {' or '.join(STRUCTURES)}, not '{self.structure}'")
        for key in ("flops", "latency"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{key} must be in (0, 1], not {value}")
        if self.structure == "element" and (self.flops is not None or self.latency is not None):
            raise ValueError("flops and latency need structure=channel (element pruning takes sparsity)")
        if self.flops is not None and self.latency is not None:
            raise ValueError("structure=channel needs one of flops (share of FLOPs to keep) or latency "
                             "(latency ratio to reach), not both")
        if self.depth and self.latency is None:
            raise ValueError("depth=true needs latency= (the blocks to remove are chosen against measured "
                             "latency)")
        if self.batch < 1 or (self.multiple is not None and self.multiple < 1):
            raise ValueError("batch and multiple must be at least 1")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {self.sparsity}")
        if self.allocation not in ("auto",) + ALLOCATIONS:
            raise ValueError(f"allocation must be auto, {', '.join(ALLOCATIONS)}, not '{self.allocation}'")
        if self.correction not in ("auto",) + CORRECTIONS:
            raise ValueError(f"correction must be auto, {', '.join(CORRECTIONS)}, not '{self.correction}'")
        unknown = [op for op in self.ops if op not in WEIGHTED_OPS]
        if unknown:
            raise ValueError(f"ops must be among {', '.join(WEIGHTED_OPS)}, not {', '.join(unknown)}")
        if self.encoding not in ("compact", "dense"):
            raise ValueError(f"encoding must be compact or dense, not '{self.encoding}'")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError("max-layer-sparsity must be in (0, 1)")
        if self.samples < 1 or self.batch_size < 1 or self.min_size < 0:
            raise ValueError("samples and batch-size must be at least 1, min-size at least 0")


@dataclass(eq=False)
class LayerPlan:
    layer: WeightedLayer
    stats: InputStatistics | None = None
    can_take_bias: bool = False
    zeros: int = 0            # weights to be zero after pruning
    error: float = math.nan   # relative output error on calibration data (noise / signal energy)
    gain: float = math.nan    # relative error of the model's outputs per unit of this layer's relative error
    fit: InputStatistics | None = None    # statistics of the calibration batches used to fit …
    check: InputStatistics | None = None  # … and of those held out to check the fit
    damping: float = DAMPING


@register
class Prune(Pass):
    name = "prune"
    summary = "magnitude pruning with sensitivity allocation and reconstruction on calibration data; compact storage"
    Config = PruneConfig

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.config.structure == "channel" and self.config.flops is None and self.config.latency is None:
            raise PreconditionError("prune: structure=channel needs one of flops= (share of FLOPs to keep) or "
                                    "latency= (latency ratio to reach), or an accuracy budget (max_accuracy_drop= "
                                    "with data=) to choose flops")
        if self.config.structure == "channel" and ctx.calibration_data is None:
            raise PreconditionError("prune: structure=channel needs calibration data (calib_data=) to choose the "
                                    "channels and re-solve the weights that read them")
        wants_data = [f"{key}={value}" for key, value in (("allocation", self.config.allocation),
                                                          ("correction", self.config.correction))
                      if value in ("sensitivity", "channel", "reconstruct")]
        if wants_data and ctx.calibration_data is None:
            raise PreconditionError(f"prune: {' and '.join(wants_data)} needs calibration data: give calib_data=, "
                                    "or use allocation=uniform and correction=none")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        if config.structure == "channel":
            result = prune_channels(graph, ctx, config)
            return PassResult(result.modified, result.stats, result.layers)
        with_data = ctx.calibration_data is not None
        allocation = config.allocation if config.allocation != "auto" else ("sensitivity" if with_data else "uniform")
        correction = config.correction if config.correction != "auto" else ("reconstruct" if with_data else "none")
        layers, skipped, stats = prepare(graph, lambda: _select(graph, config), ctx, self.name,
                                         config.encoding == "compact")
        if not layers or config.sparsity == 0.0:
            stats.update({"pruned": 0, **{f"skipped:{k}": v for k, v in sorted(skipped.items())}})
            return PassResult(False, stats)
        tables = [layer for layer in layers if layer.is_table]
        layers = [layer for layer in layers if not layer.is_table]
        kept_rows = kept_exact_rows(graph, tables, ctx, self.name, stats, enabled=config.exact_rows,
                                    samples=config.samples, batch_size=config.batch_size)
        tables = [_prune_table(table, config.sparsity, kept_rows.get(id(table.node), [])) for table in tables]
        if tables:
            stats.update({"tables": len(tables), "exact_rows": sum(rows for _, rows in tables)})
        if not layers:
            return _result(graph, [plan for plan, _ in tables], config, stats, skipped)
        plans = [LayerPlan(layer, can_take_bias=layer.can_take_bias) for layer in layers]
        with graphs.runnable(graph) as unpruned:  # on disk for a large model: not a copy in memory
            if allocation == "sensitivity" or correction != "none":
                stats.update(_measure(graph, unpruned, plans, ctx, config, correction))
            sizes = np.array([plan.layer.values.size for plan in plans])
            target = int(round(config.sparsity * sizes.sum()))
            if allocation == "uniform":
                counts = round_to_total(config.sparsity * sizes, target)
            elif allocation == "global":
                counts = _global_counts([plan.layer.values for plan in plans], target)
            else:
                counts = _sensitivity_counts(graph, plans, ctx, config, correction, target)
            for plan, count in zip(plans, counts):
                plan.zeros = int(count)
            _prune(graph, unpruned, plans, ctx, config, correction)
        zeros = sum(int(np.count_nonzero(plan.layer.values == 0)) for plan in plans)
        stats.update({"sparsity": round(float(zeros / sizes.sum()), 4), "target": config.sparsity,
                      "allocation": allocation, "correction": correction})
        if with_data:
            stats["mean_layer_snr_db"] = round(float(np.mean(snr_db([plan.error for plan in plans]))), 1)
        if any(node.op == "BatchNormalization" for node in graph.nodes):
            stats["note"] = "BatchNormalization nodes remain: run fuse-bn before prune so magnitudes are the real ones"
        return _result(graph, plans + [plan for plan, _ in tables], config, stats, skipped)


def _result(graph: gs.Graph, plans: list[LayerPlan], config: PruneConfig, stats: dict, skipped: Counter) -> PassResult:
    """Store the pruned weights and tables; the pass's result."""
    dense_bytes, stored_bytes = _store(graph, plans, config.encoding)
    stats.update({"pruned": len(plans), "dense_bytes": dense_bytes, "stored_bytes": stored_bytes})
    stats.update({f"skipped:{k}": v for k, v in sorted(skipped.items())})
    return PassResult(True, stats, [_layer_row(plan) for plan in plans])


def _prune_table(table: WeightedLayer, sparsity: float, exact: list[int]) -> tuple[LayerPlan, int]:
    """Zero the `sparsity` share of smallest magnitudes in each row of the table but those in `exact`: one token
    per row, and the rows of a vocabulary differ many-fold in magnitude, so one threshold for the table would
    empty the rows of rare tokens. (The plan, the rows left whole.)"""
    values = table.values.copy()
    per_row = int(round(sparsity * values.shape[1]))
    smallest = np.argsort(np.abs(values), axis=1, kind="stable")[:, :per_row]
    np.put_along_axis(values, smallest, 0, axis=1)
    values[exact] = table.values[exact]
    table.weight.values = values
    return LayerPlan(table, zeros=int(np.count_nonzero(values == 0))), len(exact)


def _measure(graph: gs.Graph, unpruned, plans: list[LayerPlan], ctx: PassContext, config: PruneConfig,
             correction: str) -> dict:
    """Gather each layer's input statistics, and choose the damping on held-out calibration samples."""
    samples = min(config.samples, ctx.calibration_data.num_samples)
    statistics = input_statistics(unpruned, [plan.layer for plan in plans], ctx.calibration_data, samples=samples,
                                  batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed,
                                  check_every=CHECK_EVERY)
    for plan in plans:
        # the allocation measures each layer on the batches the damping is chosen with (their solves are
        # kept); the layers are pruned on all the batches (_prune)
        plan.fit, plan.check = statistics[id(plan.layer)]
        plan.stats = plan.fit
    result: dict[str, int | float | str] = {"samples": samples}
    held_out = held_out_samples(ctx.calibration_data, samples, config.batch_size)
    if correction == "reconstruct":
        if held_out is None:
            for plan in plans:
                plan.damping = UNCHECKED_DAMPING
        else:
            damping, errors = _choose_damping(graph, plans, ctx, correction, config.sparsity, held_out,
                                              config.batch_size)
            for plan in plans:
                plan.damping = damping
                plan.fit.solved = {key: value for key, value in plan.fit.solved.items() if key[1] == damping}
            result["held_out_snr_db"] = round(float(snr_db(errors[damping])), 1)
        result["damping"] = plans[0].damping
    return result


def _sensitivity_counts(graph: gs.Graph, plans: list[LayerPlan], ctx: PassContext, config: PruneConfig,
                        correction: str, target: int) -> np.ndarray:
    cap = max(config.max_layer_sparsity, config.sparsity)
    curves = [_sensitivity(plan, correction, cap) for plan in plans]
    gains = _output_gains(graph, plans, ctx, correction, min(max(config.sparsity, 0.3), cap),
                          min(PROBE_SAMPLES, config.samples, ctx.calibration_data.num_samples), config.batch_size)
    for plan, gain in zip(plans, gains):
        plan.gain = float(gain)
    curves = [(levels, errors * gain) for (levels, errors), gain in zip(curves, gains)]
    sizes = np.array([plan.layer.values.size for plan in plans])
    zeros = allocate([(levels * size, errors) for (levels, errors), size in zip(curves, sizes)], target)
    return round_to_total(zeros, target)


def _prune(graph: gs.Graph, unpruned, plans: list[LayerPlan], ctx: PassContext, config: PruneConfig,
           correction: str) -> None:
    """Prune every layer to its count; sequentially, each wave's inputs are measured again after the layers
    before it are pruned, next to the unpruned model's."""
    names = graphs.Names(graph)
    sequential = config.sequential and correction != "none"
    waves = [[plans[i] for i in wave] for wave in layer_waves(graph, [plan.layer for plan in plans])] \
        if sequential else [plans]
    if len(waves) > 1:  # the pruned model and the unpruned one
        samples = min(config.samples, ctx.calibration_data.num_samples)
        prefixes = [PrefixRuns(ctx.calibration_data, samples, config.batch_size, provider=ctx.provider,
                               role="the model for layer statistics") for _ in range(2)]
    for index, wave in enumerate(progress.each(waves, "pruning", unit="wave")):
        if index == 0:
            for plan in wave:
                plan.stats = plan.fit + plan.check if plan.check is not None else plan.fit
        else:
            with graphs.runnable(graph) as model:
                statistics = input_statistics(model, [plan.layer for plan in wave], ctx.calibration_data,
                                              samples=samples, batch_size=config.batch_size, provider=ctx.provider,
                                              seed=ctx.seed, reference=unpruned, prefixes=prefixes)
            for plan in wave:
                plan.stats = statistics[id(plan.layer)][0]
        for plan in wave:
            pruned, bias_shift, plan.error = _prune_layer(plan, plan.zeros, correction)
            plan.layer.weight.values = pruned.astype(plan.layer.values.dtype)
            if bias_shift is not None:
                plan.layer.shift_bias(bias_shift, names)


def _store(graph: gs.Graph, plans: list[LayerPlan], layout: str) -> tuple[int, int]:
    """Encode each pruned weight in the sparse layout where that is smaller; (dense bytes, stored bytes)."""
    names = graphs.Names(graph)
    dense_bytes = stored_bytes = 0
    for plan in plans:
        values = plan.layer.values
        compact = encoding.sparse_bytes(values.size, int(np.count_nonzero(values)), values.itemsize)
        dense_bytes += values.nbytes
        if layout == "compact" and compact < values.nbytes:
            encoding.encode_sparse(graph, plan.layer.weight, names)
            stored_bytes += compact
        else:
            stored_bytes += values.nbytes
    return dense_bytes, stored_bytes


def _layer_row(plan: LayerPlan) -> dict:
    row = {"layer": plan.layer.name, "op": plan.layer.node.op, "weights": int(plan.layer.values.size),
           "sparsity": round(plan.zeros / plan.layer.values.size, 4)}
    if not math.isnan(plan.error):
        row["output_snr_db"] = round(float(snr_db(plan.error)), 1)
    if not math.isnan(plan.gain):
        row["output_gain"] = round(plan.gain, 3)
    return row


def _select(graph: gs.Graph, config: PruneConfig) -> tuple[list[WeightedLayer], Counter, list[str]]:
    return select_layers(graph, config.ops, include=config.include, exclude=config.exclude,
                         min_size=config.min_size, depthwise=config.depthwise, tables=config.tables)




def _global_counts(weights: list[np.ndarray], target: int) -> np.ndarray:
    """Per tensor, how many of the `target` smallest magnitudes over all tensors it holds."""
    magnitudes = np.concatenate([np.abs(w.astype(np.float64)).ravel() for w in weights])
    owner = np.repeat(np.arange(len(weights)), [w.size for w in weights])
    smallest = np.argsort(magnitudes, kind="stable")[:target]
    return np.bincount(owner[smallest], minlength=len(weights))






def _choose_damping(graph: gs.Graph, plans: list[LayerPlan], ctx: PassContext, correction: str, sparsity: float,
                    held_out, batch_size: int) -> tuple[float, dict[float, float]]:
    """The damping whose pruning, fitted on the other calibration samples with every layer at `sparsity`, gives
    the least relative error of the model's outputs on the held-out samples; and each tried candidate's error."""
    outputs = ModelOutputs(graph, ctx, held_out, held_out.num_samples, batch_size)

    def error_of(damping: float) -> float:
        changes = []
        for plan in plans:
            pruned, bias_shift, _ = _prune_layer(plan, int(round(sparsity * plan.layer.values.size)), correction,
                                                 stats=plan.fit, damping=damping)
            changes.append((plan.layer, pruned, bias_shift))
        return outputs.relative_error(changes)

    errors = damping_errors(error_of)
    return min(errors, key=errors.get), errors


def _output_gains(graph: gs.Graph, plans: list[LayerPlan], ctx: PassContext, correction: str, level: float,
                  samples: int, batch_size: int) -> np.ndarray:
    """For each layer, the model's relative output error over the layer's own, each layer pruned alone.

    A layer's error reaches the outputs attenuated or amplified by what follows it: a residual branch is diluted
    by its skip connection, the convolution that opens a stage is not. Weighting each layer's error curve by
    this gain makes the allocation minimise the error of the outputs, not of the layers.
    """
    outputs = ModelOutputs(graph, ctx, ctx.calibration_data, samples, batch_size, probes=len(plans))
    gains = np.ones(len(plans))
    for index, plan in enumerate(progress.each(plans, "sensitivity", unit="layer")):
        pruned, bias_shift, error = _prune_layer(plan, int(round(level * plan.layer.values.size)), correction)
        if error > 0:
            gains[index] = outputs.relative_error([(plan.layer, pruned, bias_shift)]) / error
    return gains


def _sensitivity(plan: LayerPlan, correction: str, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """The layer's relative output error on calibration data at each level up to `cap`."""
    levels = np.unique(np.concatenate([LEVELS[LEVELS < cap], [cap]]))
    size = plan.layer.values.size
    pruned = iter(_prune_layer_counts(plan, [int(round(level * size)) for level in levels if level > 0],
                                      correction))
    return levels, np.array([0.0 if level == 0 else next(pruned)[2] for level in levels])


def _prune_layer(plan: LayerPlan, zeros: int, correction: str, stats: InputStatistics | None = None,
                 damping: float | None = None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(pruned weight, bias shift or None, relative output error on `stats`) with `zeros` weights zeroed.

    `stats` default to the plan's statistics over all calibration samples, `damping` to the plan's.
    """
    return _prune_layer_counts(plan, [zeros], correction, stats, damping)[0]


def _prune_layer_counts(plan: LayerPlan, counts: list[int], correction: str, stats: InputStatistics | None = None,
                        damping: float | None = None) -> list[tuple[np.ndarray, np.ndarray | None, float]]:
    """_prune_layer for each number of zeros in `counts`, sharing the work that does not depend on it."""
    layer = plan.layer
    stats = stats or plan.stats
    rows = layer.rows().astype(np.float64)
    if stats is None:
        return [(layer.from_rows(_zero_smallest(rows, np.abs(rows), zeros)), None, math.nan) for zeros in counts]
    use_bias = correction != "none" and plan.can_take_bias
    error = output_error(layer, rows, stats, use_bias)
    return [(layer.from_rows(new_rows), bias_shift, error(new_rows))
            for new_rows, bias_shift in _pruned_rows(layer, rows, stats, counts, correction, use_bias,
                                                     plan.damping if damping is None else damping)]


def _pruned_rows(layer: WeightedLayer, rows: np.ndarray, stats: InputStatistics, counts: list[int],
                 correction: str, use_bias: bool, damping: float) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(new rows, bias shift or None) for each number of zeros in `counts`."""
    own = stats.moment(centered=use_bias)            # E[x xᵀ]
    cross = stats.cross_moment(centered=use_bias)    # E[x x_refᵀ]
    reference = stats.reference or stats
    if correction == "reconstruct" and layer.diagonal:
        # no cross terms: keep the largest energy-weighted weights, nothing to re-solve
        added = damping * own.mean(axis=1, keepdims=True)
        target = rows * expand_diagonal(layer, (cross + added) / (own + added))[:, None, :]
        score = target ** 2 * expand_diagonal(layer, own)[:, None, :]
        candidates = [_zero_smallest(target, score, zeros) for zeros in counts]
    elif correction == "reconstruct":
        target, upper = solved(layer, rows, stats, use_bias, damping, own, cross)
        candidates = _reconstruct(target, upper, counts)
    else:
        candidates = [_zero_smallest(rows, np.abs(rows), zeros) for zeros in counts]
    if correction == "none":
        return [(new_rows, None) for new_rows in candidates]
    # Restore each output unit's spread and mean on calibration data to those of the unpruned layer, as
    # re-estimating a BatchNormalization would: pruning and least squares both shrink the outputs.
    spread = unit_energy(layer, rows, reference.moment(centered=use_bias))
    if use_bias:
        expected = np.einsum("grd,gd->gr", rows, expand_diagonal(layer, reference.mean))   # w·E[x_ref]
    result = []
    for new_rows in candidates:
        now = unit_energy(layer, new_rows, own)
        new_rows = new_rows * np.sqrt(np.where(now > 0, spread / np.maximum(now, 1e-30), 1.0))[:, :, None]
        bias_shift = None
        if use_bias:  # w·E[x_ref] − w'·E[x]
            bias_shift = (expected - np.einsum("grd,gd->gr", new_rows, expand_diagonal(layer, stats.mean))).reshape(-1)
        result.append((new_rows, bias_shift))
    return result


def _zero_smallest(rows: np.ndarray, score: np.ndarray, zeros: int) -> np.ndarray:
    flat = score.reshape(-1)
    out = rows.copy().reshape(-1)
    if zeros > 0:
        out[np.argpartition(flat, zeros - 1)[:zeros] if zeros < flat.size else slice(None)] = 0.0
    return out.reshape(rows.shape)


def _reconstruct(rows: np.ndarray, upper: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """For each number in `counts`, rows (groups, units, D) with that many weights zeroed and the kept ones
    updated to keep w·x on calibration data.

    Column by column (layers.obs_sweep): the error of zeroing a weight is spread over the not yet visited columns
    of its row. The weights to zero in a block of columns are those with the least w² / U_jj², the saliency of
    optimal brain surgeon, as many as the block's share of the count. The counts are swept together, each a
    copy of the rows stacked along the units: the sweep's cost is mostly per column, not per row.
    """
    per_sweep = max(1, STACK_BYTES // max(rows.nbytes, 1))
    result = []
    for first in range(0, len(counts), per_sweep):
        result.extend(_reconstruct_stacked(rows, upper, counts[first:first + per_sweep]))
    return result


def _reconstruct_stacked(rows: np.ndarray, upper: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    groups, units, _ = rows.shape
    left = np.array(counts, dtype=np.int64)       # zeros still to place, per count
    size_left = np.full(len(counts), rows.size)   # weights not yet visited, per count

    def zero_in_block(block: np.ndarray, diagonal: np.ndarray):
        nonlocal left, size_left
        saliency = (block ** 2 / diagonal[:, None, :] ** 2).reshape(groups, len(counts), units, -1)
        size = saliency[:, 0].size
        mask = np.zeros(saliency.shape, dtype=bool)
        for index in range(len(counts)):
            count = int(round(left[index] * size / size_left[index]))
            left[index] -= count
            size_left[index] -= size
            if count > 0:
                chosen = np.zeros(size, dtype=bool)
                chosen[np.argpartition(saliency[:, index].reshape(-1), count - 1)[:count]] = True
                mask[:, index] = chosen.reshape(saliency[:, index].shape)
        mask = mask.reshape(block.shape)
        return lambda values, column: np.where(mask[:, :, column], 0.0, values)

    swept = obs_sweep(np.concatenate([rows] * len(counts), axis=1), upper, zero_in_block)
    return [swept[:, index * units:(index + 1) * units] for index in range(len(counts))]
