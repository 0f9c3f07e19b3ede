"""Benchmark: post-training pruning, naive magnitude pruning against onnxcomp's `prune` pass.

    .venv/bin/python benchmarks/prune_vs_naive.py [--models effnet,resnet20] [--assets DIR]
                                                  [--sparsities 0.3,0.5,0.7] [--runs 200] [--keep DIR]
                                                  [--calibration-offset K]

Data: the fixed calibration / evaluation split that every benchmark takes from onnxcomp.bench (effnet_data,
cifar_data). The evaluation images are never used for calibration:

  effnet    models/efficientnet_lite0_imagenet.onnx on data/imagenet/dev500 (labels.csv order): calibration =
            every 5th image (rows 0, 5, ..., 495; 100 images), evaluation = the other 400; with
            --calibration-offset K, rows K, K+5, ... instead (disjoint sets of 100 for K = 0..4).
  resnet20  models/resnet20_cifar10.onnx on data/cifar10/cifar10_test_2000.npz: calibration = images 0..99,
            evaluation = images 500..1999 (1500).

Rows, for each sparsity S (default 0.3, 0.5, 0.7), all through onnxcomp.optimize(fp32 model, RECIPE,
validate_result=False):

  naive    "prune:sparsity=S,min-size=0,depthwise=true", on the original model, WITHOUT calibration data and
           without fuse-bn: every weight tensor of every Conv / Gemm / MatMul (depthwise and small ones included)
           loses its S smallest magnitudes, before BatchNormalization is folded, and nothing is corrected.
  channel  "fuse-bn,prune:sparsity=S,correction=channel" with calibration data: magnitude pruning, per-layer
           sparsities from the sensitivity allocation, then each output unit's mean and spread restored.
  ours     "fuse-bn,prune:sparsity=S" with calibration data: the pass's defaults (sensitivity allocation,
           reconstruction of the kept weights, sequential).

calib_data is {input name: the calibration images} (100 images; the pass uses at most its samples=128).

For every row: top-1 on the evaluation images, its difference in points from fp32, top-1 agreement with the
fp32 model (same argmax), the sparsity the pass reached over the tensors it pruned (stats["sparsity"]), the
number of tensors pruned and the share of zeros over all Conv / Gemm / MatMul weights of the model, the size of
the serialized model (bytes of ModelProto.SerializeToString(), i.e. the .onnx file) and its ratio to the fp32
one, and the wall time of the prune pass (PassRecord.seconds; the whole optimize() call is in the JSON).
Top-1 is measured with ONNX Runtime, CPUExecutionProvider, default SessionOptions (ORT_ENABLE_ALL, default
threads).

Storage check, on `ours` at 0.5 (--check-sparsity): the same pipeline is built again with `encoding=dense` added
to the prune options (same calibration data, so the same weights), and
  (a) max |difference| between the ORT outputs (all outputs, every evaluation image) of the encoded and the
      dense-layout model: the sparse layout is decoded by standard ops that ORT folds at session creation,
      so this must be exactly 0.0;
  (b) bytes on disk per pruned weight = stats["stored_bytes"] / weights in the pruned tensors, next to the
      bound (1 − s) × 4 + 0.13 bytes (s = reached sparsity; 4 bytes per kept float32 value plus 1 bit of
      mask per weight), and the whole-file size of the encoded and of the dense-layout model;
  (c) median latency at batch 1 of the encoded and the dense-layout model, timed in turns with
      onnxcomp.bench.interleaved_latency (--runs 200, 20 warm-up runs), one intra-op thread, ORT_ENABLE_ALL,
      on the first evaluation image; quoted as encoded / dense.

Results go to stdout (markdown tables) and to benchmarks/results/prune.json; progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.bench import (assets_folder, cifar_data, effnet_data, environment, evaluation_outputs, fail, log,
                            markdown_table, model_keys, session, write_results)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "prune.json"
MODELS = {  # CLI name -> (report name, path relative to the assets, data loader)
    "effnet": ("efficientnet_lite0", "models/efficientnet_lite0_imagenet.onnx", effnet_data),
    "resnet20": ("resnet20_cifar10", "models/resnet20_cifar10.onnx", cifar_data),
}
METHODS = {  # name -> (recipe template, uses calibration data)
    "naive": ("prune:sparsity={s},min-size=0,depthwise=true", False),
    "channel": ("fuse-bn,prune:sparsity={s},correction=channel", True),
    "ours": ("fuse-bn,prune:sparsity={s}", True),
}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MASK_BYTES_PER_WEIGHT = 0.13  # 1 bit = 0.125 bytes, rounded up as quoted in the bound


# ---------------------------------------------------------------------------------------------------------
# Measurements


def layer_weights(model: onnx.ModelProto) -> int:
    """Number of constant weights (input 1) of the Conv / ConvTranspose / Gemm / MatMul nodes of the model."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    seen, total = set(), 0
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in sizes \
                and node.input[1] not in seen:
            seen.add(node.input[1])
            total += sizes[node.input[1]]
    return total


