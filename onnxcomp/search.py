"""Searches for the smallest (or fastest) model within an accuracy budget.

Strength search (`optimize` with `max_accuracy_drop` and data): the strengths a recipe leaves free (prune's
sparsity, or the FLOPs that channel pruning keeps, share's bits, and int8's layers left in float: see
recipe.free_strengths) are chosen from SPARSITIES, FLOPS, BITS and FLOAT_LAYERS. Accuracy is taken to
fall as either strength grows, so one free strength is bisected, and two (prune then share) are walked along the
edge of the feasible region: for each sparsity, weakest first, the most bits-saving setting still within the
budget, walked from the previous sparsity's (usually weaker, but not always). About rows + columns candidates
instead of rows × columns. Measurements are reused: the reference model's predictions and latency session are
made once, and the pipeline up to each free pass is run once per setting (the pruned model is shared by every bit
width).

Recipe search (`onnxcomp search`): every recipe of a grid is optimized and measured, in parallel (local processes,
or tasks on a Ray cluster), each result cached on disk under (model, recipe, data) digests; the Pareto front
over size, latency and accuracy is listed and the best candidate within the budget written.

Samples: with calibration data of its own, the budget is checked on all of `data`. Without (or with the same
source), samples spread evenly over `data` calibrate the passes (CALIBRATION_SAMPLES, at most a quarter) and the
budget is checked on the others, so no candidate is judged on the samples it was fitted to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxcomp import data as datasets
from onnxcomp import model_io, progress, recipe
from onnxcomp.bench import interleaved_latency
from onnxcomp.errors import InputError
from onnxcomp.manager import PassManager, PassRecord
from onnxcomp.pass_base import Pass, PassContext
from onnxcomp.runner import Runner
from onnxcomp.validate import _is_scores, tensor_outputs

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)  # prune's sparsity, weakest first
# share's bits, weakest first, in half bits where the sizes lie close to the usual budgets: from 4 to 3 bits
# the file shrinks by a fifth (ResNet-20: 8.8x to 10.3x), and share's allocation spends fractional budgets
BITS = (6, 5, 4.5, 4, 3.5, 3, 2.5, 2)
FLOPS = (0.9, 0.8, 0.7, 0.6, 0.5)  # prune:structure=channel's share of FLOPs kept, weakest first
FLOAT_LAYERS = (16, 8, 4, 2, 1, 0)  # int8's layers left in float (the most sensitive first), weakest first
STRENGTH_VALUES = {"sparsity": SPARSITIES, "bits": BITS, "flops": FLOPS, "float_layers": FLOAT_LAYERS}
CALIBRATION_SAMPLES = 128  # what prune and share use by default
MIN_SPLIT_SAMPLES = 8  # fewer samples than this are not split: calibration and budget share them
OBJECTIVES = ("size", "latency")
# A candidate is within the budget when its drop plus this many standard errors of it is: the drop is measured
# on a few hundred samples (its standard error near 0.8 points on 872 CIFAR images), and the search picks the
# strongest setting that looks within the budget, so without a margin it picks settings whose drop was
# underestimated (ResNet-20: -0.92 points on the budget samples, -2.40 on held-out ones).
NOISE_MARGIN = 1.0
LATENCY_TOLERANCE = 0.10  # a candidate is faster only when its median latency is lower by more than this share
# Passes that read the pipeline's input model (heal's teacher): they run in one manager run with the original.
READS_INPUT_MODEL = {"heal"}
CACHE_VERSION = 3  # 2: candidates carry drop_error; 3: calibration samples spread over the data
BUILT_IN_GRID = (
    "fold-constants,fuse-bn,cleanup",
    "deep-compression",
    "fold-constants,fuse-bn,prune:sparsity=0.4,share:bits=3,min-size=0,short-names",
    "fold-constants,fuse-bn,prune:sparsity=0.5,share:bits=4,min-size=0,short-names",
    "fold-constants,fuse-bn,share:bits=4,min-size=0,short-names",
    "fold-constants,fuse-bn,int8",
)


@dataclass
class Candidate:
    """One optimized model and what it measured: accuracy is top-1 against labels, or agreement with the
    original without labels; drop is in points, drop_error its standard error over the samples (paired: each
    sample's outcome under the original and the candidate); latency is the median at batch 1 (None when not
    timed)."""

    recipe: str
    bytes: int
    accuracy: float
    drop: float
    latency_ms: float | None = None
    reference_latency_ms: float | None = None
    within_budget: bool = False
    chosen: bool = False
    on_front: bool = False
    cached: bool = False
    seconds: float = 0.0
    drop_error: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, max_drop: float) -> None:
        """Whether the drop is within `max_drop` points, with NOISE_MARGIN standard errors to spare."""
        self.within_budget = self.drop + NOISE_MARGIN * self.drop_error <= max_drop

    def report_row(self) -> dict:
        """The keys of Report.candidates."""
        return {"recipe": self.recipe, "bytes": self.bytes, "latency_ms": self.latency_ms,
                "accuracy": self.accuracy, "drop": self.drop, "drop_error": self.drop_error, "chosen": self.chosen}


# ---------------------------------------------------------------------------------------------------------
# Which samples calibrate and which check the budget


@dataclass(frozen=True)
class Split:
    """Which of the evaluation data's `samples` calibrate and which check the budget. `calibration` samples spread
    evenly over the data (the first, then every samples/calibration-th) calibrate and the others check the budget;
    None: the separate calibration data calibrates and every sample checks the budget; all of them: too few to
    hold any out, both use every sample. Spread, not the first ones: data folders are often in class order
    (labels.csv of dev500: its first 128 images are fish, birds and reptiles), and the first samples would
    calibrate on a few classes and check the budget on the others."""

    samples: int
    calibration: int | None

    def calibration_indices(self) -> np.ndarray:
        if self.calibration is None:
            return np.zeros(0, np.int64)
        return datasets.spread_indices(self.samples, self.calibration)

    def budget_indices(self) -> np.ndarray:
        everything = np.arange(self.samples, dtype=np.int64)
        if self.calibration is None or self.calibration == self.samples:
            return everything
        return np.setdiff1d(everything, self.calibration_indices())

    def budget_set(self, dataset: datasets.Dataset) -> datasets.Dataset:
        return dataset if self.calibration in (None, self.samples) else dataset.select(self.budget_indices())

    def calibration_set(self, dataset: datasets.Dataset) -> datasets.Dataset | None:
        """The calibration samples of `dataset`, or None where the separate calibration data calibrates."""
        if self.calibration is None:
            return None
        return dataset if self.calibration == self.samples else dataset.select(self.calibration_indices())

    def describe(self) -> str:
        budget = len(self.budget_indices())
        if self.calibration is None:
            return f"budget checked on all {budget} data samples, calibration on the calibration data"
        if self.calibration == self.samples:
            return f"too few data samples to hold some out: calibration and budget on the same {budget}"
        first = self.calibration_indices()[:3]
        return (f"budget checked on {budget} of the {self.samples} data samples, held out from the "
                f"{self.calibration} calibration samples spread over the data (samples {', '.join(map(str, first))}, …)")


def split(samples: int, separate_calibration: bool) -> Split:
    if separate_calibration:
        return Split(samples, None)
    if samples < MIN_SPLIT_SAMPLES:
        return Split(samples, samples)
    return Split(samples, min(CALIBRATION_SAMPLES, samples // 4))


def same_source(first, second) -> bool:
    """Whether two data arguments name the same files (then they cannot be held out from each other)."""
    if first is second:
        return True
    if isinstance(first, (str, os.PathLike)) and isinstance(second, (str, os.PathLike)):
        return str(first) != "random" and Path(first).resolve() == Path(second).resolve()
    return False


# ---------------------------------------------------------------------------------------------------------
# Measuring candidates against the original, the original's side measured once


class Judge:
    """The original's predictions on the budget samples and its latency session, made once; `measure` runs a
    candidate on the same samples."""

    def __init__(self, original: onnx.ModelProto | str, dataset: datasets.Dataset, *, provider: str = "cpu",
                 optimization: str = "all", latency_runs: int = 50):
        self.dataset, self.provider, self.optimization, self.latency_runs = dataset, provider, optimization, latency_runs
        model = original if isinstance(original, onnx.ModelProto) else model_io.load(original)
        runner = Runner(model, provider=provider, optimization=optimization, outputs=tensor_outputs(model),
                        spinning=False, role="the original model")
        self.output = _scores_output(runner, dataset)
        self.reference = runner.stacked(dataset, self.output).argmax(axis=1)
        self.labels = None if dataset.labels is None else dataset.labels[:len(self.reference)]
        self.reference_accuracy = None if self.labels is None else _share(self.reference == self.labels)
        self.reference_session = runner.session
        self.latency_feed = dataset.batch(0, dataset.fixed_batch or 1)

    def measure(self, model: onnx.ModelProto, recipe_text: str) -> Candidate:
        runner = Runner(model, provider=self.provider, optimization=self.optimization, spinning=False,
                        role="a candidate model")
        predicted = runner.stacked(self.dataset, self.output).argmax(axis=1)
        if self.labels is not None:
            accuracy = _share(predicted == self.labels)
            lost = (self.reference == self.labels).astype(np.float64) - (predicted == self.labels)
        else:
            accuracy = _share(predicted == self.reference)
            lost = (predicted != self.reference).astype(np.float64)
        candidate = Candidate(recipe_text, model.ByteSize(), accuracy, 100.0 * float(np.mean(lost)),
                              drop_error=_standard_error(lost))
        if self.latency_runs > 0:
            reference, own = interleaved_latency([self.reference_session, runner.session], self.latency_feed,
                                                 runs=self.latency_runs)
            candidate.latency_ms, candidate.reference_latency_ms = own.median_ms, reference.median_ms
        return candidate


def _scores_output(runner: Runner, dataset: datasets.Dataset) -> str:
    """The first output that holds class scores, [N, C]: the one a top-1 budget is measured on."""
    start, stop = dataset.runs(dataset.num_samples, 8)[0]
    first = runner.run(dataset.batch(start, stop))
    for name in runner.outputs:
        if _is_scores(first[name], stop - start):
            return name
    raise InputError("max_accuracy_drop=: the model has no class-score output ([N, C] floats), so no accuracy or "
                     "agreement can be measured for the budget")


def _standard_error(lost: np.ndarray) -> float:
    """The standard error, in points, of the mean of per-sample losses (1 lost, -1 gained, 0 same)."""
    return 100.0 * float(np.std(lost, ddof=1) / np.sqrt(len(lost))) if len(lost) > 1 else 0.0


def _share(matches: np.ndarray) -> float:
    return 100.0 * float(np.mean(matches)) if matches.size else 0.0


# ---------------------------------------------------------------------------------------------------------
# Strength search inside one recipe


@dataclass
class StrengthSearch:
    """The result of `search_strengths`: the chosen model, its pass records, and every candidate tried."""

    model: onnx.ModelProto
    records: list[PassRecord]
    candidates: list[Candidate]
    chosen: Candidate
    split: Split | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        within = sum(c.within_budget for c in self.candidates)
        text = (f"budget search: {len(self.candidates)} candidates in {self.seconds:.1f} s, {within} within the "
                f"budget; chosen {self.chosen.recipe} ({self.chosen.drop:+.2f} points)")
        return text + (f"; {self.split.describe()}" if self.split is not None else "")


class _Pipeline:
    """Runs `passes` with some strengths replaced, caching the model after each pass a later one depends on."""

    def __init__(self, original: onnx.ModelProto, passes: list[Pass], free: dict[int, str], ctx: PassContext):
        self.original, self.passes, self.free, self.ctx = original, passes, free, ctx
        cuts = {position - 1 for position in free if position > 0} | set(sorted(free)[:-1])
        reuse = not any(p.name in READS_INPUT_MODEL for p in passes)
        self.cuts = sorted(cuts) if reuse else []
        self.stages: dict[tuple, tuple[onnx.ModelProto, list[PassRecord]]] = {}

    def configured(self, strengths: dict[int, float]) -> list[Pass]:
        return [type(p)(dataclasses.replace(p.config, **{self.free[i]: strengths[i]})) if i in strengths else p
                for i, p in enumerate(self.passes)]

    def run(self, strengths: dict[int, float]) -> tuple[onnx.ModelProto, list[PassRecord], str]:
        passes = self.configured(strengths)
        model, records, done = self.original, [], 0
        for cut in self.cuts:
            key = tuple(p.describe() for p in passes[:cut + 1])
            if key not in self.stages:
                stage, stage_records = PassManager(passes[done:cut + 1], final_cleanup=False).run(model, self.ctx)
                self.stages[key] = (stage, records + stage_records)
            model, records = self.stages[key]
            done = cut + 1
        if done < len(passes):
            model, last = PassManager(passes[done:]).run(model, self.ctx)
            records = records + last
        return model, records, ",".join(p.describe() for p in passes)


def search_strengths(original: onnx.ModelProto, passes: list[Pass], free: dict[int, str], ctx: PassContext,
                     judge: Judge, *, max_drop: float, optimize_for: str = "size",
                     split: Split | None = None) -> StrengthSearch:
    """The smallest (optimize_for="size") or fastest ("latency") model within `max_drop` points over the free
    strengths ({position: option}); when none is within the budget, the weakest setting tried."""
    if optimize_for not in OBJECTIVES:
        raise InputError(f"optimize_for= must be {' or '.join(OBJECTIVES)}, not '{optimize_for}'")
    axes = sorted(free)[:2]  # prune then share; a third free pass keeps its recipe's strength
    ctx = dataclasses.replace(ctx, memo={})
    pipeline = _Pipeline(original, passes, {i: free[i] for i in axes}, ctx)
    values = {axis: _accepted(passes[axis], free[axis]) for axis in axes}
    tried: dict[tuple[int, ...], tuple[Candidate, onnx.ModelProto, list[PassRecord]]] = {}

    def feasible(*cell: int) -> bool:
        if cell not in tried:
            strengths = {axis: values[axis][index] for axis, index in zip(axes, cell)}
            started = time.perf_counter()
            model, records, text = pipeline.run(strengths)
            candidate = judge.measure(model, text)
            candidate.check(max_drop)
            candidate.seconds = time.perf_counter() - started
            ctx.log.info("budget search: %s: %.2f points, %d bytes", text, candidate.drop, candidate.bytes)
            tried[cell] = (candidate, model, records)
        return tried[cell][0].within_budget

    started = time.perf_counter()
    sizes = [len(values[axis]) for axis in axes]
    if len(axes) == 1:
        _strongest_feasible(lambda index: feasible(index), sizes[0])
    else:
        _walk_edge(feasible, *sizes)
    found = _choose(list(tried.values()), optimize_for)
    found.split, found.seconds = split, time.perf_counter() - started
    return found


def _accepted(free_pass: Pass, option: str) -> list:
    """The STRENGTH_VALUES of `option` that the pass's other options allow (uniform sharing takes whole bits)."""
    accepted = []
    for value in STRENGTH_VALUES[option]:
        try:
            dataclasses.replace(free_pass.config, **{option: value})
        except ValueError:
            continue
        accepted.append(value)
    return accepted


