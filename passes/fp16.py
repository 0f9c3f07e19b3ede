"""fp16: weights and arithmetic in half precision, with float32 islands where the range or the runtime needs them.

Before (all float32):
    x ─► MatMul(W) ─► Add(b) ─► Softmax ─► y
After, provider=cuda (half kernels for almost every op; model I/O stays float32):
    x ─► Cast(f16) ─► MatMul(W:f16) ─► Add(b:f16) ─► Softmax ─► Cast(f32) ─► y
After, provider=cpu (ORT 1.32 on x86 has no half MatMul, Add or Softmax): weights stored in half, widened by
a Cast that ORT folds when it creates the session; the arithmetic stays float32:
    x ─► MatMul(Cast(W:f16 → f32)) ─► Add(Cast(b:f16 → f32)) ─► Softmax ─► y

Which nodes run in half is decided per node, then the graph is rewritten in one place:

1. Ranges, measured: the float model runs on the calibration data (without it, on random inputs, and the stats
   say so) and every float32 tensor's largest |x| is recorded. A node whose inputs or outputs reach the half
   type's largest value divided by `headroom` stays float32 (float16 overflows at 65504: a BERT attention mask
   of -3.4e38, a sum of squares, a large logit).
2. Kernels: a node stays float32 when the provider has no half kernel for its op (HALF_KERNELS, one table).
   ONNX Runtime's CPU provider does not fail on such nodes: it wraps each one in casts back to float32 at
   session creation (and runs a lone half node between float32 ones in float32 too), which costs time for
   nothing, so the pass keeps them float32 itself.
3. Reductions whose running sum never appears in any tensor (UNSAFE_REDUCTIONS) stay float32.
4. Islands: half nodes joined by tensors form islands; an island needing more casts at its borders than it
   holds arithmetic nodes would run slower than float32, and stays float32.
5. Rewrite: Cast nodes only where a half tensor meets a float32 reader (or the reverse); float32 weights become
   half (those of float32 nodes through a Cast that ONNX Runtime folds when it creates the session, so the file
   halves either way). Model inputs and outputs keep float32 unless io=half.

Subgraphs (If branches, Loop and Scan bodies) are converted too. Their inner tensors cannot be fetched from a
session, so after the rewrite the converted model runs on the calibration data once more: a subgraph whose node
then gives a non-finite output (where float32 gave finite ones) is converted back to float32.

bfloat16 (type=bfloat16) keeps float32's range but has 8 significant bits instead of 11. ONNX Runtime 1.32's CPU
provider has no bfloat16 arithmetic kernel at all (Add, MatMul, Conv: "Could not find an implementation"), so
bfloat16 is accepted only for provider=cuda.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxcomp import data as datasets
from onnxcomp import graph as graphs
from onnxcomp.errors import InputError
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes import calibrate
from onnxcomp.registry import register
from onnxcomp.runner import Runner, graph_of

TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
PROVIDERS = ("cpu", "cuda")

# Ops that move, select or reshape values without arithmetic: any type runs them, and an island made of them
# alone saves nothing.
MOVEMENT = frozenset({"Concat", "Constant", "Expand", "Flatten", "Gather", "Identity", "Reshape", "ScatterND",
                      "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze"})
# Ops that read only the shape of a float input: they take a half tensor as it is.
SHAPE_READERS = frozenset({"Shape", "Size"})

# Half kernels per (provider, type), the one place this is decided.
# cpu/float16: measured with ONNX Runtime 1.32 (x86-64 build, this machine): one-node models of ~90 ops in
# float16, session at ORT_DISABLE_ALL, optimized model written back; these are the ops left without inserted
# Casts. Every other op (Add, Mul, MatMul, Gemm, Conv, Softmax, Relu, Erf, pools, reductions, ...) got casts
# to float32 around it. ARM builds of ORT register more (MLAS half kernels); they are not measured here.
# cpu/bfloat16: none; Add, MatMul, Conv and the other arithmetic ops fail with "Could not find an implementation".
# cuda/*: from ORT's CUDA kernel registrations (onnxruntime/core/providers/cuda/cuda_execution_provider.cc,
# the MLFloat16 and BFloat16 entries); not measured here (no GPU on this machine). BatchNormalization is left out:
# from opset 15 its statistics have their own type parameters, which this pass keeps float32.
HALF_KERNELS = {
    ("cpu", "float16"): MOVEMENT | {"Clip", "LayerNormalization", "Max", "Min", "RMSNormalization", "Round",
                                    "Sign"},
    ("cpu", "bfloat16"): frozenset(),
    ("cuda", "float16"): MOVEMENT | {
        "Abs", "Add", "ArgMax", "ArgMin", "AveragePool", "Ceil", "Clip", "Conv",
        "ConvTranspose", "Div", "Elu", "Equal", "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool",
        "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid", "InstanceNormalization",
        "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LRN", "MatMul", "Max",
        "MaxPool", "Mean", "Min", "Mul", "Neg", "Pad", "Pow", "PRelu", "Reciprocal", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Resize", "Selu", "Sigmoid", "Sign", "Softmax", "Softplus", "Softsign",
        "Sqrt", "Sub", "Sum", "Tanh", "ThresholdedRelu", "Where"},
    ("cuda", "bfloat16"): MOVEMENT | {"Add", "Div", "Gemm", "LayerNormalization", "MatMul", "Mul", "ReduceSum",
                                     "Relu", "Sigmoid", "Softmax", "Sub", "Tanh"},
}

# Reductions whose intermediate values appear in no tensor, so measured ranges cannot vouch for them: a mean's
# running sum (ReduceMean, GlobalAveragePool: N times the mean), a norm's sum of squares under the root (ReduceL2),
# an exponential under the logarithm (ReduceLogSumExp), a running product (ReduceProd). Sums whose partial sums
# stay below their output (ReduceSum of values of one sign, ReduceSumSquare, ReduceL1) are covered by it.
UNSAFE_REDUCTIONS = frozenset({"GlobalAveragePool", "ReduceL2", "ReduceLogSumExp", "ReduceMean", "ReduceProd"})

CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
HALF_STORAGE_MIN = 64  # elements: smaller float32 constants of float32 nodes (eps, scales) keep their precision
FLOAT, HALF = "float", "half"


@dataclass(frozen=True)
class HalfConfig:
    type: str = "float16"              # float16 | bfloat16
    io: str = "float"                  # float: model inputs and outputs stay float32; half: they take `type`
    provider: str = ""                 # cpu | cuda: whose half kernels to use; empty: the run's provider
    headroom: float = 16.0             # a tensor stays float32 when its largest |x| exceeds the type's max / this
    samples: int = 64
    batch_size: int = 8
    exclude: tuple[str, ...] = ()      # node names kept in float32
    exclude_ops: tuple[str, ...] = ()  # op types kept in float32

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"type must be {' or '.join(TYPES)}, not '{self.type}'")
        if self.io not in ("float", "half"):
            raise ValueError(f"io must be float or half, not '{self.io}'")
        if self.provider not in ("",) + PROVIDERS:
            raise ValueError(f"provider must be {' or '.join(PROVIDERS)}, not '{self.provider}'")
        if not self.headroom >= 1.0:
            raise ValueError(f"headroom must be 1 or more, not {self.headroom}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch-size must be at least 1")


@dataclass
class Plan:
    half: set[int] = field(default_factory=set)              # id(node) of the nodes that run in half
    slots: dict[int, tuple] = field(default_factory=dict)    # id(node) → (input, output) indices in half
    tensors: dict[int, gs.Tensor] = field(default_factory=dict)  # id → tensors that hold half values
    kept: Counter = field(default_factory=Counter)           # reason → float32 nodes that had float tensors
    owners: dict[str, gs.Node] = field(default_factory=dict)  # key → top-level node whose subgraphs have half


@register
class Fp16(Pass):
    name = "fp16"
    summary = "half precision (float16 or bfloat16) with float32 islands where calibration ranges overflow"
    Config = HalfConfig
    visits_subgraphs = True

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        provider = self.config.provider or ctx.provider
        if not HALF_KERNELS.get((provider, self.config.type)):
            raise PreconditionError(f"fp16: type={self.config.type} cannot run on provider {provider}: ONNX Runtime "
                                    f"1.32's {provider.upper()} provider has no {self.config.type} kernels for "
                                    "arithmetic (Add, MatMul, Conv); use type=float16, or provider=cuda")
        if not any(_is_float32(t) for t in graphs.constant_tensors(graph)):
            raise PreconditionError("fp16: the model has no float32 weights to convert to half precision "
                                    "(it holds no float32 initializer or Constant)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        provider = config.provider or ctx.provider
        half_type = TYPES[config.type]
        with graphs.runnable(graph) as model:  # on disk for a large model: not a copy in memory
            structure, _ = graph_of(model)  # the graph, for names and inputs: weights stay on disk
            floats = _float32_names(structure)
            data, stats = _calibration_data(structure, ctx, config)
            ranges = _ranges(model, graph, floats, data, config, ctx.provider)
        limit = _largest(half_type) / config.headroom
        backup = graph.copy()
        reverted: set[str] = set()
        while True:
            plan = _plan(graph, floats, ranges, limit, config, provider, half_type, reverted)
            counts = _rewrite(graph, plan, half_type, config.io == "half", floats)
            failed = _overflowing_subgraphs(graph, plan, data, config, ctx.provider) - reverted
            if not failed:
                break
            reverted |= failed  # convert again from the float32 graph with these subgraphs left in float32
            _restore(graph, backup.copy())
        nodes = [node for scope in graphs.scopes(graph) for node in scope.nodes]
        ops = Counter(node.op for node in nodes if id(node) in plan.half)
        stats.update({"type": config.type, "provider": provider, "half_nodes": len(plan.half), "nodes": len(nodes),
                      "limit": float(f"{limit:.5g}"), **counts})
        stats.update({f"half:{op}": n for op, n in sorted(ops.items())})
        stats.update({f"float32:{reason}": n for reason, n in sorted(plan.kept.items())})
        if reverted:
            stats["float32_subgraphs"] = "|".join(sorted(reverted))
        return PassResult(True, stats)


def _is_float32(tensor: gs.Constant) -> bool:
    return np.asarray(tensor.values).dtype == np.float32


def _largest(half_type: int) -> float:
    return 65504.0 if half_type == TensorProto.FLOAT16 else 3.3895313892515355e38


def _calibration_data(model: onnx.ModelProto, ctx: PassContext, config: HalfConfig):
    """The data the ranges are measured on, and the stats that say which it was."""
    if ctx.calibration_data is not None:
        data = ctx.calibration_data
        random = getattr(data, "is_random", False)
    else:
        try:
            data = datasets.random_data(model, samples=config.samples, seed=ctx.seed)
        except datasets.RandomInputsUnavailable as exc:
            raise InputError(f"fp16 measures ranges on data and has no calibration data (calib_data=): {exc}") \
                from None
        random = True
    stats: dict = {"samples": min(config.samples, data.num_samples)}
    stats["ranges_from"] = "random inputs" if random else "calibration data"
    if random:
        stats["warning_data"] = ("ranges measured on random inputs, not real ones: give calibration data so that "
                                 "float32 islands are placed where real inputs overflow")
    return data, stats


def _float32_names(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the model and its subgraphs, as declared or as ONNX infers them."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help; tensors it cannot type stay float32
        pass
    names: set[str] = set()
    pending = [model.graph]
    while pending:
        current = pending.pop()
        for value in list(current.input) + list(current.output) + list(current.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type == TensorProto.FLOAT:
                names.add(value.name)
        names.update(t.name for t in current.initializer if t.data_type == TensorProto.FLOAT)
        for node in current.node:
            if node.op_type == "Constant" and any(a.name == "value" and a.t.data_type == TensorProto.FLOAT
                                                  for a in node.attribute):
                names.update(node.output)
            pending.extend(graphs.node_subgraphs(node))
    return names


def _ranges(model: onnx.ModelProto | str, graph: gs.Graph, floats: set[str], data, config: HalfConfig,
            provider: str) -> dict[str, float]:
    """Largest |x| of every float32 tensor of the main graph that depends on the inputs, on the data."""
    tensors = [name for name, t in graph.tensors().items()
               if name in floats and isinstance(t, gs.Variable) and graphs.constant_value(t) is None]
    if not tensors:
        return {}
    found = calibrate.collect(model, tensors, data, samples=min(config.samples, data.num_samples),
                              batch_size=config.batch_size, provider=provider, progress=False)
    return {name: max(abs(s.minimum), abs(s.maximum)) for name, s in found.items() if s.count}


def _half_dtype(half_type: int) -> np.dtype:
    if half_type == TensorProto.FLOAT16:
        return np.dtype(np.float16)
    import ml_dtypes  # onnx's own dependency for bfloat16 arrays

    return np.dtype(ml_dtypes.bfloat16)


def _representable(values: np.ndarray, half_type: int) -> bool:
    """Whether a float32 constant keeps its meaning in half: finite, in range, and not all flushed to zero."""
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0:
        return True
    if not np.all(np.isfinite(values)) or float(np.abs(values).max()) > _largest(half_type):
        return False
    nonzero = values[values != 0]
    return nonzero.size == 0 or bool(np.any(nonzero.astype(_half_dtype(half_type)) != 0))


def _walk(graph: gs.Graph, reverted: set[str], inside: bool = False, key: str = ""):
    """(scope, whether the scope stays float32, key of its top-level control-flow node) for every scope."""
    yield graph, inside, key
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                owner = key or node.outputs[0].name
                yield from _walk(value, reverted, inside or owner in reverted, owner)


def _slots(node: gs.Node, opset: int, half_type: int, floats: set[str]) -> tuple[list[int], list[int]] | None:
    """(input indices, output indices) that take the half type when `node` runs in half: those typed like its
    first float32 input (its first output when it has none); None when the operator's schema allows no half."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None

    def formal(params, index):
        return params[min(index, len(params) - 1)].type_str if params else ""

    inputs = [i for i, t in enumerate(node.inputs) if t.name]
    float_inputs = [i for i in inputs if node.inputs[i].name in floats]
    param = formal(schema.inputs, float_inputs[0]) if float_inputs else formal(schema.outputs, 0)
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}.get(param, [param])
    if f"tensor({'float16' if half_type == TensorProto.FLOAT16 else 'bfloat16'})" not in allowed:
        return None
    return ([i for i in inputs if formal(schema.inputs, i) == param],
            [i for i, t in enumerate(node.outputs) if t.name and formal(schema.outputs, i) == param])


