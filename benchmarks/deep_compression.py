"""Benchmark: weight sharing and the Deep Compression pipeline, post-training, against naive per-tensor k-means.

    .venv/bin/python benchmarks/deep_compression.py [--models effnet,resnet20] [--assets DIR] [--runs 200]
                                                    [--extra RECIPE] [--keep DIR]

Data: the fixed calibration / evaluation split of onnxcomp.bench (effnet_data, cifar_data): the
evaluation images are never used for calibration (EfficientNet-Lite0: 100 calibration images of dev500, 400
evaluation images; ResNet-20: CIFAR-10 test images 0..99 for calibration, 500..1999 for evaluation).

Rows per model, each through onnxcomp.optimize(fp32 model, RECIPE, validate_result=False), B = 5 bits for
EfficientNet-Lite0 and 4 for ResNet-20 (the targets of the share pass):

  naive             "share:bits=B,granularity=tensor,min-size=0,allocation=uniform,importance=none,
                    correction=none,feedback=false" without calibration data and without fuse-bn: one k-means
                    codebook per weight tensor, linear initialisation, nothing else.
  share             "fuse-bn,share:bits=B" with calibration data: the pass's defaults (bits allocated across
                    layers within the bytes of B bits per weight, error feedback, unit restoration).
  deep-compression  the `deep-compression` recipe (fuse-bn, prune, share; see onnxcomp/recipe.py) with data.
  --extra RECIPE    any other recipe, with data (repeatable).

Columns: top-1 on the evaluation images and its difference from fp32 in points, top-1 agreement with fp32,
the serialized model's size and the fp32 file's size over it ("× smaller"), the same with the share pass's
stored indices, masks and codebooks compressed by zlib (file bytes − stats.stored_bytes + stats.stored_bytes_zlib:
the entropy-coded figure Deep Compression reports, not a file format), and the median latency at batch 1 over
the fp32 model's (interleaved_latency, --runs runs each, 1 intra-op thread, ORT_ENABLE_ALL).

Storage check, on the `share` row: the same recipe with encoding=dense added (same data, so the same weights):
max |difference| of the ORT outputs on every evaluation image (must be 0.0: the decoding ops compute exactly
the shared weights), bytes stored per shared weight against the index bits per weight / 8, and the median
latency encoded / dense (ORT folds the decoding ops when it creates the session).

Clustering speed: share.cluster() on every weight tensor of EfficientNet-Lite0 that the pass shares (4.6 M
weights) at 5 bits, granularity auto, without importance; then on the same tensors with their rows repeated
4× and 16× (each copy scaled by 1 + 1e-3·copy, so the values differ): wall time, median of 3.

Results go to stdout (markdown tables) and to benchmarks/results/deep_compression.json; progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.bench import (assets_folder, cifar_data, effnet_data, environment, evaluation_outputs, fail,
                            interleaved_latency, log, markdown_table, model_keys, session, write_results)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "deep_compression.json"
MODELS = {  # CLI name -> (report name, path relative to the assets, data loader, bits)
    "effnet": ("efficientnet_lite0", "models/efficientnet_lite0_imagenet.onnx", effnet_data, 5),
    "resnet20": ("resnet20_cifar10", "models/resnet20_cifar10.onnx", cifar_data, 4),
}
NAIVE = ("share:bits={b},granularity=tensor,min-size=0,allocation=uniform,importance=none,correction=none,"
         "feedback=false")



def run_recipe(model: onnx.ModelProto, recipe: str, calib: dict | None) -> tuple[onnx.ModelProto, dict]:
    import onnxcomp

    started = time.perf_counter()
    optimized, report = onnxcomp.optimize(model, recipe, calib_data=calib, validate_result=False)
    share = next(r for r in report.passes if r.name == "share")
    return optimized, {"recipe": recipe, "calibration": calib is not None,
                       "optimize_s": time.perf_counter() - started, "share_s": share.seconds,
                       "passes": [{"name": r.name, "seconds": r.seconds, "stats": dict(r.stats)}
                                  for r in report.passes],
                       "stats": dict(share.stats), "layers": list(share.layers)}


def latency_ratio(fp32_bytes: bytes, model_bytes: bytes, data: dict, runs: int) -> dict:
    first = data["evaluation"][0]
    feed = {data["input"]: data["images"][first:first + 1]}
    ours, fp32 = interleaved_latency([session(model_bytes, True), session(fp32_bytes, True)], feed, runs=runs,
                                     warmup=20)
    return {"median_ms": ours.median_ms, "fp32_median_ms": fp32.median_ms, "ratio": ours.median_ms / fp32.median_ms}


def benchmark_model(key: str, assets: Path, args) -> dict:
    name, relative, loader, bits = MODELS[key]
    model = onnx.load(str(assets / relative))
    data = loader(assets, model)
    calib = {data["input"]: data["images"][data["calibration"]]}
    fp32_bytes = model.SerializeToString()
    fp32_out = evaluation_outputs(session(fp32_bytes), data)
    labels = data["labels"][data["evaluation"]]
    fp32_pred = fp32_out[0].argmax(-1)
    fp32 = {"top1": 100 * float(np.mean(fp32_pred == labels)), "size_bytes": len(fp32_bytes)}
    log(f"{name}: fp32 top-1 {fp32['top1']:.2f} %, {fp32['size_bytes']} bytes")
    entry: dict = {"model": name, "bits": bits, "split": data["split"], "fp32": fp32, "rows": []}
    rows = [("naive", NAIVE.format(b=bits), False), ("share", f"fuse-bn,share:bits={bits}", True),
            ("deep-compression", "deep-compression", True)] + [("extra", r, True) for r in args.extra]
    for method, recipe, with_data in rows:
        log(f"{name}: {method}: {recipe} ...")
        record: dict = {"method": method, "recipe": recipe}
        try:
            optimized, info = run_recipe(model, recipe, calib if with_data else None)
            record.update(info)
            model_bytes = optimized.SerializeToString()
            result = evaluation_outputs(session(model_bytes), data)
            prediction = result[0].argmax(-1)
            stats = record["stats"]
            coded = len(model_bytes) - stats["stored_bytes"] + stats["stored_bytes_zlib"]
            record.update(top1=100 * float(np.mean(prediction == labels)),
                          agreement=100 * float(np.mean(prediction == fp32_pred)), size_bytes=len(model_bytes),
                          entropy_coded_bytes=coded, smaller=fp32["size_bytes"] / len(model_bytes),
                          smaller_entropy_coded=fp32["size_bytes"] / coded,
                          latency=latency_ratio(fp32_bytes, model_bytes, data, args.runs), status="ok")
            record["delta_points"] = record["top1"] - fp32["top1"]
            log(f"  top-1 {record['top1']:.2f} % ({record['delta_points']:+.2f}), agreement {record['agreement']:.2f} %,"
                f" {record['smaller']:.2f}× smaller ({record['smaller_entropy_coded']:.2f}× entropy-coded), latency "
                f"{record['latency']['ratio']:.3f}× fp32, share {record['share_s']:.1f} s")
            if args.keep:
                onnx.save(optimized, str(Path(args.keep) / f"{key}_{method}.onnx"))
            if method == "share":
                entry["storage_check"] = storage_check(model, calib, recipe, optimized, result, record, data, args)
        except Exception as exc:  # a crash of the pipeline is a result to report
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            log(f"  FAILED: {record['error']}\n{record['traceback']}")
        entry["rows"].append(record)
    return entry


def storage_check(model, calib, recipe: str, encoded: onnx.ModelProto, encoded_out: list, record: dict, data: dict,
                  args) -> dict:
    dense_recipe = recipe + ",encoding=dense"
    log(f"  storage check: {dense_recipe} ...")
    dense, info = run_recipe(model, dense_recipe, calib)
    dense_bytes = dense.SerializeToString()
    dense_out = evaluation_outputs(session(dense_bytes), data)
    stats = record["stats"]
    weights = sum(int(row["weights"]) for row in record["layers"])
    index_bits = sum(int(row["weights"]) * int(row["bits"]) for row in record["layers"])
    first = data["evaluation"][0]
    feed = {data["input"]: data["images"][first:first + 1]}
    enc, den = interleaved_latency([session(encoded.SerializeToString(), True), session(dense_bytes, True)], feed,
                                   runs=args.runs, warmup=20)
    check = {"dense_recipe": dense_recipe,
             "max_abs_diff": float(max(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
                                       for a, b in zip(encoded_out, dense_out))),
             "shared_weights": weights, "stored_bytes": stats["stored_bytes"],
             "stored_bytes_per_weight": stats["stored_bytes"] / weights, "index_bytes_per_weight": index_bits / weights / 8,
             "encoded_file_bytes": len(encoded.SerializeToString()), "dense_file_bytes": len(dense_bytes),
             "latency": {"encoded_median_ms": enc.median_ms, "dense_median_ms": den.median_ms,
                         "ratio": enc.median_ms / den.median_ms, "runs": args.runs}}
    log(f"  max |diff| {check['max_abs_diff']}, {check['stored_bytes_per_weight']:.4f} B/weight (indices alone "
        f"{check['index_bytes_per_weight']:.4f}), latency encoded / dense {check['latency']['ratio']:.3f}")
    return check


def clustering_speed(assets: Path) -> list[dict]:
    from onnx import numpy_helper

    from onnxcomp.passes.share import cluster

    model = onnx.load(str(assets / MODELS["effnet"][1]))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2]
    weights = [w for w in weights if w.size >= 1024]  # what the pass shares (min-size 1024)
    result = []
    for factor in (1, 4, 16):
        tensors = [np.concatenate([w * np.float32(1 + 1e-3 * copy) for copy in range(factor)]) for w in weights]
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for tensor in tensors:
                cluster(tensor, 5)
            times.append(time.perf_counter() - started)
        count = sum(t.size for t in tensors)
        result.append({"factor": factor, "weights": count, "tensors": len(tensors), "median_s": statistics.median(times),
                       "times_s": times})
        log(f"clustering {count} weights ({factor}×): {statistics.median(times):.2f} s median of 3")
    return result


def print_tables(results: list[dict], speed: list[dict]) -> None:
    header = ["model", "method", "recipe", "top-1", "vs fp32", "agreement", "file bytes", "× smaller",
              "× smaller, entropy-coded", "latency / fp32", "mean index bits", "share s"]
    rows = []
    for entry in results:
        fp32 = entry["fp32"]
        rows.append([entry["model"], "fp32", "", f"{fp32['top1']:.2f} %", "", "", str(fp32["size_bytes"]), "1", "1",
                     "1", "32", ""])
        for r in entry["rows"]:
            if r.get("status") != "ok":
                rows.append([entry["model"], r["method"], f"`{r['recipe']}`", "error: " + r["error"][:80]]
                            + [""] * 8)
                continue
            rows.append([entry["model"], r["method"], f"`{r['recipe']}`", f"{r['top1']:.2f} %",
                         f"{r['delta_points']:+.2f}", f"{r['agreement']:.2f} %", str(r["size_bytes"]),
                         f"{r['smaller']:.2f}", f"{r['smaller_entropy_coded']:.2f}", f"{r['latency']['ratio']:.3f}",
                         str(r["stats"].get("mean_bits")), f"{r['share_s']:.1f}"])
    markdown_table(header, rows)
    checks = [(e["model"], e["storage_check"]) for e in results if e.get("storage_check")]
    if checks:
        print("\nstorage check: `share` encoded against the same recipe with encoding=dense")
        header = ["model", "max \\|Δ output\\|", "shared weights", "stored B / weight", "index bits / 8",
                  "encoded file", "dense-layout file", "latency encoded / dense"]
        markdown_table(header, [[m, repr(c["max_abs_diff"]), str(c["shared_weights"]),
                                 f"{c['stored_bytes_per_weight']:.4f}", f"{c['index_bytes_per_weight']:.4f}",
                                 str(c["encoded_file_bytes"]), str(c["dense_file_bytes"]),
                                 f"{c['latency']['ratio']:.3f}"] for m, c in checks])
    if speed:
        print("\nclustering speed: share.cluster() at 5 bits on EfficientNet-Lite0's shared tensors, repeated")
        markdown_table(["weights", "× EfficientNet-Lite0", "seconds (median of 3)", "seconds per million weights"],
               [[str(s["weights"]), str(s["factor"]), f"{s['median_s']:.2f}",
                 f"{s['median_s'] / s['weights'] * 1e6:.3f}"] for s in speed])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,resnet20", help="comma list of: effnet, resnet20 (default both)")
    parser.add_argument("--assets", help="shared assets folder (default: $ONNXCOMP_ASSETS, else ../shared/assets)")
    parser.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per session (default 200)")
    parser.add_argument("--extra", action="append", default=[], help="another recipe to run with data (repeatable)")
    parser.add_argument("--no-speed", action="store_true", help="skip the clustering speed measurement")
    parser.add_argument("--keep", help="save the optimized models in this folder")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    keys = model_keys(args.models, MODELS)
    if args.runs < 1:
        fail("--runs must be at least 1")
    assets = assets_folder(args.assets, [MODELS[key][1] for key in keys])
    started = time.perf_counter()
    speed = [] if args.no_speed else clustering_speed(assets)
    results = [benchmark_model(key, assets, args) for key in keys]
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment": environment(), "wall_s": time.perf_counter() - started,
                "clustering_speed": speed, "models": results}
    write_results(args.output, document)
    print_tables(results, speed)
    print(f"\nwhole run {document['wall_s']:.0f} s; JSON in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
