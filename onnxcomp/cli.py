"""Command line: a thin layer over onnxcomp.api. Errors become one line and an exit status, not a traceback.

Exit status: 0 success, 1 a budget (--max-accuracy-drop, --max-latency-ratio) was exceeded, 2 bad input or
usage, 3 an internal check failed (a bug: please report it).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from onnxcomp import api, html_report, inspection, model_io, progress, recipe, registry, search
from onnxcomp.distillation import AUGMENTS, LOSSES, SCHEDULES, DistillConfig, distill, heal
from onnxcomp.errors import BudgetExceeded, InputError, OnnxcompError, first_line
from onnxcomp.report import Report
from onnxcomp.validate import validate


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"onnxcomp: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxcomp", description="Optimize ONNX models for ONNX Runtime and measure the cost.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (they show only on a terminal)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    optimize = commands.add_parser("optimize", help="run passes over a model, save it, validate it")
    optimize.add_argument("model", help="input .onnx model (never modified)")
    which = optimize.add_mutually_exclusive_group()
    which.add_argument("--passes", help=f"comma-separated passes with options, e.g. "
                                        f"'fuse-bn,cleanup' (default: {api.DEFAULT_PASSES}); see `onnxcomp passes`")
    which.add_argument("--recipe", help=f"a named recipe ({', '.join(recipe.RECIPES)}) or a TOML recipe file "
                                        "with [[pass]] tables")
    optimize.add_argument("-o", "--output", help="output model (default: MODEL.opt.onnx beside the input)")
    optimize.add_argument("--calib-data", help="calibration data for the passes that need it "
                                               "(.npz, .npy, image folder, or 'random')")
    optimize.add_argument("--no-validate", action="store_true", help="skip validation against the original")
    optimize.add_argument("--optimize-for", choices=search.OBJECTIVES, default="size",
                          help="with --max-accuracy-drop, the free strengths of prune and share (not written in "
                               "the recipe) are searched for the smallest (default) or the fastest model within "
                               "the budget on --data")
    _add_validation_options(optimize)

    grid = commands.add_parser("search", help="optimize a grid of recipes in parallel, print the Pareto front "
                                              "(size, latency, accuracy) and write the best within the budget")
    grid.add_argument("model", help="input .onnx model (never modified)")
    grid.add_argument("--data", required=True, help="labelled evaluation data (or unlabelled: agreement); "
                                                    "without --calib-data, samples spread over it calibrate")
    grid.add_argument("--calib-data", help="calibration data for the passes that need it")
    grid.add_argument("--max-accuracy-drop", type=float, required=True, help="the budget, in points")
    grid.add_argument("--grid", help="TOML file of [[candidate]] tables, each with recipe = \"...\" "
                                     "(default: a built-in set; see README)")
    grid.add_argument("--preprocess", help="image preprocessing, as for optimize")
    grid.add_argument("--optimize-for", choices=search.OBJECTIVES, default="size",
                      help="the best within the budget: smallest (default) or fastest")
    grid.add_argument("--workers", type=int, help="local worker processes (default: min(CPUs, 2))")
    grid.add_argument("--ray", metavar="ADDRESS", help="run the candidates on the Ray cluster at HOST:PORT "
                                                       "(needs onnxcomp[ray]); paths must be readable there")
    grid.add_argument("--cache", help="cache folder (default: ~/.cache/onnxcomp/search)")
    grid.add_argument("--runs", type=int, default=50, help="timed runs for latency at batch 1 (default 50)")
    grid.add_argument("-o", "--output", help="write the chosen model here")
    grid.add_argument("--report", help="write the candidates to this file: .json, or .html (with the front drawn)")

    check = commands.add_parser("validate", help="compare a candidate model with a reference model")
    check.add_argument("reference", help="the original model")
    check.add_argument("candidate", help="the optimized model")
    _add_validation_options(check)

    show = commands.add_parser("inspect", help="opset, interface, operators, parameters and weights of a model")
    show.add_argument("model")
    show.add_argument("--top", type=int, default=20, help="how many of the largest weights to list")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    commands.add_parser("passes", help="list the available passes")

    teach = commands.add_parser("distill", help="train a student model to reproduce an ONNX teacher's outputs "
                                                "(knowledge distillation; needs onnxcomp[torch])")
    teach.add_argument("teacher", nargs="?", help="the teacher .onnx model (never modified)")
    teach.add_argument("--teacher", dest="teacher_option", metavar="TEACHER", help="the same, as an option")
    role = teach.add_mutually_exclusive_group(required=True)
    role.add_argument("--student", help="an .onnx model to train in place, or module:factory / "
                                        "file.py:factory returning a torch.nn.Module")
    role.add_argument("--heal", metavar="COMPRESSED", help="a model made by prune / share to fine-tune from the "
                                                           "teacher (its original), keeping masks and codebooks")
    teach.add_argument("--data", required=True, help="training data (.npz/.npy/image folder) for the teacher's "
                                                     "inputs; labels are used when present, never required")
    teach.add_argument("-o", "--output", required=True, help="the trained student .onnx")
    teach.add_argument("--preprocess", help="image preprocessing, as for optimize")
    defaults = DistillConfig()
    teach.add_argument("--epochs", type=int, default=defaults.epochs)
    teach.add_argument("--batch-size", type=int, default=defaults.batch_size)
    teach.add_argument("--lr", type=float, default=defaults.learning_rate, help="Adam learning rate")
    teach.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                       help="learning rate over the steps: cosine decay to 0 (default) or constant")
    teach.add_argument("--augment", choices=AUGMENTS, default=defaults.augment,
                       help="alter each batch at random, the teacher run on the same inputs: flip-shift flips "
                            "and shifts images (photographs; not digits or text), mixup blends pairs of samples "
                            "(any float inputs); for small transfer sets")
    teach.add_argument("--temperature", type=float, default=defaults.temperature)
    teach.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                       help="kl: Hinton's softened KL ×T²; mse: on the outputs")
    teach.add_argument("--alpha", type=float, default=defaults.alpha,
                       help="weight of the cross-entropy on labels, when the data has them")
    teach.add_argument("--holdout", type=float, default=defaults.holdout,
                       help="share of the samples held out to report agreement each epoch")
    teach.add_argument("--seed", type=int, default=defaults.seed)
    teach.add_argument("--device", default=defaults.device, help="torch device for the student: cpu or cuda")
    teach.add_argument("--provider", default=defaults.provider, help="execution provider for the teacher")
    teach.add_argument("--init-from-teacher", action="store_true",
                       help="copy teacher weights into student tensors of the same name and shape")

    out = commands.add_parser("export", help="export a torch module to ONNX (needs onnxcomp[torch])")
    out.add_argument("factory", help="module:factory or file.py:factory returning a torch.nn.Module")
    out.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,224,224 (the batch axis "
                                                          "stays free)")
    out.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    out.add_argument("--weights", help="a state dict (torch.save) to load into the module first")
    out.add_argument("--input-name", default="input")
    out.add_argument("--output-name", default="output")
    out.add_argument("--opset", type=int, default=17)
    out.add_argument("--keep-batchnorm", action="store_true",
                     help="keep BatchNormalization nodes (no folding by torch), e.g. for onnxcomp's fuse-bn")
    return parser


def _add_validation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="evaluation data: .npz/.npy (arrays named after the inputs, optional "
                                       "'labels') or an image folder; without it, random inputs")
    parser.add_argument("--preprocess", help="image preprocessing, e.g. "
                                             "'resize=256,crop=224,scale=1/255,mean=0.485|0.456|0.406,"
                                             "std=0.229|0.224|0.225,layout=NCHW'")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                        help="fix the free dimensions of an input, e.g. x:1,3,320,320 (repeatable; for random "
                             "inputs and data)")
    parser.add_argument("--tokenizer", help="a tokenizer.json (Hugging Face tokenizers) that turns sentence data "
                                            "(.txt, or .tsv with a label column) into token ids")
    parser.add_argument("--providers", default="cpu", help="execution providers to validate on: cpu, cuda")
    parser.add_argument("--limit", type=int, help="use at most this many samples")
    parser.add_argument("--runs", type=int, default=50, help="timed runs for latency at batch 1 (default 50)")
    parser.add_argument("--ort-opt", default="all", choices=["disable", "basic", "extended", "all"],
                        help="ONNX Runtime graph optimization level for validation (default all)")
    parser.add_argument("--report", help="write the report to this file: .json, or .html (one page with plots; "
                                         "needs onnxcomp[report])")
    parser.add_argument("--max-accuracy-drop", type=float,
                        help="exit 1 when top-1 (or agreement, without labels) drops more points than this")
    parser.add_argument("--max-latency-ratio", type=float,
                        help="exit 1 when new/original median latency exceeds this")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    progress.QUIET["value"] = args.quiet
    try:
        return _COMMANDS[args.command](args)
    except OnnxcompError as exc:
        print(f"onnxcomp: error: {as_flags(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must not look like "budget exceeded" (exit 1)
        if args.verbose:
            raise
        first = first_line(exc)
        print(f"onnxcomp: internal error: {type(exc).__name__}: {first} (rerun with -v for the traceback, "
              "and please report it)", file=sys.stderr)
        return 3


# The library's errors name its arguments as `name=`; on the command line the same words are these flags.
ARGUMENT_FLAGS = {"calib_data": "--calib-data", "data": "--data", "input_shapes": "--input-shape",
                  "input_shape": "--input-shape", "tokenizer": "--tokenizer",
                  "max_accuracy_drop": "--max-accuracy-drop", "max_latency_ratio": "--max-latency-ratio",
                  "optimize_for": "--optimize-for", "ray_address": "--ray", "workers": "--workers",
                  "cache": "--cache", "grid": "--grid"}


def as_flags(message: str) -> str:
    """A library message in the CLI's words: `calib_data=` becomes `--calib-data`, and so on."""
    return re.sub(r"\b(" + "|".join(ARGUMENT_FLAGS) + r")=", lambda match: ARGUMENT_FLAGS[match.group(1)], message)