def _plan(graph: gs.Graph, floats: set[str], ranges: dict[str, float], limit: float, config: HalfConfig,
          provider: str, half_type: int, reverted: set[str]) -> Plan:
    plan = Plan()
    inner: list[tuple[str, gs.Node]] = []  # half candidates inside subgraphs, with their top-level node's key
    kernels = HALF_KERNELS[(provider, config.type)]
    for scope, inside_reverted, key in _walk(graph, reverted):
        for node in scope.nodes:
            touches_float = any(t.name in floats for t in list(node.inputs) + list(node.outputs))
            if not touches_float or node.op in SHAPE_READERS:
                continue
            slots = _slots(node, graph.opset, half_type, floats) if graphs.is_standard(node) else None
            reason = _float32_reason(node, slots, inside_reverted, kernels, floats, ranges, limit, config,
                                     half_type)
            if reason:
                plan.kept[reason] += 1
                continue
            plan.half.add(id(node))
            plan.slots[id(node)] = slots
            if key:
                inner.append((key, node))
    _drop_costly_islands(graph, plan, config.io == "half")
    plan.owners = {key: _top_owner(graph, key) for key, node in inner if id(node) in plan.half}
    for scope in graphs.scopes(graph):
        for node in scope.nodes:
            if id(node) in plan.half:
                plan.tensors.update({id(node.outputs[i]): node.outputs[i] for i in plan.slots[id(node)][1]})
    if config.io == "half":
        plan.tensors.update({id(t): t for t in graph.inputs if t.name in floats})
    return plan


