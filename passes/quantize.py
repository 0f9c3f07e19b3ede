"""int8: static int8 quantization in QDQ format, calibrated on data, for ONNX Runtime's int8 kernels.

Before:
    x ─► Conv(W, b) ─► Relu ─► y ─► Add ─► z
After:
    x ─► Q ─► DQ ─► Conv(DQ(W:int8, per output channel), DQ(b:int32)) ─► Q ─► DQ ─► y ─► Add ─► Q ─► DQ ─► z

ONNX Runtime fuses `DQ → op → Q` groups into int8 kernels (QLinearConv, QGemm, QLinearAdd, …) when it creates
the session. Graph outputs stay float, so an op that produces one keeps a float kernel unless ORT has a
float-output form of it (Gemm and MatMul do; Conv and Add do not). The plan is made first, then the graph is
rewritten in one place:

1. Select the nodes to quantize: Conv and Gemm with constant weights, MatMul with a constant 2-D second
   input; Add, Mul, Concat, average pooling where they read the output of int8 work (not inside a normalization
   or activation written out in elementary ops); MaxPool, nearest/linear Resize and the reshaping ops pass their
   input's quantization through unchanged. A Relu or Clip after a quantized node is folded into the node's
   output range (uint8 with zero point 0 clamps at 0).
2. Calibrate: run the float model on the calibration data and gather each quantized tensor's statistics batch
   by batch (passes/calibrate.py); pick each range by `method`.
3. Rewrite: activations asymmetric uint8 (or int8); weights symmetric int8 per output channel; biases int32
   with scale = input scale × weight scale.

Weights and x86 CPUs without VNNI: ONNX Runtime's u8×s8 kernels there add pairs of 8-bit products in 16 bits,
which saturates when two large activations meet two large weights (|a₁w₁ + a₂w₂| > 32767). With
`weight_range=safe` (the default) each output channel gets the largest integer range for which no pair of its
weights can saturate with any uint8 input — between 64 (ORT's `reduce_range`) and 127 levels, most channels near
the top. `weight_range=full` uses ±127 everywhere (for VNNI and ARM targets), `reduced` uses ±63.
Depthwise convolutions never go through that kernel and always get ±127.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp import progress
from onnxcomp.errors import InputError
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes import calibrate
from onnxcomp.passes.layers import WeightedLayer
from onnxcomp.passes.flush_denormals import flush
from onnxcomp.registry import register
from onnxcomp.runner import Runner

WEIGHTED = ("Conv", "Gemm", "MatMul")
ELEMENTWISE = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool")
# Output keeps the input's scale and zero point, so ONNX Runtime can drop the Q/DQ pair around them.
PASS_THROUGH = ("MaxPool", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
FOLDED_ACTIVATIONS = ("Relu", "Clip")
MIN_OPSET = 13
SQNR_REPORTED = 5  # tensors with the lowest SQNR named in the stats, worst first


@dataclass(frozen=True)
class Int8Config:
    method: str = "percentile"
    percentile: float = 99.999
    activations: str = "auto"         # uint8 | int8 (static, calibrated) | dynamic | auto (see _activations)
    weight_range: str = "safe"
    per_channel: bool = True
    samples: int = 200
    batch_size: int = 16
    exclude: tuple[str, ...] = ()      # node names
    exclude_ops: tuple[str, ...] = ()  # op types
    keep_first: bool = False           # leave the first weighted layer in float
    keep_last: bool = False            # leave the last weighted layer in float
    max_drop: float | None = None      # points of top-1 (or agreement) on held-back samples; None: the
                                       # optimize command's --max-accuracy-drop, if any
    float_layers: int | None = None    # leave this many weighted layers in float, those whose int8 error
                                       # reaches the outputs most; a budget search chooses it when left free
    holdout: float = 0.2               # share of calibration samples held back to measure the drop
    bias_correction: bool = True       # cancel each channel's mean shift from weight rounding via the bias

    def __post_init__(self):
        if self.method not in calibrate.METHODS:
            raise ValueError(f"method must be one of {', '.join(calibrate.METHODS)}, not '{self.method}'")
        if self.activations not in ("auto", "uint8", "int8", "dynamic"):
            raise ValueError(f"activations must be auto, uint8, int8 or dynamic, not '{self.activations}'")
        if self.weight_range not in ("safe", "full", "reduced"):
            raise ValueError(f"weight-range must be safe, full or reduced, not '{self.weight_range}'")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch-size must be at least 1")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max-drop must be 0 or more points")
        if self.float_layers is not None and self.float_layers < 0:
            raise ValueError("float-layers must be 0 or more layers")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError("holdout must be a fraction in (0, 1)")


@dataclass
class QuantParams:
    scale: float
    zero_point: int


@dataclass
class Plan:
    nodes: list[gs.Node] = field(default_factory=list)             # nodes that will run in int8
    activations: list[gs.Tensor] = field(default_factory=list)     # tensors that get Q → DQ
    folded: dict[int, gs.Node] = field(default_factory=dict)       # id(quantized node) → Relu/Clip after it
    clip_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor name → activation bounds
    shares_input: dict[str, str] = field(default_factory=dict)     # pass-through output → input tensor name
    skipped: Counter = field(default_factory=Counter)


@register
class QuantizeInt8(Pass):
    name = "int8"
    summary = "static int8 quantization (QDQ) calibrated on calibration data, for ONNX Runtime's int8 kernels"
    Config = Int8Config

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration_data is not None:
            return
        if _activations(graph, self.config) != "dynamic":
            raise PreconditionError("int8 needs calibration data: give calib_data= (a data file or an image "
                                    "folder of typical inputs; 'random' only to try the pipeline)")
        if _chooses_layers(self.config, _budget(self.config, ctx)):
            raise PreconditionError("int8 with an accuracy budget or float-layers measures its layers on "
                                    "held-back calibration samples: give calib_data=, or neither")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        upgraded_from = graph.opset
        if graph.opset < MIN_OPSET:  # per-axis QuantizeLinear / DequantizeLinear
            graphs.upgrade_opset(graph, MIN_OPSET)
        # weights computed from constants (Reshape of an initializer, in CNTK and Paddle exports) become
        # initializers, so that they can be quantized; only in this graph, whose nodes are the ones quantized
        # (Silero VAD's two branches took 0.3 s to fold for nothing)
        graph.fold_constants(recurse_subgraphs=False).cleanup()
        config = replace(config, activations=_activations(graph, config))
        stats_out: dict[str, int | float | str] = {}
        # exact (see flush-denormals), and calibration runs the model at normal speed: PP-OCR's detector, 10 %
        # denormal weights, calibrated in 1.6 s instead of 3.4
        denormals = sum(flush(tensor) for tensor in graphs.constant_tensors(graph))
        if denormals:
            stats_out["denormals_zeroed"] = denormals
        if upgraded_from < MIN_OPSET:
            stats_out["opset"] = f"{upgraded_from}->{MIN_OPSET}"
        if config.activations == "dynamic":
            return PassResult(True, {**stats_out, **_run_dynamic(graph, config, ctx)})
        _infer_types(graph)
        plan = _plan(graph, config)
        if not plan.nodes:  # changed only if the opset had to be raised
            return PassResult(upgraded_from < MIN_OPSET,
                              {"quantized": 0, **{f"skipped:{k}": v for k, v in plan.skipped.items()}})
        budget = _budget(config, ctx)
        data = ctx.calibration_data
        calibration, holdout = _split(data, config, _chooses_layers(config, budget))
        with graphs.runnable(graph) as float_model:  # on disk for a large model: not a copy in memory
            observed = _observed(plan)
            stats = calibrate.collect(float_model, observed, calibration, samples=config.samples,
                                      batch_size=config.batch_size, provider=ctx.provider,
                                      means_of={node.inputs[0].name for node in plan.nodes if node.op in WEIGHTED})
            stats_out.update({"method": config.method, "samples": min(config.samples, calibration.num_samples)})
            if _chooses_layers(config, budget):
                def quantized(trial: gs.Graph, kept: list[str]) -> None:
                    trial_config = replace(config, exclude=config.exclude + tuple(kept))
                    trial_plan = _plan(trial, trial_config)
                    _rewrite(trial, trial_plan, _params(trial_plan, stats, trial_config), trial_config,
                             _means(stats))

                candidates = [n.name for n in plan.nodes if n.op in WEIGHTED and n.name]
                trials = _Trials(graph, quantized, float_model, holdout, ctx)
                kept, fitted = _layers_in_float(trials, candidates, config, budget, ctx)
                if kept:
                    config = replace(config, exclude=config.exclude + tuple(kept))
                    plan = _plan(graph, config)
                stats_out.update(fitted)
                if not plan.nodes:  # every layer stays float: nothing to quantize or to measure
                    return PassResult(upgraded_from < MIN_OPSET, {**stats_out, "quantized": 0})
            levels = _rewrite(graph, plan, _params(plan, stats, config), config, _means(stats))
            counts = Counter(node.op for node in plan.nodes)
            stats_out.update({"quantized": len(plan.nodes), "tensors": len(plan.activations)})
            if levels:
                stats_out["weight_levels_min"] = int(min(levels))
                stats_out["weight_levels_mean"] = round(float(np.mean(levels)), 1)
            stats_out.update({f"int8:{op}": n for op, n in sorted(counts.items())})
            stats_out.update({f"skipped:{reason}": n for reason, n in sorted(plan.skipped.items())})
            graph.cleanup()
            gc.collect()  # the replaced float weights, held by cycles of removed nodes and tensors
            with graphs.runnable(graph) as quantized_model:
                sqnr = calibrate.activation_sqnr(float_model, quantized_model, _observed(plan), calibration,
                                                 provider=ctx.provider)
        worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:SQNR_REPORTED]
        stats_out.update({f"sqnr_db:{name}": round(value, 1) for name, value in worst})
        if getattr(data, "is_random", False):
            stats_out["warning_data"] = "calibrated on random data: ranges do not reflect real inputs"
        return PassResult(True, stats_out)


def _budget(config: Int8Config, ctx: PassContext) -> float | None:
    """The accuracy budget in points: the pass's own max-drop, else the optimize command's."""
    return config.max_drop if config.max_drop is not None else ctx.max_accuracy_drop


def _run_dynamic(graph: gs.Graph, config: Int8Config, ctx: PassContext) -> dict[str, int | float | str]:
    """int8 with dynamic activations (quantize_dynamic.py); with a budget, the layers and tables to leave in
    float are chosen first, as for static int8, on held-back calibration samples."""
    from onnxcomp.passes.quantize_dynamic import quantize_dynamic, quantizable

    budget = _budget(config, ctx)
    stats: dict[str, int | float | str] = {}
    if _chooses_layers(config, budget):
        _, holdout = _split(ctx.calibration_data, config, True)
        layers = quantizable(graph, config)
        _name_unnamed(graph, layers)

        def quantized(trial: gs.Graph, kept: list[str]) -> None:
            quantize_dynamic(trial, replace(config, exclude=config.exclude + tuple(kept)))

        with graphs.runnable(graph) as float_model:
            trials = _Trials(graph, quantized, float_model, holdout, ctx)
            kept, stats = _layers_in_float(trials, [n.name for n in layers], config, budget, ctx)
        config = replace(config, exclude=config.exclude + tuple(kept))
    return {**quantize_dynamic(graph, config), **stats}


def _chooses_layers(config: Int8Config, budget: float | None) -> bool:
    """Whether layers are measured on held-back samples to stay in float: `float_layers` of them, or as many as
    the budget needs when `float_layers` is not set."""
    return bool(config.float_layers) if config.float_layers is not None else budget is not None


def _layers_in_float(trials: _Trials, candidates: list[str], config: Int8Config, budget: float | None,
                     ctx: PassContext) -> tuple[list[str], dict[str, int | float | str]]:
    """(layers to keep in float, their stats): the `float_layers` most sensitive ones when it is set (a budget
    search's candidate: the search measures the drop), else those `_fit_budget` needs for the budget."""
    if config.float_layers is not None:
        kept = trials.ranked(candidates)[:config.float_layers]
        stats: dict[str, int | float | str] = {"kept_float": len(kept)}
        if kept:
            stats["kept_float_layers"] = "|".join(kept)
        return kept, stats
    kept, drop = _fit_budget(trials, candidates, budget, ctx)
    return kept, _budget_stats(budget, trials.holdout, kept, drop)


def _budget_stats(budget: float, holdout, kept: list[str], drop: float) -> dict[str, int | float | str]:
    stats: dict[str, int | float | str] = {"budget_points": budget, "holdout_samples": holdout.num_samples,
                                           "holdout_drop_points": round(drop, 2), "kept_float": len(kept)}
    if kept:
        stats["kept_float_layers"] = "|".join(kept)
    if drop > budget:
        stats["warning"] = (f"the budget of {budget} points was not met on the held-back samples even with "
                            f"{len(kept)} layers in float")
    return stats


def kept_in_float(nodes: list[gs.Node], weighted: list[gs.Node], config: Int8Config) -> set[int]:
    """ids of the `nodes` that `config` leaves in float: named in `exclude`, of an op in `exclude-ops`, and the
    first / last of the `weighted` layers (graph order) with `keep-first` / `keep-last`."""
    kept = {id(node) for node in nodes if node.name in config.exclude or node.op in config.exclude_ops}
    if config.keep_first and weighted:
        kept.add(id(weighted[0]))
    if config.keep_last and weighted:
        kept.add(id(weighted[-1]))
    return kept


def _name_unnamed(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    """Give the unnamed `nodes` a name, so that they can be named in `exclude` and in the report."""
    names = graphs.Names(graph)
    for node in nodes:
        if not node.name:
            node.name = names.new(node.op)


def _activations(graph: gs.Graph, config: Int8Config) -> str:
    """`auto`: dynamic for transformers (their activation ranges vary per input and hold outlier channels that
    one calibrated range cannot serve), static uint8 for the rest."""
    if config.activations != "auto":
        return config.activations
    from onnxcomp.passes.quantize_dynamic import is_transformer

    return "dynamic" if is_transformer(graph) else "uint8"


HOLDOUT_LIMIT = 250  # held-back samples at most: enough to measure a drop, few enough to test many layers


def _split(data, config: Int8Config, hold_back: bool):
    """(calibration, held-back) samples, each spread evenly over the data: files are often sorted by class."""
    everything = np.arange(data.num_samples)
    held = np.array([], np.int64)
    if hold_back:
        count = min(max(1, int(round(len(everything) * config.holdout))), HOLDOUT_LIMIT)
        if len(everything) - count < 1:
            raise InputError("int8 with an accuracy budget needs at least 2 calibration samples")
        held = np.unique(np.linspace(0, len(everything) - 1, count).round().astype(np.int64))
    rest = np.setdiff1d(everything, held)
    if len(rest) > config.samples:
        rest = rest[np.unique(np.linspace(0, len(rest) - 1, config.samples).round().astype(np.int64))]
    calibration = data if len(rest) == data.num_samples else data.select(rest)
    return calibration, (data.select(held) if hold_back else None)


def _observed(plan: Plan) -> list[str]:
    """Every quantized activation: ranges for most, channel means (bias correction) and SQNR for all."""
    return sorted({t.name for t in plan.activations})


def _means(stats: dict[str, calibrate.TensorStats]) -> dict[str, np.ndarray | None]:
    return {name: s.channel_means for name, s in stats.items()}


def _params(plan: Plan, stats: dict[str, calibrate.TensorStats], config: Int8Config) -> dict[str, QuantParams]:
    params = {}
    for name in sorted(set(_observed(plan)) - set(plan.shares_input)):
        bounds = plan.clip_bounds.get(name)
        nonnegative = True if bounds is not None and bounds[0] >= 0 else None
        low, high = calibrate.choose_range(stats[name], config.method, percentile=config.percentile,
                                           nonnegative=nonnegative)
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        params[name] = _activation_params(low, high, config.activations)
    for output, source in plan.shares_input.items():
        params[output] = params[_root(source, plan.shares_input)]
    return params


def _rewrite(graph: gs.Graph, plan: Plan, params: dict[str, QuantParams], config: Int8Config,
             means: dict[str, np.ndarray | None]) -> list[int]:
    """Fold activations, quantize weights and biases, insert Q/DQ; returns the weight levels per channel."""
    names = graphs.Names(graph)
    levels: list[int] = []
    for node in plan.nodes:
        _fold_activation(node, plan)
    for node in plan.nodes:  # before the Q/DQ: bias scales look up each input by its original name
        if node.op in WEIGHTED:
            input_means = means.get(node.inputs[0].name) if config.bias_correction else None
            levels += _quantize_weights(graph, node, params, config, names, input_means)
    for tensor in plan.activations:
        _insert_qdq(graph, tensor, params[tensor.name], config.activations, names)
    for node in plan.nodes:
        if node.op in ("Add", "Mul"):
            _quantize_constant_operands(graph, node, config.activations, names)
    return levels


def _quantize_constant_operands(graph: gs.Graph, node: gs.Node, dtype: str, names: graphs.Names) -> None:
    """A constant operand of Add/Mul (a bias added after a Conv) behind DequantizeLinear, so that ONNX Runtime
    finds both inputs quantized and runs QLinearAdd / QLinearMul instead of a float op between Q/DQ."""
    for position, tensor in enumerate(node.inputs):
        value = graphs.constant_value(tensor)
        if value is None or value.dtype != np.float32:
            continue
        params = _activation_params(float(value.min()), float(value.max()), dtype)
        offset = 0 if dtype == "uint8" else -128
        quantized = np.clip(np.round(value / params.scale) + params.zero_point, offset, offset + 255)
        restored = (quantized - params.zero_point) * params.scale
        if np.abs(restored - value).max() > 0.01 * np.abs(value).max() or np.any((value != 0) & (restored == 0)):
            continue  # values spread over orders of magnitude: 8 bits would zero the small ones; stays float
        np_type = np.uint8 if dtype == "uint8" else np.int8
        base = f"{node.name or node.outputs[0].name}_operand{position}"
        node.inputs[position] = _dequantized(graph, names, base, quantized.astype(np_type),
                                             np.array(params.scale, np.float32),
                                             np.array(params.zero_point, np_type), None)


class _Trials:
    """Quantized copies of the graph run on held-back samples against the float model: `quantized(trial, kept)`
    quantizes a copy with the layers `kept` in float."""

    def __init__(self, graph: gs.Graph, quantized, float_model, holdout, ctx: PassContext):
        self.graph, self.quantized, self.holdout, self.ctx = graph, quantized, holdout, ctx
        self.reference = _outputs(float_model, holdout, ctx.provider)

    def require_scores(self) -> None:
        """A drop in points needs class scores: one row of scores per sample as the model's first output."""
        if not (self.reference.ndim == 2 and self.reference.shape[1] > 1
                and len(self.reference) == self.holdout.runs(self.holdout.num_samples, 16)[-1][1]):
            raise InputError("an accuracy budget for int8 needs class scores (one row of scores per sample) as the "
                             "model's first output; drop --max-accuracy-drop / max-drop for this model")

    def measure(self, kept: list[str]) -> tuple[float, float]:
        """(points lost, mean squared output error) with the layers `kept` in float."""
        trial = self.graph.copy()
        self.quantized(trial, kept)
        trial.cleanup().toposort(mode="nodes")
        with graphs.runnable(trial) as model:
            outputs = _outputs(model, self.holdout, self.ctx.provider, optimization="all")
        return _drop(self.reference, outputs, self.holdout.labels), float(np.mean((self.reference - outputs) ** 2))

    def ranked(self, candidates: list[str], error: float | None = None) -> list[str]:
        """The candidates, the one whose staying in float lowers the output error most first. A budget search
        runs int8 at several float-layers on the same graph: the order is measured once (ctx.memo)."""
        key = ("int8 ranking", graphs.digest(self.graph), tuple(candidates)) if self.ctx.memo is not None else None
        if key is not None and key in self.ctx.memo:
            return self.ctx.memo[key]
        if error is None:
            error = self.measure([])[1]
        recovery = {name: error - self.measure([name])[1]
                    for name in progress.each(candidates, "int8 sensitivity", unit="layer")}
        order = sorted(candidates, key=lambda n: -recovery[n])
        if key is not None:
            self.ctx.memo[key] = order
        return order


def _fit_budget(trials: _Trials, candidates: list[str], budget: float, ctx: PassContext) -> tuple[list[str], float]:
    """The `candidates` (layer names) to keep in float so the drop on held-back samples stays within `budget`,
    chosen greedily.

    Each layer's sensitivity is how much the output error falls when that layer alone stays float; layers go
    back to float in that order until the measured drop (top-1 against labels, else disagreement with the
    float model, on ONNX Runtime's int8 kernels) is within the budget. Greedy, not a search for the smallest
    set: it costs one trial model per layer, plus one per layer put back.
    """
    trials.require_scores()
    drop, error = trials.measure([])
    ctx.log.info("int8: drop %.2f points on %d held-back samples (budget %.2f)", drop, trials.holdout.num_samples,
                 budget)
    if drop <= budget:
        return [], drop
    kept: list[str] = []
    for name in trials.ranked(candidates, error):
        kept.append(name)
        drop, _ = trials.measure(kept)
        ctx.log.info("int8: %d layer(s) in float, drop %.2f points", len(kept), drop)
        if drop <= budget:
            break
    return kept, drop


def _outputs(model, dataset, provider: str, optimization: str = "basic") -> np.ndarray:
    """The first output of `model` on every sample of `dataset`, stacked."""
    return Runner(model, provider=provider, optimization=optimization).stacked(dataset, batch_size=16)


def _drop(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> float:
    """Points lost: top-1 against labels when there are labels, else disagreement with the float model."""
    expected, actual = reference.argmax(1), candidate.argmax(1)
    if labels is not None:
        labels = labels[:len(expected)]
        return 100.0 * (float(np.mean(expected == labels)) - float(np.mean(actual == labels)))
    return 100.0 * (1.0 - float(np.mean(expected == actual)))


def _plan(graph: gs.Graph, config: Int8Config) -> Plan:
    plan = Plan()
    _name_unnamed(graph, [node for node in graph.nodes if node.op in WEIGHTED])
    weighted = [n for n in graph.nodes if n.op in WEIGHTED and graphs.is_standard(n) and _weight(n) is not None]
    candidates = [n for n in graph.nodes if graphs.is_standard(n) and n.op in WEIGHTED + ELEMENTWISE + PASS_THROUGH]
    kept_float = kept_in_float(candidates, weighted, config)
    chosen: list[gs.Node] = []
    for node in candidates:
        if id(node) in kept_float:
            plan.skipped["excluded"] += 1
            continue
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            plan.skipped["resize-overshoots"] += 1  # cubic output leaves its input's range
            continue
        if node.op in WEIGHTED and _weight(node) is None:
            plan.skipped["weight-not-constant"] += 1
            continue
        if not all(_is_float(t) for t in _data_inputs(node)) or not _is_float(node.outputs[0]):
            plan.skipped["not-float"] += 1
            continue
        chosen.append(node)
    chosen = _fed_by_int8_work(chosen)
    chosen_ids = {id(n) for n in chosen}
    # A pass-through node is worth quantizing only next to int8 work; alone it would just add Q/DQ.
    chosen = [n for n in chosen if n.op not in PASS_THROUGH or _producer_chosen(n, chosen_ids)]
    plan.nodes = chosen
    marked: dict[str, gs.Tensor] = {}
    for node in chosen:
        for tensor in _data_inputs(node):
            marked.setdefault(tensor.name, tensor)
        output = _folded_output(graph, node, plan)
        if graphs.is_graph_output(graph, output):
            continue  # graph outputs stay float: the user's results keep full precision
        marked.setdefault(output.name, output)
        if node.op in PASS_THROUGH:
            plan.shares_input[output.name] = node.inputs[0].name
    plan.activations = list(marked.values())
    return plan


def _folded_output(graph: gs.Graph, node: gs.Node, plan: Plan) -> gs.Tensor:
    """The tensor whose range the node's output is quantized to: after a foldable Relu/Clip, that one's output."""
    output = node.outputs[0]
    if node.op in PASS_THROUGH or graphs.is_graph_output(graph, output):
        return output
    readers = graphs.consumers(output)
    if len(readers) != 1 or readers[0].op not in FOLDED_ACTIVATIONS or not graphs.is_standard(readers[0]):
        return output
    activation = readers[0]
    if graphs.is_graph_output(graph, activation.outputs[0]):
        return output  # graph outputs stay float, so nothing would clamp in the activation's place
    bounds = _activation_bounds(activation)
    if bounds is None or bounds[0] != 0.0:  # only clamps at zero fold exactly into a zero point
        return output
    plan.folded[id(node)] = activation
    plan.clip_bounds[activation.outputs[0].name] = bounds
    return activation.outputs[0]


def _activation_bounds(node: gs.Node) -> tuple[float, float] | None:
    if node.op == "Relu":
        return 0.0, float("inf")
    low, high = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)  # Clip before opset 11
    for position, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) > position and node.inputs[position].name:
            value = graphs.constant_value(node.inputs[position])
            if value is None or value.size != 1:
                return None
            if position == 1:
                low = float(value.reshape(()))
            else:
                high = float(value.reshape(()))
    return float(low), float(high)


def _fold_activation(node: gs.Node, plan: Plan) -> None:
    activation = plan.folded.get(id(node))
    if activation is None:
        return
    output = activation.outputs[0]
    activation.outputs.clear()
    activation.inputs.clear()
    node.outputs[0] = output


def _activation_params(low: float, high: float, dtype: str) -> QuantParams:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if scale <= 0 or not np.isfinite(scale):
        scale = 1.0  # a constant-zero tensor: any scale represents it exactly
    offset = 0 if dtype == "uint8" else -128
    zero_point = int(np.clip(round(-low / scale) + offset, offset, offset + 255))
    return QuantParams(float(scale), zero_point)


def _insert_qdq(graph: gs.Graph, tensor: gs.Tensor, params: QuantParams, dtype: str, names: graphs.Names) -> None:
    """Route `tensor` through QuantizeLinear → DequantizeLinear; readers keep its name and see the DQ output."""
    np_type = np.uint8 if dtype == "uint8" else np.int8
    scale = names.constant(f"{tensor.name}_scale", np.array(params.scale, np.float32))
    zero = names.constant(f"{tensor.name}_zero_point", np.array(params.zero_point, np_type))
    quantized = gs.Variable(names.new(f"{tensor.name}_quantized"), dtype=np_type, shape=tensor.shape)
    producer = graphs.producer(tensor)
    if producer is None or graphs.is_graph_output(graph, tensor):
        # a graph input or output keeps its name and its full precision; its readers move to the dequantized copy
        dequantized = gs.Variable(names.new(f"{tensor.name}_dequantized"), dtype=tensor.dtype, shape=tensor.shape)
        for reader in graphs.consumers(tensor):
            for position, value in enumerate(reader.inputs):
                if value is tensor:
                    reader.inputs[position] = dequantized
        source = tensor
    else:
        source = gs.Variable(names.new(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = source
        dequantized = tensor
    graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{tensor.name}_QuantizeLinear"),
                               inputs=[source, scale, zero], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tensor.name}_DequantizeLinear"),
                               inputs=[quantized, scale, zero], outputs=[dequantized]))


