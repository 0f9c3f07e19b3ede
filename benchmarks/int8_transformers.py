"""Benchmark: int8 on a BERT-family sentence embedder, onnxcomp against onnxruntime.quantization.

    .venv/bin/python benchmarks/int8_transformers.py [--assets DIR] [--calib 200] [--probe-train 4000]
                                                     [--evaluate 872] [--runs 100]

Model: ONNXCOMP_ASSETS/zoo/paraphrase_minilm_l3.onnx (sentence-transformers paraphrase-MiniLM-L3-v2), its
sentence embedding output (the [N, 384] float output). Text: SST-2 training phrases (data/sst2/train.tsv)
through the zoo's BERT tokenizer, padded to the longest phrase of each set. Rows: calibration = phrases
0..calib-1, probe training = the next --probe-train, evaluation = the next --evaluate; none is used twice.

Variants, all from the same fp32 file:
  onnxcomp int8          onnxcomp.optimize(model, "int8"): activations=auto, which picks dynamic for this graph
  onnxcomp int8 static   onnxcomp.optimize(model, "int8:activations=uint8", calib_data=calibration phrases)
  ORT quantize_dynamic   quantize_dynamic(weight_type=QInt8), ORT's recommended path for transformers
  ORT quantize_static    quant_pre_process, then quantize_static(QDQ, per_channel=True) on the calibration phrases

Figures: mean and minimum cosine of each evaluation phrase's embedding to fp32; SST-2 top-1 of a logistic
regression trained on the fp32 embeddings of the probe-training phrases and applied unchanged to each
variant's embeddings of the evaluation phrases (what a downstream classifier trained on the float model sees);
file size; median latency at batch 1 on one phrase of 16 tokens relative to fp32 (sessions timed in turns,
onnxcomp.bench.interleaved_latency, one intra-op thread); quantization time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxcomp
from onnxcomp import data as datasets
from onnxcomp.bench import interleaved_latency, working_directory
from onnxcomp.runner import Runner


def sentence_sets(assets: Path, sizes: list[int], folder: Path) -> list[Path]:
    """Consecutive SST-2 rows cut into .tsv files of the given sizes."""
    rows = (assets / "data/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    paths, start = [], 0
    for index, size in enumerate(sizes):
        path = folder / f"set{index}.tsv"
        path.write_text("\n".join(rows[start:start + size]) + "\n", encoding="utf-8")
        paths.append(path)
        start += size
    return paths


def embeddings(model_path: Path, dataset, output: str) -> np.ndarray:
    return Runner(str(model_path)).stacked(dataset, output=output, batch_size=64).astype(np.float64)


def quantize_variants(model: Path, calib: Path, tokenizer: Path, folder: Path) -> dict[str, tuple[Path, float]]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    variants = {}
    for label, recipe, calib_data in (("onnxcomp int8", "int8", None),
                                      ("onnxcomp int8 static", "int8:activations=uint8", calib)):
        out = folder / f"{label.replace(' ', '_')}.onnx"
        started = time.perf_counter()
        onnxcomp.optimize(model, recipe, calib_data=calib_data, tokenizer=tokenizer if calib_data else None,
                          output=out, validate_result=False)
        variants[label] = (out, time.perf_counter() - started)
    out = folder / "ort_dynamic.onnx"
    started = time.perf_counter()
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    variants["ORT quantize_dynamic"] = (out, time.perf_counter() - started)
    feed = datasets.open_data(calib, onnx.load(model), tokenizer=tokenizer)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([feed.batch(i, i + 1) for i in range(feed.num_samples)])

        def get_next(self):
            return next(self.feeds, None)

    out, prepared = folder / "ort_static.onnx", folder / "prepared.onnx"
    started = time.perf_counter()
    with working_directory(folder):
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    variants["ORT quantize_static"] = (out, time.perf_counter() - started)
    return variants


def latency_ratio(reference: Path, candidate: Path, feed: dict, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (reference, candidate)]
    ref, cand = interleaved_latency(sessions, feed, runs=runs, warmup=10)
    return cand.median_ms / ref.median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=os.environ.get("ONNXCOMP_ASSETS", "../shared/assets"))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--probe-train", type=int, default=4000)
    parser.add_argument("--evaluate", type=int, default=872)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    assets = Path(args.assets)
    model, tokenizer = assets / "zoo/paraphrase_minilm_l3.onnx", assets / "zoo/bert_uncased_tokenizer.json"
    graph = onnx.load(model)
    output = next(o.name for o in graph.graph.output if datasets.value_type(o) == "float32"
                  and len(datasets.value_dims(o)) == 2)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        calib, train, evaluate = sentence_sets(assets, [args.calib, args.probe_train, args.evaluate], folder)
        train_set = datasets.open_data(train, graph, tokenizer=tokenizer)
        eval_set = datasets.open_data(evaluate, graph, tokenizer=tokenizer)
        probe = LogisticRegression(max_iter=2000).fit(embeddings(model, train_set, output), train_set.labels)
        reference = embeddings(model, eval_set, output)
        one = {k: v[:1, :16] for k, v in eval_set.batch(0, 1).items()}
        fp32_top1 = 100 * probe.score(reference, eval_set.labels)
        results["fp32"] = {"top1": fp32_top1, "mb": model.stat().st_size / 1e6}
        print(f"{'variant':22s} {'probe top-1':>11s} {'cos mean':>9s} {'cos min':>8s} {'MB':>6s} "
              f"{'latency':>8s} {'time s':>7s}")
        print(f"{'fp32':22s} {fp32_top1:10.2f}% {1:9.4f} {1:8.4f} {results['fp32']['mb']:6.1f} {1:8.2f} {0:7.1f}")
        for label, (path, seconds) in quantize_variants(model, calib, tokenizer, folder).items():
            got = embeddings(path, eval_set, output)
            cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            row = {"top1": 100 * probe.score(got, eval_set.labels), "cosine_mean": float(cosine.mean()),
                   "cosine_min": float(cosine.min()), "mb": path.stat().st_size / 1e6,
                   "latency_ratio": latency_ratio(model, path, one, args.runs), "seconds": seconds}
            results[label] = row
            print(f"{label:22s} {row['top1']:10.2f}% {row['cosine_mean']:9.4f} {row['cosine_min']:8.4f} "
                  f"{row['mb']:6.1f} {row['latency_ratio']:8.2f} {seconds:7.1f}", flush=True)
    out = Path(__file__).parent / "results" / "int8_transformers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