def run_pipeline(model: onnx.ModelProto, recipe: str, calib: dict | None) -> tuple[onnx.ModelProto, dict]:
    import onnxcomp

    started = time.perf_counter()
    optimized, report = onnxcomp.optimize(model, recipe, calib_data=calib, validate_result=False)
    wall = time.perf_counter() - started
    prune = next(r for r in report.passes if r.name == "prune")
    pruned_weights = sum(int(row.get("weights", 0)) for row in prune.layers)
    record = {"recipe": recipe, "calibration": calib is not None, "optimize_s": wall, "prune_s": prune.seconds,
              "passes": [{"name": r.name, "seconds": r.seconds, "modified": r.modified, "automatic": r.automatic}
                         for r in report.passes],
              "stats": dict(prune.stats), "pruned_weights": pruned_weights, "layers": list(prune.layers)}
    return optimized, record


def evaluate(record: dict, optimized: onnx.ModelProto, data: dict, fp32: dict) -> list[np.ndarray]:
    model_bytes = optimized.SerializeToString()
    result = evaluation_outputs(session(model_bytes), data)
    prediction = result[0].argmax(-1)
    labels = data["labels"][data["evaluation"]]
    stats = record["stats"]
    record["top1"] = 100 * float(np.mean(prediction == labels))
    record["delta_points"] = record["top1"] - fp32["top1"]
    record["agreement"] = 100 * float(np.mean(prediction == fp32["prediction"]))
    record["size_bytes"] = len(model_bytes)
    record["size_ratio"] = len(model_bytes) / fp32["size_bytes"]
    if "sparsity" in stats:
        record["zeros_over_all_layer_weights"] = stats["sparsity"] * record["pruned_weights"] / fp32["layer_weights"]
    return result


def benchmark_model(key: str, assets: Path, args) -> dict:
    name, relative, loader = MODELS[key]
    model_path = assets / relative
    model = onnx.load(str(model_path))
    started = time.perf_counter()
    data = loader(assets, model)
    if args.calibration_offset:  # another of the disjoint calibration sets: every 5th image from this offset
        everything = np.arange(len(data["images"]))
        data["calibration"] = everything[args.calibration_offset::5][:len(data["calibration"])]
        data["evaluation"] = np.setdiff1d(everything, data["calibration"])
        data["split"] += f"; --calibration-offset {args.calibration_offset}: calibration rows " \
                         f"{args.calibration_offset}, {args.calibration_offset + 5}, ..., evaluation the others"
    log(f"{name}: {len(data['images'])} images preprocessed in {time.perf_counter() - started:.1f} s; "
        f"calibration {len(data['calibration'])}, evaluation {len(data['evaluation'])}")
    calib = {data["input"]: data["images"][data["calibration"]]}

    fp32_bytes = model.SerializeToString()
    fp32_out = evaluation_outputs(session(fp32_bytes), data)
    fp32_pred = fp32_out[0].argmax(-1)
    labels = data["labels"][data["evaluation"]]
    fp32 = {"top1": 100 * float(np.mean(fp32_pred == labels)), "size_bytes": len(fp32_bytes),
            "file_bytes": model_path.stat().st_size, "layer_weights": layer_weights(model), "prediction": fp32_pred}
    log(f"{name}: fp32 top-1 {fp32['top1']:.2f} %, {fp32['size_bytes']} bytes, "
        f"{fp32['layer_weights']} Conv/Gemm/MatMul weights")
    entry: dict = {"model": name, "path": str(model_path), "split": data["split"],
                   "calibration_samples": int(len(data["calibration"])),
                   "evaluation_samples": int(len(data["evaluation"])),
                   "fp32": {k: v for k, v in fp32.items() if k != "prediction"}, "rows": [], "storage_check": None}

    for sparsity in args.sparsities:
        for method in args.methods:
            template, with_data = METHODS[method]
            recipe = template.format(s=sparsity)
            log(f"{name}: {method} at {sparsity}: {recipe} ...")
            record: dict = {"method": method, "target": sparsity, "recipe": recipe}
            try:
                optimized, info = run_pipeline(model, recipe, calib if with_data else None)
                record.update(info)
                result = evaluate(record, optimized, data, fp32)
                record["status"] = "ok"
            except Exception as exc:  # a crash of the pass is a result to report
                record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                log(f"  FAILED: {record['error']}\n{record['traceback']}")
                entry["rows"].append(record)
                continue
            log(f"  top-1 {record['top1']:.2f} % ({record['delta_points']:+.2f}), agreement "
                f"{record['agreement']:.2f} %, sparsity {record['stats'].get('sparsity')} over "
                f"{record['stats'].get('pruned')} tensors, {record['size_bytes']} bytes, prune {record['prune_s']:.1f} s"
                + (f", damping {record['stats']['damping']}" if "damping" in record["stats"] else ""))
            if args.keep:
                onnx.save(optimized, str(Path(args.keep) / f"{key}_{method}_{sparsity}.onnx"))
            if method == "ours" and abs(sparsity - args.check_sparsity) < 1e-9:
                entry["storage_check"] = storage_check(model, calib, sparsity, optimized, result, record, data, args)
            entry["rows"].append(record)
    return entry


