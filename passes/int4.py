"""int4: weight-only block-wise quantization of MatMul / Gemm weights and embedding tables (ONNX Runtime's
com.microsoft MatMulNBits and GatherBlockQuantized).

Before:                                          After:
    x [..., K] ─► MatMul(W: float [K, N]) ─► y       x ─► MatMulNBits(B: uint8 [N, K/block, block·bits/8],
    x [M, K] ─► Gemm(W, C; transB) ─► y                            scales [N, K/block], zero points?, bias?) ─► y
    ids ─► Gather(E: float [V, D]) ─► e              ids ─► GatherBlockQuantized(E: uint8 [V, D·bits/8],
                                                                              scales [V, D/block], zero points?)
                                                         (─► Add(Gather(error rows, Gather(slot, ids))) ─► e)

Each column of W (each row of E) is cut along K (along D) into blocks of `block` values; each block gets its own
float scale (and, unless `symmetric`, its own zero point) and its values become `bits`-bit codes, packed low bits
first, `8 / bits` codes a byte. Activations stay float: ONNX Runtime decodes the weights inside its kernels, so
the file holds about bits/32 of the float weights' bytes plus one scale per block. A transformer's weights are
most of its file (paraphrase-MiniLM-L3: the 30522 × 384 word-embedding table alone is 47 of its 69 MB), so the
tables are quantized too and decoded only at the gathered rows.

`method=rtn` (the default) rounds each weight to its nearest code. `method=gptq` (Frantar et al. 2023) rounds
W's rows of K one after another and spreads each rounding error over the rows not yet rounded, through the
inverse of H = E[x xᵀ] measured on calibration data, so that x·W on that data is kept rather than W itself;
the block scales are fixed from W before the sweep.

With calibration data, two corrections aim at the error that every input shares, which a transformer's pooled
output does not average away (measured on paraphrase-MiniLM-L3, each alone cost 7 to 15 points of an SST-2
probe on its sentence embedding at a cosine of 0.98):
- bias correction: a few input channels of a transformer's MatMuls are large and nearly constant, so the
  rounding error of their weights shifts every output alike, by E[x]·(W − W'); MatMulNBits' bias takes it back.
- exact rows: table rows read in almost every input ([CLS], [SEP], padding, the first positions) add the same
  rounding error to every sentence; their errors are kept in a small float table, one byte per row says where.

Sensitive layers may keep 8 bits: `keep_first` / `keep_last` (the first / last MatMul or Gemm in graph order;
the last is a language model's lm_head). ONNX Runtime 1.32's CPU kernels run 2, 4 and 8 bits.
Only float32 weights are rewritten; Gemm only as a MatMul plus bias (transA = 0, alpha = beta = 1); a table
read by another node too (tied to an output projection) stays float.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp import progress
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.passes.layers import WeightedLayer, input_statistics, obs_sweep, relative_error, select_layers, snr_db
from onnxcomp.passes.layers import embedding_table, frequent_rows, solved
from onnxcomp.passes.quantize_dynamic import gemm_bias, matmul_weight
from onnxcomp.registry import register
from onnxcomp.runner import Runner

RUNNABLE_BITS = (2, 4, 8)  # what MatMulNBits runs in ONNX Runtime 1.32 (its CPU kernel refuses the others)
SENSITIVE_BITS = 8
METHODS = ("rtn", "gptq")
DAMPING = 0.01  # share of H's mean diagonal added to it, as GPTQ does, so that its inverse is well-posed
MICROSOFT = "com.microsoft"


@dataclass(frozen=True)
class Int4Config:
    bits: int = 4
    block: int = 32                   # weights per scale, along K (a power of two, 16 or more)
    symmetric: bool = True            # no zero points: codes centred on 2^(bits-1)
    method: str = "rtn"               # rtn | gptq (needs calibration data)
    tables: bool = True               # embedding tables (Gather on a constant 2-D table) too
    keep_first: bool = False          # the first MatMul / Gemm at 8 bits
    keep_last: bool = False           # the last MatMul / Gemm (lm_head) at 8 bits
    exclude: tuple[str, ...] = ()     # shell patterns over node and weight names: left in float
    bias_correction: bool = True      # with calibration data: cancel the mean output shift via the bias
    exact_rows: bool = True           # with calibration data: table rows read in most samples kept exact
    samples: int = 128
    batch_size: int = 16

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be 2 to 8, not {self.bits}")
        if self.bits not in RUNNABLE_BITS:
            raise ValueError(f"bits={self.bits}: ONNX Runtime's MatMulNBits runs only "
                             f"{', '.join(map(str, RUNNABLE_BITS))} bits; choose one of them")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two of 16 or more (16, 32, 64, ...), not {self.block}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch-size must be at least 1")


@dataclass
class Blocked:
    """A weight as `bits`-bit codes (units, blocks, block) with a scale and a zero point per block."""

    codes: np.ndarray   # uint8 (units, blocks, block)
    scales: np.ndarray  # float32 (units, blocks)
    zeros: np.ndarray   # uint8 (units, blocks)
    bits: int

    def decoded(self, length: int) -> np.ndarray:
        """The float values (units, length) the codes stand for."""
        values = (self.codes.astype(np.float32) - self.zeros[:, :, None]) * self.scales[:, :, None]
        return values.reshape(values.shape[0], -1)[:, :length]

    def packed_codes(self) -> np.ndarray:
        """(units, blocks, block · bits / 8) bytes, the first code of each byte in its low bits."""
        return pack(self.codes, self.bits)

    def packed_zeros(self) -> np.ndarray:
        """(units, ⌈blocks · bits / 8⌉) bytes, as MatMulNBits and GatherBlockQuantized read uint8 zero points."""
        per_byte = 8 // self.bits
        units, blocks = self.zeros.shape
        padded = np.full((units, -(-blocks // per_byte) * per_byte), 1 << (self.bits - 1), np.uint8)
        padded[:, :blocks] = self.zeros
        return pack(padded, self.bits)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes along the last axis, `8 / bits` a byte, low bits first."""
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def block_grid(units: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(scales, zero points) per block of `units` (units, length), and the length padded to whole blocks.

    Symmetric: the block's largest magnitude, with its sign, lands on the lowest code (−2^(bits−1) steps from the
    centre), so that side uses every level, as ONNX Runtime's own quantizer does. Asymmetric: [min, max] (0
    included) spread over all 2^bits levels."""
    padded = _padded(units, block)
    blocks = padded.reshape(padded.shape[0], -1, block)
    half, top = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        high, low = blocks.max(axis=2), blocks.min(axis=2)
        scales = (np.where(np.abs(high) >= np.abs(low), high, low) / -half).astype(np.float32)
        zeros = np.full(scales.shape, half, np.uint8)
    else:
        low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
        scales = ((high - low) / top).astype(np.float32)
        zeros = np.clip(np.round(-low / np.where(scales == 0, 1, scales)), 0, top).astype(np.uint8)
    return scales, zeros, padded.shape[1]


def round_to_grid(values: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int) -> np.ndarray:
    """The codes nearest to `values` on the grid of `scales` and `zeros` (same shapes, or broadcastable)."""
    safe = np.where(scales == 0, 1, scales)
    return np.clip(np.round(values / safe) + zeros, 0, (1 << bits) - 1).astype(np.uint8)


def quantize_rtn(units: np.ndarray, bits: int, block: int, symmetric: bool) -> Blocked:
    """`units` (units, length) rounded to the nearest code of their block."""
    scales, zeros, length = block_grid(units, bits, block, symmetric)
    blocks = _padded(units, block).reshape(units.shape[0], -1, block)
    return Blocked(round_to_grid(blocks, scales[:, :, None], zeros[:, :, None], bits), scales, zeros, bits)


def quantize_gptq(layer: WeightedLayer, units: np.ndarray, stats, bits: int, block: int,
                  symmetric: bool) -> Blocked:
    """`units` (N, K), the layer's weight columns, rounded along K with GPTQ's error feedback on `stats`."""
    scales, zeros, _ = block_grid(units, bits, block, symmetric)
    rows = units[None].astype(np.float64)
    moment = stats.moment(centered=False)
    _, upper = solved(layer, rows, stats, False, DAMPING, moment, moment)
    codes = np.zeros((units.shape[0], scales.shape[1] * block), np.uint8)
    codes[:] = zeros.repeat(block, axis=1)  # the padding past K decodes to 0
    visited = 0

    def nearest(columns: np.ndarray, _diagonal: np.ndarray):
        nonlocal visited
        first, visited = visited, visited + columns.shape[-1]

        def round_column(values: np.ndarray, column: int) -> np.ndarray:
            index = first + column
            scale, zero = scales[:, index // block], zeros[:, index // block]
            codes[:, index] = round_to_grid(values[0], scale, zero, bits)
            return ((codes[:, index].astype(np.float32) - zero) * scale)[None]
        return round_column

    obs_sweep(rows, upper, nearest)
    return Blocked(codes.reshape(units.shape[0], -1, block), scales, zeros, bits)


def _padded(units: np.ndarray, block: int) -> np.ndarray:
    length = units.shape[1]
    padded = np.zeros((units.shape[0], -(-length // block) * block), np.float32)
    padded[:, :length] = units
    return padded


@dataclass(eq=False)
class Target:
    """One MatMul / Gemm to rewrite, with the bits it gets."""

    layer: WeightedLayer
    bits: int


@register
class Int4(Pass):
    name = "int4"
    summary = "weight-only block-wise int4 (2/4/8-bit) MatMul, Gemm and embedding tables, as ORT's MatMulNBits"
    Config = Int4Config

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.config.method == "gptq" and ctx.calibration_data is None:
            raise PreconditionError("int4:method=gptq needs calibration data: give calib_data= (typical inputs), "
                                    "or use method=rtn")
        layers, _ = _layers(graph, Int4Config(exclude=self.config.exclude))
        if not layers and not (self.config.tables and _tables(graph, self.config.exclude, self.config.bits)):
            raise PreconditionError("int4 found no MatMul or Gemm with a constant float32 weight"
                                    + (" and no embedding table" if self.config.tables else "")
                                    + " to quantize; it changes only such weights")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        config = self.config
        graph.toposort(mode="nodes")
        layers, skipped = _layers(graph, config)
        targets = [Target(layer, SENSITIVE_BITS if (config.keep_first and index == 0) or
                          (config.keep_last and index == len(layers) - 1) else config.bits)
                   for index, layer in enumerate(layers)]
        tables = _tables(graph, config.exclude, config.bits) if config.tables else []
        calibration = _calibrate(graph, targets, tables, ctx, config)
        statistics = _statistics(graph, targets, ctx, config) if targets and config.method == "gptq" else {}
        names = graphs.Names(graph)
        rows = []
        for target in progress.each(targets, f"int4 {config.method}", unit="layer"):
            rows.append(_rewrite_matmul(graph, target, statistics.get(id(target.layer)),
                                        calibration.means.get(id(target.layer)), config, names))
        rows.extend(_rewrite_gather(graph, node, config, names, calibration.rows.get(id(node), []))
                    for node in tables)
        stats: dict[str, int | float | str] = {"bits": config.bits, "block": config.block, "method": config.method,
                                               "symmetric": str(config.symmetric).lower()}
        stats.update({f"int4:{op}": n for op, n in sorted(Counter(row["op"] for row in rows).items())})
        if any(target.bits != config.bits for target in targets):
            stats["kept_8_bits"] = "|".join(t.layer.name for t in targets if t.bits != config.bits)
        if rows:
            stats["weight_snr_db_min"] = min(row["weight_snr_db"] for row in rows)
            stats["float_mb"] = round(sum(row["float_bytes"] for row in rows) / 1e6, 2)
            stats["stored_mb"] = round(sum(row["stored_bytes"] for row in rows) / 1e6, 2)
        if calibration.rows:
            stats["exact_rows"] = sum(len(found) for found in calibration.rows.values())
        if calibration.samples:
            stats["samples"] = calibration.samples
        stats.update({f"skipped:{reason}": n for reason, n in sorted(skipped.items())})
        return PassResult(bool(rows), stats, rows)


def _layers(graph: gs.Graph, config: Int4Config) -> tuple[list[WeightedLayer], Counter]:
    """The MatMul / Gemm layers MatMulNBits can take, in graph order, and why others were passed over."""
    layers, skipped, _ = select_layers(graph, ("MatMul", "Gemm"), exclude=config.exclude)
    kept = []
    for layer in layers:
        weight = matmul_weight(layer.node)
        bias = gemm_bias(layer.node) if layer.node.op == "Gemm" else None
        if weight is None:
            skipped["not-float32-matmul" if layer.node.op == "MatMul" else "gemm-not-matmul-plus-bias"] += 1
        elif bias is not None and bias.size not in (1, weight.shape[1]):
            skipped["gemm-bias-not-per-column"] += 1  # MatMulNBits adds one bias value per output column
        else:
            kept.append(layer)
    return kept, skipped


def _tables(graph: gs.Graph, exclude: tuple[str, ...], bits: int) -> list[gs.Node]:
    """Gathers from a constant float32 2-D table that no other node reads, whose rows fill whole bytes."""
    found = []
    for node in graph.nodes:
        table = embedding_table(node)
        if table is None or len(graphs.consumers(node.inputs[0])) > 1 or table.shape[1] * bits % 8:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for name in (node.name, node.inputs[0].name) if name
               for pattern in exclude):
            continue
        found.append(node)
    return found


def _statistics(graph: gs.Graph, targets: list[Target], ctx: PassContext, config: Int4Config) -> dict:
    """E[x xᵀ] of each layer's input on calibration data, keyed by id(layer), for GPTQ."""
    layers = [target.layer for target in targets]
    with graphs.runnable(graph) as model:
        found = input_statistics(model, layers, ctx.calibration_data,
                                 samples=min(config.samples, ctx.calibration_data.num_samples),
                                 batch_size=config.batch_size, provider=ctx.provider, seed=ctx.seed)
    return {key: fit for key, (fit, _) in found.items()}