def _quantize_weights(graph: gs.Graph, node: gs.Node, params: dict[str, QuantParams], config: Int8Config,
                      names: graphs.Names, input_means: np.ndarray | None) -> list[int]:
    """Replace the node's weight (and bias) by int8 (int32) initializers behind DequantizeLinear."""
    position = 1
    weight = graphs.constant_value(node.inputs[position]).astype(np.float32)
    if node.op == "Gemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
        # alpha·A·B = A·(alpha·B), exactly: ONNX Runtime's QGemm fusion wants alpha = 1
        weight = weight * np.float32(node.attrs["alpha"])
        node.attrs["alpha"] = 1.0
    layer = WeightedLayer(node, node.inputs[position])
    axis = layer.unit_axis
    depthwise = node.op == "Conv" and int(node.attrs.get("group", 1)) == weight.shape[0] and weight.shape[1] == 1
    if config.per_channel:
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    else:
        moved = weight.reshape(1, -1)
    levels = weight_levels(moved, config.weight_range, depthwise)
    largest = np.abs(moved).max(axis=1)
    scale = np.where(largest > 0, largest / levels, 1.0)
    channels = weight.shape[axis]
    bias, input_params = _int32_bias(layer, channels), params.get(node.inputs[0].name)
    if bias is None and input_params is not None and input_means is not None and _can_take_bias(node):
        bias = np.zeros(channels, np.float32)  # bias correction needs somewhere to put the correction
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0  # no C before: beta did not matter; the new C must count once
    if bias is not None and input_params is not None:
        # The int32 bias step is input scale × weight scale. A channel with tiny weights but a real bias (a
        # nearly dead filter) would overflow int32: widen that channel's weight step instead; its weights are
        # tiny, so they lose little.
        needed = np.abs(bias).max() if len(scale) == 1 else np.abs(bias)
        scale = np.maximum(scale, needed / (input_params.scale * 2.0**30))
    scale = scale.astype(np.float32)
    quantized = np.clip(np.round(moved / scale[:, None]), -levels[:, None], levels[:, None]).astype(np.int8)
    if config.per_channel:
        quantized = np.moveaxis(quantized.reshape((weight.shape[axis],) + tuple(np.delete(weight.shape, axis))),
                                0, axis)
    else:
        quantized = quantized.reshape(weight.shape)
    if bias is not None and input_means is not None:
        restored = quantized.astype(np.float64) * (np.expand_dims(scale, tuple(i for i in range(weight.ndim)
                                                                                if i != axis))
                                                   if config.per_channel else scale[0])
        shift = _mean_shift(node, restored - weight, input_means)
        if shift is not None:
            bias = (np.broadcast_to(bias, shift.shape) - shift).astype(np.float32)
    base = node.name or node.outputs[0].name
    node.inputs[position] = _dequantized(graph, names, f"{base}_weight", quantized, scale,
                                         np.zeros(scale.shape, np.int8), axis if config.per_channel else None)
    if bias is not None and input_params is not None:
        bias_scale = (input_params.scale * np.broadcast_to(scale, bias.shape)).astype(np.float32)
        if (bias_scale > 0).all() and np.isfinite(bias_scale).all():  # else the bias stays float
            bias_quantized = np.clip(np.round(bias.astype(np.float64) / bias_scale), -(2**31) + 1, 2**31 - 1)
            dequantized_bias = _dequantized(graph, names, f"{base}_bias", bias_quantized.astype(np.int32),
                                            bias_scale, np.zeros(bias_scale.shape, np.int32),
                                            0 if bias_scale.size > 1 else None)
            if len(node.inputs) > 2:
                node.inputs[2] = dequantized_bias
            else:
                node.inputs.append(dequantized_bias)
    return levels.tolist()