def _strongest_feasible(feasible, count: int, below: int | None = None) -> int:
    """Bisection: the largest index < `below` (default count) that is feasible, or -1; assumes feasibility only
    falls as the index grows."""
    low, high = -1, count if below is None else below  # low is feasible (or none), high is not (or past the end)
    while high - low > 1:
        middle = (low + high) // 2
        if feasible(middle):
            low = middle
        else:
            high = middle
    return low


def _walk_edge(feasible, rows: int, columns: int) -> list[tuple[int, int]]:
    """(row, strongest feasible column) for each row that has one, rows weakest first: bisected in the first row,
    then walked from the previous row's column, down while infeasible and up while the next is feasible.

    A stronger row usually takes a weaker column, but not always: on ResNet-20, prune 0.4 + 4 bits measured
    -0.11 points where 0.3 + 4 bits measured +0.23 (pruning's re-solve undoes some of what it removes, and each
    drop is measured to about ±0.6), so each row also tries the columns past the previous row's."""
    column = _strongest_feasible(lambda c: feasible(0, c), columns)
    edge = [(0, column)] if column >= 0 else []
    for row in range(1, rows):
        while column >= 0 and not feasible(row, column):
            column -= 1
        if column < 0:
            break
        while column + 1 < columns and feasible(row, column + 1):
            column += 1
        edge.append((row, column))
    return edge