def _rewrite_matmul(graph: gs.Graph, target: Target, stats, mean: np.ndarray | None, config: Int4Config,
                    names: graphs.Names) -> dict:
    """Replace the MatMul (or Gemm) by a MatMulNBits; the layer's report row."""
    node, bits = target.layer.node, target.bits
    weight = matmul_weight(node)  # [K, N]
    units = np.ascontiguousarray(weight.T)
    if config.method == "rtn":
        blocked = quantize_rtn(units, bits, config.block, config.symmetric)
    else:
        blocked = quantize_gptq(target.layer, units, stats, bits, config.block, config.symmetric)
    k, n = weight.shape
    base = node.name or node.outputs[0].name
    inputs = [node.inputs[0], names.constant(f"{base}_weight_q{bits}", blocked.packed_codes()),
              names.constant(f"{base}_weight_scales", blocked.scales)]
    if not config.symmetric:
        inputs.append(names.constant(f"{base}_weight_zero_points", blocked.packed_zeros()))
    bias = gemm_bias(node) if node.op == "Gemm" else None
    vector = None if bias is None else np.broadcast_to(bias.reshape(-1), (n,)).astype(np.float64)
    if mean is not None:
        # the rounding error's mean effect on the outputs, E[x] (W - W'), is the same for every input: a
        # transformer's few large constant channels make it most of the error; the bias takes it back
        shift = mean @ (weight.astype(np.float64) - blocked.decoded(k).T)
        vector = shift if vector is None else vector + shift
    if vector is not None:
        inputs += [gs.Variable.empty()] * (5 - len(inputs)) + [names.constant(f"{base}_bias",
                                                                              vector.astype(np.float32))]
    output = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("MatMulNBits", names.new(f"{base}_Q{bits}"), domain=MICROSOFT,
                               attrs={"K": k, "N": n, "bits": bits, "block_size": config.block},
                               inputs=inputs, outputs=[output]))
    row = _row(target.layer.name, node.op, units, blocked, bits, _stored_bytes(inputs[1:]))
    if stats is not None:
        error = relative_error(target.layer, units[None].astype(np.float64),
                               blocked.decoded(k)[None].astype(np.float64), stats, use_bias=mean is not None)
        row["output_snr_db"] = round(float(snr_db(error)), 1)
    return row