def storage_check(model, calib, sparsity, encoded: onnx.ModelProto, encoded_out: list[np.ndarray], record: dict,
                  data: dict, args) -> dict:
    from onnxcomp.bench import interleaved_latency

    recipe = METHODS["ours"][0].format(s=sparsity) + ",encoding=dense"
    log(f"  storage check: {recipe} ...")
    check: dict = {"recipe_encoded": record["recipe"], "recipe_dense": recipe}
    try:
        dense, info = run_pipeline(model, recipe, calib)
        dense_bytes = dense.SerializeToString()
        dense_out = evaluation_outputs(session(dense_bytes), data)
        check["max_abs_diff"] = float(max(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
                                          for a, b in zip(encoded_out, dense_out)))
        check["dense_layout_stats"] = info["stats"]
        check["dense_layout_prune_s"] = info["prune_s"]
        stats = record["stats"]
        n = record["pruned_weights"]
        s = float(stats["sparsity"])
        check.update({
            "reached_sparsity": s, "pruned_weights": n, "dense_bytes": stats["dense_bytes"],
            "stored_bytes": stats["stored_bytes"], "bytes_per_pruned_weight": stats["stored_bytes"] / n,
            "bound_bytes_per_weight": (1 - s) * 4 + MASK_BYTES_PER_WEIGHT,
            "dense_bytes_per_pruned_weight": stats["dense_bytes"] / n,
            "encoded_file_bytes": len(encoded.SerializeToString()), "dense_file_bytes": len(dense_bytes),
            "same_sparsity": info["stats"].get("sparsity") == s,
        })
        encoded_sess, dense_sess = session(encoded.SerializeToString(), True), session(dense_bytes, True)
        first = data["evaluation"][0]
        feed = {data["input"]: data["images"][first:first + 1]}
        enc_lat, dense_lat = interleaved_latency([encoded_sess, dense_sess], feed, runs=args.runs, warmup=20)
        check["latency"] = {"encoded_median_ms": enc_lat.median_ms, "dense_median_ms": dense_lat.median_ms,
                            "encoded_p90_ms": enc_lat.p90_ms, "dense_p90_ms": dense_lat.p90_ms,
                            "ratio": enc_lat.median_ms / dense_lat.median_ms, "runs": args.runs, "threads": 1}
        check["status"] = "ok"
        log(f"  max |diff| {check['max_abs_diff']}, {check['bytes_per_pruned_weight']:.4f} B/weight "
            f"(bound {check['bound_bytes_per_weight']:.4f}), files {check['encoded_file_bytes']} vs "
            f"{check['dense_file_bytes']}, latency ratio {check['latency']['ratio']:.3f}")
    except Exception as exc:
        check.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        log(f"  storage check FAILED: {check['error']}\n{check['traceback']}")
    return check


# ---------------------------------------------------------------------------------------------------------
# Report


