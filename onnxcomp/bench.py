"""Latency at batch 1: warm-up, then many timed runs; quantiles, not means, because machines are noisy."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    p99_ms: float
    runs: int
    timings_ms: list[float] = field(default_factory=list)  # each timed run, in order: the distribution's plot


def interleaved_latency(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], *,
                        runs: int = 50, warmup: int = 5) -> list[Latency]:
    """Time each session on the same feed, taking turns run by run.

    Alternating spreads background noise (other processes, frequency changes) evenly over the models
    being compared, so their ratio is fairer than timing one model after the other.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    for current in sessions:
        for _ in range(warmup):
            current.run(None, feed)
    timings = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for _ in range(runs):
        order.reverse()  # neither model always runs first, with a warmer cache
        for index in order:
            current = sessions[index]
            started = time.perf_counter()
            current.run(None, feed)
            timings[index].append((time.perf_counter() - started) * 1000)
    return [_summary(t) for t in timings]


def _summary(milliseconds: list[float]) -> Latency:
    values = np.asarray(milliseconds)
    return Latency(float(np.median(values)), float(np.percentile(values, 90)), float(np.percentile(values, 99)),
                   len(values), [float(v) for v in values])


@contextmanager
def working_directory(folder):
    """Run code (ORT's quantization tools) inside `folder`: quant_pre_process leaves its temporary model and
    external-data files in the current directory when symbolic shape inference fails."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
