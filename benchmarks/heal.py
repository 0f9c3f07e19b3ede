"""Benchmark: healing compressed models with `distill --heal`, against the same models post-training.

    .venv/bin/python benchmarks/heal.py [--models resnet20,effnet] [--assets DIR] [--epochs 30] [--lr 0.001]
        [--recipe RECIPE ...] [--schedule cosine|constant] [--augment none|flip-shift|mixup|flip-shift+mixup]
        [--folds K] [--output FILE]

Data (the split of onnxcomp.bench's loaders): the evaluation images are never trained on.
  resnet20  CIFAR-10 test images: calibration 0..99 (prune / share), transfer set 0..499 without labels (heal;
            every 10th held out for the per-epoch report), evaluation 500..1999.
  effnet    dev500: calibration and transfer set = every 5th image (100, without labels), evaluation the
            other 400.

--folds K (cross-validation, for a larger transfer set than the split above allows): the images are dealt into
K folds by index modulo K; each fold in turn is the evaluation set, and the other folds are the transfer set,
every k-th of them (at most 100) the calibration images. Top-1 is pooled over all K folds (every image
evaluated once, by a model that never saw it); fp32 is evaluated on the same images.

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

from onnxcomp.bench import (assets_folder, cifar_data, effnet_data, environment, evaluation_outputs, log, model_keys,
                            session, write_results)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "heal.json"
MODELS = {  # name -> (path, loader, transfer-set indices, recipes)
    "resnet20": ("models/resnet20_cifar10.onnx", cifar_data, slice(0, 500),
                 ["fuse-bn,prune:sparsity=0.7", "deep-compression",
                  "fuse-bn,prune:sparsity=0.4,share:bits=3,min-size=0,short-names",
                  "fuse-bn,share:bits=1.25,min-size=0,short-names"]),
    "effnet": ("models/efficientnet_lite0_imagenet.onnx", effnet_data, None,
               ["fuse-bn,prune:sparsity=0.3,share:bits=3,min-size=0,short-names",
                "fuse-bn,share:bits=3,min-size=0,short-names"]),
}


def top1(model: onnx.ModelProto, data: dict) -> float:
    prediction = evaluation_outputs(session(model.SerializeToString()), data)[0].argmax(-1)
    return 100 * float(np.mean(prediction == data["labels"][data["evaluation"]]))


def splits(data: dict, transfer_slice: slice | None, folds: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(calibration, transfer, evaluation) image indices: the fixed split, or one per fold of a K-fold split."""
    everything = np.arange(len(data["labels"]))
    if not folds:
        transfer = everything[transfer_slice] if transfer_slice is not None else data["calibration"]
        return [(data["calibration"], transfer, data["evaluation"])]
    result = []
    for fold in range(folds):
        transfer = everything[everything % folds != fold]
        calibration = transfer[::max(1, len(transfer) // 100)][:100]
        result.append((calibration, transfer, everything[everything % folds == fold]))
    return result


def heal_row(config, model: onnx.ModelProto, data: dict, folds: list, recipe: str) -> dict:
    """Post-training and healed top-1 of `recipe`, pooled over `folds` (each fold's images counted once), and the
    largest healed file of the folds (each fold calibrates on its own images, so bit allocations may differ)."""
    import onnxcomp

    before = after = seconds = 0.0
    train_samples, same_size, largest = 0, True, 0
    images = data["images"]
    for calibration, transfer, evaluation in folds:
        compressed, _ = onnxcomp.optimize(model, recipe, calib_data={data["input"]: images[calibration]},
                                          validate_result=False)
        begun = time.perf_counter()
        healed, report = onnxcomp.heal(compressed, model, {data["input"]: images[transfer]}, config=config,
                                       progress=False)
        seconds += time.perf_counter() - begun
        fold_data = dict(data, evaluation=evaluation)
        before += top1(compressed, fold_data) * len(evaluation)
        after += top1(healed, fold_data) * len(evaluation)
        train_samples += report.train_samples
        size = len(healed.SerializeToString())
        same_size = same_size and size == len(compressed.SerializeToString())
        largest = max(largest, size)
    evaluated = sum(len(evaluation) for _, _, evaluation in folds)
    return {"recipe": recipe, "post_training": before / evaluated, "healed": after / evaluated, "heal_s": seconds,
            "transfer_samples": train_samples, "same_size": same_size, "bytes": largest}


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--folds", type=int, default=0,
                        help="cross-validate over K folds of all images instead of the fixed split (K >= 2)")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.folds == 1 or args.folds < 0:
        parser.error("--folds needs K >= 2 (or 0 for the fixed split)")
    keys = model_keys(args.models, MODELS)
    assets = assets_folder(args.assets, [MODELS[key][0] for key in keys])
    results = []
    started = time.perf_counter()
    for key in keys:
        relative, loader, transfer_slice, recipes = MODELS[key]
        recipes = args.recipe or recipes
        model = onnx.load(str(assets / relative))
        data = loader(assets, model)
        if args.folds:
            data = dict(data, evaluation=np.arange(len(data["labels"])))  # fp32 on every image, as the folds pool
        fp32 = top1(model, data)
        fp32_bytes = len(model.SerializeToString())
        log(f"{key}: fp32 {fp32:.2f} %")
        for recipe in recipes:
            row = heal_row(DistillConfig(epochs=args.epochs, learning_rate=args.lr, schedule=args.schedule,
                                         augment=args.augment),
                           model, data, splits(data, transfer_slice, args.folds), recipe)
            row.update({"model": key, "fp32": fp32, "smaller": fp32_bytes / row.pop("bytes"),
                        "schedule": args.schedule, "augment": args.augment, "epochs": args.epochs, "lr": args.lr,
                        "folds": args.folds})
            results.append(row)
            log(f"  {recipe}: {row['post_training']:.2f} % -> healed {row['healed']:.2f} % "
                            f"({row['healed'] - fp32:+.2f}), {row['smaller']:.2f}x smaller, {row['heal_s']:.0f} s")
    wall = time.perf_counter() - started
    print("| model | recipe | fp32 | post-training | healed | healed vs fp32 | × smaller | heal s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | `{r['recipe']}` | {r['fp32']:.2f} % | {r['post_training']:.2f} % | "
              f"{r['healed']:.2f} % | {r['healed'] - r['fp32']:+.2f} | {r['smaller']:.2f} | {r['heal_s']:.0f} |")
    print(f"\n{args.epochs} epochs, Adam lr {args.lr} ({args.schedule}), batch 32, KL at T=4, augment {args.augment}; "
          f"whole run {wall:.0f} s")
    write_results(args.output, {"environment": environment(), "wall_s": wall,
                                            "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