def _choose(tried, optimize_for: str) -> StrengthSearch:
    candidates = [candidate for candidate, _, _ in tried]
    best = best_candidate(candidates, optimize_for)
    best.chosen = True
    model, records = next((m, r) for c, m, r in tried if c is best)
    return StrengthSearch(model, records, candidates, best)


def best_candidate(candidates: list[Candidate], optimize_for: str) -> Candidate:
    """Within the budget: the smallest (then fastest), or the fastest (then smallest); none within it: the one
    that lost least."""
    within = [c for c in candidates if c.within_budget]
    if not within:
        return min(candidates, key=lambda c: (c.drop, c.bytes))
    if optimize_for == "latency" and all(c.latency_ms is not None for c in within):
        fastest = min(c.latency_ms for c in within)
        within = [c for c in within if c.latency_ms <= fastest * (1 + LATENCY_TOLERANCE)]
    return min(within, key=lambda c: (c.bytes, c.latency_ms or 0.0))


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other one beats on size, latency and accuracy together (latency counts only when it
    differs by more than LATENCY_TOLERANCE); marks them `on_front`."""
    def faster(a: Candidate, b: Candidate) -> bool:
        return a.latency_ms is not None and b.latency_ms is not None and \
            a.latency_ms < b.latency_ms * (1 - LATENCY_TOLERANCE)

    def dominates(a: Candidate, b: Candidate) -> bool:
        no_worse = a.bytes <= b.bytes and a.accuracy >= b.accuracy and not faster(b, a)
        better = a.bytes < b.bytes or a.accuracy > b.accuracy or faster(a, b)
        return no_worse and better

    front = [c for c in candidates if not any(dominates(other, c) for other in candidates if other is not c)]
    for candidate in front:
        candidate.on_front = True
    return sorted(front, key=lambda c: c.bytes)


# ---------------------------------------------------------------------------------------------------------
# Recipe search over a grid, in parallel, cached on disk


@dataclass(frozen=True)
class Job:
    """One grid candidate, everything a worker process (local or on a Ray node) needs to run it by itself."""

    model: str
    recipe: str
    data: str
    calib_data: str | None
    preprocess: str | None
    split: Split
    max_drop: float
    latency_runs: int
    seed: int
    entry: str  # the cache folder its model and result go to


@dataclass
class RecipeSearch:
    """The result of `search_recipes`: every candidate, the Pareto front, the chosen one and where it went."""

    candidates: list[Candidate]
    front: list[Candidate]
    chosen: Candidate
    split: Split
    output: str | None
    seconds: float
    reference_bytes: int
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        rows = [("", "recipe", "size", "smaller", "latency ms", "accuracy", "drop", "budget", "front", "time")]
        for c in sorted(self.candidates, key=lambda c: c.bytes):
            rows.append(("*" if c.chosen else "", c.recipe, f"{c.bytes:,}", f"{self.reference_bytes / c.bytes:.2f}x",
                         "-" if c.latency_ms is None else f"{c.latency_ms:.3f}", f"{c.accuracy:.2f}%",
                         f"{c.drop:+.2f}±{c.drop_error:.2f}", "ok" if c.within_budget else "over",
                         "yes" if c.on_front else "",
                         "cached" if c.cached else f"{c.seconds:.1f} s"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"Pareto front (size, latency, accuracy): {len(self.front)} of {len(self.candidates)}; "
                     f"chosen: {self.chosen.recipe}" + (f" → {self.output}" if self.output else ""))
        lines.append(f"samples: {self.split.describe()}; search took {self.seconds:.1f} s")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def search_recipes(model: str, data: str, *, calib_data: str | None = None, max_accuracy_drop: float,
                   grid: str | None = None, preprocess: str | None = None, workers: int | None = None,
                   ray_address: str | None = None, cache: str | None = None, output: str | None = None,
                   optimize_for: str = "size", latency_runs: int = 50, seed: int = 0) -> RecipeSearch:
    """Optimize and measure every recipe of `grid` (a TOML file of [[candidate]] tables with a `recipe`, or the
    built-in BUILT_IN_GRID), in `workers` local processes (default min(CPUs, 2)) or as tasks on the Ray cluster
    at `ray_address`; results are cached under `cache` (default ~/.cache/onnxcomp/search) by the digests of the
    model, the recipe and the data. Writes the chosen candidate to `output` when given."""
    started = time.perf_counter()
    if optimize_for not in OBJECTIVES:
        raise InputError(f"optimize_for= must be {' or '.join(OBJECTIVES)}, not '{optimize_for}'")
    if data is None or str(data) == "random":
        raise InputError("max_accuracy_drop= needs real data (data=); random inputs measure no accuracy")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise InputError(f"workers= must be at least 1, not {workers}")
    recipes = read_grid(grid)
    original = model_io.load(model)
    if output is not None:
        model_io.check_output_path(model, output)
    dataset = datasets.open_data(data, original, preprocess=preprocess, seed=seed)
    if calib_data is not None:
        datasets.open_data(calib_data, original, preprocess=preprocess, seed=seed)  # bad data fails here, once
    chosen_split = split(dataset.num_samples, calib_data is not None and not same_source(data, calib_data))
    if ray_address is not None:
        check_ray_address(ray_address)
    folder = cache_folder(cache)
    shared = {"version": CACHE_VERSION, "model": _digest_bytes(original.SerializeToString()),
              "data": digest_path(data), "calib": None if calib_data is None else digest_path(calib_data),
              "preprocess": preprocess, "split": dataclasses.asdict(chosen_split), "runs": latency_runs,
              "seed": seed}
    jobs = [Job(str(model), text, str(data), None if calib_data is None else str(calib_data), preprocess,
                chosen_split, max_accuracy_drop, latency_runs, seed,
                str(folder / _key(shared, canonical_recipe(text)))) for text in recipes]
    results = _cached(jobs)
    pending = [job for job in jobs if job.entry not in results]
    if pending:
        run = _run_on_ray if ray_address is not None else _run_locally
        results.update(run(pending, ray_address if ray_address is not None else workers))
    candidates = [results[job.entry] for job in jobs]
    for candidate in candidates:
        candidate.check(max_accuracy_drop)
    front = pareto_front(candidates)
    chosen = best_candidate(candidates, optimize_for)
    chosen.chosen = True
    notes = [] if chosen.within_budget else [f"no candidate is within the budget of {max_accuracy_drop} points: the "
                                             "one that lost least was chosen"]
    if output is not None:
        entry = jobs[candidates.index(chosen)].entry
        model_io.save(model_io.load(Path(entry) / "model.onnx"), output, source=model)
    return RecipeSearch(candidates, front, chosen, chosen_split, None if output is None else str(output),
                        time.perf_counter() - started, model_io.file_size(model), notes)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 2))


def read_grid(grid: str | None) -> list[str]:
    """The recipes of a grid file ([[candidate]] tables, each with recipe = "..."), checked before any work."""
    if grid is None:
        return list(BUILT_IN_GRID)
    path = Path(grid)
    try:
        document = recipe.tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: grid file not found; give a TOML file of [[candidate]] tables") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the grid ({exc.strerror or exc})") from None
    except (recipe.tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid TOML grid ({exc})") from None
    entries = document.get("candidate")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{path}: a grid needs one or more [[candidate]] tables, each with recipe = \"...\"")
    recipes = []
    for position, entry in enumerate(entries, start=1):
        text = entry.get("recipe")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}: [[candidate]] number {position} has no recipe = \"...\"")
        try:
            recipe.parse(text)
        except InputError as exc:
            raise InputError(f"{path}: candidate {position} ({text}): {exc}") from None
        recipes.append(text.strip())
    return recipes


def canonical_recipe(text: str) -> str:
    """The passes a recipe stands for with their non-default options: two spellings of one recipe match."""
    return ",".join(p.describe() for p in recipe.parse(text))


# The cache: one folder per (model, recipe, data) key holding model.onnx and result.json, written in that order
# (each atomically), so a folder with result.json is complete.


def cache_folder(cache: str | None) -> Path:
    """The cache folder, created; a folder that cannot be is bad input."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    folder = Path(cache) if cache is not None else Path(base) / "onnxcomp" / "search"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cache= {folder}: cannot create the cache folder ({exc.strerror or exc}); give another "
                         "with cache=") from None
    return folder


