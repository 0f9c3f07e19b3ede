"""lowrank: a Gemm, MatMul or Conv becomes two thinner layers of rank r, fitted to its outputs on calibration data.

Before:
    x ─► MatMul(W: 384×1536) ─► Add(b) ─► y
    x ─► Conv(W: 64×32×3×3, b) ─► y
After (rank 64, rank 16):
    x ─► MatMul(A: 384×64) ─► MatMul(B: 64×1536) ─► Add(b') ─► y
    x ─► Conv(A: 16×32×3×3) ─► Conv(B: 64×16×1×1, b') ─► y

A K×N weight costs K·N multiply-adds per output vector (token, pixel); its two factors cost r·(K + N), so a
layer is factorized only where its rank makes it cheaper, r·(K + N) < K·N. A Conv's first factor keeps the
kernel, strides and pads with r output channels; the second is a 1×1 Conv. Grouped Conv, ConvTranspose and Gemm
with transA are left.

How the factors are fitted (whitened SVD, as in SVD-LLM, Wang et al. 2024): the truncation that keeps the
layer's outputs on calibration data, min E‖x W − x A B‖², is the SVD of Lᵀ W, where H = L Lᵀ is the Cholesky
factor of the inputs' second moments E[x xᵀ] (a Conv's inputs are its im2col patches), damped by `damping` times
their mean diagonal, on the calibration batches not held out. The output error of rank r is the energy of the
singular directions left out, measured on the held-out batches (every fifth): a layer with more inputs than
fitted vectors (a classifier after global pooling) reproduces those vectors at any rank. Plain SVD of
W ignores which input directions carry signal: on a transformer it loses several times more output at the same
rank. Where the layer has a bias (Gemm's C, Conv's B, or a MatMul's constant Add), the inputs' covariance is
used instead of E[x xᵀ] and the mean of the error goes into the bias, which absorbs it exactly.

Which rank each layer gets: with `flops=F`, the layers together keep the share F of their multiply-adds. Every
layer's relative output error at every rank (multiples of `multiple`: by default the block in which ORT's CPU
kernels run widths, runtime.channel_block, 16 with AVX-512 and 8 with AVX2) is known from
its singular values; it is weighted by the layer's gain, how much relative error of the model's outputs one unit
of the layer's own brings (measured by factorizing each layer alone, on the held-out samples), and the ranks
with the least summed error within the FLOPs budget are chosen (a multiple-choice knapsack over the options
dense, 16, 32, …). `rank=R` instead puts every layer at rank R where that is cheaper. A rank between two
multiples of the block costs what the upper one does: two MatMuls through rank r at 128 tokens × 384 on an
AVX-512 machine took 245 µs at r = 104 and 249 at 112, 278 at 120 and 279 at 128.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp import progress, runtime
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes.allocation import ModelOutputs, choose
from onnxcomp.passes.layers import (CHECK_EVERY, WeightedLayer, held_out_samples, input_statistics, prepare,
                                    select_layers, snr_db, warn)
from onnxcomp.registry import register
from onnxcomp.runner import Runner

FACTORABLE_OPS = ("Conv", "Gemm", "MatMul")
DEFAULT_FLOPS = 0.5
PROBE_SAMPLES = 32  # calibration samples on which each layer's effect on the model's outputs is measured


@dataclass(frozen=True)
class LowrankConfig:
    flops: float | None = None   # share of the factorizable layers' multiply-adds to keep; 0.5 unless rank= is given
    rank: int | None = None      # every layer at this rank instead, where that is cheaper
    ops: tuple[str, ...] = FACTORABLE_OPS
    include: tuple[str, ...] = ()  # shell patterns over node and weight names; empty: every layer
    exclude: tuple[str, ...] = ()
    min_size: int = 1024         # weights; smaller layers are left
    samples: int = 128
    batch_size: int = 8
    damping: float = 0.01        # share of the mean diagonal of E[x xᵀ] added to it: keeps its Cholesky factor finite
    multiple: int | None = None  # ranks are multiples of this; None: the CPU kernels' block (runtime.channel_block)

    def __post_init__(self):
        if self.flops is not None and self.rank is not None:
            raise ValueError("give flops (a share of FLOPs to keep) or rank (one rank for every layer), not both")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise ValueError(f"flops is the share of FLOPs to keep and must be in (0, 1], not {self.flops}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, not {self.rank}")
        unknown = [op for op in self.ops if op not in FACTORABLE_OPS]
        if unknown:
            raise ValueError(f"ops must be among {', '.join(FACTORABLE_OPS)}, not {', '.join(unknown)}")
        if self.samples < 1 or self.batch_size < 1 or self.min_size < 0:
            raise ValueError("samples and batch-size must be at least 1, min-size at least 0")
        if not self.damping > 0.0:
            raise ValueError(f"damping must be above 0, not {self.damping}")
        if self.multiple is not None and self.multiple < 1:
            raise ValueError(f"multiple must be at least 1, not {self.multiple}")

    @property
    def target(self) -> float | None:
        """The share of FLOPs to keep, or None with an explicit rank."""
        return None if self.rank is not None else (DEFAULT_FLOPS if self.flops is None else self.flops)


@dataclass(eq=False)
class Plan:
    """A layer, its weight as (K inputs, N outputs), and its whitened SVD on calibration data."""

    layer: WeightedLayer
    bias: gs.Constant | None   # a MatMul's bias: the constant of the Add that alone reads its output
    positions: int = 1         # output vectors per sample: tokens, pixels
    weight: np.ndarray | None = None
    mean: np.ndarray | None = None   # E[x] where a bias absorbs the error's mean, else None
    moment: np.ndarray | None = None  # E[x xᵀ], or the covariance with a bias (undamped)
    lower: np.ndarray | None = None  # Cholesky factor L of the damped moment
    left: np.ndarray | None = None
    singular: np.ndarray | None = None
    right: np.ndarray | None = None
    check: np.ndarray | None = None  # the moment on the held-out calibration batches (None: none held out)
    reach: np.ndarray | None = None  # per singular direction, the output energy of one unit of it on those
    gain: float = 1.0
    rank: int = 0              # 0: left dense
    multiple: int = 8          # the ranks tried are multiples of this
    error: float = math.nan

    @property
    def dims(self) -> tuple[int, int]:
        return self.layer.rows().shape[2], self.layer.rows().shape[1]

    def cost(self, rank: int = 0) -> int:
        """Multiply-adds per sample, dense (rank 0) or at `rank`."""
        k, n = self.dims
        return (rank * (k + n) if rank else k * n) * self.positions

    def ranks(self) -> list[int]:
        """The ranks at which the layer would be cheaper, multiples of `multiple`, smallest first."""
        k, n = self.dims
        return [r for r in range(self.multiple, min(k, n) + 1, self.multiple) if r * (k + n) < k * n]

    def relative_error(self, rank: int) -> float:
        """E‖x W − x A B‖² / E‖x W‖² at `rank`: on the held-out calibration batches where there are some, else
        on the fitted ones (with H damped). Fitted and measured on the same inputs, a layer with more inputs
        than vectors looks exact at any rank: EfficientNet-Lite0's classifier (1280 inputs, one vector per
        image) measured 1e-4 at rank 8 on 100 images, and its model lost every point."""
        energy = self.singular ** 2 if self.reach is None else self.singular ** 2 * self.reach
        signal = energy.sum() if self.check is None else ((self.check @ self.weight) * self.weight).sum()
        return float(energy[rank:].sum() / max(float(signal), 1e-30))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A: K×r, B: r×N) with A B the best rank-r weight for the calibration inputs; singular values split
        evenly between the two, so neither factor's range is far from the other's in float32."""
        scale = np.sqrt(self.singular[:rank])
        first = np.linalg.solve(self.lower.T, self.left[:, :rank] * scale)  # un-whiten: L⁻ᵀ U √S
        return first, scale[:, None] * self.right[:rank]

    def bias_shift(self, first: np.ndarray, second: np.ndarray) -> np.ndarray | None:
        """What the bias gains so that the factorized layer's mean output on calibration data is the original's."""
        return None if self.mean is None else self.mean @ (self.weight - first @ second)

    def measured_error(self, first: np.ndarray, second: np.ndarray) -> float:
        """The relative output error of the factors on the held-out calibration inputs (or, without, on all of
        them), H undamped."""
        moment = self.moment if self.check is None else self.check
        change = self.weight - first @ second
        signal = float(((moment @ self.weight) * self.weight).sum())
        return max(float(((moment @ change) * change).sum()), 0.0) / max(signal, 1e-30)