def _can_take_bias(node: gs.Node) -> bool:
    """A Conv or Gemm without a bias input, which can be given one."""
    return node.op in ("Conv", "Gemm") and (len(node.inputs) < 3 or not node.inputs[2].name)


def _mean_shift(node: gs.Node, weight_error: np.ndarray, input_means: np.ndarray) -> np.ndarray | None:
    """E[ΔW·x] per output channel: the mean by which weight rounding moves each output (Nagel et al. 2019).

    Uses the per-channel means of the layer's input on calibration data; a convolution's border padding is
    ignored, which the mean over a whole feature map makes small.
    """
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        out_channels, in_per_group = weight_error.shape[:2]
        if input_means.shape != (groups * in_per_group,) or out_channels % groups:
            return None
        summed = weight_error.reshape(out_channels, in_per_group, -1).sum(axis=2)
        per_group = summed.reshape(groups, out_channels // groups, in_per_group)
        return np.einsum("goi,gi->go", per_group, input_means.reshape(groups, in_per_group)).reshape(out_channels)
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        alpha = float(node.attrs.get("alpha", 1.0))
        error = weight_error if int(node.attrs.get("transB", 0)) else weight_error.T  # [out, in]
        if input_means.shape != (error.shape[1],):
            return None
        return alpha * (error @ input_means)
    return None


def _int32_bias(layer: WeightedLayer, channels: int) -> np.ndarray | None:
    """The layer's constant bias when it can become int32 (Gemm: only with beta = 1, which the int32 bias
    cannot scale)."""
    if layer.node.op == "Gemm" and float(layer.node.attrs.get("beta", 1.0)) != 1.0:
        return None
    return layer.bias(channels)


def weight_levels(rows: np.ndarray, weight_range: str, depthwise: bool) -> np.ndarray:
    """Largest |integer| per output channel (row): 127, 63, or the largest that cannot saturate a u8s8 pair."""
    if weight_range == "full" or depthwise:
        return np.full(len(rows), 127)
    if weight_range == "reduced":
        return np.full(len(rows), 63)
    if rows.shape[1] < 2:
        return np.full(len(rows), 127)
    top_two = -np.partition(-np.abs(rows), 1, axis=1)[:, :2]
    second = top_two[:, 1] / np.maximum(top_two[:, 0], np.finfo(np.float32).tiny)
    # Any two weights may meet inputs of 255: need 255·(q₁ + q₂) ≤ 32767, i.e. q₁ + q₂ ≤ 128 with q₁ = L,
    # q₂ = round(second·L). Take the largest L from 64 (always safe) to 127 that keeps it.
    candidates = np.arange(64, 128)
    safe = candidates[None, :] + np.round(second[:, None] * candidates[None, :]) <= 128
    return np.where(safe, candidates[None, :], 64).max(axis=1)


def _dequantized(graph: gs.Graph, names: graphs.Names, base: str, values: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray, axis: int | None) -> gs.Variable:
    """A DequantizeLinear over new initializers; returns its float output."""
    output = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    per_tensor = axis is None
    graph.nodes.append(gs.Node(
        "DequantizeLinear", names.new(f"{base}_DequantizeLinear"), attrs={} if per_tensor else {"axis": axis},
        inputs=[names.constant(f"{base}_quantized", values),
                names.constant(f"{base}_scale", scale.reshape(()) if per_tensor else scale),
                names.constant(f"{base}_zero_point", zero.reshape(()) if per_tensor else zero)],
        outputs=[output]))
    return output


def _weight(node: gs.Node) -> np.ndarray | None:
    if len(node.inputs) < 2:
        return None
    if node.op == "MatMul":
        value = graphs.constant_value(node.inputs[1])
        return value if value is not None and value.ndim == 2 else None
    return graphs.constant_value(node.inputs[1])


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The activation inputs of a node: not weights, biases, shapes or other constants."""
    if node.op in WEIGHTED or node.op in PASS_THROUGH:
        return [node.inputs[0]]
    return [t for t in node.inputs if t.name and graphs.constant_value(t) is None]


def _is_float(tensor: gs.Tensor) -> bool:
    """float32, as far as the model says (after _infer_types); unknown types are left alone."""
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _infer_types(graph: gs.Graph) -> None:
    """Fill in element types the model does not state, with ONNX shape inference: int64 shape arithmetic
    (Shape → Gather → Concat → Reshape) must not be mistaken for activations. Tensors it cannot type stay
    unquantized."""
    tensors = graph.tensors()
    for name, value in graphs.inferred_types(graph).items():
        tensor = tensors.get(name)
        elem_type = value.tensor_type.elem_type if value.HasField("tensor_type") else 0
        if isinstance(tensor, gs.Variable) and tensor.dtype is None and elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def _fed_by_int8_work(chosen: list[gs.Node]) -> list[gs.Node]:
    """The weighted layers, and the elementwise nodes (in graph order) that read one of them or an elementwise
    node already kept, through a Relu/Clip folded after it: a residual Add, a per-channel Mul, the pooling of the
    head. An Add or Mul inside a normalization or activation written out in elementary ops (a LayerNorm's
    variance, a tanh-GELU's cube; Magika's classifier) reads only float ops, so 8 bits there add error and no
    int8 kernel: it stays float (Magika's agreement with fp32 went from 48 % to 98 % of 64 files)."""
    kept = {id(node) for node in chosen if node.op in WEIGHTED}
    for node in chosen:
        if node.op in ELEMENTWISE and any(id(source) in kept for source in map(_int8_source, _data_inputs(node))):
            kept.add(id(node))
    return [node for node in chosen if id(node) in kept or node.op in PASS_THROUGH]


def _int8_source(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, looking through a Relu or Clip (folded into its producer's range)."""
    source = graphs.producer(tensor)
    if source is not None and source.op in FOLDED_ACTIVATIONS and source.inputs:
        return graphs.producer(source.inputs[0])
    return source


def _producer_chosen(node: gs.Node, chosen: set[int]) -> bool:
    source = graphs.producer(node.inputs[0])
    readers = graphs.consumers(node.outputs[0])
    return (source is not None and id(source) in chosen) or any(id(r) in chosen for r in readers)


def _root(name: str, shares: dict[str, str]) -> str:
    while name in shares:
        name = shares[name]
    return name