def _rewrite_gather(graph: gs.Graph, node: gs.Node, config: Int4Config, names: graphs.Names,
                    exact: list[int]) -> dict:
    """Replace the Gather by a GatherBlockQuantized over the table's rows, plus the rounding error of the rows
    in `exact` gathered from a small float table; the table's report row."""
    table = embedding_table(node)  # [V, D]
    blocked = quantize_rtn(table, config.bits, config.block, config.symmetric)
    base = node.name or node.outputs[0].name
    packed = blocked.packed_codes().reshape(table.shape[0], -1)[:, :table.shape[1] * config.bits // 8]
    ids, output = node.inputs[1], node.outputs[0]
    inputs = [names.constant(f"{base}_table_q{config.bits}", packed), ids,
              names.constant(f"{base}_table_scales", blocked.scales)]
    if not config.symmetric:
        inputs.append(names.constant(f"{base}_table_zero_points", blocked.packed_zeros()))
    node.outputs.clear()
    node.inputs.clear()
    decoded = gs.Variable(names.new(f"{base}_decoded"), dtype=np.float32) if exact else output
    graph.nodes.append(gs.Node("GatherBlockQuantized", names.new(f"{base}_Q{config.bits}"), domain=MICROSOFT,
                               attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": config.block,
                                      "bits": config.bits},
                               inputs=inputs, outputs=[decoded]))
    stored = _stored_bytes(inputs[2:]) + packed.nbytes
    if exact:
        stored += _restore_rows(graph, table, blocked, exact, ids, decoded, output, names, base)
    row = _row(node.name or inputs[0].name, "Gather", table, blocked, config.bits, stored)
    row["exact_rows"] = len(exact)
    return row


