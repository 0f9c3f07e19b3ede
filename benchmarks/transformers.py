"""Benchmark: onnxcomp's int8, int4, fp16 and share on two BERT-family models, against ONNX Runtime's quantizers.

    .venv/bin/python benchmarks/transformers.py [--assets DIR] [--cache DIR] [--runs 200]
                                                [--models minilm,small-bert]

Models:
  minilm      ONNXCOMP_ASSETS/zoo/paraphrase_minilm_l3.onnx (sentence-transformers paraphrase-MiniLM-L3-v2, 3
              layers, 384 wide), its [N, 384] sentence embedding. Top-1: a logistic-regression probe trained
              on the fp32 embeddings of SST-2 phrases 200..4199 and applied unchanged to each variant's
              embeddings of phrases 4200..5071 (what a downstream classifier trained on the float model sees).
  small-bert  a BERT built here in plain torch (token and position embeddings, 2 post-LayerNorm encoder layers
              of 4-head attention and GELU feed-forward, 128 wide, a masked-mean pooler and a classifier),
              trained from scratch on SST-2 phrases 5072.. with the same tokenizer (fixed seed and steps, a few
              minutes on CPU), exported with torch.onnx.export and cached under --cache. Top-1: its own
              classifier on phrases 4200..5071, which it never saw; cosine: of its pooled output.
Both read SST-2 training phrases (data/sst2/train.tsv) through the zoo's uncased BERT tokenizer; phrases
0..199 are the calibration data of every variant that takes some. No phrase is used twice.

Variants, all from the same fp32 file, through onnxcomp's Python API and ORT's quantization package:
  onnxcomp int8    optimize(model, "int8"): the pass picks dynamic activations for transformers; no data
  onnxcomp int4    optimize(model, "int4", calib_data=calibration phrases): weight-only, block 32, round to
                   nearest, with the pass's bias correction and exact rows measured on the phrases
  onnxcomp fp16    optimize(model, "fp16", calib_data=calibration phrases): float32 islands where ranges overflow
  onnxcomp share   optimize(model, "share:samples=32", calib_data=calibration phrases): 5-bit k-means sharing,
                   its sensitivity allocation measured on 32 of the phrases (as the zoo benchmark does)
  onnxcomp lowrank optimize(model, "lowrank:flops=F", calib_data=calibration phrases), F = 0.6, 0.7, 0.8:
                   MatMul weights factorized by whitened SVD, for speed (the FLOPs share of those layers kept)
  ORT quantize_dynamic        quantize_dynamic(weight_type=QInt8), ORT's recommended path for transformers
  ORT quantize_static         quant_pre_process, then quantize_static(QDQ, per_channel=True) on the calibration
                              phrases, in batches of 16 of about one length
  ORT MatMulNBitsQuantizer    matmul_nbits_quantizer, 4 bits, block 32, symmetric
A pass this checkout does not have is reported as "pass not available"; a quantizer that fails, with its error.

Figures: top-1 (as above); mean cosine of each evaluation phrase's output to fp32's; file size; latency at batch
1 on one 32-token sentence, every variant of a model and its fp32 taking turns run by run
(onnxcomp.bench.interleaved_latency, one intra-op thread), median over --runs as a ratio to fp32's median;
quantization time (the call that writes the variant's file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxcomp
from onnxcomp import data as datasets
from onnxcomp import registry, text
from onnxcomp.bench import interleaved_latency, working_directory
from onnxcomp.errors import first_line
from onnxcomp.runner import Runner

CALIBRATION, PROBE_TRAIN, EVALUATION = (0, 200), (200, 4200), (4200, 5072)
BERT_TRAIN_FROM = 5072
LATENCY_TOKENS = 32
OURS = (("onnxcomp int8", "int8", False), ("onnxcomp int4", "int4", True), ("onnxcomp fp16", "fp16", True),
        ("onnxcomp share", "share:samples=32", True),  # label, recipe, takes the calibration phrases
        ("onnxcomp lowrank 0.6", "lowrank:flops=0.6", True), ("onnxcomp lowrank 0.7", "lowrank:flops=0.7", True),
        ("onnxcomp lowrank 0.8", "lowrank:flops=0.8", True))
MODELS = ("minilm", "small-bert")


@dataclass(frozen=True)
class SmallBert:
    """The second model's architecture and training, all of which name its cached file."""
    width: int = 128
    layers: int = 2
    heads: int = 4
    feed_forward: int = 512
    positions: int = 128
    steps: int = 600
    batch: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class Sentences:
    """Sentences tokenized in batches of similar length (little padding), and where each sentence came from."""
    feeds: list[dict[str, np.ndarray]]
    order: np.ndarray
    labels: np.ndarray


