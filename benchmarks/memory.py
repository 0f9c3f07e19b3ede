"""Benchmark: peak resident memory and time of each pass on a generated model of several GB, validation included.

    .venv/bin/python benchmarks/memory.py [--gb 2.4] [--width 4096] [--recipes fuse-bn,int8,...] [--folder DIR]
    .venv/bin/python benchmarks/memory.py --sessions MODEL...   (one ORT session of each file, its peak)

The model: x [N, width] → (MatMul → BatchNormalization → Relu) × layers, as many layers of width² float32
weights as make --gb, saved with its weights in external data (onnxcomp.bench.matmul_bn_chain). Each recipe runs
as `onnxcomp optimize` in a fresh process, with validation on random inputs (8 samples, 5 latency runs) and,
for int8, 8 random calibration samples; prune and share run without calibration data (magnitude pruning,
uniform bits: their data-driven steps solve a width × width system per layer, which is time, not memory, at this
size); their compact layouts are validated from a copy with the weights decoded (validate.py: ONNX Runtime's
own decoding at session creation would take 9 to 26 times the weights). The figure is the process's peak
resident memory (VmHWM) over the weights' bytes, next to the same run on a one-layer model (the interpreter, its
libraries and ORT's arenas), and the run's wall time.

Results: stdout (one table) and benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxcomp.bench import environment, log, markdown_table, matmul_bn_chain, peak_memory, write_results

RECIPES = {
    "fuse-bn": ("fuse-bn", []),
    "int8": ("fuse-bn,int8", ["--calib-data", "random"]),
    "prune": ("fuse-bn,prune:sparsity=0.5", []),
    "share": ("fuse-bn,share:bits=6", []),
    "fp16": ("fuse-bn,fp16", []),
    "int4": ("fuse-bn,int4", []),
}


def run(model: Path, recipe: str) -> tuple[int, float]:
    passes, extra = RECIPES[recipe]
    output = model.with_name(f"{model.stem}.{recipe}.onnx")
    try:
        return peak_memory("optimize", str(model), "-o", str(output), "--passes", passes, "--runs", "5",
                           "--limit", "8", *extra)
    finally:
        for path in output.parent.glob(output.name + "*"):
            path.unlink()


# The peak of one ORT session of a model file over the interpreter's, in a fresh process.
SESSION_SCRIPT = """
import sys, onnxruntime as ort
def peak():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
before = peak()
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(peak() - before)
"""


def session_peaks(paths: list[str]) -> None:
    """Print the ORT session peak of each model file (the compact layouts' folding, README: peak memory)."""
    rows = []
    for path in paths:
        result = subprocess.run([sys.executable, "-c", SESSION_SCRIPT, path], capture_output=True, text=True,
                                check=True)
        rows.append([path, f"{os.path.getsize(path) / 1e6:.1f} MB", f"{int(result.stdout) / 1e9:.2f} GB"])
    markdown_table(["model", "file", "ORT session peak over the interpreter"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--folder", help="where the generated models go (default: a temporary folder)")
    parser.add_argument("--sessions", nargs="+", metavar="MODEL",
                        help="instead: the ORT session peak of each model file, each in a fresh process")
    args = parser.parse_args()
    if args.sessions:
        session_peaks(args.sessions)
        return
    layers = max(1, round(args.gb * 1e9 / (4 * args.width ** 2)))
    rows, results = [], {"environment": environment(), "width": args.width, "layers": layers, "recipes": {}}
    with tempfile.TemporaryDirectory(dir=args.folder) as work:
        (Path(work) / "small").mkdir(), (Path(work) / "large").mkdir()
        small_model, large_model = Path(work) / "small" / "model.onnx", Path(work) / "large" / "model.onnx"
        matmul_bn_chain(small_model, 1, args.width)
        weights = matmul_bn_chain(large_model, layers, args.width)
        log(f"generated {layers} layers of {args.width}², {weights / 1e9:.2f} GB of weights")
        for recipe in args.recipes.split(","):
            base, _ = run(small_model, recipe)
            try:
                peak, seconds = run(large_model, recipe)
            except RuntimeError as exc:  # killed for memory, most often: a row, and the next recipe
                results["recipes"][recipe] = {"error": str(exc)[-300:], "weights_bytes": weights}
                rows.append([recipe, RECIPES[recipe][0], "failed", "", "", ""])
            else:
                results["recipes"][recipe] = {"peak_bytes": peak, "base_bytes": base, "seconds": seconds,
                                              "weights_bytes": weights}
                rows.append([recipe, RECIPES[recipe][0], f"{peak / 1e9:.2f}", f"{peak / weights:.2f}",
                             f"{(peak - base) / weights:.2f}", f"{seconds:.0f}"])
            log(" | ".join(rows[-1]))
            write_results(Path(__file__).parent / "results" / "memory.json", results)
    markdown_table(["recipe", "passes", "peak GB", "peak / weights", "(peak − one-layer run) / weights", "s"], rows)


if __name__ == "__main__":
    main()
