"""Benchmark: healing compressed models with `distill --heal`, against the same models post-training.

    .venv/bin/python benchmarks/heal.py [--models resnet20,effnet] [--assets DIR] [--epochs 30] [--lr 0.001]
        [--recipe RECIPE ...] [--schedule cosine|constant] [--augment none|flip-shift] [--output FILE]

Data (benchmarks/int8_vs_ort.py's split, its loaders imported): the evaluation images are never trained on.
  resnet20  CIFAR-10 test images: calibration 0..99 (prune / share), transfer set 0..499 without labels (heal;
            every 10th held out for the per-epoch report), evaluation 500..1999.
  effnet    dev500: calibration and transfer set = every 5th image (100, without labels), evaluation the
            other 400.

Rows: each recipe is run by onnxcomp.optimize on the fp32 model with the calibration images; the result is
healed by onnxcomp.heal(compressed, fp32 model, transfer set, DistillConfig(epochs, learning_rate)), KL at
T=4 with the fp32 model as teacher. Columns: fp32 top-1, top-1 post-training and healed, their difference from
fp32, the fp32 file over the model's size (healing keeps the layout, so the size does not change), and the
wall time of the heal. Results: stdout (markdown) and benchmarks/results/heal.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_vs_ort  # noqa: E402
import prune_vs_naive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "heal.json"
MODELS = {  # name -> (path, loader, transfer-set indices, recipes)
    "resnet20": ("models/resnet20_cifar10.onnx", int8_vs_ort.cifar_data, slice(0, 500),
                 ["fuse-bn,prune:sparsity=0.7", "deep-compression",
                  "fuse-bn,prune:sparsity=0.4,share:bits=3,min-size=0,short-names",
                  "fuse-bn,share:bits=1.25,min-size=0,short-names"]),
    "effnet": ("models/efficientnet_lite0_imagenet.onnx", int8_vs_ort.effnet_data, None,
               ["fuse-bn,prune:sparsity=0.3,share:bits=3,min-size=0,short-names",
                "fuse-bn,share:bits=3,min-size=0,short-names"]),
}


def top1(model: onnx.ModelProto, data: dict) -> float:
    prediction = prune_vs_naive.outputs(prune_vs_naive.session(model.SerializeToString()), data)[0].argmax(-1)
    return 100 * float(np.mean(prediction == data["labels"][data["evaluation"]]))


def main(argv: list[str] | None = None) -> int:
    import onnxcomp
    from onnxcomp.distillation import AUGMENTS, SCHEDULES, DistillConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,effnet")
    parser.add_argument("--assets")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--recipe", action="append", default=[],
                        help="a recipe to run instead of the model's list (repeatable)")
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    parser.add_argument("--augment", default="none", choices=AUGMENTS,
                        help="alter each batch's images at random (DistillConfig.augment; default none)")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    keys = int8_vs_ort.model_keys(args.models, MODELS)
    assets = int8_vs_ort.assets_folder(args.assets, [MODELS[key][0] for key in keys])
    results = []
    started = time.perf_counter()
    for key in keys:
        relative, loader, transfer_slice, recipes = MODELS[key]
        recipes = args.recipe or recipes
        model = onnx.load(str(assets / relative))
        data = loader(assets, model)
        images = data["images"]
        calib = {data["input"]: images[data["calibration"]]}
        transfer_images = images[transfer_slice] if transfer_slice is not None else images[data["calibration"]]
        transfer = {data["input"]: transfer_images}
        fp32 = top1(model, data)
        fp32_bytes = len(model.SerializeToString())
        int8_vs_ort.log(f"{key}: fp32 {fp32:.2f} %")
        for recipe in recipes:
            compressed, _ = onnxcomp.optimize(model, recipe, calib_data=calib, validate_result=False)
            before = top1(compressed, data)
            begun = time.perf_counter()
            healed, report = onnxcomp.heal(compressed, model, transfer,
                                           config=DistillConfig(epochs=args.epochs, learning_rate=args.lr,
                                                                schedule=args.schedule, augment=args.augment),
                                           progress=False)
            seconds = time.perf_counter() - begun
            after = top1(healed, data)
            row = {"model": key, "recipe": recipe, "fp32": fp32, "post_training": before, "healed": after,
                   "smaller": fp32_bytes / len(healed.SerializeToString()), "heal_s": seconds,
                   "transfer_samples": report.train_samples, "schedule": args.schedule, "augment": args.augment,
                   "epochs": args.epochs, "lr": args.lr,
                   "same_size": len(healed.SerializeToString()) == len(compressed.SerializeToString())}
            results.append(row)
            int8_vs_ort.log(f"  {recipe}: {before:.2f} % -> healed {after:.2f} % ({after - fp32:+.2f}), "
                            f"{row['smaller']:.2f}x smaller, {seconds:.0f} s")
    wall = time.perf_counter() - started
    print("| model | recipe | fp32 | post-training | healed | healed vs fp32 | × smaller | heal s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | `{r['recipe']}` | {r['fp32']:.2f} % | {r['post_training']:.2f} % | "
              f"{r['healed']:.2f} % | {r['healed'] - r['fp32']:+.2f} | {r['smaller']:.2f} | {r['heal_s']:.0f} |")
    print(f"\n{args.epochs} epochs, Adam lr {args.lr} ({args.schedule}), batch 32, KL at T=4, augment {args.augment}; "
          f"whole run {wall:.0f} s")
    int8_vs_ort.write_results(args.output, {"environment": int8_vs_ort.environment(), "wall_s": wall,
                                            "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