def print_tables(results: list[dict]) -> None:
    header = ["model", "sparsity", "method", "top-1", "vs fp32", "agreement", "sparsity reached", "tensors",
              "zeros / all weights", "file bytes", "file / fp32", "prune s"]
    rows = []
    for entry in results:
        fp32 = entry["fp32"]
        rows.append([entry["model"], "", "fp32", f"{fp32['top1']:.2f} %", "", "", "", "", "",
                     str(fp32["size_bytes"]), "1", ""])
        for r in entry["rows"]:
            if r.get("status") != "ok":
                rows.append([entry["model"], f"{r['target']}", r["method"]] + ["error"] + [""] * 7
                            + [r.get("error", "?").splitlines()[0][:80]])
                continue
            stats = r["stats"]
            reached = stats.get("sparsity")
            share = r.get("zeros_over_all_layer_weights")
            rows.append([entry["model"], f"{r['target']}", r["method"], f"{r['top1']:.2f} %",
                         f"{r['delta_points']:+.2f}", f"{r['agreement']:.2f} %",
                         "-" if reached is None else f"{100 * reached:.2f} %", str(stats.get("pruned", "-")),
                         "-" if share is None else f"{100 * share:.1f} %", str(r["size_bytes"]),
                         f"{r['size_ratio']:.3f}", f"{r['prune_s']:.1f}"])
    markdown_table(header, rows)
    print("\nsparsity reached: zeros over the tensors the pass pruned (stats); tensors: how many it pruned; "
          "zeros / all weights: over every Conv/Gemm/MatMul weight of the model; prune s: the prune pass alone")

    checks = [(entry["model"], entry["storage_check"]) for entry in results if entry.get("storage_check")]
    if checks:
        print("\nstorage check: `ours` encoded (sparse layout) against the same pipeline with encoding=dense")
        header = ["model", "recipe", "max \\|Δ output\\|", "reached s", "pruned weights", "stored B / pruned weight",
                  "bound (1−s)×4+0.13", "encoded file bytes", "dense-layout file bytes", "encoded / dense file",
                  "latency encoded / dense", "encoded ms", "dense ms"]
        rows = []
        for model, c in checks:
            if c.get("status") != "ok":
                rows.append([model, c["recipe_encoded"], "error: " + c.get("error", "?").splitlines()[0][:80]]
                            + [""] * 10)
                continue
            lat = c["latency"]
            rows.append([model, f"`{c['recipe_encoded']}`", repr(c["max_abs_diff"]), f"{c['reached_sparsity']:.4f}",
                         str(c["pruned_weights"]), f"{c['bytes_per_pruned_weight']:.4f}",
                         f"{c['bound_bytes_per_weight']:.4f}", str(c["encoded_file_bytes"]),
                         str(c["dense_file_bytes"]), f"{c['encoded_file_bytes'] / c['dense_file_bytes']:.3f}",
                         f"{lat['ratio']:.3f}", f"{lat['encoded_median_ms']:.2f}", f"{lat['dense_median_ms']:.2f}"])
        markdown_table(header, rows)
        print("latency: median at batch 1, sessions timed in turns (interleaved_latency), 1 intra-op thread, "
              "ORT_ENABLE_ALL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,resnet20", help="comma list of: effnet, resnet20 (default both)")
    parser.add_argument("--assets", help="shared assets folder (default: $ONNXCOMP_ASSETS, else ../shared/assets)")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7", help="comma list of target sparsities (default %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of: naive, channel, ours (default all)")
    parser.add_argument("--check-sparsity", type=float, default=0.5,
                        help="sparsity of the `ours` row that gets the storage check (default 0.5)")
    parser.add_argument("--runs", type=int, default=200,
                        help="timed batch-1 runs of each session in the storage check (default 200)")
    parser.add_argument("--calibration-offset", type=int, default=0,
                        help="calibrate on every 5th image from this offset (0-4; 0 is the standard split), "
                             "evaluate on the rest: disjoint calibration sets for the same model")
    parser.add_argument("--keep", help="save the pruned models in this folder")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)

    keys = model_keys(args.models, MODELS)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        fail(f"--methods: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}")
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        fail(f"--sparsities: give numbers, not '{args.sparsities}'")
    if not args.sparsities or any(not 0.0 <= s < 1.0 for s in args.sparsities):
        fail("--sparsities: each must be in [0, 1)")
    if args.runs < 1:
        fail("--runs must be at least 1")
    if not 0 <= args.calibration_offset <= 4:
        fail("--calibration-offset must be 0 to 4")
    assets = assets_folder(args.assets, [MODELS[key][1] for key in keys])
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results = [benchmark_model(key, assets, args) for key in keys]
    elapsed = time.perf_counter() - started

    print()
    print_tables(results)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"\nORT {ort.__version__} (CPUExecutionProvider), onnx {onnx.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); {date}; evaluation: default "
          f"SessionOptions; latency: batch 1, {args.runs} interleaved runs, 1 intra-op thread, ORT_ENABLE_ALL; "
          f"whole run {elapsed:.1f} s")

    document = {
        "date": date,
        **environment(),
        "settings": {"models": keys, "sparsities": args.sparsities, "methods": {m: METHODS[m][0] for m in args.methods},
                     "check_sparsity": args.check_sparsity, "runs": args.runs, "provider": "CPUExecutionProvider",
                     "evaluation_session": "default SessionOptions",
                     "latency_session": "ORT_ENABLE_ALL, intra_op_num_threads=1"},
        "seconds": elapsed,
        "results": results,
    }
    write_results(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