def sst2(assets: Path) -> tuple[list[str], np.ndarray]:
    return text.read_sentences(assets / "data/sst2/train.tsv")


def sentences(phrases: list[str], labels: np.ndarray, tokenizer: Path, specs, batch: int = 64) -> Sentences:
    lengths = [len(e.ids) for e in text.load_tokenizer(tokenizer).encode_batch(phrases)]
    order = np.argsort(lengths, kind="stable")
    feeds = [text.encode([phrases[i] for i in order[start:start + batch]], tokenizer, specs)
             for start in range(0, len(order), batch)]
    return Sentences(feeds, order, labels)


def outputs(model: Path, data: Sentences, names: list[str]) -> dict[str, np.ndarray]:
    """{output: [N, ...] float64 in the sentences' own order}."""
    runner = Runner(str(model))
    parts = [runner.run(feed, names) for feed in data.feeds]
    result = {}
    for name in names:
        stacked = np.concatenate([part[name] for part in parts]).astype(np.float64)
        result[name] = np.empty_like(stacked)
        result[name][data.order] = stacked
    return result


def write_tsv(phrases: list[str], labels: np.ndarray, path: Path) -> Path:
    path.write_text("".join(f"{p}\t{int(y)}\n" for p, y in zip(phrases, labels)), encoding="utf-8")
    return path