def _optimize(args) -> int:
    output = args.output or str(_default_output(Path(args.model)))
    _check_validation_args(args, models=(args.model, output))
    _, report = api.optimize(args.model, args.passes, recipe_file=args.recipe, data=args.data,
                             calib_data=args.calib_data, preprocess=args.preprocess, output=output,
                             validate_result=not args.no_validate, providers=_providers(args), limit=args.limit,
                             latency_runs=args.runs, optimization=args.ort_opt,
                             max_accuracy_drop=args.max_accuracy_drop, max_latency_ratio=args.max_latency_ratio,
                             input_shapes=_input_shapes(args), tokenizer=args.tokenizer,
                             optimize_for=args.optimize_for, return_model=False)
    return _finish(report, args)


def _search(args) -> int:
    if args.runs < 0:
        raise InputError("--runs must be 0 (no latency) or more")
    if args.report:
        _check_report_path(args.report)
    result = search.search_recipes(args.model, args.data, calib_data=args.calib_data,
                                   max_accuracy_drop=args.max_accuracy_drop, grid=args.grid,
                                   preprocess=args.preprocess, workers=args.workers, ray_address=args.ray,
                                   cache=args.cache, output=args.output, optimize_for=args.optimize_for,
                                   latency_runs=args.runs)
    print(result.render())
    if args.report:
        _write_report(Report(model=args.model, output=args.output,
                             candidates=[candidate.report_row() for candidate in result.candidates]), args.report)
    if not result.chosen.within_budget:
        raise BudgetExceeded(f"no candidate is within the budget: the least drop was {result.chosen.drop:.2f} "
                             f"points, over {args.max_accuracy_drop} (--max-accuracy-drop)")
    return 0


