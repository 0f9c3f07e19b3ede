"""What the benchmarks share: latency at batch 1 (warm-up, then many timed runs; quantiles, not means, because
machines are noisy), the shared assets' fixed calibration / evaluation splits with their preprocessing, and
the command-line, log and results-file helpers of a benchmark script."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


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


def node_times(session: ort.InferenceSession, feed: dict[str, np.ndarray], *, runs: int = 20) -> dict[str, float]:
    """The median time in microseconds of each node of a session made with a `profile_prefix`, over `runs` runs
    after one warm-up, by the node's name in ORT's optimized graph (a fused node takes the name ORT gives it:
    often its last output's, with a suffix such as `_nchwc`). Ends the profiling and removes its file."""
    for _ in range(runs + 1):
        session.run(None, feed)
    path = Path(session.end_profiling())
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    times: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            times.setdefault(name[:-len("_kernel_time")], []).append(float(event["dur"]))
    return {name: float(np.median(values[1:] if len(values) > 1 else values)) for name, values in times.items()}


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


# ---------------------------------------------------------------------------------------------------------
# Benchmark scripts: their options, log, results file

REPO = Path(__file__).resolve().parents[1]
# How the shared assets' images become model inputs (their README): one definition for every benchmark.
IMAGENET_PREPROCESS = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128,layout=NCHW"
CIFAR_PREPROCESS = "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def model_keys(text: str, models: dict) -> list[str]:
    """The --models comma list, each checked against `models`."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in models]
    if unknown or not keys:
        fail(f"--models: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(models)}")
    return keys


def assets_folder(given: str | None, relatives: list[str]) -> Path:
    """--assets, else $ONNXCOMP_ASSETS, else ../shared/assets beside the repository, with the model files
    `relatives` in it."""
    assets = Path(given or os.environ.get("ONNXCOMP_ASSETS") or REPO.parent / "shared" / "assets")
    if not assets.is_dir():
        fail(f"assets folder {assets} not found; pass --assets DIR or set ONNXCOMP_ASSETS")
    for relative in relatives:
        if not (assets / relative).is_file():
            fail(f"{assets / relative} not found; is {assets} the shared assets folder?")
    return assets


def write_results(path: str | Path, document: dict) -> None:
    """The results file of a benchmark run, as JSON (numpy scalars and paths as text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment() -> dict:
    """Library versions and machine, for the results file of a benchmark run."""
    return {"versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}}


# ---------------------------------------------------------------------------------------------------------
# Data: the fixed calibration / evaluation split of the shared assets


def effnet_split(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows 0, 5, …, evaluation: the others) of dev500. labels.csv lists the images by class id, so
    its first 100 rows are fish, birds and reptiles: a model calibrated on them alone is measured on classes it
    never saw (EfficientNet-Lite0 channel-pruned to 0.8 of its latency: output error 0.61 on the other images
    calibrated on rows 0..99, 0.21 calibrated on every fifth row)."""
    from onnxcomp import data as datasets

    calibration = datasets.spread_indices(samples, samples // 5)
    return calibration, np.setdiff1d(np.arange(samples), calibration)


def effnet_data(assets: Path, model: onnx.ModelProto) -> dict:
    from onnxcomp import data as datasets

    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET_PREPROCESS)
    name = dataset.inputs[0].name
    images = np.concatenate([feed[name] for _, feed in dataset.batches(50)])
    everything = np.arange(dataset.num_samples)
    calibration, evaluation = effnet_split(dataset.num_samples)
    return {"input": name, "images": images, "labels": dataset.labels, "calibration": calibration,
            "evaluation": evaluation, "scaling": {50: everything[:50], 500: everything},
            "stream": (str(assets / "data/imagenet/dev500"), IMAGENET_PREPROCESS),
            "split": "dev500 in labels.csv order: calibration rows 0,5,...,495 (100), evaluation the other 400",
            "eval_batch": 50}


def cifar_data(assets: Path, model: onnx.ModelProto) -> dict:
    from onnxcomp import data as datasets

    dataset = datasets.open_data(assets / "data/cifar10/cifar10_test_2000.npz", model, preprocess=CIFAR_PREPROCESS)
    name = dataset.inputs[0].name
    images = dataset.batch(0, dataset.num_samples)[name]
    return {"input": name, "images": images, "labels": dataset.labels, "calibration": np.arange(100),
            "evaluation": np.arange(500, 2000), "scaling": {50: np.arange(50), 500: np.arange(500)},
            "stream": (str(assets / "data/cifar10/cifar10_test_2000.npz"), CIFAR_PREPROCESS),
            "split": "cifar10_test_2000.npz: calibration images 0..99 (100), evaluation images 500..1999 (1500)",
            "eval_batch": 250}


def session(model_bytes: bytes, latency: bool = False) -> ort.InferenceSession:
    """Evaluation sessions: ORT's default options; latency sessions: one intra-op thread, ORT_ENABLE_ALL."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if latency:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def evaluation_outputs(sess: ort.InferenceSession, data: dict) -> list[np.ndarray]:
    """Every output of the model on the evaluation images, in order."""
    images = data["images"][data["evaluation"]]
    step = data["eval_batch"]
    batches = [sess.run(None, {data["input"]: images[i:i + step]}) for i in range(0, len(images), step)]
    return [np.concatenate([batch[k] for batch in batches]) for k in range(len(batches[0]))]


def markdown_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------------------------------------------------
# Memory: generated models of any size, and the peak resident memory of a command on them

# VmHWM, the process's own peak: getrusage's ru_maxrss keeps the parent's peak across fork and exec.
PEAK_SCRIPT = """
import runpy, sys, time
exec(sys.argv.pop(1))
sys.argv = ["onnxcomp"] + sys.argv[1:]
started = time.perf_counter()
try:
    runpy.run_module("onnxcomp.cli", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
seconds = time.perf_counter() - started
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")), seconds)
"""


def matmul_bn_chain(path: Path, layers: int, width: int = 2048) -> int:
    """x [N, width] → (MatMul → BatchNormalization → Relu) × layers, saved at `path` with its weights in external
    data (one file); returns the weights' bytes."""
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array(
            rng.standard_normal((width, width), dtype=np.float32) / np.float32(width ** 0.5), f"w{i}"))
        for name, values in (("s", np.ones(width)), ("b", np.zeros(width)), ("m", rng.normal(0, 0.1, width)),
                             ("v", np.ones(width))):
            weights.append(numpy_helper.from_array(values.astype(np.float32), f"{name}{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("BatchNormalization", [f"mm{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"bn{i}"]),
                  helper.make_node("Relu", [f"bn{i}"], [f"r{i}"])]
        current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return sum(t.ByteSize() for t in weights)


def peak_memory(*arguments: str, timeout: float = 3600, prelude: str = "") -> tuple[int, float]:
    """(peak resident bytes, seconds) of `onnxcomp ARGUMENTS...` in a fresh process, which must exit 0;
    `prelude` is Python run in that process first (a module setting for a test)."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, prelude, *arguments], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"onnxcomp {' '.join(arguments)} failed: {result.stderr.strip()[-500:]}")
    peak, seconds = result.stdout.strip().splitlines()[-1].split()
    return int(peak), float(seconds)
