"""Benchmark: every pass on third-party models as their packages ship them, on realistic inputs made here.

    .venv/bin/python benchmarks/zoo.py [--models NAME,...] [--recipes default,int8,...] [--assets DIR]
                                       [--calib 32] [--eval 64] [--runs 30] [--no-ort]

For each model of ONNXCOMP_ASSETS/zoo (and ResNet-20 / EfficientNet-Lite0 of models/) and each recipe
(default = onnxcomp's default exact pipeline; int8; prune:sparsity=0.3; share:bits=6; and, asked for with
--recipes, channel = prune:structure=channel,flops=0.7, latency = the same at latency=0.8, lowrank =
lowrank:flops=0.7, each after fuse-bn), onnxcomp.optimize runs
with calibration on the first --calib samples and validation on the next --eval samples, never the same ones:
exit status (0, or 2 / 3 with the error), pass time, size ratio, and for every output its cosine to the
original and argmax agreement where it has one; the worst output is the row's figure. Next to int8 stands ORT's
quantize_static (QDQ, per-channel, on the same calibration samples, after quant_pre_process): its time and
the same figures. Latency is the median at batch 1 over --runs runs, the two models taking turns.

Inputs (made here, never random):
  ppocrv6_det_small / ppocrv6_rec_small  text lines rendered with Pillow (DejaVu Sans where installed, else
        Pillow's own font) from SST-2 phrases: 320×320 pages of 4 lines for the detector, 48×320 single
        lines for the recogniser; BGR/255, mean 0.5, std 0.5, as RapidOCR feeds them
  nudenet_320n        ImageNet dev500 photos, resized to 320×320, RGB/255
  silero_vad          speech from espeak-ng (SST-2 phrases, 16 kHz), cut into 512-sample windows, zero state
  magika_standard_v3_3  the bytes of real files on this machine (Python sources, images, texts, binaries): the
        first and last 1024 bytes, padded with 256, as magika's standard v3 config reads a file
  paraphrase_minilm_l3  SST-2 phrases through the BERT tokenizer of the zoo (padded to the longest, 64 max)
  resnet20 / efficientnet_lite0  CIFAR-10 test images / dev500, preprocessed as in the other benchmarks

Results: stdout (one table) and benchmarks/results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxcomp
from onnxcomp import data as datasets
from onnxcomp.bench import working_directory
from onnxcomp.errors import OnnxcompError, first_line

RECIPES = {"default": None, "int8": "int8", "prune": "prune:sparsity=0.3", "share": "share:bits=6",
           "channel": "fold-constants,fuse-bn,cleanup,prune:structure=channel,flops=0.7",
           "latency": "fold-constants,fuse-bn,cleanup,prune:structure=channel,latency=0.8",
           "lowrank": "fold-constants,fuse-bn,cleanup,lowrank:flops=0.7"}
MODELS = ["ppocrv6_det_small", "ppocrv6_rec_small", "nudenet_320n", "silero_vad", "magika_standard_v3_3",
          "paraphrase_minilm_l3", "resnet20", "efficientnet_lite0"]
IMAGENET_PREPROCESS = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128"
CIFAR_PREPROCESS = "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"


def phrases(assets: Path, count: int, offset: int = 0) -> list[str]:
    lines = (assets / "data/sst2/train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines[offset:offset + count]]


def font(size: int):
    from PIL import ImageFont

    path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size=size)


def ocr_normalise(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] RGB uint8 → [N, 3, H, W] BGR, (x/255 − 0.5) / 0.5."""
    return datasets.Preprocess.parse("scale=1/255,mean=0.5,std=0.5,channels=BGR").apply(images)


