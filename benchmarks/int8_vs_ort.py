"""Benchmark: static int8 quantization (QDQ), onnxcomp's `int8` pass against onnxruntime.quantization.

    .venv/bin/python benchmarks/int8_vs_ort.py [--models effnet,resnet20] [--assets DIR] [--runs 200]
                                               [--ours "fuse-bn,int8"] [--skip-memory] [--keep DIR]
                                               [--variants ...] [--threads 1] [--calib-batch 16]

Every variant turns the same fp32 model into a QDQ model from the same calibration images. The evaluation
images are never used for calibration:

  effnet    models/efficientnet_lite0_imagenet.onnx on data/imagenet/dev500 (500 images, labels.csv order, which
            is sorted by file name): calibration = every 5th image (rows 0, 5, ..., 495; 100 images),
            evaluation = the other 400. Preprocessing: resize=256,crop=224,scale=1,mean=127,std=128, NCHW.
  resnet20  models/resnet20_cifar10.onnx on data/cifar10/cifar10_test_2000.npz: calibration = images 0..99,
            evaluation = images 500..1999 (1500). Preprocessing: RGB/255, mean (0.485, 0.456, 0.406),
            std (0.229, 0.224, 0.225), NCHW.

Variants (ORT variants run `onnxruntime.quantization.shape_inference.quant_pre_process` first, as ORT
recommends, then `quantize_static(..., quant_format=QuantFormat.QDQ)`; only the options named differ from
ORT's defaults, which in ORT 1.32 are per-tensor, MinMax, QInt8 activations and QInt8 weights):

  ort-default      defaults
  ort-pc           per_channel=True
  ort-pc-rr        per_channel=True, reduce_range=True            (the best setting measured in DESIGN.md)
  ort-pct-pc-rr    per_channel=True, reduce_range=True, calibrate_method=Percentile
  ort-u8-pc-rr     per_channel=True, reduce_range=True, activation_type=QUInt8 (the setting ORT's docstring
                   recommends for x86 CPUs without VNNI)
  onnxcomp         onnxcomp.optimize(fp32, --ours, calib_data=<calibration arrays>, validate_result=False)

"ORT best" is the ORT variant with the highest top-1 in this run.

For each variant: top-1 on the evaluation images, top-1 agreement with the fp32 model, median latency at
batch 1 relative to fp32 (ORT_ENABLE_ALL, CPU provider, fp32 and int8 sessions timed in turns with
onnxcomp.bench.interleaved_latency), wall time of the quantization, and its peak resident memory.

Latency: the sessions use one intra-op thread by default (--threads 1). With ORT's default threading the
worker threads of one session spin after its run and take the cores from the other session: on this 2-core
machine the fp32 median then ranged from 11 to 36 ms between variants within one run, worse than with one
thread. --threads 0 gives ORT's default thread count with spinning turned off
(session.intra_op.allow_spinning=0): fair between the two sessions, but bimodal here (7 or 12 ms).

Memory: each quantization runs in a fresh Python process (this script with --_quantize-one), which loads the
calibration arrays from a temporary .npz and reports its own peak resident memory (VmHWM; see _memory_mb for
why not ru_maxrss) and its resident memory just before quantizing. The memory-scaling rows repeat ORT default
and onnxcomp with 50 and with 500 calibration images (effnet: the first 50 / all 500 of dev500; resnet20:
images 0..49 / 0..499) and give the peak ratio 500/50; they measure memory only. The int8 pass calibrates on
at most its `samples` option (check the "images used" column; `--ours "fuse-bn,int8:samples=500"` lifts it).

ORT calibrates in batches of --calib-batch (default 16, the int8 pass's default batch_size). Its peak memory
grows with the batch, not with the number of images (MinMax keeps only per-tensor min/max): EfficientNet-Lite0,
100 images, batch 1 / 10 / 50: 0.55 / 1.47 / 5.66 GB. Percentile keeps every activation of every image, and
ORT's histogram calibrators need batches of one size (onnxruntime issue #18792: "inhomogeneous shape"), so
that variant uses the largest batch up to --calib-batch that divides the number of images.

Op counts: each quantized model is loaded by ORT with ORT_ENABLE_ALL and the graph ORT will run is written
with SessionOptions.optimized_model_filepath; the counts (QLinearConv, QLinearMatMul, QGemm, QLinearAdd, other
com.microsoft Q* ops, float Conv / FusedConv left, QuantizeLinear / DequantizeLinear left) show whether the model
really runs int8 kernels.

Results go to stdout (plain tables) and to benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.bench import (assets_folder, cifar_data, effnet_data, environment, fail, log, model_keys,
                            write_results)
from onnxcomp.errors import first_line

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "int8.json"
DEFAULT_OURS = "fuse-bn,int8"
NOT_AVAILABLE = "onnxcomp int8 pass not available"

# name -> (label, quantize_static options beyond the defaults); onnxcomp is handled apart
ORT_VARIANTS = {
    "ort-default": ("ORT default (per-tensor)", {}),
    "ort-pc": ("ORT per-channel", {"per_channel": True}),
    "ort-pc-rr": ("ORT per-channel + reduce_range", {"per_channel": True, "reduce_range": True}),
    "ort-pct-pc-rr": ("ORT Percentile + per-channel + rr",
                      {"per_channel": True, "reduce_range": True, "calibrate_method": "Percentile"}),
    "ort-u8-pc-rr": ("ORT u8 act + per-channel + rr",
                     {"per_channel": True, "reduce_range": True, "activation_type": "QUInt8"}),
}
OURS = "onnxcomp"


MODELS = {  # CLI name -> (report name, path relative to the assets, data loader)
    "effnet": ("efficientnet_lite0", "models/efficientnet_lite0_imagenet.onnx", effnet_data),
    "resnet20": ("resnet20_cifar10", "models/resnet20_cifar10.onnx", cifar_data),
}


# ---------------------------------------------------------------------------------------------------------
# One quantization, in a fresh process (--_quantize-one)


def quantize_one(variant: str, model_path: str, calib_path: str, out_path: str, result_path: str, ours: str,
                 calib_batch: int) -> int:
    """Quantize in this process and write a JSON record; the parent only reads the record."""
    if calib_path.endswith(".stream.json"):
        # memory rows of onnxcomp: the pass reads its samples from the files batch by batch, as the CLI does
        spec = json.loads(Path(calib_path).read_text(encoding="utf-8"))
        from onnxcomp import data as datasets

        arrays = datasets.open_data(spec["source"], onnx.load(model_path), preprocess=spec["preprocess"],
                                    limit=spec["limit"])
        samples = arrays.num_samples
        ours = f"{ours},samples={samples}"  # calibrate on all of them, not the pass's default cap
    else:
        with np.load(calib_path) as archive:
            arrays = {key: archive[key] for key in archive.files}
        samples = len(next(iter(arrays.values())))
    record: dict = {"variant": variant, "calibration_samples": samples, "calib_batch": calib_batch}
    if variant == OURS:
        import onnxcomp
        from onnxcomp.errors import InputError
    else:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    # imports and calibration arrays, before any quantization work
    record["peak_before_mb"], record["rss_before_mb"] = _memory_mb()
    started = time.perf_counter()
    status = 0
    try:
        if variant == OURS:
            try:
                model, report = onnxcomp.optimize(model_path, ours, calib_data=arrays, validate_result=False)
            except InputError as exc:
                if "unknown pass 'int8'" in str(exc):
                    record.update(status="unavailable", error=NOT_AVAILABLE, detail=str(exc))
                    raise _Done() from None
                raise
            onnxcomp.save(model, out_path, source=model_path)
            record["passes"] = report.to_dict()["passes"]
            record.pop("calib_batch")  # the pass batches by its own options
            for step in record["passes"]:  # what the pass really used: it may cap the samples it calibrates on
                if step.get("name") == "int8" and "samples" in step.get("stats", {}):
                    record["calibration_samples"] = step["stats"]["samples"]
        else:
            options = dict(ORT_VARIANTS[variant][1])
            if "calibrate_method" in options:
                options["calibrate_method"] = getattr(CalibrationMethod, options["calibrate_method"])
            if "activation_type" in options:
                options["activation_type"] = getattr(QuantType, options["activation_type"])
            if options.get("calibrate_method", CalibrationMethod.MinMax) != CalibrationMethod.MinMax:
                # ORT's histogram calibrators stack the outputs of all batches into one array and fail with
                # "inhomogeneous shape" when the last batch is smaller (onnxruntime issue #18792), so take
                # the largest batch size up to --calib-batch that divides the number of samples
                calib_batch = max(b for b in range(1, min(calib_batch, samples) + 1) if samples % b == 0)
                record["calib_batch"] = calib_batch

            class Reader(CalibrationDataReader):
                """Batches of the calibration arrays, in order."""

                def __init__(self):
                    self.start = 0

                def get_next(self):
                    if self.start >= samples:
                        return None
                    stop = min(self.start + calib_batch, samples)
                    feed = {key: value[self.start:stop] for key, value in arrays.items()}
                    self.start = stop
                    return feed

                def rewind(self):
                    self.start = 0

            preprocessed = str(Path(out_path).with_suffix(".pre.onnx"))
            quant_pre_process(model_path, preprocessed)
            record["preprocess_s"] = time.perf_counter() - started
            quantize_static(preprocessed, out_path, Reader(), quant_format=QuantFormat.QDQ, **options)
            Path(preprocessed).unlink(missing_ok=True)
        record["status"] = "ok"
    except _Done:
        status = 3
    except Exception as exc:  # a failure is a result to report, not a crash of the benchmark
        record.update(status="error", error=f"{type(exc).__name__}: {first_line(exc)}")
        status = 1
    record["wall_s"] = time.perf_counter() - started
    record["peak_rss_mb"], _ = _memory_mb()
    Path(result_path).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return status


class _Done(Exception):
    pass


def _memory_mb() -> tuple[float, float]:
    """(peak, current) resident memory of this process in MiB.

    The peak is VmHWM from /proc/self/status, the high-water mark of this process's own address space. Not
    ru_maxrss: Linux carries the parent's high-water mark into a child across fork/vfork + exec, so a child
    started by a parent holding 350 MB reports at least 350 MB whatever it does.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))
        return peak, float("nan")


