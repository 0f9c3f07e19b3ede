"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import onnx

from onnxcomp import data as datasets
from onnxcomp import model_io, recipe, runtime, search
from onnxcomp.errors import BudgetExceeded, InputError
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import Pass, PassContext
from onnxcomp.report import Report
from onnxcomp.text import is_text
from onnxcomp.validate import Validation, validate

DEFAULT_PASSES = "fold-constants,flush-denormals,fuse-bn,cleanup"


def load(path: str | os.PathLike) -> onnx.ModelProto:
    return model_io.load(path)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    return model_io.save(model, path, source=source)


def resolve_passes(passes: str | list[Pass] | None = None, recipe_file: str | os.PathLike | None = None) -> list[Pass]:
    """A pass list from a recipe string, a recipe (a TOML file or a named recipe), or configured Pass objects."""
    if passes is not None and recipe_file is not None:
        raise InputError("give either passes or a recipe file, not both")
    if recipe_file is not None:
        return recipe.load(recipe_file)
    if passes is None:
        return recipe.parse(DEFAULT_PASSES)
    if isinstance(passes, str):
        return recipe.parse(passes)
    return list(passes)


def optimize(model: onnx.ModelProto | str | os.PathLike, passes: str | list[Pass] | None = None, *,
             recipe_file: str | os.PathLike | None = None, data=None, calib_data=None, preprocess=None,
             output: str | os.PathLike | None = None, validate_result: bool = True, providers=("cpu",),
             limit: int | None = None, latency_runs: int = 50, optimization: str = "all",
             seed: int = 0, max_accuracy_drop: float | None = None, max_latency_ratio: float | None = None,
             input_shapes: dict[str, tuple[int, ...]] | None = None,
             tokenizer: str | os.PathLike | None = None, optimize_for: str = "size",
             return_model: bool = True) -> tuple[onnx.ModelProto | None, Report]:
    """Run passes over a model, optionally save it, and validate it against the original.

    `model` is a path or a ModelProto (never modified). `data` is evaluation data and `calib_data` calibration
    data for the passes that need it (paths, arrays or Datasets; see onnxcomp.data). `max_accuracy_drop`
    (points) is the budget that accuracy-aware passes (int8) aim for on held-back calibration samples; checking
    it on `data` afterwards is `check_budgets`. `input_shapes` ({input: dims}) fixes free input dimensions for
    random inputs and data. Without data, validation runs on random inputs where the model's inputs allow
    them; where they do not, the report says why validation was skipped, unless a budget needs it (then
    InputError, before any work). `tokenizer` (a tokenizer.json) turns sentence files (.txt, .tsv) given as
    `data` or `calib_data` into token inputs. Returns the optimized model and its report.

    With `max_accuracy_drop` and `data`, the strengths the recipe leaves free (prune's sparsity, share's bits:
    named alone, or from a named recipe such as deep-compression) are searched for the smallest model
    (`optimize_for="size"`) or the fastest ("latency") within the budget on `data` (onnxcomp.search); without
    calibration data of its own, samples spread evenly over `data` calibrate and the budget is checked on the others.
    The report lists the candidates tried, and its validation is on the samples the budget was checked on.

    `return_model=False` (with `output`) lets the optimized model go once it is saved and returns None in its
    place: validating a 1.2 GB model then peaked at 2.3 times its size instead of 3.1 (ONNX Runtime's own load of
    a model file takes twice its size for a moment).
    """
    if not return_model and output is None:
        raise InputError("return_model=False needs output=: the optimized model would be lost")
    if validate_result:  # fail on what can be checked now, before any work or any file is written
        runtime.require_available(runtime.parse_providers(list(providers)))
    if isinstance(preprocess, str):
        preprocess = datasets.Preprocess.parse(preprocess)
    if tokenizer is not None and not any(_text_only(d, tokenizer) for d in (data, calib_data)):
        raise InputError(f"a tokenizer ({tokenizer}) turns sentences into token ids, but no data given is "
                         "sentences (.txt/.tsv)")
    source = None if isinstance(model, onnx.ModelProto) else str(model)
    pipeline = resolve_passes(passes, recipe_file)
    free = _free_strengths(passes, recipe_file) if max_accuracy_drop is not None else {}
    if data is None or (isinstance(data, str) and data == "random"):
        # without data to measure on, int8 fits its budget itself, on held-back calibration samples
        free = {position: strength for position, strength in free.items() if strength != "float_layers"}
    # The passes read the weights of a model file from the file, as they need them (manager's `folder`), so a
    # large model is never held whole; heal (its teacher) and the budget search still take it loaded.
    folder = None
    if source is not None and not free and not any(current.name == "heal" for current in pipeline):
        folder = model_io.folder_of(source)
    original = model if source is None else model_io.load(source, weights=folder is None)
    if free and (data is None or (isinstance(data, str) and data == "random")):
        raise InputError("max_accuracy_drop= chooses how strongly prune and share compress by measuring "
                         "accuracy on data: give data= (labelled, or unlabelled for agreement)")
    if output is not None and source is not None:
        model_io.check_output_path(source, output)
    ctx = PassContext(seed=seed, provider=providers[0] if providers else "cpu", max_accuracy_drop=max_accuracy_drop)
    if calib_data is not None:
        ctx.calibration_data = datasets.open_data(calib_data, original, preprocess=preprocess, seed=seed,
                                                  input_shapes=input_shapes,
                                                  tokenizer=_text_only(calib_data, tokenizer))
    evaluation, skipped = None, None
    if validate_result or free:  # a budget search measures on the data even when the result is not validated
        try:
            evaluation = datasets.open_data("random" if data is None else data, original, preprocess=preprocess,
                                            limit=limit, seed=seed, input_shapes=input_shapes,
                                            tokenizer=_text_only(data, tokenizer))
        except datasets.RandomInputsUnavailable as exc:
            if max_accuracy_drop is not None or max_latency_ratio is not None:
                raise InputError(f"the budget cannot be checked: {exc}") from None
            skipped = str(exc)
    found = None
    if free:
        evaluation, found = _search_strengths(original, pipeline, free, ctx, evaluation, data, calib_data,
                                              max_accuracy_drop, optimize_for, providers, optimization, latency_runs)
        optimized, records = found.model, found.records
    else:
        optimized, records = PassManager(pipeline).run(original, ctx, folder=folder)
    if output is not None:
        model_io.save(optimized, output, source=source)
    if not return_model:
        optimized = None
    if source is not None:  # validation reads the file: the loaded copy's weights need not stay in memory
        original = ctx.input_model = None
        gc.collect()  # the passes' graph, a cycle of nodes and tensors, still refers to the loaded copy's tensors
    report = Report(model=source or "(in memory)", output=None if output is None else str(output), passes=records,
                    validation_skipped=skipped)
    if evaluation is not None and validate_result:
        report.validation = validate(source or original, str(output) if output is not None else optimized,
                                     evaluation, providers=providers, latency_runs=latency_runs,
                                     optimization=optimization)
    if found is not None:
        report.candidates = [candidate.report_row() for candidate in found.candidates]
        if report.validation is not None:
            report.validation.notes.append(found.summary())
    return optimized, report