def _key(shared: dict, canonical: str) -> str:
    return hashlib.sha256(json.dumps({**shared, "recipe": canonical}, sort_keys=True).encode()).hexdigest()[:32]


def _digest_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def digest_path(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _cached(jobs: list[Job]) -> dict[str, Candidate]:
    found = {}
    for job in jobs:
        result = Path(job.entry) / "result.json"
        if result.is_file() and (Path(job.entry) / "model.onnx").is_file():
            try:
                candidate = Candidate(**json.loads(result.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue  # an entry of another version or a damaged one: measured again
            candidate.cached, candidate.chosen, candidate.on_front = True, False, False
            found[job.entry] = candidate
    return found


def run_candidate(job: Job) -> Candidate:
    """Optimize and measure one grid candidate and store it in its cache folder (runs in a worker)."""
    from onnxcomp import api

    started = time.perf_counter()
    original = model_io.load(job.model)
    dataset = datasets.open_data(job.data, original, preprocess=job.preprocess, seed=job.seed)
    budget = job.split.budget_set(dataset)
    calibration = job.split.calibration_set(dataset)
    if calibration is None and job.calib_data is not None:
        calibration = datasets.open_data(job.calib_data, original, preprocess=job.preprocess, seed=job.seed)
    optimized, _ = api.optimize(original, job.recipe, calib_data=calibration, validate_result=False, seed=job.seed)
    candidate = _judge(job, original, budget).measure(optimized, job.recipe)
    candidate.check(job.max_drop)
    candidate.seconds = time.perf_counter() - started
    Path(job.entry).mkdir(parents=True, exist_ok=True)
    model_io.save(optimized, Path(job.entry) / "model.onnx")
    model_io.save_text(json.dumps(candidate.to_dict()), Path(job.entry) / "result.json")
    return candidate


_JUDGES: dict[tuple, Judge] = {}  # one per worker process and (model, data, split): the original measured once


def _judge(job: Job, original: onnx.ModelProto, budget: datasets.Dataset) -> Judge:
    key = (job.model, job.data, job.preprocess, job.split, job.latency_runs)
    if key not in _JUDGES:
        _JUDGES[key] = Judge(original, budget, latency_runs=job.latency_runs)
    return _JUDGES[key]


def _run_locally(jobs: list[Job], workers: int) -> dict[str, Candidate]:
    """The jobs in this process (one worker) or in `workers` fresh processes (spawned: ONNX Runtime's and the
    BLAS thread pools do not survive a fork)."""
    done = {}
    with progress.bar(len(jobs), "search", unit="candidate") as shown:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                done[job.entry] = run_candidate(job)
                shown.update(1)
            return done
        context = multiprocessing.get_context("spawn")
        with _threads_each(max(1, (os.cpu_count() or 1) // workers)), \
                ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            futures = {pool.submit(run_candidate, job): job for job in jobs}
            for future in as_completed(futures):
                done[futures[future].entry] = future.result()
                shown.update(1)
    return done


# The BLAS libraries read these when a process starts: workers spawned with them share the cores instead of each
# starting a thread per core (what Ray does for its tasks too). A value the user set is kept.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _threads_each(threads: int):
    """Worker processes started inside this block get `threads` BLAS threads each."""
    added = [name for name in THREAD_VARIABLES if name not in os.environ]
    os.environ.update({name: str(threads) for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


RAY_CONNECT_SECONDS = 5.0


def check_ray_address(address: str) -> None:
    """Fail in seconds, in one line, when nothing listens at a Ray head's address (ray.init would retry for
    a minute or more)."""
    try:
        import ray  # noqa: F401 - only its presence is checked here
    except ImportError:
        raise InputError("ray_address= needs Ray: pip install 'onnxcomp[ray]'") from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"ray_address= {address}: give the head's HOST:PORT (as `ray start --head` prints it)")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_SECONDS).close()
    except OSError as exc:
        raise InputError(f"ray_address= {address}: no Ray head answers there ({exc.strerror or exc}); start one "
                         "with `ray start --head` or check the address") from None


def _run_on_ray(jobs: list[Job], address: str) -> dict[str, Candidate]:
    """The jobs as Ray tasks of one CPU each; the model, data and cache paths must be readable and writable on
    the cluster's nodes (a shared file system, or a single machine)."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_candidate)
        pending = {task.remote(job): job for job in jobs}
        done = {}
        with progress.bar(len(jobs), "search on ray", unit="candidate") as shown:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                done[job.entry] = _ray_result(ray, ready[0])
                shown.update(1)
        return done
    finally:
        ray.shutdown()


def _ray_result(ray, ref) -> Candidate:
    """A task's candidate; a task that raised InputError raises it here as the same one-line error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, InputError):
            raise InputError(str(cause.args[0]) if cause.args else str(cause)) from None
        raise
