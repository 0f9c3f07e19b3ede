"""Benchmark: the digits student distilled from the digits teacher against the same student trained on labels.

    .venv/bin/python benchmarks/distill_digits.py [--seeds 0,1,2] [--epochs 30] [--lr 0.01] [--schedule cosine]
        [--augment none|mixup] [--output FILE]

Teacher: models/digits_cnn.onnx (17 k parameters). Student: models/digits_student.py:small_student (3.7 k).
Data: the model's own training split (models/train_digits.py load_split: 1437 images), every 10th held out for
the per-epoch report; top-1 is measured on the test split models/digits_test.npz (360 images), never trained on.

Rows, each with the same student, epochs, batch size 32, Adam learning rate, augmentation and seed
(onnxcomp.distill; with mixup, the labels are blended as the images are):
  labels only    alpha=1: cross-entropy on the labels, the teacher ignored
  distilled      alpha=0.5: half Hinton's KL at T=4 (×T²), half cross-entropy on the labels
  distilled, no labels   the same data without its labels: KL to the teacher alone

Results: stdout (markdown table: mean and standard deviation over the seeds, and each seed) and
benchmarks/results/distill_digits.json; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))
RESULTS = REPO / "benchmarks" / "results" / "distill_digits.json"
ROWS = {"labels only": (1.0, True), "distilled": (0.5, True), "distilled, no labels": (0.0, False)}


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    import onnxcomp
    import train_digits
    from onnxcomp.distillation import AUGMENTS, SCHEDULES, DistillConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    parser.add_argument("--augment", default="none", choices=AUGMENTS,
                        help="DistillConfig.augment for every row (flip-shift does not suit 8×8 digits)")
    parser.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    x_train, _, y_train, _ = train_digits.load_split()
    test = np.load(REPO / "models/digits_test.npz")
    teacher = str(REPO / "models/digits_cnn.onnx")
    student = str(REPO / "models/digits_student.py") + ":small_student"
    teacher_top1 = 100 * float(np.mean(ort.InferenceSession(teacher).run(None, {"input": test["input"]})[0].argmax(1)
                                       == test["labels"]))
    results = {}
    started = time.perf_counter()
    for name, (alpha, labelled) in ROWS.items():
        results[name] = []
        for seed in seeds:
            data = {"input": x_train, "labels": y_train} if labelled else {"input": x_train}
            config = DistillConfig(epochs=args.epochs, learning_rate=args.lr, schedule=args.schedule, alpha=alpha,
                                   augment=args.augment, seed=seed)
            trained, _ = onnxcomp.distill(teacher, student, data, config=config, progress=False)
            logits = ort.InferenceSession(trained.SerializeToString()).run(None, {"input": test["input"]})[0]
            results[name].append(100 * float(np.mean(logits.argmax(1) == test["labels"])))
            print(f"{name}, seed {seed}: {results[name][-1]:.2f} %", file=sys.stderr)
    wall = time.perf_counter() - started
    print(f"teacher (17 k parameters): {teacher_top1:.2f} % on the 360 test images\n")
    print("| student (3.7 k parameters) | top-1 mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(seeds))
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.2f} % | {spread:.2f} | "
              + " | ".join(f"{v:.2f} %" for v in values) + " |")
    print(f"\n{args.epochs} epochs, Adam lr {args.lr} ({args.schedule}), batch 32, augment {args.augment}; "
          f"whole run {wall:.0f} s")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"teacher_top1": teacher_top1, "epochs": args.epochs, "lr": args.lr,
                                  "schedule": args.schedule, "augment": args.augment,
                                  "seeds": seeds, "results": results, "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