def _validate(args) -> int:
    _check_validation_args(args, models=(args.reference, args.candidate))
    result = validate(args.reference, args.candidate, args.data, preprocess=args.preprocess,
                      providers=_providers(args), limit=args.limit, latency_runs=args.runs,
                      optimization=args.ort_opt, input_shapes=_input_shapes(args), tokenizer=args.tokenizer)
    return _finish(Report(model=args.reference, output=args.candidate, validation=result), args)


def _finish(report: Report, args) -> int:
    if report.validation_skipped:
        report.validation_skipped = as_flags(report.validation_skipped)
    print(report.render())
    if args.report:
        _write_report(report, args.report)
    if report.validation is not None:
        api.check_budgets(report.validation, max_accuracy_drop=args.max_accuracy_drop,
                          max_latency_ratio=args.max_latency_ratio)
    api.check_pass_targets(report)
    return 0


def _inspect(args) -> int:
    summary = inspection.summarize(model_io.load(args.model))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(f"{args.model}: {model_io.file_size(args.model):,} bytes on disk")
        print(summary.render(top=args.top))
    return 0


def _passes(args) -> int:
    passes = registry.available()
    width = max(len(name) for name in passes)
    for name, cls in passes.items():
        print(f"{name:{width}s}  {cls.summary}")
    print("\nrecipes (usable wherever a pass name is):")
    for name, passes_text in recipe.RECIPES.items():
        print(f"{name}  = {passes_text}")
    return 0