def small_bert_module(config: SmallBert, vocabulary: int):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.out = (nn.Linear(config.width, config.width) for _ in range(4))
            self.attention_norm = nn.LayerNorm(config.width)
            self.up = nn.Linear(config.width, config.feed_forward)
            self.down = nn.Linear(config.feed_forward, config.width)
            self.output_norm = nn.LayerNorm(config.width)

        def heads(self, x):
            n, t, _ = x.shape
            return x.reshape(n, t, config.heads, config.width // config.heads).transpose(1, 2)

        def forward(self, x, additive_mask):
            q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
            scores = q @ k.transpose(2, 3) / (config.width // config.heads) ** 0.5 + additive_mask
            mixed = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(x.shape)
            x = self.attention_norm(x + self.out(mixed))
            return self.output_norm(x + self.down(nn.functional.gelu(self.up(x))))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.words = nn.Embedding(vocabulary, config.width)
            self.positions = nn.Embedding(config.positions, config.width)
            self.embedding_norm = nn.LayerNorm(config.width)
            self.layers = nn.ModuleList(Layer() for _ in range(config.layers))
            self.pooler = nn.Linear(config.width, config.width)
            self.classifier = nn.Linear(config.width, 2)

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.embedding_norm(self.words(input_ids) + self.positions(positions))
            mask = attention_mask.to(x.dtype)
            additive = (1.0 - mask[:, None, None, :]) * -10000.0
            for layer in self.layers:
                x = layer(x, additive)
            mean = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
            pooled = torch.tanh(self.pooler(mean))
            return self.classifier(pooled), pooled

    return Bert()


def train_small_bert(config: SmallBert, phrases: list[str], labels: np.ndarray, tokenizer: Path):
    """The module trained with a fixed seed and step count on `phrases` (deterministic on one machine)."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vocabulary = text.load_tokenizer(tokenizer).get_vocab_size()
    module = small_bert_module(config, vocabulary)
    encoded = [e.ids[:config.positions] for e in text.load_tokenizer(tokenizer).encode_batch(phrases)]
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / config.steps)
    module.train()
    # batches of phrases of about one length (random ones pad every phrase to the longest: 4x the work), the
    # batches drawn in a new random order each epoch
    by_length = np.argsort([len(ids) + rng.random() for ids in encoded])
    batches = [by_length[start:start + config.batch] for start in range(0, len(by_length), config.batch)]
    order = []
    started = time.perf_counter()
    for step in range(config.steps):
        if not order:
            order = list(rng.permutation(len(batches)))
        chosen = batches[order.pop()]
        length = max(len(encoded[i]) for i in chosen)
        ids = np.zeros((len(chosen), length), np.int64)
        mask = np.zeros_like(ids)
        for row, i in enumerate(chosen):
            ids[row, :len(encoded[i])], mask[row, :len(encoded[i])] = encoded[i], 1
        logits, _ = module(torch.from_numpy(ids), torch.from_numpy(mask))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[chosen]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            print(f"  small-bert step {step + 1}/{config.steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return module.eval()


def small_bert(assets: Path, cache: Path, tokenizer: Path) -> Path:
    """The trained small BERT's ONNX file, trained and exported on first use."""
    import torch

    from onnxcomp.export import to_onnx

    config = SmallBert()
    key = json.dumps({**config.__dict__, "train_from": BERT_TRAIN_FROM, "torch": torch.__version__}, sort_keys=True)
    path = cache / f"sst2_small_bert_{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"
    if path.exists():
        return path
    phrases, labels = sst2(assets)
    print(f"training the small BERT on SST-2 phrases {BERT_TRAIN_FROM}..{len(phrases) - 1} (cached as {path})")
    torch.set_num_threads(1)  # more threads spin-wait for each other on a loaded machine, at no gain for this size
    module = train_small_bert(config, phrases[BERT_TRAIN_FROM:], labels[BERT_TRAIN_FROM:], tokenizer)
    example = (torch.ones(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64))
    sequence = {"input_ids": {1: "T"}, "attention_mask": {1: "T"}}
    model = to_onnx(module, example, ["input_ids", "attention_mask"], ["logits", "pooled"], free_axes=sequence)
    cache.mkdir(parents=True, exist_ok=True)
    onnxcomp.save(model, path)
    return path


def ours(model: Path, recipe: str, calib: Path | None, tokenizer: Path, out: Path) -> None:
    onnxcomp.optimize(model, recipe, calib_data=calib, tokenizer=tokenizer if calib else None, output=out,
                      validate_result=False)


def ort_dynamic(model: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)


def ort_static(model: Path, out: Path, calibration: Sentences) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration.feeds)

        def get_next(self):
            return next(self.feeds, None)

    prepared = out.with_name(out.stem + "_prepared.onnx")
    quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def ort_nbits(model: Path, out: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(model), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def variants(model: Path, calib: Path, calibration: Sentences, tokenizer: Path, folder: Path) -> dict[str, dict]:
    """{label: {"path": file or None, "seconds": quantization time, "note": why there is no file}}."""
    available = registry.available()
    jobs = [(label, (lambda out, r=recipe, c=takes: ours(model, r, calib if c else None, tokenizer, out))
             if recipe.split(":")[0] in available else None) for label, recipe, takes in OURS]
    jobs += [("ORT quantize_dynamic", lambda out: ort_dynamic(model, out)),
             ("ORT quantize_static", lambda out: ort_static(model, out, calibration)),
             ("ORT MatMulNBitsQuantizer", lambda out: ort_nbits(model, out))]
    made = {}
    for label, job in jobs:
        if job is None:
            made[label] = {"path": None, "note": "pass not available"}
            continue
        out = folder / f"{model.stem}_{label.replace(' ', '_')}.onnx"
        started = time.perf_counter()
        try:
            with working_directory(folder):  # ORT's tools leave temporary files in the current directory
                job(out)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report, not a reason to stop
            made[label] = {"path": None, "note": f"failed: {type(exc).__name__}: {first_line(exc)}"}
            continue
        made[label] = {"path": out, "seconds": time.perf_counter() - started}
    return made


def latency_ratios(model: Path, paths: dict[str, Path], feed: dict, runs: int) -> dict[str, float]:
    """Each variant's median latency over fp32's, all of them timed in turns in one run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    labels = ["fp32", *paths]
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in [model, *paths.values()]]
    timings = interleaved_latency(sessions, feed, runs=runs, warmup=10)
    return {label: t.median_ms / timings[0].median_ms for label, t in zip(labels, timings)}


def cosines(got: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (got * reference).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1),
                                                 1e-30)


def benchmark(name: str, model: Path, assets: Path, tokenizer: Path, folder: Path, runs: int) -> dict[str, dict]:
    phrases, labels = sst2(assets)
    graph = onnx.load(model)
    specs = datasets.model_inputs(graph)

    def part(span: tuple[int, int]) -> Sentences:
        return sentences(phrases[span[0]:span[1]], labels[span[0]:span[1]], tokenizer, specs)

    calib = write_tsv(phrases[slice(*CALIBRATION)], labels[slice(*CALIBRATION)], folder / f"{name}_calib.tsv")
    calibration = sentences(phrases[slice(*CALIBRATION)], labels[slice(*CALIBRATION)], tokenizer, specs, batch=16)
    evaluation = part(EVALUATION)
    if name == "minilm":
        from sklearn.linear_model import LogisticRegression

        cosine_output = next(o.name for o in graph.graph.output if datasets.value_type(o) == "float32"
                             and len(datasets.value_dims(o)) == 2)
        train = part(PROBE_TRAIN)
        probe = LogisticRegression(max_iter=2000).fit(outputs(model, train, [cosine_output])[cosine_output],
                                                      train.labels)

        def evaluate(path: Path) -> tuple[float, np.ndarray]:
            embedding = outputs(path, evaluation, [cosine_output])[cosine_output]
            return 100 * probe.score(embedding, evaluation.labels), embedding
    else:
        cosine_output = "pooled"

        def evaluate(path: Path) -> tuple[float, np.ndarray]:
            got = outputs(path, evaluation, ["logits", "pooled"])
            return 100 * float(np.mean(got["logits"].argmax(1) == evaluation.labels)), got["pooled"]

    fp32_top1, reference = evaluate(model)
    long_phrase = next(p for p in phrases[slice(*EVALUATION)]
                       if len(text.load_tokenizer(tokenizer).encode(p).ids) >= LATENCY_TOKENS)
    feed = text.encode([long_phrase], tokenizer, specs, max_length=LATENCY_TOKENS)
    results = {"fp32": {"top1": fp32_top1, "cosine_mean": 1.0, "mb": model.stat().st_size / 1e6}}
    made = variants(model, calib, calibration, tokenizer, folder)
    for label, variant in made.items():
        if variant["path"] is None:
            results[label] = {"note": variant["note"]}
            continue
        try:
            top1, got = evaluate(variant["path"])
        except Exception as exc:  # noqa: BLE001 - e.g. a peer's model ORT cannot load
            results[label] = {"note": f"does not run: {first_line(exc)}"}
            continue
        results[label] = {"top1": top1, "cosine_mean": float(cosines(got, reference).mean()),
                          "finite": bool(np.all(np.isfinite(got))), "mb": variant["path"].stat().st_size / 1e6,
                          "seconds": variant["seconds"]}
    timed = {label: made[label]["path"] for label in results if label != "fp32" and "note" not in results[label]}
    for label, ratio in latency_ratios(model, timed, feed, runs).items():
        results[label]["latency_ratio"] = ratio
    return results


def table(name: str, results: dict[str, dict]) -> str:
    fp32 = results["fp32"]
    lines = [f"{name}: top-1 as described in the module docstring; latency = median at batch 1, "
             f"{LATENCY_TOKENS} tokens, / fp32",
             "| variant | top-1 | mean cosine | MB | latency / fp32 | time s |", "|---|---|---|---|---|---|"]
    for label, row in results.items():
        if "note" in row:
            lines.append(f"| {label} | {row['note']} | | | | |")
            continue
        drop = "" if label == "fp32" else f" ({row['top1'] - fp32['top1']:+.2f})"
        seconds = f"{row['seconds']:.1f}" if "seconds" in row else ""
        cosine = f"{row['cosine_mean']:.4f}" + ("" if row.get("finite", True) else " (inf/NaN outputs)")
        lines.append(f"| {label} | {row['top1']:.2f} %{drop} | {cosine} | {row['mb']:.3f} | "
                     f"{row.get('latency_ratio', 1.0):.2f} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=os.environ.get("ONNXCOMP_ASSETS", "../shared/assets"))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "onnxcomp"),
                        help="where the trained small BERT is kept between runs")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per variant")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    assets = Path(args.assets)
    tokenizer = assets / "zoo/bert_uncased_tokenizer.json"
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in chosen:
            model = assets / "zoo/paraphrase_minilm_l3.onnx" if name == "minilm" else \
                small_bert(assets, Path(args.cache), tokenizer)
            started = time.perf_counter()
            results[name] = benchmark(name, model, assets, tokenizer, Path(work), args.runs)
            print(table(name, results[name]), f"\n({time.perf_counter() - started:.0f} s)\n", flush=True)
    out = Path(__file__).parent / "results" / "transformers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
