"""Benchmark: onnxcomp's `fuse-bn` pass against onnxoptimizer's `fuse_bn_into_conv`.

    .venv/bin/python benchmarks/fuse_bn_vs_onnxoptimizer.py [--assets DIR] [--images 100] [--repeats 5]

For each model and each tool: node count before/after, BatchNormalization nodes left, wall time of the
transformation (median of --repeats timed runs after one untimed run), and the largest |logit difference|
against the original model under ONNX Runtime (CPU, GraphOptimizationLevel.ORT_DISABLE_ALL, so ORT's own
Conv+BN fusion and constant folding do not hide anything) on real inputs, absolute and relative to the
largest |logit| of the original.

Tools compared:
  onnxcomp             PassManager(recipe.parse("fuse-bn")).run(model): fuse-bn, then the automatic cleanup.
  onnxoptimizer        onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]).
  onnxoptimizer+elim   the same followed by eliminate_identity, eliminate_deadend, eliminate_unused_initializer.
  onnxoptimizer+fold   onnxoptimizer+elim, then the constant sub-graphs it leaves are evaluated once with
                       onnx.reference and stored as initializers (a helper in this script, not part of either
                       tool; onnxoptimizer has no constant-folding pass). Its time includes the folding.

onnxoptimizer >= 0.3 does not compute the fused weights itself: it inserts Cast/Add/Sqrt/Div/Unsqueeze/Mul/Sub
nodes that compute them at run time and leaves the folding to a later tool (ORT's optimizer, onnxsim). That
is why the +fold row exists: it shows the node count onnxoptimizer's fusion reaches once those are folded.

Results go to stdout (a plain table) and to benchmarks/results/fuse_bn.json.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxoptimizer
import onnxruntime as ort

from onnxcomp import data as datasets
from onnxcomp import recipe
from onnxcomp.manager import PassManager

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fuse_bn.json"
ELIMINATE = ["eliminate_identity", "eliminate_deadend", "eliminate_unused_initializer"]
IMAGENET_PREPROCESS = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128,layout=NCHW"
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
CIFAR_STD = np.array([0.229, 0.224, 0.225], np.float32)
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def cifar10_inputs(assets: Path, model: onnx.ModelProto, count: int) -> list[dict]:
    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        images = archive["images"][:count]
    x = (images.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    return [{"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)}]


def imagenet_inputs(assets: Path, model: onnx.ModelProto, count: int) -> list[dict]:
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET_PREPROCESS,
                                 limit=count)
    return [feed for _, feed in dataset.batches(25)]


def mnist_inputs(assets: Path, model: onnx.ModelProto, count: int) -> list[dict]:
    with gzip.open(assets / "data/mnist/t10k-images-idx3-ubyte.gz", "rb") as handle:
        raw = handle.read()
    magic, total, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        fail("data/mnist/t10k-images-idx3-ubyte.gz is not an idx3 image file")
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(total, rows, cols)[:count].astype(np.float32)
    name = datasets.model_inputs(model)[0].name  # Input3; the weights are graph inputs too, with initializers
    return [{name: image.reshape(1, 1, rows, cols)} for image in pixels]  # the batch dim is fixed at 1


def digits_inputs(assets: Path, model: onnx.ModelProto, count: int) -> list[dict]:
    with np.load(REPO / "models/digits_test.npz") as archive:
        return [{"input": archive["input"][:count].astype(np.float32)}]


MODELS = [  # name, path (relative to assets, or absolute), input loader
    ("resnet20_cifar10", "models/resnet20_cifar10.onnx", cifar10_inputs),
    ("efficientnet_lite0", "models/efficientnet_lite0_imagenet.onnx", imagenet_inputs),
    ("mnist-8", "models/mnist-8.onnx", mnist_inputs),
    ("digits_cnn", REPO / "models/digits_cnn.onnx", digits_inputs),
]


# ---------------------------------------------------------------------------------------------------------
# Tools


def run_onnxcomp(model: onnx.ModelProto) -> onnx.ModelProto:
    optimized, _ = PassManager(recipe.parse("fuse-bn")).run(model)
    return optimized


def run_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def run_onnxoptimizer_elim(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"] + ELIMINATE)


def run_onnxoptimizer_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    return fold_constants(run_onnxoptimizer_elim(model))


TOOLS = [
    ("onnxcomp", run_onnxcomp),
    ("onnxoptimizer", run_onnxoptimizer),
    ("onnxoptimizer+elim", run_onnxoptimizer_elim),
    ("onnxoptimizer+fold", run_onnxoptimizer_fold),
]


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all initializers (transitively) once, and store the results.

    Initializers that are also graph inputs (IR < 4 models such as mnist-8) can be overridden at run time, so
    they do not count as constant.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    overridable = {value.name for value in graph.input}
    known = {init.name for init in graph.initializer if init.name not in overridable}
    constant_nodes, other_nodes = [], []
    for node in graph.node:
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if (node.domain in ("", "ai.onnx") and node.op_type not in NONDETERMINISTIC and not has_subgraph
                and all(name == "" or name in known for name in node.input)):
            constant_nodes.append(node)
            known.update(node.output)
        else:
            other_nodes.append(node)
    if not constant_nodes:
        return model
    produced = {name for node in constant_nodes for name in node.output}
    read_later = {name for node in other_nodes for name in node.input} | {value.name for value in graph.output}
    wanted = [name for node in constant_nodes for name in node.output if name in read_later]
    read_by_constants = {name for node in constant_nodes for name in node.input}
    sub = onnx.helper.make_graph(
        constant_nodes, "fold", [], [onnx.helper.make_empty_tensor_value_info(name) for name in wanted],
        initializer=[init for init in graph.initializer if init.name in read_by_constants])
    values = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})

    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    del folded.graph.node[:]
    folded.graph.node.extend(other_nodes)
    still_read = {name for node in other_nodes for name in node.input} | {v.name for v in graph.output}
    kept = [init for init in graph.initializer if init.name in still_read or init.name in overridable]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(kept)
    folded.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in zip(wanted, values))
    keep_info = [vi for vi in folded.graph.value_info if vi.name not in produced]
    del folded.graph.value_info[:]
    folded.graph.value_info.extend(keep_info)
    return folded


# ---------------------------------------------------------------------------------------------------------
# Measurements


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def infer(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run(None, feed)[0] for feed in feeds])


def count_bn(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def measure(tool_name: str, tool, model: onnx.ModelProto, feeds: list[dict], reference: np.ndarray,
            repeats: int) -> dict:
    record: dict = {"tool": tool_name, "nodes_before": len(model.graph.node), "bn_before": count_bn(model)}
    try:
        started = time.perf_counter()
        optimized = tool(model)  # untimed in the median: first call, also the model that is checked
        first = time.perf_counter() - started
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            tool(model)
            times.append(time.perf_counter() - started)
    except Exception as exc:  # a tool failing on a model is a result, not a crash of the benchmark
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return record
    record.update(nodes_after=len(optimized.graph.node), bn_after=count_bn(optimized),
                  initializers_after=len(optimized.graph.initializer),
                  ops_after=dict(sorted(_op_counts(optimized).items())),
                  first_run_s=first, median_s=statistics.median(times), min_s=min(times), times_s=times)
    try:
        onnx.checker.check_model(optimized)
        record["checker"] = "ok"
    except Exception as exc:
        record["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    try:
        outputs = infer(optimized, feeds)
    except Exception as exc:
        record["error"] = f"onnxruntime: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return record
    diff = float(np.max(np.abs(outputs.astype(np.float64) - reference.astype(np.float64))))
    scale = float(np.max(np.abs(reference)))
    record.update(max_abs_diff=diff, max_abs_logit=scale, rel_diff=diff / scale if scale else None,
                  top1_agreement=float(np.mean(outputs.argmax(-1) == reference.argmax(-1))))
    return record


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------
# Report


def print_table(results: list[dict]) -> None:
    header = ["model", "tool", "nodes", "BN left", "time ms", "ours/this", "max|dlogit|", "rel", "top1 agree"]
    rows = []
    for entry in results:
        ours = next((r for r in entry["tools"] if r["tool"] == "onnxcomp" and "median_s" in r), None)
        for r in entry["tools"]:
            if "median_s" not in r:
                rows.append([entry["model"], r["tool"], f"{r['nodes_before']} -> ?", "?", "-", "-",
                             "FAILED", r.get("error", ""), ""])
                continue
            ratio = "" if r["tool"] == "onnxcomp" or ours is None else f"{ours['median_s'] / r['median_s']:.2f}"
            if "max_abs_diff" in r:
                diff, rel = f"{r['max_abs_diff']:.2e}", f"{r['rel_diff']:.2e}"
                agree = f"{100 * r['top1_agreement']:.0f}%"
            else:
                diff, rel, agree = "ERROR", r.get("error", ""), ""
            rows.append([entry["model"], r["tool"], f"{r['nodes_before']} -> {r['nodes_after']}",
                         str(r["bn_after"]), f"{1000 * r['median_s']:.1f}", ratio, diff, rel, agree])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", help="shared assets folder (default: $ONNXCOMP_ASSETS, else ../shared/assets)")
    parser.add_argument("--images", type=int, default=100, help="real inputs per model (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tool and model (default 5)")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        fail("--images and --repeats must be at least 1")

    assets = Path(args.assets or os.environ.get("ONNXCOMP_ASSETS") or REPO.parent / "shared" / "assets")
    if not assets.is_dir():
        fail(f"assets folder {assets} not found; pass --assets DIR or set ONNXCOMP_ASSETS")
    for _, path, _ in MODELS:
        if not (assets / path).is_file():  # an absolute path ignores `assets`
            fail(f"{assets / path} not found; is {assets} the shared assets folder?")

    started = time.perf_counter()
    results = []
    for name, path, loader in MODELS:
        model = onnx.load(str(assets / path))
        feeds = loader(assets, model, args.images)
        reference = infer(model, feeds)
        samples = int(sum(next(iter(f.values())).shape[0] for f in feeds))
        print(f"{name}: {len(model.graph.node)} nodes, {count_bn(model)} BatchNormalization, "
              f"{samples} inputs", file=sys.stderr, flush=True)
        entry = {"model": name, "path": str(assets / path), "samples": samples,
                 "max_abs_logit": float(np.max(np.abs(reference))), "tools": []}
        for tool_name, tool in TOOLS:
            entry["tools"].append(measure(tool_name, tool, model, feeds, reference, args.repeats))
        results.append(entry)
    elapsed = time.perf_counter() - started

    print()
    print_table(results)
    print()
    print("time ratio = onnxcomp median time / that tool's median time (< 1: onnxcomp is faster)")
    for entry in results:
        ours = next(r for r in entry["tools"] if r["tool"] == "onnxcomp")
        for r in entry["tools"][1:]:
            if "median_s" in r and "median_s" in ours:
                print(f"  {entry['model']:<20} onnxcomp / {r['tool']:<20} {ours['median_s'] / r['median_s']:6.2f}")
    print(f"\nORT {ort.__version__} (ORT_DISABLE_ALL, CPU), onnxoptimizer {onnxoptimizer.__version__}, "
          f"onnx {onnx.__version__}, {os.cpu_count()} CPUs; whole run {elapsed:.1f} s")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"onnxruntime": ort.__version__, "onnxoptimizer": onnxoptimizer.__version__,
                     "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "settings": {"images": args.images, "repeats": args.repeats, "ort_optimization": "ORT_DISABLE_ALL",
                     "onnxoptimizer_eliminate_passes": ELIMINATE},
        "seconds": elapsed,
        "results": results,
    }
    output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
