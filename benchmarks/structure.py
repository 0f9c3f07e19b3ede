"""Speed from structure: prune:structure=channel (and lowrank, where the pass exists) against an L1-norm channel
pruning baseline at the same FLOPs, on ResNet-20 (CIFAR-10) and EfficientNet-Lite0 (ImageNet dev500).

    .venv/bin/python benchmarks/structure.py [--assets DIR] [--models resnet20,efficientnet] [--heal-epochs 0]

Every row starts from the BN-fused original (fold-constants,fuse-bn,cleanup), which is also the latency
reference: ORT latency ratios are medians of interleaved runs (onnxcomp.bench.interleaved_latency), batch 1 and
batch 32, in one process. The baseline is Torch-Pruning's MagnitudePruner as most users run it: per dependency
group the channels with the least L1 norm (of every weight row and column of the group) go, one share for every
group, searched so that the MACs match the channel-pruning row's; no re-solve, no rounding of counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx

from onnxcomp import data as datasets
from onnxcomp import graph as graphs
from onnxcomp import registry, runtime
from onnxcomp.bench import assets_folder, effnet_split, interleaved_latency
from onnxcomp.distillation import distill
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import PassContext
from onnxcomp.passes.channels import ChannelGraph
from onnxcomp.passes.heal import HealConfig
from onnxcomp.passes.prune_channels import GroupPlan, Macs, pruned_copy
from onnxcomp.recipe import parse
from onnxcomp.runner import Runner

ROOT = Path(__file__).resolve().parent
CIFAR_PREPROCESS = "scale=1/255,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"
IMAGENET_PREPROCESS = "resize=256,crop=224,scale=1,mean=127|127|127,std=128|128|128"
FUSED = "fold-constants,fuse-bn,cleanup"
MODELS = {
    "resnet20": {"file": "models/resnet20_cifar10.onnx",
                 "targets": ["flops=0.7", "flops=0.5", "latency=0.6", "latency=0.6,depth=false"],
                 "lowrank": ["lowrank:flops=0.6"]},
    "efficientnet": {"file": "models/efficientnet_lite0_imagenet.onnx",
                     "targets": ["latency=0.8"], "lowrank": ["lowrank:flops=0.7"]},
}


def cifar(assets: Path, model: onnx.ModelProto):
    """(calibration: the first 2000 of the 10k training images, the 2000 test images, the 10k transfer set)."""
    preprocess = datasets.Preprocess.parse(CIFAR_PREPROCESS)
    sets = []
    for name in ("cifar10_train_10000", "cifar10_test_2000"):
        with np.load(assets / f"data/cifar10/{name}.npz") as archive:
            images, labels = preprocess.apply(archive["images"]), archive["labels"].astype(np.int64)
        dataset = datasets.open_data({"input": images}, model)
        dataset.labels = labels
        sets.append(dataset)
    return sets[0].subset(0, 2000), sets[1], sets[0]


def imagenet(assets: Path, model: onnx.ModelProto):
    """(dev500 rows 0, 5, …, 495 for calibration, the other 400 for evaluation; no transfer set to heal on)."""
    dataset = datasets.open_data(str(assets / "data/imagenet/dev500"), model, preprocess=IMAGENET_PREPROCESS)
    calibration, evaluation = effnet_split(dataset.num_samples)
    return dataset.select(calibration), dataset.select(evaluation), None


def top1(model: onnx.ModelProto, dataset) -> float:
    scores = Runner(model).stacked(dataset, batch_size=50)
    return float(np.mean(scores.argmax(axis=1) == dataset.labels) * 100)


def latency_ratios(reference: onnx.ModelProto, model: onnx.ModelProto, dataset) -> dict[str, float]:
    ratios = {}
    for batch, runs in ((1, 60), (32, 12)):
        feed = {name: np.concatenate([value] * math.ceil(batch / value.shape[0]))[:batch]
                for name, value in dataset.batch(0, min(batch, dataset.num_samples)).items()}
        sessions = [runtime.session(m, "cpu", spinning=False) for m in (reference, model)]
        base, new = interleaved_latency(sessions, feed, runs=runs)
        ratios[f"latency_b{batch}"] = round(new.median_ms / base.median_ms, 3)
    return ratios


def l1_baseline(fused: onnx.ModelProto, flops: float) -> tuple[onnx.ModelProto, float]:
    """Channels of least L1 norm removed, one share for every group, to `flops` of the MACs (no re-solve)."""
    graph = graphs.import_model(_copy(fused))
    channels = ChannelGraph(graph)
    plans = []
    for group in channels.groups():
        norms = np.zeros(len(group.components))
        position = {c: i for i, c in enumerate(group.components)}
        for layer in channels.layers:
            weight = np.abs(graphs.constant_value(layer.node.inputs[1]).astype(np.float64))
            for followed, axis in ((layer.out, _out_axis(layer.node)), (layer.reads, _in_axis(layer.node))):
                if followed is None or followed.name not in group.tensors:
                    continue
                if followed is layer.reads and layer.depthwise:
                    continue  # its rows are counted as its output's
                per_channel = np.moveaxis(weight, axis, 0).reshape(followed.size, -1).sum(axis=1)
                for channel, component in enumerate(channels.components(followed)):
                    if int(component) in position:
                        norms[position[int(component)]] += per_channel[channel]
        size = len(group.components)
        plans.append(GroupPlan(group, np.array(group.components)[np.argsort(-norms)], list(range(size, 0, -1))))
    macs = Macs(channels, plans)
    low, high = 0.0, 1.0
    for _ in range(30):  # the share removed from every group that gives the MACs asked for
        share = (low + high) / 2
        choice = [min(len(p.counts) - 1, int(round(share * len(p.counts)))) for p in plans]
        if macs.ratio(choice) > flops:
            low = share
        else:
            high = share
    choice = [min(len(p.counts) - 1, int(round(high * len(p.counts)))) for p in plans]
    return pruned_copy(graph, plans, choice), macs.ratio(choice)


def _out_axis(node) -> int:
    return 0 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else 1


def _in_axis(node) -> int:
    return 1 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else 0


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def run_recipe(fused: onnx.ModelProto, recipe: str, calibration) -> tuple[onnx.ModelProto, dict, float]:
    ctx = PassContext(calibration_data=calibration)
    started = time.perf_counter()
    model, records = PassManager(parse(recipe)).run(fused, ctx)
    seconds = time.perf_counter() - started
    stats = {}
    for record in records:
        stats.update({k: v for k, v in record.stats.items() if k in (
            "flops_ratio", "latency_ratio", "latency_ratio_batch32", "unreached", "note", "channels_removed",
            "ridge", "blocks_removed", "removed_blocks", "resolved", "resolve_rejected", "depth_candidates")})
    return model, stats, seconds


def bench_model(name: str, assets: Path, heal_epochs: int, lowrank: bool, save) -> list[dict]:
    spec = MODELS[name]
    original = onnx.load(assets / spec["file"])
    fused, _ = PassManager(parse(FUSED)).run(original)
    calibration, test, transfer = (cifar if name == "resnet20" else imagenet)(assets, fused)
    rows = [{"model": name, "method": "BN-fused original", "flops": 1.0, "latency_b1": 1.0, "latency_b32": 1.0,
             "top1": round(top1(fused, test), 2), "seconds": 0.0}]
    print(_line(rows[-1]), flush=True)
    recipes = [("prune:structure=channel," + t, f"prune:structure=channel,{t}") for t in spec["targets"]]
    if lowrank and "lowrank" in registry.available():
        recipes += [(r, r) for r in spec["lowrank"]]
        recipes += [(f"prune:structure=channel,flops=0.7 + {r}", f"prune:structure=channel,flops=0.7,{r}")
                    for r in spec["lowrank"][:1]]
    for label, recipe in recipes:
        model, stats, seconds = run_recipe(fused, recipe, calibration)
        row = {"model": name, "method": label, "flops": stats.get("flops_ratio"),
               **latency_ratios(fused, model, test), "top1": round(top1(model, test), 2),
               "seconds": round(seconds, 1), "pass_latency_ratio": stats.get("latency_ratio"),
               **{key: stats.get(key) for key in ("unreached", "ridge", "blocks_removed", "resolved",
                                                  "resolve_rejected", "depth_candidates") if key in stats}}
        if heal_epochs and transfer is not None:
            started = time.perf_counter()
            config = HealConfig(epochs=heal_epochs, augment="flip-shift").distill_config()
            healed, _ = distill(fused, model, transfer, config=config, progress=False)
            row["top1_healed"] = round(top1(healed, test), 2)
            row["heal_seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        save(rows)
        print(_line(row), flush=True)
        if recipe.startswith("prune:") and row["flops"] is not None and "lowrank" not in recipe:
            started = time.perf_counter()
            baseline, share = l1_baseline(fused, row["flops"])
            base_row = {"model": name, "method": f"L1-norm baseline at {label.split(',')[-1]}'s FLOPs",
                        "flops": round(share, 4), **latency_ratios(fused, baseline, test),
                        "top1": round(top1(baseline, test), 2), "seconds": round(time.perf_counter() - started, 1)}
            rows.append(base_row)
            save(rows)
            print(_line(base_row), flush=True)
    return rows


def _line(row: dict) -> str:
    healed = f"  healed {row['top1_healed']:.2f}" if "top1_healed" in row else ""
    flops = "-" if row["flops"] is None else f"{row['flops']:.3f}"
    return (f"{row['model']:<13} {row['method']:<48} FLOPs {flops}  latency b1 {row['latency_b1']:.3f}x "
            f"b32 {row['latency_b32']:.3f}x  top-1 {row['top1']:.2f}{healed}  {row['seconds']:.0f} s"
            + (f"  (unreached: {row['unreached']})" if row.get("unreached") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets")
    parser.add_argument("--models", default="resnet20,efficientnet")
    parser.add_argument("--heal-epochs", type=int, default=0,
                        help="distill each CIFAR row from the original on the 10k transfer set (0: no healing)")
    parser.add_argument("--no-lowrank", action="store_true", help="leave out the lowrank rows")
    parser.add_argument("--out", default="structure.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    assets = assets_folder(args.assets, [MODELS[name]["file"] for name in args.models.split(",")])
    out = ROOT / "results" / args.out
    out.parent.mkdir(exist_ok=True)
    done: list[dict] = []

    def save(rows: list[dict]) -> None:  # after every row: a long run that is cut short keeps what it measured
        out.write_text(json.dumps({"load_average": os.getloadavg(), "rows": done + rows}, indent=2))

    for name in args.models.split(","):
        done += bench_model(name, assets, args.heal_epochs, not args.no_lowrank, save)
    save([])
    print(f"written {out}; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