@register
class Lowrank(Pass):
    name = "lowrank"
    summary = "Gemm/MatMul/Conv into two thinner layers by whitened SVD on calibration data, to a FLOPs target"
    Config = LowrankConfig

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration_data is None:
            raise PreconditionError("lowrank needs calibration data to fit the factors to the layers' inputs: "
                                    "give calib_data= (--calib-data)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        multiple = config.multiple or runtime.channel_block()
        layers, skipped, stats = prepare(graph, lambda: _select(graph, config, multiple), ctx, self.name, False)
        plans = [Plan(layer, _separate_bias(graph, layer), multiple=multiple) for layer in layers]
        if not plans:
            warn(stats, ctx, self.name, "no layer would be cheaper as two factors; the model is unchanged")
            stats.update({"factorized": 0, **{f"skipped:{k}": v for k, v in sorted(skipped.items())}})
            return PassResult(False, stats)
        original = gs.export_onnx(graph, do_type_check=False)
        samples = min(config.samples, ctx.calibration_data.num_samples)
        _measure(original, plans, ctx, samples, config)
        if config.rank is not None:
            for plan in plans:
                plan.rank = config.rank
        else:
            _output_gains(graph, plans, ctx, min(PROBE_SAMPLES, samples), config.batch_size, samples)
            _allocate(plans, config.target)
        chosen = [plan for plan in plans if plan.rank]
        names = graphs.Names(graph)
        for plan in chosen:
            _factorize(graph, plan, names)
        dense = sum(plan.cost() for plan in plans)
        params = sum(plan.dims[0] * plan.dims[1] for plan in plans)
        stats.update({
            "factorized": len(chosen), "layers": len(plans), "samples": samples,
            "flops_ratio": round(sum(plan.cost(plan.rank) for plan in plans) / dense, 4),
            "params_ratio": round(sum(plan.cost(plan.rank) / plan.positions for plan in plans) / params, 4)})
        if config.target is not None:
            stats["target_flops"] = config.target
            if stats["flops_ratio"] > config.target:
                warn(stats, ctx, self.name, f"flops={config.target} is below what rank {multiple} in every layer "
                     f"reaches; got {stats['flops_ratio']}")
        if chosen:
            stats["mean_layer_snr_db"] = round(float(np.mean(snr_db([plan.error for plan in chosen]))), 1)
        stats.update({f"skipped:{k}": v for k, v in sorted(skipped.items())})
        return PassResult(bool(chosen), stats, [_layer_row(plan) for plan in plans])


def _select(graph: gs.Graph, config: LowrankConfig, multiple: int) -> tuple[list[WeightedLayer], Counter, list[str]]:
    """The layers that two factors of the smallest allowed rank would make cheaper."""
    layers, skipped, warnings = select_layers(graph, config.ops, include=config.include, exclude=config.exclude,
                                              min_size=config.min_size)
    chosen = []
    smallest = config.rank or multiple
    for layer in layers:
        node = layer.node
        if node.op == "Conv" and layer.groups > 1:
            skipped["grouped-conv"] += 1
        elif node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            skipped["gemm-transA"] += 1
        else:
            rows = layer.rows()
            k, n = rows.shape[2], rows.shape[1]
            if smallest > min(k, n) or smallest * (k + n) >= k * n:
                skipped["not-cheaper"] += 1
            else:
                chosen.append(layer)
    return chosen, skipped, warnings


def _separate_bias(graph: gs.Graph, layer: WeightedLayer) -> gs.Constant | None:
    """The per-unit constant of the Add that alone reads a MatMul's output, where the pass may change it."""
    node = layer.node
    if node.op != "MatMul":
        return None
    output = node.outputs[0]
    readers = graphs.consumers(output)
    if len(readers) != 1 or readers[0].op != "Add" or graphs.is_graph_output(graph, output):
        return None
    others = [t for t in readers[0].inputs if t is not output]
    if len(others) != 1 or not isinstance(others[0], gs.Constant) or len(graphs.consumers(others[0])) != 1:
        return None
    units = layer.values.shape[1]
    value = np.asarray(others[0].values)
    ok = value.dtype == layer.values.dtype and value.size == units and value.shape[-1] == units
    return others[0] if ok else None


def _measure(model, plans: list[Plan], ctx: PassContext, samples: int, config: LowrankConfig) -> None:
    """Each layer's input moments and output positions on calibration data, and its whitened SVD."""
    shared = {}  # layers reading the same input the same way (a transformer's query, key and value) share moments
    for plan in plans:
        shared.setdefault(_input_key(plan.layer), plan.layer)
    statistics = input_statistics(model, list(shared.values()), ctx.calibration_data, samples=samples,
                                  batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed,
                                  check_every=CHECK_EVERY)
    outputs = Runner(model, provider=ctx.provider, outputs=[plan.layer.node.outputs[0].name for plan in plans],
                     role="the model for the layers' output sizes").run(ctx.calibration_data.batch(0, 1))
    for plan in progress.each(plans, "whitened SVD", unit="layer"):
        plan.positions = _positions(plan.layer, outputs[plan.layer.node.outputs[0].name].shape)
        stats, check = statistics[id(shared[_input_key(plan.layer)])]
        use_bias = plan.bias is not None or plan.layer.can_take_bias
        plan.weight = plan.layer.rows()[0].T.astype(np.float64)
        plan.moment = stats.moment(centered=use_bias)[0]
        plan.mean = stats.mean[0] if use_bias else None
        _whitened_svd(plan, config.damping)
        if check is not None:
            _held_out_reach(plan, check.moment(centered=use_bias)[0])


def _input_key(layer: WeightedLayer) -> tuple:
    """What a layer's input vectors depend on: the input tensor, and for a Conv how it is cut into patches."""
    node = layer.node
    if node.op != "Conv":
        return (node.inputs[0].name,)
    return (node.inputs[0].name, layer.values.shape[1:], repr(sorted(node.attrs.items())))


def _positions(layer: WeightedLayer, shape: tuple[int, ...]) -> int:
    """Output vectors per sample, from the layer's output on one sample."""
    if layer.node.op == "Conv":
        return int(np.prod(shape[2:]))
    return int(np.prod(shape[:-1]))  # MatMul: every row of every leading axis; Gemm: the one row


def _whitened_svd(plan: Plan, damping: float) -> None:
    """SVD of Lᵀ W, with L L ᵀ the damped input moment: truncating it keeps the most output energy."""
    moment = plan.moment
    dims = moment.shape[0]
    scale = max(float(np.trace(moment)) / dims, 1e-12)
    plan.lower = np.linalg.cholesky(moment + damping * scale * np.eye(dims))
    plan.left, plan.singular, plan.right = _svd(plan.lower.T @ plan.weight)


def _held_out_reach(plan: Plan, check: np.ndarray) -> None:
    """The output energy each singular direction carries on the held-out inputs: W − A_r B_r = L⁻ᵀ Σ_(i>r)
    u_i s_i v_iᵀ with the v_i orthonormal, so its energy under a moment H' is Σ_(i>r) s_i² u_iᵀ L⁻¹ H' L⁻ᵀ u_i."""
    unwhitened = np.linalg.solve(plan.lower.T, plan.left)  # L⁻ᵀ U
    plan.check = check
    plan.reach = np.maximum(((check @ unwhitened) * unwhitened).sum(axis=0), 0.0)


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, s, Vᵀ) of `matrix` from the eigenvectors of its smaller Gram matrix: several times faster than
    LAPACK's SVD on a 384×1536 weight, and exact to float64 precision in the leading vectors that a truncation
    keeps (the Gram matrix squares the condition number, so only directions below 1e-8 of the largest blur)."""
    wide = matrix.shape[0] <= matrix.shape[1]
    values, vectors = np.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    order = np.argsort(values)[::-1]
    singular, vectors = np.sqrt(np.maximum(values[order], 0.0)), vectors[:, order]
    divisor = np.maximum(singular, max(singular[0], 1e-300) * 1e-12)
    if wide:
        return vectors, singular, (matrix.T @ vectors / divisor).T
    return matrix @ vectors / divisor, singular, vectors.T


def _output_gains(graph: gs.Graph, plans: list[Plan], ctx: PassContext, samples: int, batch_size: int,
                  samples_fitted: int) -> None:
    """For each layer, the model's relative output error over the layer's own, each layer factorized alone at the
    rank that halves its FLOPs: an error in a query projection reaches the outputs through a softmax, one in a
    residual branch is diluted by the skip connection."""
    held_out = held_out_samples(ctx.calibration_data, samples_fitted, batch_size)
    data = held_out if held_out is not None else ctx.calibration_data  # the factors were fitted on the others
    outputs = ModelOutputs(graph, ctx, data, min(samples, data.num_samples), batch_size, probes=len(plans))
    for plan in progress.each(plans, "output gains", unit="layer"):
        ranks = plan.ranks()
        rank = ranks[len(ranks) // 2]
        error = plan.relative_error(rank)
        if error <= 0:
            continue
        first, second = plan.factors(rank)
        product = plan.layer.from_rows((first @ second).T[None])
        shift = plan.bias_shift(first, second)
        if plan.bias is None:
            probe = outputs.relative_error([(plan.layer, product, shift)])
        else:  # a MatMul's bias is a separate Add: shift its constant for the run
            kept = plan.bias.values
            plan.bias.values = (kept + shift.reshape(kept.shape)).astype(kept.dtype)
            probe = outputs.relative_error([(plan.layer, product, None)])
            plan.bias.values = kept
        plan.gain = probe / error


def _allocate(plans: list[Plan], target: float) -> None:
    """Ranks (0: dense) with the least summed gain-weighted error whose FLOPs are within `target` of dense."""
    options = [[0] + plan.ranks() for plan in plans]
    costs = [np.array([plan.cost(rank) for rank in ranks], np.float64) for plan, ranks in zip(plans, options)]
    errors = [np.array([plan.gain * plan.relative_error(rank) if rank else 0.0 for rank in ranks])
              for plan, ranks in zip(plans, options)]
    budget = target * sum(plan.cost() for plan in plans)
    for plan, ranks, pick in zip(plans, options, choose(costs, errors, budget)):
        plan.rank = ranks[pick]


def _factorize(graph: gs.Graph, plan: Plan, names: graphs.Names) -> None:
    """Replace the layer by its two factors at plan.rank: a new first node, the layer's own node as the second."""
    layer, node = plan.layer, plan.layer.node
    first, second = plan.factors(plan.rank)
    plan.error = plan.measured_error(first, second)
    shift = plan.bias_shift(first, second)
    dtype = layer.values.dtype
    hidden = gs.Variable(names.new(f"{node.name}_rank{plan.rank}"), dtype=dtype)
    if node.op == "Conv":
        first_weight = first.T.reshape(plan.rank, *layer.values.shape[1:])
        second_weight = second.T.reshape(layer.values.shape[0], plan.rank, *[1] * (layer.values.ndim - 2))
        attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        first_constant = names.constant(f"{layer.weight.name}_first", first_weight.astype(dtype))
        graph.nodes.append(gs.Node("Conv", names.new(f"{node.name}_first"), attrs, [node.inputs[0], first_constant],
                                   [hidden]))
        if shift is not None:
            layer.shift_bias(shift, names)
        node.attrs = {}
    else:
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        graph.nodes.append(gs.Node("MatMul", names.new(f"{node.name}_first"), inputs=[
            node.inputs[0], names.constant(f"{layer.weight.name}_first", (alpha * first).astype(dtype))],
            outputs=[hidden]))
        second_weight = second
        if node.op == "Gemm":
            if shift is not None:
                layer.shift_bias(shift, names)  # in units of x W, before alpha moves into the first factor
            node.attrs = {**node.attrs, "alpha": 1.0, "transB": 0}
        elif plan.bias is not None:
            add = graphs.consumers(node.outputs[0])[0]
            index = next(i for i, t in enumerate(add.inputs) if t is plan.bias)
            kept = np.asarray(plan.bias.values)
            add.inputs[index] = names.constant(f"{plan.bias.name}_lowrank",
                                               (kept + shift.reshape(kept.shape)).astype(kept.dtype))
    node.inputs[0] = hidden
    node.inputs[1] = names.constant(f"{layer.weight.name}_second", second_weight.astype(dtype))


def _layer_row(plan: Plan) -> dict:
    k, n = plan.dims
    row = {"layer": plan.layer.name, "op": plan.layer.node.op, "inputs": k, "outputs": n, "rank": plan.rank,
           "flops_ratio": round(plan.cost(plan.rank) / plan.cost(), 3)}
    if plan.rank:
        row["output_snr_db"] = round(float(snr_db(plan.error)), 1)
    if plan.gain != 1.0:
        row["output_gain"] = float(f"{plan.gain:.3g}")
    return row