def _providers(args) -> list[str]:
    from onnxcomp.runtime import parse_providers

    return parse_providers(args.providers)


def _input_shapes(args) -> dict[str, tuple[int, ...]]:
    from onnxcomp.data import parse_input_shapes

    try:
        return parse_input_shapes(args.input_shape)
    except InputError as exc:
        raise InputError(f"--input-shape: {exc}") from None


def _check_validation_args(args, models: tuple[str, ...]) -> None:
    if args.report and any(Path(args.report).resolve() == Path(m).resolve() for m in models):
        raise InputError(f"--report {args.report} would overwrite a model of this run; choose another file")
    if args.report:
        _check_report_path(args.report)
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit must be at least 1")
    if args.runs < 0:
        raise InputError("--runs must be 0 (no latency) or more")
    if getattr(args, "no_validate", False) and (args.max_accuracy_drop is not None
                                                 or args.max_latency_ratio is not None):
        raise InputError("budgets need validation; drop --no-validate")
    if args.max_latency_ratio is not None and args.runs == 0:
        raise InputError("--max-latency-ratio needs latency runs; drop --runs 0")
    if args.max_accuracy_drop is not None and (args.data is None or args.data == "random"):
        raise InputError("--max-accuracy-drop needs real data (--data); random inputs measure no accuracy")


def _write_report(report: Report, path: str) -> None:
    """JSON, or the HTML page for .html (checked first by _check_report_path); never over the run's models."""
    text = html_report.render(report) if html_report.is_html(path) else report.to_json()
    model_io.save_text(text, path, protect=(report.model, report.output))


def _check_report_path(path: str) -> None:
    """Before any work: a report format we write, and for HTML the library that draws its plots. A device or a
    pipe (/dev/stdout) takes JSON."""
    if html_report.is_html(path):
        html_report.require_matplotlib()
    elif Path(path).suffix.lower() != ".json" and not (Path(path).exists() and not Path(path).is_file()):
        raise InputError(f"--report {path}: give a .json or an .html file name")


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".opt.onnx")


def _distill(args) -> int:
    config = DistillConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                           schedule=args.schedule, augment=args.augment,
                           temperature=args.temperature, loss=args.loss, alpha=args.alpha, holdout=args.holdout,
                           seed=args.seed, device=args.device, provider=args.provider,
                           init_from_teacher=args.init_from_teacher)
    if bool(args.teacher) == bool(args.teacher_option):
        raise InputError("give the teacher model once: as the first argument or with --teacher")
    teacher = args.teacher or args.teacher_option
    if args.heal:
        _, report = heal(args.heal, teacher, args.data, config=config, preprocess=args.preprocess,
                         output=args.output)
    else:
        _, report = distill(teacher, args.student, args.data, config=config, preprocess=args.preprocess,
                            output=args.output)
    print(report.render())
    print(f"{'healed model' if args.heal else 'student'} written to {args.output}")
    return 0


def _export(args) -> int:
    from onnxcomp.export import export

    try:
        shape = [int(d) for d in args.input_shape.split(",")]
    except ValueError:
        raise InputError(f"--input-shape {args.input_shape}: give integers separated by commas, e.g. 1,3,224,224") \
            from None
    model = export(args.factory, shape, args.output, weights=args.weights, input_name=args.input_name,
                   output_name=args.output_name, opset=args.opset, keep_batchnorm=args.keep_batchnorm)
    batchnorms = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    print(f"{args.factory} written to {args.output}: {len(model.graph.node)} nodes, {batchnorms} BatchNormalization")
    return 0


_COMMANDS = {"optimize": _optimize, "validate": _validate, "inspect": _inspect, "passes": _passes,
             "distill": _distill, "export": _export, "search": _search}

if __name__ == "__main__":
    sys.exit(main())