def _restore_rows(graph: gs.Graph, table: np.ndarray, blocked: Blocked, exact: list[int], ids: gs.Tensor,
                  decoded: gs.Variable, output: gs.Variable, names: graphs.Names, base: str) -> int:
    """output = decoded + correction[slot[ids]]: slot 0 (every other row) adds nothing, slot i adds row
    exact[i-1]'s rounding error. Returns the bytes stored."""
    slots = np.zeros(table.shape[0], np.uint8)
    slots[exact] = np.arange(1, len(exact) + 1)
    corrections = np.zeros((len(exact) + 1, table.shape[1]), np.float32)
    corrections[1:] = table[exact] - blocked.decoded(table.shape[1])[exact]
    slot_constant = names.constant(f"{base}_exact_slot", slots)
    correction_constant = names.constant(f"{base}_exact_correction", corrections)
    slot, index, correction = (gs.Variable(names.new(f"{base}_{label}"), dtype=kind) for label, kind in
                               (("slot", np.uint8), ("slot_index", np.int64), ("correction", np.float32)))
    graph.nodes.extend([
        gs.Node("Gather", names.new(f"{base}_exact_slot"), attrs={"axis": 0}, inputs=[slot_constant, ids],
                outputs=[slot]),
        gs.Node("Cast", names.new(f"{base}_slot_index"), attrs={"to": np.int64}, inputs=[slot], outputs=[index]),
        gs.Node("Gather", names.new(f"{base}_exact_correction"), attrs={"axis": 0},
                inputs=[correction_constant, index], outputs=[correction]),
        gs.Node("Add", names.new(f"{base}_exact_rows"), inputs=[decoded, correction], outputs=[output]),
    ])
    return slots.nbytes + corrections.nbytes


