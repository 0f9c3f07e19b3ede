"""Weighted layers seen as rows, and what each multiplies its weights with on calibration data.

Conv, ConvTranspose, Gemm and MatMul all compute, for every output unit r of group g, a dot product
y = w[g, r] · x over an input vector x of D values: a patch of the input (Conv), a row of A (Gemm, MatMul).
`WeightedLayer.rows` gives the weight in that (groups, rows, D) layout and `from_rows` puts it back, so
pruning and clustering can be written once. `input_statistics` gathers, on calibration data, the second moments
Σ x xᵀ and the sums Σ x of those input vectors: what a change of the weights costs in output error is
Δw H Δwᵀ with H = E[x xᵀ].

ConvTranspose scatters instead of gathering, so its statistics are per input channel only (the diagonal of H).
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from onnxcomp import graph as graphs
from onnxcomp.errors import InputError
from onnxcomp.progress import bar
from onnxcomp.runner import PrefixRuns, Runner

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Candidate dampings of H, one chosen per model on held-out calibration samples: large values trust the
# calibration data less (the updates tend to none), for data that does not cover what the model sees (few
# images of many classes); small values fit the layer outputs closely.
DAMPINGS = (0.01, 0.1, 1.0, 10.0)
CHECK_EVERY = 5  # every 5th calibration batch is held out to choose the damping
UNCHECKED_DAMPING = 1.0  # too few batches to hold some out: trust the calibration data moderately
BLOCK = 128  # columns whose choices are made before their updates reach the later columns
FLOAT_KINDS = ("float16", "float32", "float64", "bfloat16")


@dataclass(eq=False)
class WeightedLayer:
    node: gs.Node
    weight: gs.Constant

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self.weight.values)

    @property
    def is_table(self) -> bool:
        """An embedding table (Gather on a constant [V, D]): a weight without a dot product, so rows(), the
        input statistics and the output probes do not apply; passes store it but do not measure it."""
        return self.node.op == "Gather"

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.node.op in ("Conv", "ConvTranspose") else 1

    @property
    def depthwise(self) -> bool:
        return self.node.op == "Conv" and self.groups > 1 and self.values.shape[1] == 1

    @property
    def diagonal(self) -> bool:
        """True when only per-input-channel statistics describe the layer's input (ConvTranspose)."""
        return self.node.op == "ConvTranspose"

    @property
    def can_take_bias(self) -> bool:
        """True when the layer has, or may be given, a per-output-unit bias."""
        node = self.node
        if node.op in ("Conv", "ConvTranspose"):
            return len(node.inputs) < 3 or graphs.constant_value(node.inputs[2]) is not None
        if node.op == "Gemm":
            if len(node.inputs) < 3 or not node.inputs[2].name:
                return True
            bias = graphs.constant_value(node.inputs[2])
            units = self.rows().shape[1]
            return bias is not None and float(node.attrs.get("beta", 1.0)) != 0.0 and \
                bias.size in (1, units) and bias.shape[-1:] in ((1,), (units,), ()) and bias.ndim <= 2
        return False  # MatMul: its bias, if any, is a separate Add

    @property
    def unit_axis(self) -> int:
        """The weight's axis over output units: what per-channel scales and biases run along."""
        op = self.node.op
        if op == "ConvTranspose":
            return 1
        if op == "Conv" or (op == "Gemm" and int(self.node.attrs.get("transB", 0))):
            return 0
        return 1  # Gemm without transB, MatMul: (K, N)

    def bias(self, units: int) -> np.ndarray | None:
        """The constant bias as one float32 value per output unit (Gemm's C broadcast the way Gemm does), or
        None: no bias input, one that is not constant or not per unit, or MatMul (its bias is a separate Add)."""
        node = self.node
        if node.op == "MatMul" or len(node.inputs) < 3 or not node.inputs[2].name:
            return None
        bias = graphs.constant_value(node.inputs[2])
        if bias is None or bias.size not in (units, 1) or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
            return None
        return np.broadcast_to(bias.reshape(-1), (units,)).astype(np.float32)

    def shift_bias(self, shift: np.ndarray, names: graphs.Names) -> None:
        """Add `shift` to the layer's output per unit, through a new bias initializer."""
        node = self.node
        if node.op == "Gemm":
            shift = shift / float(node.attrs.get("beta", 1.0)) * float(node.attrs.get("alpha", 1.0))
        has_bias = len(node.inputs) >= 3 and node.inputs[2].name
        current = graphs.constant_value(node.inputs[2]).astype(np.float64).reshape(-1) if has_bias else 0.0
        bias = names.constant(f"{self.weight.name}_bias", (current + shift).astype(self.values.dtype))
        if has_bias:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)

    def rows(self, values: np.ndarray | None = None) -> np.ndarray:
        """The weight as (groups, output units per group, inputs per unit)."""
        w = self.values if values is None else values
        g = self.groups
        if self.node.op == "Conv":
            return w.reshape(g, w.shape[0] // g, -1)
        if self.node.op == "ConvTranspose":  # (Cin, Cout/g, *k): unit = output channel, inputs = (ci, k)
            cin, cout, kernel = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
            return w.reshape(g, cin // g, cout, kernel).transpose(0, 2, 1, 3).reshape(g, cout, -1)
        if self.node.op == "Gemm" and int(self.node.attrs.get("transB", 0)):
            return w[None]
        return w.T[None]  # Gemm without transB, MatMul: (K, N)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        shape = self.values.shape
        if self.node.op == "Conv":
            return rows.reshape(shape)
        if self.node.op == "ConvTranspose":
            g, cout = rows.shape[0], rows.shape[1]
            cin_g = shape[0] // g
            return rows.reshape(g, cout, cin_g, -1).transpose(0, 2, 1, 3).reshape(shape)
        if self.node.op == "Gemm" and int(self.node.attrs.get("transB", 0)):
            return rows[0]
        return rows[0].T

    def input_vectors(self, x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
        """At most `limit` input vectors of this layer from a batch of its input `x`: (P, groups, D).

        For ConvTranspose, the per-channel values (P, groups, Cin / groups).
        """
        op = self.node.op
        if op in ("Gemm", "MatMul"):
            if op == "Gemm" and int(self.node.attrs.get("transA", 0)):
                x = x.T
            vectors = x.reshape(-1, x.shape[-1])
            return _sample(vectors, limit, rng)[:, None, :]
        if op == "ConvTranspose":
            pixels = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            return _sample(pixels, limit, rng).reshape(-1, self.groups, x.shape[1] // self.groups)
        return _conv_patches(x, self.node, self.values.shape[2:], limit, rng).reshape(-1, self.groups,
                                                                                      self.rows().shape[2])


def find_layers(graph: gs.Graph, ops: tuple[str, ...] = WEIGHTED_OPS,
                tables: bool = False) -> tuple[list[WeightedLayer], Counter]:
    """Layers of `ops` with a constant float weight (and, with `tables`, embedding tables), and the reasons
    others were passed over.

    A weight held in a Constant node becomes an initializer, so that a pass can replace it.
    """
    layers, skipped = [], Counter()
    readers: Counter = Counter()
    for node in graph.nodes:
        for tensor in node.inputs:
            readers[id(tensor)] += 1
    names = None
    for node in graph.nodes:
        is_table = tables and embedding_table(node) is not None
        if not is_table and (node.op not in ops or not graphs.is_standard(node) or len(node.inputs) < 2):
            continue
        tensor = node.inputs[0 if is_table else 1]
        value = graphs.constant_value(tensor)
        if value is None:
            skipped["weight-not-constant"] += 1
            continue
        if node.op == "MatMul" and value.ndim != 2:
            skipped["batched-matmul"] += 1
            continue
        if value.dtype.name not in FLOAT_KINDS:
            skipped["not-float"] += 1
            continue
        if readers[id(tensor)] > 1 or graphs.is_graph_output(graph, tensor):
            skipped["weight-shared"] += 1  # changing it for one reader would change it for the others
            continue
        if not isinstance(tensor, gs.Constant):  # a Constant node's output: make it an initializer
            names = names or graphs.Names(graph)
            constant = names.constant(tensor.name + "_value", value)
            node.inputs[0 if is_table else 1] = constant
            tensor = constant
        if not node.name:
            names = names or graphs.Names(graph)
            node.name = names.new(f"{node.op}_{tensor.name}")
        layers.append(WeightedLayer(node, tensor))
    return layers, skipped


def select_layers(graph: gs.Graph, ops: tuple[str, ...], *, include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = (), min_size: int = 0, depthwise: bool = True,
                  tables: bool = False) -> tuple[list[WeightedLayer], Counter, list[str]]:
    """The layers a compression pass works on (with `tables`, embedding tables too), the reasons others were
    passed over, and warnings.

    `include` / `exclude` are shell patterns over node and weight names; a pattern that matches no layer gets
    a warning that names it. Depthwise convolutions (unless `depthwise`) and weights under `min_size` are left.
    """
    layers, skipped = find_layers(graph, ops, tables)
    matched = dict.fromkeys(include + exclude, False)
    chosen = []
    for layer in layers:
        names = (layer.node.name, layer.weight.name)
        hits = {p for p in matched if any(fnmatch.fnmatchcase(n, p) for n in names if n)}
        for pattern in hits:
            matched[pattern] = True
        if include and not hits & set(include):
            skipped["not-included"] += 1
        elif hits & set(exclude):
            skipped["excluded"] += 1
        elif layer.depthwise and not depthwise:
            skipped["depthwise"] += 1
        elif layer.values.size < min_size:
            skipped["small"] += 1
        else:
            chosen.append(layer)
    unmatched = [p for p, hit in matched.items() if not hit]
    warnings = [f"pattern{'s' if len(unmatched) > 1 else ''} {', '.join(repr(p) for p in unmatched)} matched no "
                "layer it could change"] if unmatched else []
    return chosen, skipped, warnings


MIN_TABLE = 1024  # entries: smaller embedding tables save nothing worth a decoder


def embedding_table(node: gs.Node) -> np.ndarray | None:
    """The [V, D] float32 table of a Gather that looks up rows of a constant (an embedding table), or None."""
    if node.op != "Gather" or not graphs.is_standard(node) or int(node.attrs.get("axis", 0)) != 0 \
            or len(node.inputs) != 2:
        return None
    table = graphs.constant_value(node.inputs[0])
    if table is None or table.ndim != 2 or table.dtype != np.float32 or table.size < MIN_TABLE:
        return None
    return table


FREQUENT_SHARE = 0.25  # a table row read this many times per calibration sample (or more) is kept exact
MAX_EXACT_ROWS = 255   # rows kept exact per table at most (int4 numbers them in a byte)


def frequent_rows(graph: gs.Graph, tables: list[gs.Node], data, *, samples: int, batch_size: int,
                  provider: str = "cpu") -> dict[int, list[int]]:
    """The rows of each table (by id of its Gather) that the float model reads FREQUENT_SHARE times per
    calibration sample or more, at most MAX_EXACT_ROWS, the most read first; one run over `samples` samples.

    Compressed tables keep these rows exact: tokens in nearly every input, as a BERT's [CLS], [SEP] and padding,
    add the same rounding error to every sentence, a bias that no later layer averages out (paraphrase-MiniLM-L3's
    word table shared at 5 bits: sentence-embedding cosine 0.963; with those three rows exact, 0.99995).
    """
    if not tables:
        return {}
    samples = min(samples, data.num_samples)
    ids = {id(node): node.inputs[1].name for node in tables}
    sizes = {id(node): embedding_table(node).shape[0] for node in tables}
    counts = {key: np.zeros(sizes[key], np.int64) for key in ids}
    with graphs.runnable(graph) as model, bar(samples, "table rows", unit="sample") as shown:
        runner = Runner(model, provider=provider, outputs=sorted(set(ids.values())),
                        role="the model, counting the table rows it reads")
        for done, values in runner.batches(data, samples, batch_size):
            for key, name in ids.items():
                counts[key] += np.bincount(values[name].reshape(-1) % sizes[key], minlength=sizes[key])
            shown.update(done - shown.n)
    rows = {}
    for key, count in counts.items():
        order = np.argsort(-count, kind="stable")[:MAX_EXACT_ROWS]
        rows[key] = sorted(int(row) for row in order if count[row] >= FREQUENT_SHARE * samples)
    return rows


def kept_exact_rows(graph: gs.Graph, tables: list[WeightedLayer], ctx, pass_name: str, stats: dict, *,
                    enabled: bool, samples: int, batch_size: int) -> dict[int, list[int]]:
    """The rows of each table (by id of its Gather) that a compression pass keeps exact: frequent_rows on the
    calibration data; without data none, with a warning in the pass's stats."""
    if not tables or not enabled:
        return {}
    if ctx.calibration_data is None:
        warn(stats, ctx, pass_name, "embedding tables compressed without calibration data: the rows read in nearly "
             "every input ([CLS], [SEP], padding) cannot be found and kept exact, and their error reaches every "
             "output; give calib_data=")
        return {}
    return frequent_rows(graph, [table.node for table in tables], ctx.calibration_data, samples=samples,
                         batch_size=batch_size, provider=ctx.provider)


def warn(stats: dict, ctx, pass_name: str, warning: str) -> None:
    """Log `warning` and add it to the pass's stats (where the report shows it)."""
    ctx.log.warning("%s: %s", pass_name, warning)
    stats["warning"] = "; ".join(filter(None, [stats.get("warning"), warning]))


def prepare(graph: gs.Graph, select, ctx, pass_name: str, compact: bool) -> tuple[list[WeightedLayer], Counter, dict]:
    """(layers, skipped, stats) for a compression pass, from `select()` → (layers, skipped, warnings).

    Weights computed from constants, or stored in a compact layout by an earlier pass, are folded into
    initializers first. Warnings are logged and put in the stats. When there are layers to change and they are
    to be stored compactly, the opset is raised to what the decoding ops need (with ONNX's checked converter).
    """
    from onnxcomp import encoding

    layers, skipped, warnings = select()
    if skipped.get("weight-not-constant"):
        graph.fold_constants().cleanup()
        layers, skipped, warnings = select()
    stats: dict[str, int | float | str] = {}
    for warning in warnings:
        warn(stats, ctx, pass_name, warning)
    if layers and compact and graph.opset < encoding.SPARSE_MIN_OPSET:
        stats["opset"] = f"{graph.opset}->{encoding.SPARSE_MIN_OPSET}"
        graphs.upgrade_opset(graph, encoding.SPARSE_MIN_OPSET)  # raises a PreconditionError when it cannot
        layers, skipped, _ = select()
    return layers, skipped, stats


@dataclass
class InputStatistics:
    """Σ x xᵀ (groups, D, D), or Σ x² (groups, D) for diagonal layers, and Σ x over `count` input vectors.

    With a reference model, `reference` holds the same sums for the reference's input vectors at the same
    positions, and `cross` holds Σ x x_refᵀ (or Σ x · x_ref for diagonal layers).
    """

    second: np.ndarray
    total: np.ndarray
    count: int = 0
    reference: "InputStatistics | None" = None
    cross: np.ndarray | None = None
    solved: dict = field(default_factory=dict, repr=False)  # what users of the statistics derive from them
    moments: dict = field(default_factory=dict, repr=False)  # the moments computed so far, read-only

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def moment(self, centered: bool) -> np.ndarray:
        """E[x xᵀ] per group, or the covariance when `centered` (the part a bias cannot absorb)."""
        return self._cached("second", centered, lambda: _moment(self.second, self.mean, self.mean, self.count,
                                                                 centered))

    def cross_moment(self, centered: bool) -> np.ndarray:
        """E[x x_refᵀ], or the cross-covariance when `centered`; E[x xᵀ] without a reference."""
        if self.reference is None:
            return self.moment(centered)
        return self._cached("cross", centered, lambda: _moment(self.cross, self.mean, self.reference.mean,
                                                                self.count, centered))

    def _cached(self, which: str, centered: bool, compute) -> np.ndarray:
        # a pass asks for the same [D, D] moments of a layer once per candidate it tries (thousands of times in
        # prune's sensitivity curves); they change only when vectors are added
        key = (which, centered, self.count)
        if key not in self.moments:
            value = compute()
            value.flags.writeable = False
            self.moments[key] = value
        return self.moments[key]

    def add(self, vectors: np.ndarray, diagonal: bool, reference: np.ndarray | None = None) -> None:
        self.moments.clear()
        _accumulate(self, vectors, vectors, diagonal, "second")
        self.total += vectors.sum(axis=0, dtype=np.float64)
        self.count += vectors.shape[0]
        if reference is not None:
            _accumulate(self, vectors, reference, diagonal, "cross")
            self.reference.add(reference, diagonal)

    def __add__(self, other: "InputStatistics") -> "InputStatistics":
        return InputStatistics(self.second + other.second, self.total + other.total, self.count + other.count,
                               None if self.reference is None else self.reference + other.reference,
                               None if self.cross is None else self.cross + other.cross)

    @classmethod
    def empty(cls, groups: int, dims: int, diagonal: bool, with_reference: bool) -> "InputStatistics":
        shape = (groups, dims) if diagonal else (groups, dims, dims)
        stats = cls(np.zeros(shape), np.zeros((groups, dims)))
        if with_reference:
            stats.reference = cls(np.zeros(shape), np.zeros((groups, dims)))
            stats.cross = np.zeros(shape)
        return stats


def _moment(sums: np.ndarray, mean: np.ndarray, other_mean: np.ndarray, count: int, centered: bool) -> np.ndarray:
    moment = sums / max(count, 1)
    if not centered:
        return moment
    if moment.ndim == 2:
        return moment - mean * other_mean
    return moment - mean[:, :, None] * other_mean[:, None, :]


def _accumulate(stats: InputStatistics, left: np.ndarray, right: np.ndarray, diagonal: bool, field: str) -> None:
    """Add Σ left rightᵀ over a batch's vectors (P, groups, D) to the float64 sums: products of float32 vectors
    summed in float32 within the batch (a relative error near 1e-6, far below what the damping adds), twice as
    fast as float64 on the largest layers, where this product is most of a pass's arithmetic."""
    target = getattr(stats, field)
    if diagonal:
        target += np.einsum("pgd,pgd->gd", left, right, dtype=np.float64)
    else:
        target += left.transpose(1, 2, 0) @ right.transpose(1, 0, 2)  # (g, D, P) @ (g, P, D)


def input_statistics(model: onnx.ModelProto | str, layers: list[WeightedLayer], dataset, *, samples: int,
                     batch_size: int, provider: str = "cpu", vectors_per_sample: int = 256, seed: int = 0,
                     reference: onnx.ModelProto | None = None, check_every: int = 0,
                     progress: bool | None = None, prefixes: list[PrefixRuns] | None = None,
                     ) -> dict[int, tuple[InputStatistics, InputStatistics | None]]:
    """Statistics of each layer's input vectors over the first `samples` samples, keyed by id(layer).

    Each value is (statistics of the fitting batches, of the held-out batches): with `check_every` = k, every
    k-th batch is held out (see held_out_batch), so a method fitted on the others can be checked on it;
    otherwise none is.

    A convolution sees one input vector per output position; `vectors_per_sample` of them, chosen at random,
    are enough to estimate H and keep the cost independent of the image size. With a `reference` model (the
    same graph with other weights), the same positions are also read from it, for cross statistics.
    `prefixes` (one PrefixRuns over `dataset` per model) resume the runs from what earlier calls computed.
    """
    rng = np.random.default_rng(seed)
    inputs = sorted({layer.node.inputs[0].name for layer in layers})
    result: dict[int, list] = {}
    total = dataset.runs(samples, batch_size)[-1][1]
    shown = bar(total, "layer inputs", show=progress, unit="sample")
    models = [model] if reference is None else [model, reference]
    if prefixes is not None:
        runs = [prefix.batches(m, inputs) for prefix, m in zip(prefixes, models)]
    else:
        runs = [Runner(m, provider=provider, outputs=inputs, role="the model for layer statistics").batches(
                dataset, samples, batch_size) for m in models]
    done_before = 0
    held_out_batches = 0
    count = len(dataset.runs(samples, batch_size))
    for number, batches in enumerate(zip(*runs)):
        done = batches[0][0]
        held_out = check_every > 0 and held_out_batch(number, count, check_every)
        held_out_batches += held_out
        for layer in layers:
            limit = vectors_per_sample * (done - done_before)
            picks = rng.integers(2 ** 63)  # the same positions in the model and in the reference
            vectors = []
            for _, values in batches:
                x = values[layer.node.inputs[0].name]
                if not np.isfinite(x).all():
                    raise InputError(f"calibration: the input of '{layer.name}' holds NaN or infinite values on "
                                     f"{dataset.source}; check the calibration data (and the model) for them")
                vectors.append(layer.input_vectors(x, limit, np.random.default_rng(picks)).astype(np.float32))
            if id(layer) not in result:
                result[id(layer)] = [InputStatistics.empty(vectors[0].shape[1], vectors[0].shape[2], layer.diagonal,
                                                           reference is not None) for _ in range(2)]
            stats = result[id(layer)][1 if held_out else 0]
            stats.add(vectors[0], layer.diagonal, vectors[1] if reference is not None else None)
        done_before = done
        shown.update(done - shown.n)
    shown.close()
    return {key: (fit, check if held_out_batches else None) for key, (fit, check) in result.items()}


def layer_waves(graph: gs.Graph, layers: list[WeightedLayer]) -> list[list[int]]:
    """The layers' positions in groups whose inputs no layer of the same or a later group computes, in graph
    order: the order in which a pass that measures each layer's inputs after changing the layers before it
    (sequential prune and share) can change them."""
    index = {id(layer.node): i for i, layer in enumerate(layers)}
    upstream: dict[str, frozenset[int]] = {}  # tensor name → layers it depends on
    depends: dict[int, frozenset[int]] = {}
    for node in graph.toposort(mode="nodes").nodes:
        above = frozenset().union(*(upstream.get(t.name, frozenset()) for t in node.inputs))
        if id(node) in index:
            depends[index[id(node)]] = upstream.get(node.inputs[0].name, frozenset())
            above = above | {index[id(node)]}
        for tensor in node.outputs:
            upstream[tensor.name] = above
    waves, done = [], set()
    while len(done) < len(layers):
        wave = [i for i in range(len(layers)) if i not in done and depends[i] <= done]
        waves.append(wave)
        done.update(wave)
    return waves


def damping_errors(error_of) -> dict[float, float]:
    """`error_of(damping)` for the candidates in DAMPINGS that a descent visits: from the middle two towards the
    lesser error while it decreases. The error over the damping's logarithm has one minimum (too little
    overfits the calibration batches, too much leaves the plain rounding), so the rest need not be solved."""
    errors: dict[float, float] = {}
    shown = bar(len(DAMPINGS), "damping", unit="candidate")

    def at(index: int) -> float:
        if DAMPINGS[index] not in errors:
            errors[DAMPINGS[index]] = error_of(DAMPINGS[index])
            shown.update(1)
        return errors[DAMPINGS[index]]

    with shown:
        index = (len(DAMPINGS) - 1) // 2
        step = 1 if at(index + 1) < at(index) else -1
        index += step == 1
        while 0 <= index + step < len(DAMPINGS) and at(index + step) < at(index):
            index += step
    return errors


def held_out_batch(number: int, count: int, every: int) -> bool:
    """Whether batch `number` of `count` is held out: every `every`-th, or the last of 2 to `every` − 1."""
    if count >= every:
        return number % every == every - 1
    return count > 1 and number == count - 1


def held_out_indices(data, samples: int, batch_size: int) -> list[int]:
    """The indices of the calibration samples in the batches `input_statistics` holds out (none: empty)."""
    runs = data.runs(samples, batch_size)
    return [i for number, (start, stop) in enumerate(runs) if held_out_batch(number, len(runs), CHECK_EVERY)
            for i in range(start, stop)]


def held_out_samples(data, samples: int, batch_size: int):
    """The calibration samples of the batches `input_statistics` holds out, or None when there are none."""
    indices = held_out_indices(data, samples, batch_size)
    return data.select(indices) if indices else None


def _sample(vectors: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if vectors.shape[0] <= limit:
        return vectors
    return vectors[np.sort(rng.choice(vectors.shape[0], limit, replace=False))]


def _conv_patches(x: np.ndarray, node: gs.Node, kernel: tuple, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `limit` input patches of a convolution, (P, C · prod(kernel)), channel-major like the weight."""
    dims = len(kernel)
    spatial = x.shape[2:]
    strides = list(node.attrs.get("strides", [1] * dims))
    dilations = list(node.attrs.get("dilations", [1] * dims))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = _pads(node, spatial, extent, strides)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    windows = sliding_window_view(x, extent, axis=tuple(range(2, 2 + dims)))  # (N, C, *positions, *extent)
    step = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    windows = windows[step]  # (N, C, *output positions, *kernel)
    positions = windows.shape[2:2 + dims]
    count = windows.shape[0] * math.prod(positions)
    chosen = np.arange(count) if count <= limit else np.sort(rng.choice(count, limit, replace=False))
    index = np.unravel_index(chosen, (windows.shape[0], *positions))
    patches = windows[(index[0], slice(None), *index[1:])]  # (P, C, *kernel)
    return np.ascontiguousarray(patches).reshape(len(chosen), -1)


def _pads(node: gs.Node, spatial: tuple, extent: list[int], strides: list[int]) -> list[int]:
    dims = len(extent)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, e, s in zip(spatial, extent, strides):
            total = max((math.ceil(size / s) - 1) * s + e - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    return list(node.attrs.get("pads", [0] * (2 * dims)))


def relative_error(layer: WeightedLayer, rows: np.ndarray, new_rows: np.ndarray, stats: InputStatistics,
                   use_bias: bool) -> float:
    """E‖W x_ref − W' x‖² / E‖W x_ref‖² for rows W and new rows W' (groups, units, D), where x_ref is the
    layer's input in the reference model and x its input now (the same without reference statistics), both
    centred when the bias absorbs the mean."""
    return output_error(layer, rows, stats, use_bias)(new_rows)


def output_error(layer: WeightedLayer, rows: np.ndarray, stats: InputStatistics, use_bias: bool):
    """relative_error as a function of the new rows, the terms that depend only on `rows` and the statistics
    computed once: for the many options of one layer that a bit allocation tries."""
    reference = stats.reference or stats
    own = stats.moment(centered=use_bias)
    cross = stats.cross_moment(centered=use_bias)
    signal = unit_energy(layer, rows, reference.moment(centered=True)).sum()
    expected = unit_energy(layer, rows, reference.moment(centered=use_bias)).sum()

    def error(new_rows: np.ndarray) -> float:
        if layer.diagonal:
            mixed = (rows * new_rows * expand_diagonal(layer, cross)[:, None, :]).sum()
        else:
            mixed = ((new_rows @ cross) * rows).sum()
        value = (expected - 2 * mixed + unit_energy(layer, new_rows, own).sum()) / max(signal, 1e-30)
        return float(max(value, 0.0))

    return error


def unit_energy(layer: WeightedLayer, rows: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """w H wᵀ for each unit (groups, units): the output energy rows of weights give with input moments H."""
    if layer.diagonal:
        return (rows * rows * expand_diagonal(layer, moment)[:, None, :]).sum(axis=-1)
    return ((rows @ moment) * rows).sum(axis=-1)


def spread_scale(layer: WeightedLayer, rows_before: np.ndarray, moment_before: np.ndarray, rows: np.ndarray,
                 moment: np.ndarray) -> np.ndarray:
    """Per unit (groups, units), the factor that gives `rows` on inputs of `moment` the output spread of
    `rows_before` on inputs of `moment_before`, as re-estimating a BatchNormalization would: least squares,
    pruning and sharing all shrink a unit's outputs. A unit silent on the data keeps its scale: zeroing it would
    trust the data too far."""
    spread = unit_energy(layer, rows_before, moment_before)
    now = unit_energy(layer, rows, moment)
    return np.sqrt(np.where((now > 0) & (spread > 0), spread / np.maximum(now, 1e-30), 1.0))


def expand_diagonal(layer: WeightedLayer, per_channel: np.ndarray) -> np.ndarray:
    """Per-input-channel statistics (groups, Cin/g) repeated over the kernel positions of a ConvTranspose row."""
    if not layer.diagonal:
        return per_channel
    kernel = int(np.prod(layer.values.shape[2:]))
    return np.repeat(per_channel, kernel, axis=-1)


def snr_db(error) -> np.ndarray:
    """A relative error energy as a signal-to-noise ratio in dB."""
    return -10.0 * np.log10(np.maximum(np.asarray(error, dtype=np.float64), 1e-12))


def regularized(moment: np.ndarray, count: int, damping: float, like: np.ndarray | None = None) -> np.ndarray:
    """H with its off-diagonal terms shrunk by d / (d + n) (few vectors: trust the cross terms less), plus
    `damping` times the mean diagonal of `like` (default: of `moment` itself) on the diagonal."""
    dims = moment.shape[-1]
    diagonal = np.einsum("gii->gi", moment)
    scale = np.einsum("gii->gi", moment if like is None else like).mean(axis=1, keepdims=True)
    shrink = dims / (dims + count)
    regular = (1 - shrink) * moment
    index = np.arange(dims)
    regular[:, index, index] = diagonal + damping * np.maximum(scale, 1e-12)
    return regular


def solved(layer: WeightedLayer, rows: np.ndarray, stats: InputStatistics, use_bias: bool, damping: float,
           own: np.ndarray, cross: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W̃, upper Cholesky factor of the regularized H⁻¹), which do not depend on how the weights are then
    zeroed or rounded: computed once per layer, statistics and damping, and kept on the statistics."""
    key = (id(layer), damping, use_bias)
    if key not in stats.solved:
        regular = regularized(own, stats.count, damping)
        # the dense weights that best give the reference layer's outputs from the inputs it gets now,
        # W̃ = W E[x_ref xᵀ] E[x xᵀ]⁻¹ with both moments regularized alike: W̃ = W when nothing upstream changed
        cross_regular = regularized(cross.transpose(0, 2, 1), stats.count, damping, like=own)
        inverse = np.linalg.inv(regular)
        target = (rows @ cross_regular) @ inverse  # H symmetric: W C H⁻¹ without a second factorization
        upper = np.linalg.cholesky((inverse + inverse.transpose(0, 2, 1)) / 2).transpose(0, 2, 1)
        stats.solved[key] = (target, upper)
    return stats.solved[key]


def obs_sweep(rows: np.ndarray, upper: np.ndarray, rounder) -> np.ndarray:
    """Rows (groups, units, D) with each column replaced, in order, by what `rounder` makes of it, the error of
    every replacement spread over the columns not yet visited so that w·x on calibration data is kept: the
    optimal brain surgeon updates of SparseGPT (zeroing) and GPTQ (rounding), through `upper`, the upper
    Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U).

    For each block of BLOCK columns, `rounder(block, diagonal)` is called once with the block's current values
    and U's diagonal there; it returns `round_column(values, column)`, called for the block's columns in turn.
    """
    dims = rows.shape[-1]
    weights = rows.copy()
    for start in range(0, dims, BLOCK):
        stop = min(start + BLOCK, dims)
        block = weights[:, :, start:stop]
        factor = upper[:, start:stop, start:stop]
        diagonal = np.einsum("gii->gi", factor)
        round_column = rounder(block, diagonal)
        # each column gets the updates of the block's earlier columns when it is visited, as one product with
        # their errors, instead of every column updating all later ones: the same sums, a quarter of the time
        errors = np.zeros((block.shape[0], stop - start, block.shape[1]))  # (groups, column, unit)
        rounded_block = np.empty_like(block)
        for column in range(stop - start):
            values = block[:, :, column]
            if column:
                values = values - (factor[:, None, :column, column] @ errors[:, :column, :])[:, 0, :]
            rounded = round_column(values, column)
            errors[:, column, :] = (values - rounded) / diagonal[:, None, column]
            rounded_block[:, :, column] = rounded
        weights[:, :, start:stop] = rounded_block
        if stop < dims:
            weights[:, :, stop:] -= errors.transpose(0, 2, 1) @ upper[:, start:stop, stop:]
    return weights