def _top_owner(graph: gs.Graph, key: str) -> gs.Node:
    return next(node for node in graph.nodes if node.outputs and node.outputs[0].name == key)


def _float32_reason(node: gs.Node, slots, inside_reverted: bool, kernels, floats: set[str],
                    ranges: dict[str, float], limit: float, config: HalfConfig, half_type: int) -> str | None:
    """Why `node` stays float32, or None when it runs in half."""
    if node.name in config.exclude or node.op in config.exclude_ops:
        return "excluded"
    if node.op in CONTROL_FLOW:
        return "control-flow"  # its subgraphs are converted on their own
    if inside_reverted:
        return "subgraph-overflow"
    if node.op in UNSAFE_REDUCTIONS:
        return "reduction"
    if node.op not in kernels:
        return "no-kernel"
    if slots is None:
        return "types"
    tensors = [node.inputs[i] for i in slots[0]] + [node.outputs[i] for i in slots[1]]
    if not all(t.name in floats for t in tensors):
        return "types"  # only float32 tensors are converted; unknown or other types stay as they are
    if node.op == "Constant":
        value = node.attrs.get("value")
        return None if isinstance(value, gs.Constant) and _representable(value.values, half_type) else "range"
    for tensor in tensors:
        constant = graphs.constant_value(tensor)  # initializers and Constant node outputs
        if constant is not None and not _representable(constant, half_type):
            return "range"
        if ranges.get(tensor.name, 0.0) > limit:
            return "range"
    return None


