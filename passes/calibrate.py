"""Calibration: activation statistics gathered batch by batch, and the quantization range each method picks.

Statistics per tensor are a min, a max and a histogram of fixed size. The histogram covers [-limit, limit];
when a batch holds a larger value, the limit doubles and neighbouring bins merge, so earlier batches stay
counted without being stored. Memory is the same for 50 samples or 50 000.

Range methods, for a tensor quantized to `levels` steps:
    minmax      [min, max]
    percentile  clip (100 − percentile) % of the values at each end (only at the top for tensors that are never
                negative)
    entropy     the clipping threshold whose quantized histogram is closest to the real one (KL divergence,
                as in TensorRT's calibrator)
    mse         the clipping range with the least expected squared error: clipping error of the values outside
                plus rounding noise step²/12 of the values inside
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcomp.errors import InputError
from onnxcomp.progress import bar
from onnxcomp.runner import Runner

BINS = 2048  # per side of zero
RUN_BYTES = 256 << 20  # activations fetched per run at most (Runner.batches): larger runs are many-fold slower
HISTOGRAM_SAMPLES = 1 << 14  # values per tensor and sample that enter the histogram (2^18 for a batch of 16)
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    minimum: float = math.inf
    maximum: float = -math.inf
    limit: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(2 * BINS, np.int64))
    count: int = 0
    channel_sums: np.ndarray | None = None  # per channel (axis 1) sums of all values, for means
    channel_count: int = 0
    means: bool = True  # keep the channel sums (bias correction needs them for the inputs of weighted layers)

    def update(self, values: np.ndarray, samples: int = 16) -> bool:
        """Add a batch of `samples` samples' values (by default a calibration batch's 16); False (and nothing
        added) when it holds NaN or infinity."""
        values = np.asarray(values, dtype=np.float32)
        if values.size == 0:
            return True
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            return False
        if values.ndim >= 2 and self.means:
            sums = values.sum(axis=tuple(i for i in range(values.ndim) if i != 1), dtype=np.float64)
            if self.channel_sums is None or self.channel_sums.shape != sums.shape:
                self.channel_sums, self.channel_count = np.zeros_like(sums), 0
            self.channel_sums += sums
            self.channel_count += values.size // values.shape[1]
        values = values.ravel()
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        largest = max(abs(low), abs(high))
        if self.limit == 0.0:
            self.limit = largest if largest > 0 else 1e-8
        while largest > self.limit:
            self._double_range()
        limit = HISTOGRAM_SAMPLES * max(samples, 1)
        if values.size > limit:
            # min and max above saw every value; the histogram's quantiles need far fewer. A prime stride does
            # not line up with the power-of-two sizes of feature maps.
            values = values[:: _prime_at_least(values.size // limit)]
        index = (values + np.float32(self.limit)) * np.float32(BINS / self.limit)
        np.clip(index, 0, 2 * BINS - 1, out=index)
        self.counts += np.bincount(index.astype(np.int32), minlength=2 * BINS)
        self.count += values.size
        return True

    def _double_range(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)  # BINS bins over [-limit, limit]
        self.counts = np.zeros(2 * BINS, np.int64)
        self.counts[BINS // 2: BINS // 2 + BINS] = merged
        self.limit *= 2

    @property
    def channel_means(self) -> np.ndarray | None:
        """Mean of each channel (axis 1) over everything seen, or None for tensors without channels."""
        if self.channel_sums is None or self.channel_count == 0:
            return None
        return self.channel_sums / self.channel_count

    @property
    def centers(self) -> np.ndarray:
        width = self.limit / BINS
        return -self.limit + width * (np.arange(2 * BINS) + 0.5)


def _prime_at_least(n: int) -> int:
    candidate = max(2, n)
    while any(candidate % d == 0 for d in range(2, int(candidate ** 0.5) + 1)):
        candidate += 1
    return candidate


def choose_range(stats: TensorStats, method: str, *, percentile: float = 99.999, levels: int = 256,
                 nonnegative: bool | None = None) -> tuple[float, float]:
    """The [low, high] range to quantize a tensor with these statistics to, by `method`. Always holds 0."""
    if stats.count == 0:
        return 0.0, 0.0
    if nonnegative is None:
        nonnegative = stats.minimum >= 0
    low, high = min(stats.minimum, 0.0), max(stats.maximum, 0.0)
    if method == "minmax" or high - low == 0:
        pass
    elif method == "percentile":
        low, high = _percentile_range(stats, percentile, nonnegative)
    elif method == "entropy":
        threshold = _entropy_threshold(stats, levels if nonnegative else levels // 2, nonnegative)
        low, high = max(low, -threshold), min(high, threshold)
    elif method == "mse":
        low, high = _mse_range(stats, levels, nonnegative)
    else:
        raise InputError(f"unknown calibration method '{method}'; valid: {', '.join(METHODS)}")
    return float(min(low, 0.0)), float(max(high, 0.0))


def _percentile_range(stats: TensorStats, percentile: float, nonnegative: bool) -> tuple[float, float]:
    cumulative = np.cumsum(stats.counts)
    total = cumulative[-1]
    tail = (100.0 - percentile) / 100.0 * total
    centers = stats.centers
    high = centers[min(np.searchsorted(cumulative, total - tail), len(centers) - 1)]
    low = 0.0 if nonnegative else centers[np.searchsorted(cumulative, tail)]
    return max(low, stats.minimum), min(high, stats.maximum)


def _mse_range(stats: TensorStats, levels: int, nonnegative: bool) -> tuple[float, float]:
    """Coordinate search: best upper end for the current lower end, then best lower end, twice."""
    used = stats.counts > 0
    centers, counts = stats.centers[used], stats.counts[used].astype(np.float64)
    low, high = min(stats.minimum, 0.0), max(stats.maximum, 0.0)

    def error(lo: float, hi: float) -> float:
        step = (hi - lo) / (levels - 1)
        clipped = np.clip(centers, lo, hi)
        inside = counts[(centers >= lo) & (centers <= hi)].sum()
        return float(np.dot(counts, (centers - clipped) ** 2) + inside * step * step / 12.0)

    fractions = np.linspace(0.02, 1.0, 99)
    full_low, full_high = low, high
    for _ in range(2):
        if full_high > 0:
            high = min((full_high * f for f in fractions), key=lambda h: error(low, h))
        if not nonnegative and full_low < 0:
            low = min((full_low * f for f in fractions), key=lambda lo: error(lo, high))
    return low, high


def _entropy_threshold(stats: TensorStats, levels: int, nonnegative: bool) -> float:
    """KL-divergence threshold on |x| (TensorRT's method), over candidate thresholds every few bins."""
    positive = stats.counts[BINS:].astype(np.float64)
    if not nonnegative:
        positive = positive + stats.counts[:BINS][::-1]
    # The first bin holds the exact zeros after a Relu: any range represents them exactly, and their weight
    # in the divergence would make every clipping look harmless.
    positive[0] = 0.0
    width = stats.limit / BINS
    last = int(np.nonzero(positive)[0][-1]) + 1 if positive.any() else 1
    if last <= levels:
        return last * width
    best, best_divergence = last, math.inf
    for end in range(levels, last + 1, max(1, (last - levels) // 256)):
        reference = positive[:end].copy()
        reference[end - 1] += positive[end:].sum()
        # quantize the first `end` bins into `levels` groups, spreading each group's mass over its non-empty bins
        kept = positive[:end]
        edges = (np.arange(levels + 1) * end) // levels
        occupied = (kept > 0).astype(np.float64)
        mass = np.add.reduceat(kept, edges[:-1]) / np.maximum(np.add.reduceat(occupied, edges[:-1]), 1.0)
        expanded = np.repeat(mass, np.diff(edges)) * occupied
        p = reference / reference.sum()
        q = expanded / max(expanded.sum(), 1e-12)
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best_divergence:
            best, best_divergence = end, divergence
    return best * width


def collect(model: onnx.ModelProto | str, tensors: list[str], dataset, *, samples: int, batch_size: int,
            provider: str = "cpu", progress: bool | None = None,
            means_of: set[str] | None = None) -> dict[str, TensorStats]:
    """Run `model` on up to `samples` samples of `dataset` and gather statistics of `tensors`, batch by batch;
    channel means only of the tensors in `means_of` (default: all)."""
    stats = {name: TensorStats(means=means_of is None or name in means_of) for name in tensors}
    total = dataset.runs(samples, batch_size)[-1][1]
    with bar(total, "calibrating", show=progress, unit="sample") as shown:
        runner = Runner(model, provider=provider, outputs=tensors, role="the model for calibration")
        done_before = 0
        for done, values in runner.batches(dataset, samples, batch_size, max_bytes=RUN_BYTES):
            for name, value in values.items():
                if not stats[name].update(value, done - done_before):
                    raise InputError(f"calibration: tensor '{name}' holds NaN or infinite values on "
                                     f"{dataset.source}; check the calibration data (and the model) for them")
            del values, value  # free this batch's activations before the next batch is computed
            shown.update(done - shown.n)
            done_before = done
    return stats


def activation_sqnr(reference: onnx.ModelProto | str, quantized: onnx.ModelProto | str, tensors: list[str], dataset, *,
                    samples: int = 2, provider: str = "cpu") -> dict[str, float]:
    """SQNR (dB) of each tensor of the quantized model against the float model, on the first samples (a
    figure for the report: a few samples hold thousands of values of each activation)."""
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    # the two models fetch tensors of the same shapes, so their batches are cut into the same parts
    def run(model: onnx.ModelProto | str, role: str):
        return Runner(model, provider=provider, outputs=tensors, role=role).batches(dataset, samples, 4,
                                                                                    max_bytes=RUN_BYTES)

    float_runs = run(reference, "the float model")
    if isinstance(reference, str):  # weights large enough to be on disk: one session at a time, a few samples kept
        float_runs = list(float_runs)
    for (_, expected), (_, actual) in zip(float_runs, run(quantized, "the quantized model")):
        for name in list(tensors):
            # float32 products summed by BLAS: a detector's activations are 280 MB a sample, and widening them to
            # float64 took longer than running both models
            e, a = expected[name].astype(np.float32).ravel(), actual[name].astype(np.float32).ravel()
            difference = e - a
            signal[name] += float(np.dot(e, e))
            noise[name] += float(np.dot(difference, difference))
    return {name: (math.inf if noise[name] == 0 else 10 * math.log10(max(signal[name], 1e-30) / noise[name]))
            for name in tensors}