@dataclass
class Calibration:
    """What the corrections need from calibration data: each layer's E[x] and each table's rows to keep exact."""

    means: dict = field(default_factory=dict)  # id(layer) → E[x] over every input vector (K,)
    rows: dict = field(default_factory=dict)   # id(Gather) → rows
    samples: int = 0


def _calibrate(graph: gs.Graph, targets: list[Target], tables: list[gs.Node], ctx: PassContext,
               config: Int4Config) -> Calibration:
    """The layers' input means (one run of the float model over the calibration data) and the rows of each
    table to keep exact (layers.frequent_rows)."""
    layer_inputs = {id(t.layer): t.layer.node.inputs[0].name for t in targets} if config.bias_correction else {}
    exact_tables = tables if config.exact_rows else []
    if ctx.calibration_data is None or not (layer_inputs or exact_tables):
        return Calibration()
    samples = min(config.samples, ctx.calibration_data.num_samples)
    rows = frequent_rows(graph, exact_tables, ctx.calibration_data, samples=samples, batch_size=config.batch_size,
                         provider=ctx.provider)
    if not layer_inputs:
        return Calibration({}, rows, samples)
    names = sorted(set(layer_inputs.values()))
    sums: dict[str, np.ndarray] = {}
    vectors: Counter = Counter()
    with graphs.runnable(graph) as model, progress.bar(samples, "int4 calibration", unit="sample") as shown:
        runner = Runner(model, provider=ctx.provider, outputs=names, role="the model for int4's calibration")
        for done, values in runner.batches(ctx.calibration_data, samples, config.batch_size):
            for name in names:
                x = values[name].reshape(-1, values[name].shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0.0) + x.sum(axis=0)
                vectors[name] += x.shape[0]
            shown.update(done - shown.n)
    means = {key: sums[name] / vectors[name] for key, name in layer_inputs.items()}
    return Calibration(means, rows, samples)


def _stored_bytes(tensors: list) -> int:
    return sum(t.values.nbytes for t in tensors if isinstance(t, gs.Constant))


def _row(name: str, op: str, units: np.ndarray, blocked: Blocked, bits: int, stored: int) -> dict:
    error = blocked.decoded(units.shape[1]) - units
    noise = float((error.astype(np.float64) ** 2).sum()) / max(float((units.astype(np.float64) ** 2).sum()), 1e-30)
    return {"layer": name, "op": op, "weights": int(units.size), "bits": bits,
            "weight_snr_db": round(float(snr_db(noise)), 1), "float_bytes": int(units.nbytes),
            "stored_bytes": int(stored)}
