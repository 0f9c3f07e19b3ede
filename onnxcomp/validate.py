"""Reference vs candidate under ONNX Runtime: accuracy, agreement, numerical error, latency and size.

Both models see the same samples on each execution provider. Errors are accumulated batch by batch, so memory
does not grow with the data set, except for models too large to hold two sessions of (ONE_SESSION_AT_A_TIME_BYTES):
there the reference's outputs are kept while the candidate runs. Accuracy is measured only against labels;
without labels, agreement (same top-1 class as the reference) is reported instead; with random inputs, only
agreement and error are meaningful.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import onnx

from onnxcomp import data as datasets
from onnxcomp import encoding, model_io, runtime
from onnxcomp.bench import Latency, interleaved_latency
from onnxcomp.errors import InputError, first_line
from onnxcomp.runner import Runner

# Above this size of the two models together, their sessions open one after the other instead of side by side:
# on a generated 2.4 GB model, two sessions at once were most of validation's peak memory.
ONE_SESSION_AT_A_TIME_BYTES = 2**30


@dataclass
class OutputError:
    name: str
    max_abs_error: float
    mean_abs_error: float
    max_abs_reference: float
    cosine: float
    sqnr_db: float  # 10·log10(Σ ref² / Σ (ref − cand)²); inf when identical
    integer: bool = False  # integer and bool outputs are compared exactly: `mismatches` counts differing elements
    mismatches: int = 0
    agreement: float | None = None  # %, same argmax as the reference, per sample or per position
    agreement_over: str | None = None  # "sample" ([N, C] scores) or "position" ([N, T, C], [N, C, H, W] maps)

    @property
    def badness(self) -> tuple:
        """Orders outputs from best to worst: differing integers, then NaN, then lower SQNR."""
        sqnr = self.sqnr_db
        return (self.mismatches, math.isnan(sqnr), -sqnr if not math.isnan(sqnr) else 0.0)


@dataclass
class ProviderResult:
    provider: str
    samples: int
    reference_accuracy: float | None  # %, against labels
    candidate_accuracy: float | None
    agreement: float | None  # %, same top-1 as the reference
    outputs: list[OutputError]
    reference_latency: Latency | None
    candidate_latency: Latency | None

    @property
    def worst_output(self) -> OutputError:
        return max(self.outputs, key=lambda output: output.badness)

    @property
    def accuracy_drop(self) -> float | None:
        """Points of top-1 lost against labels, or points of disagreement when there are no labels."""
        if self.reference_accuracy is not None and self.candidate_accuracy is not None:
            return self.reference_accuracy - self.candidate_accuracy
        return None if self.agreement is None else 100.0 - self.agreement

    @property
    def latency_ratio(self) -> float | None:
        if not (self.reference_latency and self.candidate_latency):
            return None
        return self.candidate_latency.median_ms / self.reference_latency.median_ms


@dataclass
class Validation:
    data_source: str
    random_data: bool
    labelled: bool
    reference_bytes: int
    candidate_bytes: int
    providers: list[ProviderResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.candidate_bytes / self.reference_bytes

    @property
    def accuracy_drop(self) -> float | None:
        drops = [p.accuracy_drop for p in self.providers if p.accuracy_drop is not None]
        return max(drops) if drops else None

    @property
    def latency_ratio(self) -> float | None:
        ratios = [p.latency_ratio for p in self.providers if p.latency_ratio is not None]
        return max(ratios) if ratios else None

    def to_dict(self) -> dict:
        result = asdict(self)
        result["size_ratio"] = self.size_ratio
        for entry, provider in zip(result["providers"], self.providers):
            entry["accuracy_drop"] = provider.accuracy_drop
            entry["latency_ratio"] = provider.latency_ratio
        return result


def validate(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, data=None, *,
             preprocess=None, providers=("cpu",), limit: int | None = None, batch_size: int = 32,
             latency_runs: int = 50, warmup: int = 5, optimization: str = "all",
             input_shapes: dict[str, tuple[int, ...]] | None = None, tokenizer=None) -> Validation:
    """Compare `candidate` with `reference` on `data` (a path, arrays, Dataset, or None for random inputs).

    `input_shapes` ({input: dims}) fixes free dimensions for the data; `tokenizer` reads sentence files. Every
    tensor output is compared; integer and string outputs exactly."""
    providers = runtime.parse_providers(list(providers))
    runtime.require_available(providers)
    if isinstance(preprocess, str):
        preprocess = datasets.Preprocess.parse(preprocess)
    reference_model = _as_model(reference)
    candidate_model = _as_model(candidate)
    _check_same_interface(reference_model, candidate_model)
    compared = tensor_outputs(reference_model)
    if not compared:
        raise InputError("the model has no tensor outputs (only sequences or maps), so there is nothing to compare")
    dataset = datasets.random_data(reference_model, input_shapes=input_shapes) if data is None else \
        datasets.open_data(data, reference_model, preprocess=preprocess, limit=limit, input_shapes=input_shapes,
                           tokenizer=tokenizer)
    runs = dataset.runs(dataset.num_samples, batch_size)
    usable = runs[-1][1]
    notes = []
    others = [o.name for o in reference_model.graph.output if o.name not in compared]
    if others:
        notes.append(f"output(s) {', '.join(others)} are sequences or maps, not tensors: not compared")
    if dataset.is_random:
        notes.append("no data given: random inputs were used, so accuracy was NOT measured; "
                     "agreement and error on random inputs only")
    elif dataset.labels is None:
        notes.append("the data has no labels: accuracy was not measured, agreement with the reference was")
    if usable < dataset.num_samples:
        notes.append(f"the model's batch is fixed at {dataset.fixed_batch}: the last {dataset.num_samples - usable} "
                     "sample(s) were not used")
    result = Validation(dataset.source, dataset.is_random, dataset.labels is not None,
                        _size(reference, reference_model), _size(candidate, candidate_model), notes=notes)
    one_at_a_time = result.reference_bytes + result.candidate_bytes > ONE_SESSION_AT_A_TIME_BYTES
    if one_at_a_time:
        notes.append(f"the two models hold {(result.reference_bytes + result.candidate_bytes) / 2**30:.1f} GiB: "
                     "their sessions were opened one after the other, and each was timed alone (not in turns)")
    with _as_run(candidate, candidate_model, one_at_a_time, notes) as run_candidate:
        for provider in providers:
            result.providers.append(_compare_on(provider, reference, reference_model, run_candidate,
                                                candidate_model, dataset, runs, latency_runs, warmup, optimization,
                                                one_at_a_time))
    return result


@contextmanager
def _as_run(candidate, candidate_model: onnx.ModelProto, large: bool, notes: list[str]) -> Iterator:
    """The candidate as its sessions open it: itself, except for a large model with compact weights (prune's
    and share's layouts). ONNX Runtime folds their decoding when it loads the file and holds every intermediate
    tensor of the folding until it ends, 9 to 26 times the weights: a 2.4 GB model would take over 20 GB. Its
    sessions open instead a copy in a temporary file whose weights were decoded one at a time, which computes
    what the folded session runs (the same dense weights, bit for bit, and the same graph)."""
    if not large or not any(f.domain == encoding.DOMAIN for f in candidate_model.functions):
        yield candidate
        return
    folder = None if isinstance(candidate, onnx.ModelProto) else model_io.folder_of(candidate)
    skeleton, decoded = encoding.without_decoding(candidate_model, lambda t: model_io.tensor_array(t, folder))
    weights = itertools.chain(model_io.moved_out(skeleton, folder) if folder else (),
                              (model_io.array_weight(name, values) for name, values in decoded))
    with model_io.on_disk(skeleton, weights) as path:
        notes.append("the candidate's compact weights were decoded before its sessions opened, one weight at a "
                     "time: ONNX Runtime's own decoding of this file, when it loads it, holds every intermediate "
                     "tensor and takes several times the weights' memory (prune and share's encoding=dense "
                     "avoids it)")
        yield path


def _compare_on(provider, reference, reference_model, candidate, candidate_model, dataset, runs,
                latency_runs, warmup, optimization, one_at_a_time: bool) -> ProviderResult:
    output_names = tensor_outputs(reference_model)
    one = dataset.batch(0, dataset.fixed_batch or 1)  # batch 1, unless the model only takes its fixed batch

    def opened(source, role) -> Runner:  # spinning off: idle threads would steal the cores of a session being timed
        return Runner(source, provider=provider, optimization=optimization, spinning=False, role=role)

    ref_runner = opened(_source(reference, reference_model), "the reference model")
    ref_outputs = _outputs(ref_runner, dataset, runs, output_names)
    if one_at_a_time:
        # Two sessions of a large model at once were most of validation's peak memory: the reference runs
        # first, its outputs are kept, and its session is let go before the candidate's opens.
        ref_outputs = list(ref_outputs)
        ref_latency = _timed([ref_runner], one, latency_runs, warmup)[0]
        ref_runner = None
    cand_runner = opened(_source(candidate, candidate_model), "the candidate model")
    # Outputs are compared before any latency run: data the model rejects is then an InputError from the
    # runner, not an error of a timed run.
    result = _compared(provider, reference_model, output_names,
                       zip(ref_outputs, _outputs(cand_runner, dataset, runs, output_names)), runs, dataset.labels)
    if one_at_a_time:
        result.reference_latency = ref_latency
        result.candidate_latency = _timed([cand_runner], one, latency_runs, warmup)[0]
    else:  # the two sessions take turns: background noise falls on both alike
        result.reference_latency, result.candidate_latency = _timed([ref_runner, cand_runner], one, latency_runs,
                                                                    warmup)
    return result


def _timed(runners: list[Runner], feed, runs: int, warmup: int) -> list[Latency | None]:
    """Latency of each runner's session on `feed`, in turns; None for each where no runs were asked for."""
    if runs <= 0:
        return [None] * len(runners)
    try:
        return interleaved_latency([runner.session for runner in runners], feed, runs=runs, warmup=warmup)
    except Exception as exc:  # noqa: BLE001 - ORT's own types; batch 1 can fail where the compared batches ran
        raise InputError(f"onnxruntime could not time {' and '.join(r.role for r in runners)} at batch 1: "
                         f"{first_line(exc)}") from None


def _outputs(runner: Runner, dataset, runs, names: list[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(rows, outputs in `names` order) of each batch of `runs`, run as they are asked for."""
    for start, stop in runs:
        yield stop - start, list(runner.run(dataset.batch(start, stop), names).values())


def _compared(provider, reference_model, output_names, pairs, runs, labels) -> ProviderResult:
    """The errors, agreement and accuracy of the candidate's outputs against the reference's, batch by batch;
    latency is left for the caller."""
    producers = output_producers(reference_model)
    errors = {name: _ErrorAccumulator(producers.get(name)) for name in output_names}
    scores = None  # the first [N, C] float output: top-1 against labels, and agreement
    ref_top1, cand_top1 = [], []
    usable = runs[-1][1]
    for (rows, ref_out), (_, cand_out) in pairs:
        for name, r, c in zip(output_names, ref_out, cand_out):
            errors[name].add(r, c, rows)
        scores = scores if scores is not None else next(
            (i for i, r in enumerate(ref_out) if _is_scores(r, rows)), -1)
        if scores >= 0:
            ref_top1.append(ref_out[scores].argmax(axis=1))
            cand_top1.append(cand_out[scores].argmax(axis=1))
    results = [errors[name].result(name) for name in output_names]
    ref_acc = cand_acc = None
    agreement = min((o.agreement for o in results if o.agreement is not None), default=None)
    if ref_top1 and sum(map(len, ref_top1)) == usable:
        agreement = results[scores].agreement  # the scores output's top-1 agreement, per sample
        if labels is not None:
            ref_classes, cand_classes = np.concatenate(ref_top1), np.concatenate(cand_top1)
            ref_acc = 100.0 * float(np.mean(ref_classes == labels[:usable]))
            cand_acc = 100.0 * float(np.mean(cand_classes == labels[:usable]))
    return ProviderResult(provider, usable, ref_acc, cand_acc, agreement, results, None, None)


def _is_scores(output: np.ndarray, rows: int) -> bool:
    """Class scores: a float matrix with one row per sample and more than one class."""
    return output.ndim == 2 and _class_axis(output, rows) is not None


def _class_axis(output: np.ndarray, rows: int, producer: tuple[str, int | None] | None = None) -> int | None:
    """The axis whose argmax is a prediction: classes of [N, C], the last axis of [N, T, C] sequences, the
    channels of [N, C, H, W] maps; None where there is no such axis (one channel, other ranks).

    `producer` (op type, softmax axis) is the op that computes the output, where known (see `output_producers`):
    a softmax's axis is the class axis; a map or sequence that a Concat or a Sigmoid computes has none: a
    detector's [N, 4 + classes, anchors] Concat of boxes and scores, or independent per-element probabilities,
    where argmax over any axis means nothing."""
    if output.dtype.kind != "f" or not output.shape or output.shape[0] != rows:
        return None
    axis = {2: 1, 3: 2, 4: 1}.get(output.ndim)
    if producer is not None and output.ndim > 2:
        op, softmax_axis = producer
        if softmax_axis is not None:
            axis = softmax_axis % output.ndim
        elif op in NOT_CLASS_SCORES:
            return None
    return axis if axis is not None and output.shape[axis] > 1 else None


NOT_CLASS_SCORES = {"Concat", "Sigmoid", "HardSigmoid"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax", "Hardmax"}


def output_producers(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """{output name: (op type of the node computing it, the softmax axis where that op is one)}, through
    Identity and Cast."""
    producer_of = {name: node for node in model.graph.node for name in node.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    producers = {}
    for output in model.graph.output:
        node = producer_of.get(output.name)
        while node is not None and node.op_type in ("Identity", "Cast") and node.input:
            node = producer_of.get(node.input[0])
        if node is None:
            continue
        axis = None
        if node.op_type in _SOFTMAX_OPS:
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        producers[output.name] = (node.op_type, axis)
    return producers


class _ErrorAccumulator:
    def __init__(self, producer: tuple[str, int | None] | None = None):
        self.producer = producer
        self.count = 0
        self.max_abs = 0.0
        self.max_ref = 0.0
        self.sum_abs = 0.0
        self.sum_ref_sq = 0.0
        self.sum_cand_sq = 0.0
        self.sum_diff_sq = 0.0
        self.dot = 0.0
        self.not_finite = False
        self.integer = False
        self.mismatches = 0
        self.positions = 0
        self.agreeing = 0
        self.agreement_over: str | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray, rows: int) -> None:
        if reference.shape != candidate.shape:
            raise InputError(f"output shapes differ: reference {list(reference.shape)}, candidate "
                             f"{list(candidate.shape)}")
        self.integer = reference.dtype.kind in "biuOSU"  # strings (class labels) compare exactly too
        if self.integer:
            self.mismatches += int(np.count_nonzero(reference != candidate))
        if reference.dtype.kind in "OSU":
            return
        axis = _class_axis(reference, rows, self.producer)
        if axis is not None:
            same = reference.argmax(axis=axis) == candidate.argmax(axis=axis)
            self.positions += same.size
            self.agreeing += int(same.sum())
            self.agreement_over = "sample" if reference.ndim == 2 else "position"
        r = reference.astype(np.float64).ravel()
        c = candidate.astype(np.float64).ravel()
        diff = np.abs(r - c)
        self.not_finite |= not (np.isfinite(r).all() and np.isfinite(c).all())
        self.count += r.size
        if r.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_ref = max(self.max_ref, float(np.abs(r).max()))
        self.sum_abs += float(diff.sum())
        self.sum_ref_sq += float(r @ r)
        self.sum_cand_sq += float(c @ c)
        self.sum_diff_sq += float(diff @ diff)
        self.dot += float(r @ c)

    def result(self, name: str) -> OutputError:
        agreement = 100.0 * self.agreeing / self.positions if self.positions else None
        exact = dict(integer=self.integer, mismatches=self.mismatches, agreement=agreement,
                     agreement_over=self.agreement_over)
        if self.not_finite:  # NaN or inf in either model's output: no figure would mean anything
            return OutputError(name, float("nan"), float("nan"), self.max_ref, float("nan"), float("nan"), **exact)
        norms = np.sqrt(self.sum_ref_sq * self.sum_cand_sq)
        cosine = self.dot / norms if norms > 0 else (1.0 if self.sum_diff_sq == 0 else 0.0)
        if self.sum_diff_sq == 0:
            sqnr = float("inf")
        else:
            sqnr = 10 * np.log10(self.sum_ref_sq / self.sum_diff_sq) if self.sum_ref_sq > 0 else float("-inf")
        return OutputError(name, self.max_abs, self.sum_abs / max(self.count, 1), self.max_ref, float(cosine),
                           float(sqnr), **exact)


def tensor_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs validation compares: tensors (sequences and maps, such as ZipMap's, are not compared)."""
    return [o.name for o in model.graph.output if o.type.HasField("tensor_type")]


def _check_same_interface(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    ref_inputs = [s.name for s in datasets.model_inputs(reference)]
    cand_inputs = [s.name for s in datasets.model_inputs(candidate)]
    ref_outputs = [o.name for o in reference.graph.output]
    cand_outputs = [o.name for o in candidate.graph.output]
    if ref_inputs != cand_inputs or ref_outputs != cand_outputs:
        raise InputError(f"the models do not have the same inputs and outputs: reference {ref_inputs} → "
                         f"{ref_outputs}, candidate {cand_inputs} → {cand_outputs}")


def _as_model(model: onnx.ModelProto | str) -> onnx.ModelProto:
    # the graph only: ORT reads a path's weights itself, and a second copy of a 2.4 GB model's weights here
    # was a third of validation's peak memory
    return model if isinstance(model, onnx.ModelProto) else model_io.load(model, weights=False)


def _source(original, loaded: onnx.ModelProto):
    """Give ORT the path when there is one (external data, >2 GB), else the model itself."""
    return str(original) if not isinstance(original, onnx.ModelProto) else loaded


def _size(original, loaded: onnx.ModelProto) -> int:
    return model_io.file_size(original) if not isinstance(original, onnx.ModelProto) else loaded.ByteSize()