def _drop_costly_islands(graph: gs.Graph, plan: Plan, io_half: bool) -> None:
    """Return to float32 every island (half nodes joined by half tensors) that needs more casts of activations at
    its borders than it has arithmetic nodes: there the casts cost more than half precision saves."""
    parent: dict[int, int] = {}

    def root(key: int) -> int:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    nodes = [node for scope in graphs.scopes(graph) for node in scope.nodes if id(node) in plan.half]
    for node in nodes:
        for i in plan.slots[id(node)][0]:
            source = graphs.producer(node.inputs[i])
            if source is not None and _writes_half(source, node.inputs[i], plan):
                parent[root(id(node))] = root(id(source))
    casts: Counter = Counter()
    cast_inputs: set[tuple[int, int]] = set()  # (island, tensor): one Cast serves every reader in the island
    arithmetic: Counter = Counter(root(id(node)) for node in nodes if node.op not in MOVEMENT)
    float_outputs = {id(t) for scope in graphs.scopes(graph) for t in scope.outputs
                     if scope is not graph or not io_half}  # graph outputs that must be float32
    inputs = {id(t) for t in graph.inputs} if io_half else set()
    for node in nodes:
        island = root(id(node))
        for i in plan.slots[id(node)][0]:
            tensor = node.inputs[i]
            source = graphs.producer(tensor)
            constant = isinstance(tensor, gs.Constant) or (source is not None and source.op == "Constant")
            if not constant and id(tensor) not in inputs and not (source and _writes_half(source, tensor, plan)):
                cast_inputs.add((island, id(tensor)))
        for i in plan.slots[id(node)][1]:
            tensor = node.outputs[i]
            float_readers = [c for c in graphs.consumers(tensor)
                             if c.op not in SHAPE_READERS and not _reads_half(c, tensor, plan)]
            casts[island] += bool(float_readers) or id(tensor) in float_outputs
    casts.update(island for island, _ in cast_inputs)
    for node in nodes:
        if casts[root(id(node))] > arithmetic[root(id(node))]:
            plan.half.discard(id(node))
            plan.kept["casts-cost-more"] += 1