def _free_strengths(passes, recipe_file) -> dict[int, str]:
    """The strengths the user left free; configured Pass objects have none (their options are explicit)."""
    if passes is not None and not isinstance(passes, str):
        return {}
    return recipe.free_strengths(passes or DEFAULT_PASSES, recipe_file)


def _search_strengths(original, pipeline, free, ctx, evaluation, data, calib_data, max_accuracy_drop,
                      optimize_for, providers, optimization, latency_runs):
    """Split the data into calibration and budget samples, then search; the budget samples become the
    evaluation data of the report."""
    chosen_split = search.split(evaluation.num_samples,
                                calib_data is not None and not search.same_source(data, calib_data))
    if chosen_split.calibration is not None:
        ctx.calibration_data = chosen_split.calibration_set(evaluation)
    evaluation = chosen_split.budget_set(evaluation)
    judge = search.Judge(original, evaluation, provider=providers[0] if providers else "cpu",
                         optimization=optimization, latency_runs=latency_runs)
    found = search.search_strengths(original, pipeline, free, ctx, judge, max_drop=max_accuracy_drop,
                                    optimize_for=optimize_for, split=chosen_split)
    return evaluation, found


def _text_only(source, tokenizer):
    """The tokenizer for a source of sentences; one tokenizer serves both data sets, whichever are text."""
    return tokenizer if is_text(source) else None


def check_budgets(result: Validation, *, max_accuracy_drop: float | None = None,
                  max_latency_ratio: float | None = None) -> None:
    """Raise BudgetExceeded when the measured result breaks a limit the user set."""
    if max_accuracy_drop is not None:
        if result.random_data:
            raise InputError("max_accuracy_drop= needs real data (data=); random inputs measure no accuracy")
        drop = result.accuracy_drop
        if drop is None:
            raise InputError("max_accuracy_drop=: the model's outputs are not class scores, so no accuracy "
                             "or agreement could be measured")
        if drop > max_accuracy_drop:
            kind = "top-1 accuracy" if result.labelled else "agreement with the original"
            raise BudgetExceeded(f"{kind} dropped {drop:.2f} points, over the budget of {max_accuracy_drop} "
                                 "(max_accuracy_drop=)")
    if max_latency_ratio is not None:
        ratio = result.latency_ratio
        if ratio is None:
            raise InputError("max_latency_ratio=: latency was not measured")
        if ratio > max_latency_ratio:
            raise BudgetExceeded(f"latency ratio {ratio:.2f} is over the budget of {max_latency_ratio} "
                                 "(max_latency_ratio=)")


def check_pass_targets(report: Report) -> None:
    """Raise BudgetExceeded when a pass could not reach a target the user gave it (prune's latency=): the
    model was still produced, at the best the pass reached, and the report says how far it got."""
    for record in report.passes:
        if record.stats.get("unreached"):
            raise BudgetExceeded(f"{record.name}: {record.stats['unreached']}")
