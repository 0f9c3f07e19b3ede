"""Spending a compression budget across layers, and measuring what a layer's change does to the model's outputs.

prune and share both choose, per layer, how hard to compress it: each layer has a curve of output error against
savings (weights zeroed, bytes saved), measured on calibration data, and the total savings are fixed. `allocate`
(prune: any sparsity per layer) takes the lower convex hull of every curve and its segments cheapest error per
saving first, which is optimal for convex curves (the classic greedy of bit allocation in transform coding);
`choose` (share: a few discrete options per layer) solves the multiple-choice knapsack by dynamic programming.
A layer's own error reaches the model's outputs attenuated or amplified by what follows it; `ModelOutputs`
measures that by running the model with changed weights.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp.passes.layers import WeightedLayer
from onnxcomp.runner import PrefixRuns, Runner


def allocate(curves: list[tuple[np.ndarray, np.ndarray]], target: float) -> np.ndarray:
    """Savings per layer reaching `target` in total with the least summed error, from each layer's
    (savings, errors) points, savings increasing from 0, where a layer may stop anywhere along its curve.

    Each curve is replaced by its lower convex hull, whose segments are taken cheapest error per saving first;
    the last one in part, so the target is met exactly.
    """
    segments = []
    for index, (savings, errors) in enumerate(curves):
        hull = lower_hull(np.asarray(savings, dtype=np.float64), np.asarray(errors, dtype=np.float64))
        for (x0, e0), (x1, e1) in zip(hull, hull[1:]):
            segments.append(((e1 - e0) / (x1 - x0), index, x1 - x0))
    segments.sort(key=lambda s: (s[0], s[1]))  # within a layer, hull slopes increase: order is kept
    taken = np.zeros(len(curves))
    left = float(target)
    for _, index, width in segments:
        if left <= 0:
            break
        step = min(width, left)
        taken[index] += step
        left -= step
    return taken


def choose(costs: list[np.ndarray], errors: list[np.ndarray], budget: float, steps: int = 2 ** 15) -> list[int]:
    """One option per layer, by index into its (costs, errors), with the least summed error whose summed cost is
    within `budget`; the cheapest option of every layer where even those exceed it.

    The options are discrete (bits per weight), so this is a multiple-choice knapsack, solved by dynamic
    programming over the budget in `steps` equal units. A cost is rounded up to whole units, so the choice never
    exceeds the budget, and gives away at most one unit per layer. Unlike taking a curve's hull segments cheapest
    first, it never overshoots: a greedy step that must be whole can spend a large error to save a few bytes.
    """
    floors = [float(np.min(cost)) for cost in costs]
    room = budget - sum(floors)
    if room <= 0:
        return [int(np.argmin(cost)) for cost in costs]
    unit = max(room / steps, 1e-9)
    slots = int(room / unit) + 1
    best = np.zeros(slots)  # best[c]: least error of the layers so far within c units above their cheapest
    picks, units_of = [], []
    for cost, error, floor in zip(costs, errors, floors):
        units = np.ceil((np.asarray(cost, np.float64) - floor) / unit - 1e-9).astype(np.int64)
        merged = np.full(slots, np.inf)
        pick = np.zeros(slots, dtype=np.int64)
        for option in np.flatnonzero(units < slots):
            shift = units[option]
            candidate = np.full(slots, np.inf)
            candidate[shift:] = best[:slots - shift] + error[option]
            better = candidate < merged
            merged[better], pick[better] = candidate[better], option
        best = merged
        picks.append(pick)
        units_of.append(units)
    chosen, at = [], int(np.argmin(best))
    for units, pick in zip(reversed(units_of), reversed(picks)):
        option = int(pick[at])
        chosen.append(option)
        at -= int(units[option])
    return chosen[::-1]


def lower_hull(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    """The lower convex hull of points given in increasing x (equal xs: the lowest y is kept)."""
    hull: list[tuple[float, float]] = []
    for point in zip(xs.tolist(), ys.tolist()):
        if hull and point[0] == hull[-1][0]:
            if point[1] >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (point[0] - x0) >= (point[1] - y0) * (x1 - x0):  # middle point on or above the chord
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def round_to_total(targets: np.ndarray, total: int) -> np.ndarray:
    """Integers close to `targets` that sum to `total` (largest remainders get the rounding up)."""
    floors = np.floor(targets).astype(np.int64)
    short = total - int(floors.sum())
    if short > 0:
        floors[np.argsort(-(targets - floors), kind="stable")[:short]] += 1
    elif short < 0:
        floors[np.argsort(targets - floors, kind="stable")[:-short]] -= 1
    return floors


PROBE_SECONDS = 10.0  # what a pass's layer-by-layer probes may take together before they use fewer samples
MIN_PROBE_SAMPLES = 4  # a 320×320 detector's 4 samples hold 400 000 output values


def _downstream(nodes: list[gs.Node]) -> set[str]:
    """The names of the tensors computed from the outputs of `nodes`, those outputs included."""
    seen: set[str] = set()
    pending = [tensor for node in nodes for tensor in node.outputs]
    while pending:
        tensor = pending.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        pending.extend(output for reader in tensor.outputs for output in reader.outputs)
    return seen


class ModelOutputs:
    """The model's outputs on some samples, with some layers' weights (and biases) changed for the run.

    `probes`: how many runs the caller will make. Where that many runs over `samples` would take more than
    PROBE_SECONDS (a large model, timed on its reference run), fewer samples are used, down to
    MIN_PROBE_SAMPLES in whole batches (of MIN_PROBE_SAMPLES at most, for several probes): a layer's gain is a
    ratio of errors, stable over a few samples, while the probes of a 70-layer detector at 320×320 took a
    minute on 32.

    A run resumes from the unchanged model's tensors before the changed layers (runner.PrefixRuns), so probing
    the layers one by one in graph order costs about half the full runs it would.
    """

    def __init__(self, graph: gs.Graph, ctx, data, samples: int, batch_size: int, probes: int = 1):
        batch_size = min(batch_size, MIN_PROBE_SAMPLES) if probes > 1 else batch_size
        self.graph, self.ctx, self.data, self.samples, self.batch_size = graph, ctx, data, samples, batch_size
        self.names = [t.name for t in graph.outputs]
        self.unchanged = gs.export_onnx(graph, do_type_check=False)
        self.prefix: PrefixRuns | None = None
        started = time.perf_counter()
        batches = self._batches([])
        overhead = time.perf_counter() - started - sum(seconds for _, _, seconds in batches)  # export, session
        done = [stop for stop, _, _ in batches]
        per_sample = sum(seconds for _, _, seconds in batches) / max(done[-1], 1)
        affordable = (PROBE_SECONDS / probes - overhead) / max(per_sample, 1e-9)
        wanted = max(affordable, MIN_PROBE_SAMPLES)
        kept = next((index + 1 for index, stop in enumerate(done) if stop >= wanted), len(done))
        self.samples = done[kept - 1]
        self.reference = np.concatenate([values for _, values, _ in batches[:kept]])
        self.signal = max(float(np.square(self.reference).sum(dtype=np.float64)), 1e-30)

    def run(self, changes: list[tuple[WeightedLayer, np.ndarray, np.ndarray | None]]) -> np.ndarray:
        """The outputs, flattened, with each (layer, weight, bias shift or None) of `changes` applied."""
        return np.concatenate([values for _, values, _ in self._batches(changes)])

    def _batches(self, changes) -> list[tuple[int, np.ndarray, float]]:
        """(samples done, the batch's outputs flattened, seconds its run took) per batch, with `changes` applied."""
        kept = [(layer.weight.values, list(layer.node.inputs)) for layer, _, _ in changes]
        scratch = graphs.Names(self.graph)
        for layer, values, bias_shift in changes:
            layer.weight.values = values.astype(layer.values.dtype)
            if bias_shift is not None:
                layer.shift_bias(bias_shift, scratch)
        model = gs.export_onnx(self.graph, do_type_check=False)
        for (layer, _, _), (values, inputs) in zip(changes, kept):
            layer.weight.values = values
            layer.node.inputs.clear()
            layer.node.inputs.extend(inputs)
        batches, started = [], time.perf_counter()
        for stop, values in self._runs(model, [layer.node for layer, _, _ in changes]):
            # float outputs only: an integer output (a text model passing its token ids through, values up to
            # the vocabulary's size) would outweigh the rest and make every layer's gain look like zero
            flat = np.concatenate([np.asarray(v).astype(np.float32, copy=False).ravel() for v in values.values()
                                   if np.issubdtype(np.asarray(v).dtype, np.floating)] or [np.zeros(0, np.float32)])
            batches.append((stop, flat, time.perf_counter() - started))
            started = time.perf_counter()
        return batches

    def _runs(self, model, changed: list[gs.Node]):
        """The changed model's batches: in full without changes, else from the unchanged model's tensors that
        the changed nodes read (computed once, as far as the probes have gone)."""
        if not changed:
            return Runner(model, provider=self.ctx.provider, outputs=self.names,
                          role="the model for a sensitivity probe").batches(self.data, self.samples, self.batch_size)
        produced = {t.name for node in changed for t in node.outputs}
        if self.prefix is None or produced & self.prefix.computed:  # a layer before those probed: start again
            self.prefix = PrefixRuns(self.data, self.samples, self.batch_size, provider=self.ctx.provider,
                                     role="the model for a sensitivity probe")
        # a changed node that reads another's output (channel pruning changes every reader of a group, at several
        # depths) must see it changed: only reads upstream of every change come from the unchanged model
        after = _downstream(changed)
        reads = [t.name for node in changed for t in node.inputs
                 if isinstance(t, gs.Variable) and t.inputs and t.name not in after]
        if reads:
            for _ in self.prefix.batches(self.unchanged, reads):
                pass
        return self.prefix.branch(model, self.names)

    def relative_error(self, changes) -> float:
        """‖outputs with `changes` − outputs‖² / ‖outputs‖²."""
        difference = self.run(changes) - self.reference
        return float(np.square(difference).sum(dtype=np.float64)) / self.signal