def _writes_half(node: gs.Node, tensor: gs.Tensor, plan: Plan) -> bool:
    return id(node) in plan.half and any(node.outputs[i] is tensor for i in plan.slots[id(node)][1])


def _reads_half(node: gs.Node, tensor: gs.Tensor, plan: Plan) -> bool:
    return id(node) in plan.half and any(node.inputs[i] is tensor for i in plan.slots[id(node)][0])


class _Rewriter:
    """Edits the graph to the plan: half nodes read half tensors, float32 nodes float32 ones, with one Cast per
    tensor, target type and scope where they differ; float32 constants are stored in half."""

    def __init__(self, graph: gs.Graph, plan: Plan, half_type: int, floats: set[str]):
        self.graph, self.plan, self.half_type, self.floats = graph, plan, half_type, floats
        self.half_dtype = _half_dtype(half_type)
        self.names = graphs.Names(graph)
        self.casts: dict[tuple[int, int, str], gs.Variable] = {}
        self.halves: dict[int, gs.Constant] = {}
        self.activation_casts = self.weight_casts = 0

    def reading(self, scope: gs.Graph, tensor: gs.Tensor, target: str) -> gs.Tensor:
        """`tensor` as a reader in `scope` that wants `target` must see it."""
        if isinstance(tensor, gs.Constant):
            return self._constant(scope, tensor, target)
        have = HALF if id(tensor) in self.plan.tensors else FLOAT
        return tensor if have == target else self._cast(scope, tensor, target)

    def _constant(self, scope: gs.Graph, tensor: gs.Constant, target: str) -> gs.Tensor:
        values = np.asarray(tensor.values)
        if target == FLOAT and (values.size < HALF_STORAGE_MIN or not _representable(values, self.half_type)):
            return tensor
        if id(tensor) not in self.halves:
            self.halves[id(tensor)] = self.names.constant(tensor.name + "_half", values.astype(self.half_dtype))
        half = self.halves[id(tensor)]
        return half if target == HALF else self._cast(scope, half, FLOAT)

    def _cast(self, scope: gs.Graph, tensor: gs.Tensor, target: str) -> gs.Variable:
        key = (id(scope), id(tensor), target)
        if key not in self.casts:
            dtype = self.half_dtype if target == HALF else np.dtype(np.float32)
            cast = gs.Variable(self.names.new(f"{tensor.name}_{target}"), dtype=dtype, shape=tensor.shape)
            to = self.half_type if target == HALF else TensorProto.FLOAT
            scope.nodes.append(gs.Node("Cast", self.names.new(f"{tensor.name}_to_{target}"), {"to": to},
                                       inputs=[tensor], outputs=[cast]))
            self.casts[key] = cast
            if isinstance(tensor, gs.Constant):
                self.weight_casts += 1
            else:
                self.activation_casts += 1
        return self.casts[key]

    def run(self, io_half: bool) -> None:
        for scope in graphs.scopes(self.graph):
            for node in list(scope.nodes):
                if id(node) in self.plan.half:
                    self._to_half(scope, node)
                elif node.op == "Constant":
                    self._store_in_half(scope, node)
                elif node.op not in SHAPE_READERS and graphs.is_standard(node):  # other domains: inputs as they were
                    for i, tensor in enumerate(node.inputs):
                        if tensor.name in self.floats:
                            node.inputs[i] = self.reading(scope, tensor, FLOAT)
        for tensor in self.plan.tensors.values():
            tensor.dtype = self.half_dtype
        for scope in graphs.scopes(self.graph):
            target = HALF if scope is self.graph and io_half else FLOAT
            for i, tensor in enumerate(scope.outputs):
                if tensor.name in self.floats and not isinstance(tensor, gs.Constant):
                    self._keep_output_type(scope, i, tensor, target)

    def _to_half(self, scope: gs.Graph, node: gs.Node) -> None:
        if node.op == "Constant":
            value = node.attrs["value"]
            node.attrs["value"] = gs.Constant(value.name, np.asarray(value.values).astype(self.half_dtype))
        for i in self.plan.slots[id(node)][0]:
            node.inputs[i] = self.reading(scope, node.inputs[i], HALF)

    def _store_in_half(self, scope: gs.Graph, node: gs.Node) -> None:
        """A float32 Constant node's value is stored in half and widened by a Cast that ORT folds, as for
        initializers: exporters such as Paddle's and the Silero VAD's keep their weights in Constant nodes."""
        value, output = node.attrs.get("value"), node.outputs[0]
        if (not isinstance(value, gs.Constant) or output.name not in self.floats or value.values.size < HALF_STORAGE_MIN
                or not _representable(value.values, self.half_type)):
            return
        node.attrs["value"] = gs.Constant(value.name, np.asarray(value.values).astype(self.half_dtype))
        half = gs.Variable(self.names.new(f"{output.name}_{HALF}"), dtype=self.half_dtype, shape=output.shape)
        node.outputs.clear()  # graphsurgeon's lists keep the tensors' producers in step
        node.outputs.append(half)
        scope.nodes.append(gs.Node("Cast", self.names.new(f"{output.name}_to_{FLOAT}"), {"to": TensorProto.FLOAT},
                                   inputs=[half], outputs=[output]))
        self.halves[id(value)] = node.attrs["value"]
        self.weight_casts += 1

    def _keep_output_type(self, scope: gs.Graph, index: int, tensor: gs.Tensor, target: str) -> None:
        """A graph output keeps its name and gets `target`'s type: the tensor computed in the other type is
        renamed and a Cast writes the output."""
        converted = self.reading(scope, tensor, target)
        if converted is tensor:
            return
        name = tensor.name
        tensor.name = self.names.new(f"{name}_{HALF if target == FLOAT else FLOAT}")
        converted.name = name
        scope.outputs[index] = converted