def run_child(variant: str, model_path: Path, calib_path: Path, out_path: Path, ours: str, calib_batch: int,
              timeout: int) -> dict:
    result_path = out_path.with_suffix(".json")
    result_path.unlink(missing_ok=True)  # never read a record left by an earlier run (--keep)
    command = [sys.executable, str(Path(__file__).resolve()), "--_quantize-one", variant, "--_model", str(model_path),
               "--_calib", str(calib_path), "--_out", str(out_path), "--_result", str(result_path), "--ours", ours,
               "--calib-batch", str(calib_batch)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "error", "error": f"quantization took over {timeout} s (--timeout)"}
    if not result_path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"variant": variant, "status": "error", "error": f"child exited {done.returncode}: {tail[0]}"}
    record = json.loads(result_path.read_text(encoding="utf-8"))
    record["process_s"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------------------------------------------------
# Measurements in the parent


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
    else:  # ORT's thread count; no spinning, or each session's idle workers take the cores from the other
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, data: dict) -> np.ndarray:
    images = data["images"][data["evaluation"]]
    step = data["eval_batch"]
    return np.concatenate([sess.run(None, {data["input"]: images[i:i + step]})[0].argmax(-1)
                           for i in range(0, len(images), step)])


INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def op_counts(path: Path) -> dict:
    """Op histogram of the graph ORT runs, and a summary of int8 kernels against float convolutions."""
    model = onnx.load(str(path), load_external_data=False)
    full: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        full[key] = full.get(key, 0) + 1
    summary = {name: 0 for name in ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "other_q", "QDQ",
                                     "float_conv", "float_matmul")}
    other = {}
    for node in model.graph.node:
        op = node.op_type
        if op in INT8_KERNELS:
            summary[op] += 1
        elif op in QDQ:
            summary["QDQ"] += 1
        elif node.domain == "com.microsoft" and (op.startswith("QLinear") or op.startswith("Q")
                                                 or op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")):
            summary["other_q"] += 1
            other[op] = other.get(op, 0) + 1
        elif op in ("ConvInteger", "MatMulInteger"):
            summary["other_q"] += 1
            other[op] = other.get(op, 0) + 1
        elif op in ("Conv", "FusedConv", "ConvTranspose"):  # "" and com.microsoft(.nchwc) domains
            summary["float_conv"] += 1
        elif op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
            summary["float_matmul"] += 1
    return {"summary": summary, "other_q_ops": dict(sorted(other.items())), "ops": dict(sorted(full.items()))}


def evaluate_variant(record: dict, quantized: Path, fp32_sess: ort.InferenceSession, fp32_pred: np.ndarray,
                     data: dict, runs: int, threads: int) -> None:
    optimized = quantized.with_suffix(".ort_opt.onnx")
    sess = session(quantized, threads, optimized)
    prediction = predict(sess, data)
    labels = data["labels"][data["evaluation"]]
    record["top1"] = 100 * float(np.mean(prediction == labels))
    record["agreement"] = 100 * float(np.mean(prediction == fp32_pred))
    record["ops_after_ort"] = op_counts(optimized)
    record["size_bytes"] = quantized.stat().st_size
    record["latency"] = measure_latency(fp32_sess, sess, data, runs)


def measure_latency(fp32_sess, sess, data: dict, runs: int) -> dict:
    from onnxcomp.bench import interleaved_latency

    first = data["evaluation"][0]
    feed = {data["input"]: data["images"][first:first + 1]}
    ref, new = interleaved_latency([fp32_sess, sess], feed, runs=runs, warmup=20)
    return {"fp32_median_ms": ref.median_ms, "int8_median_ms": new.median_ms, "fp32_p90_ms": ref.p90_ms,
            "int8_p90_ms": new.p90_ms, "ratio": new.median_ms / ref.median_ms, "runs": runs}


def benchmark_model(key: str, assets: Path, args, workdir: Path) -> dict:
    name, relative, loader = MODELS[key]
    model_path = assets / relative
    model = onnx.load(str(model_path))
    started = time.perf_counter()
    data = loader(assets, model)
    log(f"{name}: {len(data['images'])} images preprocessed in {time.perf_counter() - started:.1f} s; "
        f"calibration {len(data['calibration'])}, evaluation {len(data['evaluation'])}")
    input_name = data["input"]
    calib_path = workdir / f"{key}_calib.npz"
    np.savez(calib_path, **{input_name: data["images"][data["calibration"]]})

    fp32_optimized = workdir / f"{key}_fp32.ort_opt.onnx"
    fp32_sess = session(model_path, args.threads, fp32_optimized)
    fp32_pred = predict(fp32_sess, data)
    labels = data["labels"][data["evaluation"]]
    entry: dict = {
        "model": name, "path": str(model_path), "split": data["split"],
        "calibration_samples": int(len(data["calibration"])), "evaluation_samples": int(len(data["evaluation"])),
        "fp32": {"top1": 100 * float(np.mean(fp32_pred == labels)), "size_bytes": model_path.stat().st_size,
                 "ops_after_ort": op_counts(fp32_optimized)},
        "variants": [], "memory_scaling": [],
    }
    log(f"{name}: fp32 top-1 {entry['fp32']['top1']:.2f} %")

    for variant in args.variants:
        out = workdir / f"{key}_{variant}.onnx"
        log(f"{name}: quantizing with {variant} ...")
        record = run_child(variant, model_path, calib_path, out, args.ours, args.calib_batch, args.timeout)
        record["label"] = ORT_VARIANTS[variant][0] if variant in ORT_VARIANTS else f"onnxcomp ({args.ours})"
        record["settings"] = ({"ours": args.ours} if variant == OURS else
                              {"quant_format": "QDQ", "preprocess": "quant_pre_process", **ORT_VARIANTS[variant][1]})
        if record.get("status") == "ok":
            try:
                evaluate_variant(record, out, fp32_sess, fp32_pred, data, args.runs, args.threads)
            except Exception as exc:
                record.update(status="error", error=f"onnxruntime: {type(exc).__name__}: {first_line(exc)}")
        if record.get("status") == "ok":
            log(f"  top-1 {record['top1']:.2f} %, agreement {record['agreement']:.2f} %, latency ratio "
                f"{record['latency']['ratio']:.2f}, {record['wall_s']:.1f} s, peak {record['peak_rss_mb']:.0f} MB")
        else:
            log(f"  {record.get('error')}")
        entry["variants"].append(record)

    ort_rows = [r for r in entry["variants"] if r["variant"] in ORT_VARIANTS and r.get("status") == "ok"]
    entry["ort_best"] = max(ort_rows, key=lambda r: r["top1"])["variant"] if ort_rows else None

    if not args.skip_memory:
        for variant in [v for v in ("ort-default", OURS) if v in args.variants]:
            row: dict = {"variant": variant}
            for count, indices in data["scaling"].items():
                if variant == OURS:
                    path = workdir / f"{key}_calib{count}.stream.json"
                    source, preprocess = data["stream"]
                    path.write_text(json.dumps({"source": source, "preprocess": preprocess, "limit": count}))
                else:
                    path = workdir / f"{key}_calib{count}.npz"
                    if not path.exists():
                        np.savez(path, **{input_name: data["images"][indices]})
                log(f"{name}: memory scaling, {variant} on {count} images ...")
                record = run_child(variant, model_path, path, workdir / f"{key}_{variant}_mem{count}.onnx", args.ours,
                                   args.calib_batch, args.timeout)
                row[str(count)] = {k: record.get(k) for k in ("status", "error", "peak_rss_mb", "rss_before_mb",
                                                              "peak_before_mb", "wall_s",
                                                              "calibration_samples")}
            small, large = row[str(min(data["scaling"]))], row[str(max(data["scaling"]))]
            if small.get("status") == "ok" and large.get("status") == "ok":
                row["peak_ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
                growth_small = small["peak_rss_mb"] - small["rss_before_mb"]
                growth_large = large["peak_rss_mb"] - large["rss_before_mb"]
                row["quantization_growth_ratio"] = growth_large / growth_small if growth_small > 0 else None
            entry["memory_scaling"].append(row)
    return entry


# ---------------------------------------------------------------------------------------------------------
# Report


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def print_tables(results: list[dict], calib_batch: int) -> None:
    header = ["model", "variant", "top-1", "vs fp32", "agree", "int8/fp32 p50", "int8 ms", "fp32 ms", "quant s",
              "peak MB", "note"]
    rows = []
    for entry in results:
        fp32 = entry["fp32"]
        rows.append([entry["model"], "fp32", f"{fp32['top1']:.2f}%", "", "", "1.00", "", "", "", "", ""])
        for r in entry["variants"]:
            label = r["variant"] + (" *best*" if r["variant"] == entry.get("ort_best") else "")
            if r.get("status") != "ok":
                rows.append([entry["model"], label] + ["-"] * 8 + [r.get("error", "?")])
                continue
            latency = r["latency"]
            rows.append([entry["model"], label, f"{r['top1']:.2f}%", f"{r['top1'] - fp32['top1']:+.2f}",
                         f"{r['agreement']:.2f}%", f"{latency['ratio']:.2f}", f"{latency['int8_median_ms']:.2f}",
                         f"{latency['fp32_median_ms']:.2f}", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                         "" if r.get("calib_batch", calib_batch) == calib_batch else
                         f"calibration batch {r['calib_batch']}"])
    _table(header, rows)
    print("*best*: the ORT variant with the highest top-1; int8/fp32 p50: median latency ratio at batch 1, the two "
          "sessions timed in turns")

    print("\nops in the graph ORT runs (ORT_ENABLE_ALL, CPU; optimized_model_filepath)")
    header = ["model", "variant", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "other Q*", "Q/DQ left",
              "float Conv", "float Gemm/MatMul"]
    rows = []
    for entry in results:
        fp32 = {"variant": "fp32", "status": "ok", "ops_after_ort": entry["fp32"]["ops_after_ort"]}
        for r in [fp32] + entry["variants"]:
            if r.get("status") != "ok":
                continue
            s, other = r["ops_after_ort"]["summary"], r["ops_after_ort"]["other_q_ops"]
            other_text = str(s["other_q"])
            if other:
                other_text += " (" + ", ".join(f"{k} {v}" for k, v in other.items()) + ")"
            rows.append([entry["model"], r["variant"], str(s["QLinearConv"]), str(s["QLinearMatMul"]), str(s["QGemm"]),
                         str(s["QLinearAdd"]), other_text, str(s["QDQ"]), str(s["float_conv"]), str(s["float_matmul"])])
    _table(header, rows)

    scaling = [(entry["model"], row) for entry in results for row in entry["memory_scaling"]]
    if scaling:
        print("\npeak RSS of the quantization process against the number of calibration images")
        header = ["model", "variant", "images used", "50: peak MB", "500: peak MB", "ratio 500/50", "growth ratio",
                  "50: s", "500: s"]
        rows = []
        for model, row in scaling:
            small, large = row["50"], row["500"]
            if small.get("status") != "ok" or large.get("status") != "ok":
                rows.append([model, row["variant"], "", small.get("error") or large.get("error") or "?"] + [""] * 5)
                continue
            growth = row.get("quantization_growth_ratio")
            used = f"{small.get('calibration_samples')} / {large.get('calibration_samples')}"
            rows.append([model, row["variant"], used, f"{small['peak_rss_mb']:.0f}", f"{large['peak_rss_mb']:.0f}",
                         f"{row['peak_ratio']:.2f}", "-" if growth is None else f"{growth:.2f}",
                         f"{small['wall_s']:.1f}", f"{large['wall_s']:.1f}"])
        _table(header, rows)
        print("growth ratio: (peak − RSS before quantizing) at 500 / the same at 50; RSS before quantizing holds "
              "the imports and the calibration arrays.\nimages used: what the quantizer calibrated on (the int8 pass "
              "reports its own count; it may cap it with its samples= option)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,resnet20", help="comma list of: effnet, resnet20 (default both)")
    parser.add_argument("--assets", help="shared assets folder (default: $ONNXCOMP_ASSETS, else ../shared/assets)")
    parser.add_argument("--runs", type=int, default=200,
                        help="timed batch-1 runs of each session in every fp32/int8 pair (default 200)")
    parser.add_argument("--ours", default=DEFAULT_OURS, help=f"onnxcomp passes for our row (default '{DEFAULT_OURS}')")
    parser.add_argument("--variants", default=",".join([*ORT_VARIANTS, OURS]),
                        help="comma list of variants to run (default all: %(default)s)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 50 vs 500 calibration-image memory rows")
    parser.add_argument("--calib-batch", type=int, default=16,
                        help="calibration batch size of ORT's data reader (default 16, as the int8 pass)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of the evaluation and latency sessions (default 1; 0: ORT's "
                             "default count, spinning off)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per quantization (default 900)")
    parser.add_argument("--keep", help="keep the quantized and ORT-optimized models in this folder")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    for hidden in ("--_quantize-one", "--_model", "--_calib", "--_out", "--_result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._quantize_one:
        return quantize_one(args._quantize_one, args._model, args._calib, args._out, args._result, args.ours,
                            args.calib_batch)

    keys = model_keys(args.models, MODELS)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ORT_VARIANTS and v != OURS]
    if unknown or not args.variants:
        fail(f"--variants: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join([*ORT_VARIANTS, OURS])}")
    if args.runs < 1 or args.calib_batch < 1 or args.threads < 0:
        fail("--runs and --calib-batch must be at least 1, --threads at least 0")
    assets = assets_folder(args.assets, [MODELS[key][1] for key in keys])

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="int8_vs_ort.") as temp:
        workdir = Path(args.keep) if args.keep else Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            results.append(benchmark_model(key, assets, args, workdir))
    elapsed = time.perf_counter() - started

    print()
    print_tables(results, args.calib_batch)
    print()
    for entry in results:
        if entry.get("ort_best"):
            best = next(r for r in entry["variants"] if r["variant"] == entry["ort_best"])
            ours = next((r for r in entry["variants"] if r["variant"] == OURS), None)
            line = f"{entry['model']}: ORT best = {best['variant']} ({best['top1']:.2f} %)"
            if ours is not None and ours.get("status") == "ok":
                line += (f"; onnxcomp {ours['top1']:.2f} % ({ours['top1'] - best['top1']:+.2f} points), latency "
                         f"{ours['latency']['ratio']:.2f} vs {best['latency']['ratio']:.2f}, quantization "
                         f"{ours['wall_s']:.1f} s vs {best['wall_s']:.1f} s")
            elif ours is not None:
                line += f"; onnxcomp: {ours.get('error')}"
            print(line)
    print(f"\nORT {ort.__version__} (quantize_static QDQ; evaluation ORT_ENABLE_ALL, CPU), onnx {onnx.__version__}, "
          f"{os.cpu_count()} CPUs; latency batch 1, {args.runs} interleaved runs, "
          f"{args.threads or 'default (no spinning)'} intra-op thread(s); whole run {elapsed:.1f} s")

    document = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **environment(),
        "settings": {"models": keys, "variants": args.variants, "ours": args.ours, "runs": args.runs,
                     "calib_batch": args.calib_batch, "threads": args.threads, "skip_memory": args.skip_memory,
                     "ort_optimization": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider"},
        "seconds": elapsed,
        "results": results,
    }
    write_results(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