def text_pages(assets: Path, count: int) -> dict:
    from PIL import Image, ImageDraw

    pages = []
    texts = phrases(assets, count * 4)
    for index in range(count):
        page = Image.new("RGB", (320, 320), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        for line in range(4):
            draw.text((12, 20 + 75 * line), texts[index * 4 + line][:28], fill=(0, 0, 0), font=font(22))
        pages.append(np.asarray(page))
    return {"x": ocr_normalise(np.stack(pages))}


def text_lines(assets: Path, count: int) -> dict:
    from PIL import Image, ImageDraw

    lines = []
    for text in phrases(assets, count, offset=5000):
        line = Image.new("RGB", (320, 48), (255, 255, 255))
        ImageDraw.Draw(line).text((6, 10), text[:26], fill=(0, 0, 0), font=font(24))
        lines.append(np.asarray(line))
    return {"x": ocr_normalise(np.stack(lines))}


def photos(assets: Path, count: int, size: int) -> dict:
    from PIL import Image

    files = sorted((assets / "data/imagenet/dev500").glob("*.JPEG"))[:count]
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    return {"images": datasets.Preprocess.parse("scale=1/255").apply(np.stack(images))}


def speech(assets: Path, count: int) -> dict:
    if not shutil.which("espeak-ng"):
        raise SystemExit("silero_vad needs espeak-ng (apt-get install espeak-ng) for its speech")
    windows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, text in enumerate(phrases(assets, 40, offset=2000)):
            wav = Path(folder) / f"{index}.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
            audio = read_wav_16k(wav)
            windows += [audio[i:i + 512] for i in range(0, len(audio) - 512, 512)]
            if len(windows) >= count:
                break
    return {"input": np.stack(windows[:count]).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64)}


def read_wav_16k(path: Path) -> np.ndarray:
    """A mono 16-bit WAV as float32 in [-1, 1], resampled linearly to 16 kHz."""
    import wave

    with wave.open(str(path)) as handle:
        rate, frames = handle.getframerate(), handle.readframes(handle.getnframes())
    audio = np.frombuffer(frames, np.int16).astype(np.float32) / 32768
    positions = np.arange(0, len(audio) - 1, rate / 16000)
    return np.interp(positions, np.arange(len(audio)), audio)