def _rewrite(graph: gs.Graph, plan: Plan, half_type: int, io_half: bool, floats: set[str]) -> dict:
    before = _float_bytes(graph)
    rewriter = _Rewriter(graph, plan, half_type, floats)
    rewriter.run(io_half)
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort(mode="nodes")
    return {"half_weights": len(rewriter.halves), "activation_casts": rewriter.activation_casts,
            "weight_casts": rewriter.weight_casts, "weight_bytes_before": before,
            "weight_bytes_after": _float_bytes(graph)}


def _float_bytes(graph: gs.Graph) -> int:
    return sum(np.asarray(t.values).nbytes for t in graphs.constant_tensors(graph)
               if np.asarray(t.values).dtype.kind == "f" or t.values.dtype.name == "bfloat16")


def _overflowing_subgraphs(graph: gs.Graph, plan: Plan, data, config: HalfConfig, provider: str) -> set[str]:
    """Keys of the control-flow nodes whose half subgraphs give non-finite outputs on the data."""
    outputs = {key: [t.name for t in node.outputs if t.name] for key, node in plan.owners.items()}
    if not outputs:
        return set()
    names = [name for names in outputs.values() for name in names]
    failed: set[str] = set()
    with graphs.runnable(graph) as model:
        runner = Runner(model, provider=provider, outputs=names, role="the half-precision model")
        for _, values in runner.batches(data, min(config.samples, data.num_samples), config.batch_size):
            for key, names in outputs.items():
                if any(values[n].dtype.kind == "f" and not np.all(np.isfinite(values[n])) for n in names):
                    failed.add(key)
    return failed


def _restore(graph: gs.Graph, saved: gs.Graph) -> None:
    graph.nodes, graph.inputs, graph.outputs = saved.nodes, saved.inputs, saved.outputs