def file_bytes(assets: Path, count: int) -> dict:
    roots = [Path(sys.prefix) / "lib", Path("/usr/share/doc"), Path("/usr/bin"), assets / "data/imagenet/dev500"]
    files = []
    for root in roots:
        found = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                       and p.stat().st_size > 64)
        files += found[:: max(1, len(found) // (count // len(roots) + 1))][: count // len(roots) + 1]
    rows = []
    for path in files[:count]:
        content = path.read_bytes()
        begin = list(content[:1024]) + [256] * (1024 - min(len(content), 1024))
        end = [256] * (1024 - min(len(content), 1024)) + list(content[-1024:])
        rows.append(begin + end)
    return {"bytes": np.asarray(rows, dtype=np.int32)}


def sentences(assets: Path, count: int) -> dict:
    from onnxcomp import text

    model = onnx.load(assets / "zoo/paraphrase_minilm_l3.onnx", load_external_data=False)
    return text.encode(phrases(assets, count, offset=10000), assets / "zoo/bert_uncased_tokenizer.json",
                       datasets.model_inputs(model), max_length=64)


def cifar(assets: Path, count: int) -> dict:
    with np.load(assets / "data/cifar10/cifar10_test_2000.npz") as archive:
        return {"input": datasets.Preprocess.parse(CIFAR_PREPROCESS).apply(archive["images"][:count])}


def imagenet(assets: Path, model: onnx.ModelProto, count: int) -> dict:
    dataset = datasets.open_data(assets / "data/imagenet/dev500", model, preprocess=IMAGENET_PREPROCESS,
                                 limit=count)
    return dataset.batch(0, dataset.num_samples)


def model_and_inputs(name: str, assets: Path, count: int) -> tuple[Path, dict, dict]:
    """(model path, arrays, input shapes) for `count` samples."""
    if name == "resnet20":
        path = assets / "models/resnet20_cifar10.onnx"
        arrays = cifar(assets, count)
        return path, {datasets.model_inputs(onnx.load(path))[0].name: next(iter(arrays.values()))}, {}
    if name == "efficientnet_lite0":
        path = assets / "models/efficientnet_lite0_imagenet.onnx"
        return path, imagenet(assets, onnx.load(path), count), {}
    path = assets / "zoo" / f"{name}.onnx"
    makers = {"ppocrv6_det_small": (text_pages, {"x": (1, 3, 320, 320)}),
              "ppocrv6_rec_small": (text_lines, {"x": (1, 3, 48, 320)}),
              "nudenet_320n": (lambda a, n: photos(a, n, 320), {"images": (1, 3, 320, 320)}),
              "silero_vad": (speech, {"input": (1, 512), "state": (2, 1, 128)}),
              "magika_standard_v3_3": (file_bytes, {}),
              "paraphrase_minilm_l3": (sentences, {})}
    make, shapes = makers[name]
    return path, make(assets, count), shapes


def split(arrays: dict, batched: set[str], start: int, stop: int) -> dict:
    """Samples start..stop-1: batched inputs sliced, the others (state, sample rate) whole."""
    return {name: value[start:stop] if name in batched else value for name, value in arrays.items()}


def run_onnxcomp(path: Path, recipe: str | None, calib: dict, evaluation: dict, shapes: dict, runs: int,
                 folder: Path) -> dict:
    output = folder / f"{path.stem}.{(recipe or 'default').split(':')[0]}.onnx"
    started = time.perf_counter()
    try:
        _, report = onnxcomp.optimize(path, recipe, calib_data=calib if recipe else None, data=evaluation,
                                      output=output, latency_runs=runs, input_shapes=shapes or None)
    except OnnxcompError as exc:
        return {"status": exc.exit_code, "error": first_line(exc), "seconds": time.perf_counter() - started}
    except Exception as exc:  # noqa: BLE001 - a bug: recorded as exit 3, as the CLI would
        return {"status": 3, "error": f"{type(exc).__name__}: {first_line(exc)}",
                "seconds": time.perf_counter() - started}
    return summarize(report.validation, sum(r.seconds for r in report.passes if not r.automatic))


def summarize(validation, seconds: float) -> dict:
    provider = validation.providers[0]
    worst = provider.worst_output
    return {"status": 0, "seconds": seconds, "size_ratio": validation.size_ratio,
            "worst_output": worst.name, "worst_cosine": worst.cosine, "worst_sqnr_db": worst.sqnr_db,
            "agreement": provider.agreement, "latency_ratio": provider.latency_ratio,
            "outputs": {o.name: {"cosine": o.cosine, "agreement": o.agreement, "integer": o.integer,
                                 "mismatches": o.mismatches} for o in provider.outputs}}


def run_ort_static(path: Path, calib: dict, evaluation: dict, shapes: dict, batched: set[str], runs: int,
                   folder: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            count = len(calib[next(iter(batched))])
            self.feeds = iter([split(calib, batched, i, i + 1) for i in range(count)])

        def get_next(self):
            return next(self.feeds, None)

    prepared, output = folder / f"{path.stem}.pre.onnx", folder / f"{path.stem}.ort_int8.onnx"
    started = time.perf_counter()
    try:
        with working_directory(folder):
            quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many types
        return {"status": "failed", "error": f"{type(exc).__name__}: {first_line(exc)}",
                "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    try:
        validation = onnxcomp.validate(str(path), str(output), evaluation, latency_runs=runs,
                                       input_shapes=shapes or None)
    except OnnxcompError as exc:
        return {"status": "failed", "error": first_line(exc), "seconds": seconds}
    return summarize(validation, seconds)


def row(model: str, recipe: str, result: dict) -> str:
    if result["status"] not in (0,):
        return f"| {model} | {recipe} | {result['status']} | {result['seconds']:.1f} | {result['error'][:70]} |||||"
    agreement = "-" if result["agreement"] is None else f"{result['agreement']:.1f} %"
    latency = "-" if result["latency_ratio"] is None else f"{result['latency_ratio']:.2f}"
    return (f"| {model} | {recipe} | 0 | {result['seconds']:.1f} | {result['size_ratio']:.3f} | "
            f"{result['worst_output']} | {result['worst_cosine']:.4f} | {agreement} | {latency} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default="default,int8,prune,share")
    parser.add_argument("--assets", default=os.environ.get("ONNXCOMP_ASSETS", "../shared/assets"))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-ort", action="store_true")
    args = parser.parse_args()
    assets = Path(args.assets)
    results = {}
    print("| model | recipe | exit | pass s | size | worst output | cosine | agreement | latency |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            path, arrays, shapes = model_and_inputs(name, assets, args.calib + args.eval)
            batched = datasets.batched_names(datasets.model_inputs(onnx.load(path), shapes))
            calib = split(arrays, batched, 0, args.calib)
            evaluation = split(arrays, batched, args.calib, args.calib + args.eval)
            for recipe in args.recipes.split(","):
                result = run_onnxcomp(path, RECIPES[recipe], calib, evaluation, shapes, args.runs, Path(work))
                results[f"{name}/{recipe}"] = result
                print(row(name, recipe, result), flush=True)
                if recipe == "int8" and not args.no_ort:
                    result = run_ort_static(path, calib, evaluation, shapes, batched, args.runs, Path(work))
                    results[f"{name}/ort-quantize_static"] = result
                    print(row(name, "ORT quantize_static", result), flush=True)
    out = Path(__file__).parent / "results" / "zoo.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
