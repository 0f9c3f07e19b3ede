"""distill: train a student model to reproduce an ONNX teacher's outputs (knowledge distillation).

The teacher is any ONNX model, run by ONNX Runtime on the chosen execution provider: once over the data, its
outputs kept in memory, or, with `augment`, on each batch's randomly altered inputs, the same inputs the student
sees, so that the teacher's function is matched on more than the few samples a transfer set often has:
`flip-shift` flips and shifts images, `mixup` blends pairs of samples, `flip-shift+mixup` does both. The
learning rate decays to 0 along a cosine over the steps (`schedule=cosine`) or stays constant. The student is

- an ONNX model: trained in place through onnxcomp.torch_graph (its graph unchanged, its weights trained) and
  written back as the same graph with new weights; or
- `package.module:factory` or `path/to/file.py:factory`: a function returning a torch.nn.Module, exported to
  ONNX after training with the teacher's input names and a free batch axis.

Loss (Hinton et al. 2015): the KL divergence between the teacher's and the student's outputs softened by a
temperature T, times T² so that its gradients keep their scale as T changes (`loss=kl`), or the mean squared
error between the outputs (`loss=mse`); plus, when the data has labels, α times the cross-entropy on them.
Unlabeled data works: the teacher's outputs are the targets. A share of the samples (`holdout`, spread over the
data, which is often sorted by class) is held out: after each epoch the student's top-1 agreement with the
teacher there (and accuracy, with labels) is reported. Deterministic for a given `seed` on the CPU.

`init_from_teacher` copies teacher weights into the student's tensors whose names and shapes match (the
parameter-transfer form of knowledge transfer) and reports each.

`heal` trains a model made by prune / share against its original the same way, with its compact weights tied
to their stored form (encoding.layouts): masks and codebook indices fixed, stored values, codebooks and scales
trained, and the result written back into the same layout. A model whose weights are plain tensors (channels
removed by prune:structure=channel, layers factorized by lowrank) has its weights trained as they are.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import data as datasets
from onnxcomp import encoding, model_io
from onnxcomp.errors import InputError
from onnxcomp.export import load_factory, require_torch, to_onnx
from onnxcomp.progress import bar
from onnxcomp.runner import Runner

LOSSES = ("kl", "mse")
SCHEDULES = ("cosine", "constant")
AUGMENTS = ("none", "flip-shift", "mixup", "flip-shift+mixup")


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3     # Adam
    schedule: str = "cosine"        # learning rate over the steps: cosine (down to 0) | constant
    augment: str = "none"           # none | flip-shift | mixup | flip-shift+mixup: each batch altered at random
    temperature: float = 4.0
    loss: str = "kl"                # kl | mse
    alpha: float = 0.5              # weight of the cross-entropy on labels, when the data has them
    holdout: float = 0.1            # share of the samples held out to report agreement each epoch
    seed: int = 0
    device: str = "cpu"             # torch device for the student: cpu, cuda
    provider: str = "cpu"           # ONNX Runtime execution provider for the teacher
    init_from_teacher: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("epochs and batch-size must be at least 1")
        if not self.learning_rate > 0 or not self.temperature > 0:
            raise InputError("learning rate and temperature must be positive")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, not '{self.loss}'")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, not '{self.schedule}'")
        if self.augment not in AUGMENTS:
            raise InputError(f"augment must be one of {', '.join(AUGMENTS)}, not '{self.augment}'")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"alpha must be in [0, 1], not {self.alpha}")
        if not 0 <= self.holdout < 1:
            raise InputError(f"holdout must be in [0, 1), not {self.holdout}")


@dataclass
class Epoch:
    number: int
    loss: float                  # mean training loss over the epoch
    agreement: float | None      # held-out top-1 agreement with the teacher, percent
    accuracy: float | None       # held-out top-1 on labels, percent
    seconds: float


@dataclass
class DistillReport:
    teacher: str
    student: str
    train_samples: int
    held_out_samples: int
    teacher_accuracy: float | None = None   # on the held-out samples, with labels
    epochs: list[Epoch] = field(default_factory=list)
    transferred: list[dict] = field(default_factory=list)  # init_from_teacher, one row per student tensor

    def render(self) -> str:
        lines = [f"distill {self.student} from {self.teacher}: {self.train_samples} training samples, "
                 f"{self.held_out_samples} held out"]
        if self.transferred:
            copied = sum(row["copied"] for row in self.transferred)
            lines.append(f"init from teacher: {copied} of {len(self.transferred)} student tensors copied")
            lines += [f"  {row['name']}  {row['shape']}  {'copied' if row['copied'] else row['reason']}"
                      for row in self.transferred]
        for epoch in self.epochs:
            lines.append(_epoch_line(epoch, len(self.epochs)))
        if self.teacher_accuracy is not None:
            lines.append(f"teacher held-out accuracy {self.teacher_accuracy:.2f} %")
        return "\n".join(lines)


def distill(teacher, student, data, *, config: DistillConfig = DistillConfig(), preprocess=None,
            output: str | Path | None = None, progress: bool | None = None) -> tuple[onnx.ModelProto, DistillReport]:
    """Train `student` (an ONNX model or path, or 'module:factory') to reproduce `teacher` on `data`.

    Returns the trained student as an ONNX model (also written to `output` when given) and the report.
    """
    torch = require_torch("distill")
    _check_output(output, teacher, student)
    teacher_model = teacher if isinstance(teacher, onnx.ModelProto) else model_io.load(teacher)
    transfer = _Transfer(teacher_model, data, preprocess, config)
    report = transfer.report(teacher, student)
    torch.manual_seed(config.seed)
    module, student_model = _student(student, transfer.names)
    if config.init_from_teacher:
        report.transferred, student_model = _transfer(teacher_model, module, student_model)
    _train(module, module.input_names if student_model is not None else transfer.names, transfer, config, report,
           progress)
    if student_model is not None:
        from onnxcomp.torch_graph import with_weights

        trained = with_weights(student_model, module.weights())
    else:
        trained = _export(torch, module, transfer.feed, transfer.names, teacher_model)
    if output is not None:
        model_io.save(trained, output)
    return trained, report


def heal(compressed, teacher, data, *, config: DistillConfig = DistillConfig(), preprocess=None,
         output: str | Path | None = None, progress: bool | None = None) -> tuple[onnx.ModelProto, DistillReport]:
    """Fine-tune a model made by prune / share to reproduce `teacher` (the original) on `data`, keeping its
    structure: pruned weights stay zero, shared weights stay shared (each codebook value and scale moves by the
    sum of its members' gradients, Deep Compression's trained quantization), and the result is stored in
    exactly the layout the input had: only the stored values, codebooks, scales and the dense tensors change.
    A model without compact weights (channel pruning, lowrank) is trained as `distill` trains an ONNX student.
    """
    torch = require_torch("heal")
    from onnxcomp.torch_graph import OnnxModule, with_weights

    _check_output(output, teacher, compressed)
    teacher_model = teacher if isinstance(teacher, onnx.ModelProto) else model_io.load(teacher)
    compressed_model = compressed if isinstance(compressed, onnx.ModelProto) else model_io.load(compressed)
    found = encoding.layouts(compressed_model)
    if not found:
        if compressed_model.graph.SerializeToString() == teacher_model.graph.SerializeToString():
            raise InputError(f"{compressed}: the model to heal is the teacher itself; give the model that "
                             "prune, share or lowrank made from it")
        return distill(teacher_model, compressed_model, data, config=config, preprocess=preprocess, output=output,
                       progress=progress)
    transfer = _Transfer(teacher_model, data, preprocess, config)
    report = transfer.report(teacher, compressed)
    torch.manual_seed(config.seed)
    module = OnnxModule(_decoded(compressed_model))
    payload = [_tie(module, layout, compressed_model) for layout in found]
    _train(module, module.input_names, transfer, config, report, progress)
    tied = {layout.name for layout in found}
    updates = {name: value for name, value in module.weights().items() if name not in tied}
    for write in payload:
        updates.update(write())
    trained = with_weights(compressed_model, updates)
    if output is not None:
        model_io.save(trained, output)
    return trained, report


class _Transfer:
    """The data, the teacher's outputs on it, and the held-out split."""

    def __init__(self, teacher_model: onnx.ModelProto, data, preprocess, config: DistillConfig):
        dataset = datasets.open_data(data, teacher_model, preprocess=preprocess)
        self.names = [spec.name for spec in dataset.inputs]
        self.feed = dataset.batch(0, dataset.num_samples)
        if "mixup" in config.augment:
            integers = [name for name, value in self.feed.items() if not np.issubdtype(value.dtype, np.floating)]
            if integers:
                raise InputError(f"augment={config.augment} blends inputs, and {', '.join(integers)} are not "
                                 "floating-point (ids or indices cannot be blended); use augment=none")
        if "flip-shift" in config.augment:
            shapes = {name: value.shape for name, value in self.feed.items()}
            if len(shapes) != 1 or len(next(iter(shapes.values()))) != 4:
                raise InputError(f"augment={config.augment} alters images: it needs one (N, C, H, W) input, and "
                                 f"the data has {shapes}; use augment=mixup or none")
        self.teacher = Runner(teacher_model, provider=config.provider, role="the teacher")
        self.targets = self.teacher.stacked(dataset, batch_size=64).astype(np.float32)
        self.labels = dataset.labels
        self.held_out = _held_out_indices(dataset.num_samples, config.holdout)
        self.train = np.setdiff1d(np.arange(dataset.num_samples), self.held_out)

    def teacher_outputs(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The teacher's first output on `feed`, float32 (N, …)."""
        return np.asarray(self.teacher.run(feed)[self.teacher.outputs[0]], dtype=np.float32)

    def report(self, teacher, student) -> DistillReport:
        report = DistillReport(_label(teacher), _label(student), len(self.train), len(self.held_out))
        if self.labels is not None and len(self.held_out):
            held = self.held_out
            report.teacher_accuracy = 100 * float(np.mean(self.targets[held].argmax(-1) == self.labels[held]))
        return report


def _label(model) -> str:
    return "model" if isinstance(model, onnx.ModelProto) else str(model)


def _train(module, order: list[str], transfer: _Transfer, config: DistillConfig, report: DistillReport,
           progress: bool | None) -> None:
    """Adam on the distillation loss over the training samples, one report line per epoch."""
    import torch

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no GPU here; use --device cpu")
    module.to(device)
    inputs = [torch.from_numpy(np.ascontiguousarray(transfer.feed[name])) for name in order]
    teacher_out = torch.from_numpy(transfer.targets)
    _check_shapes(module, inputs, teacher_out, device)
    labels, train = transfer.labels, transfer.train
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=config.learning_rate)
    steps = config.epochs * -(-len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if config.schedule == "cosine"
        else (lambda step: 1.0))
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    for number in range(1, config.epochs + 1):
        started = time.perf_counter()
        module.train()
        shuffled = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        total, seen = 0.0, 0
        shown = bar(len(shuffled), f"epoch {number}/{config.epochs}", show=progress, unit="sample")
        for first in range(0, len(shuffled), config.batch_size):
            index = shuffled[first:first + config.batch_size]
            label_batch = None if labels is None else torch.from_numpy(labels[index.numpy()])
            if config.augment == "none":
                batch, targets = [x[index] for x in inputs], teacher_out[index]
            else:  # the teacher sees the same altered inputs as the student
                feed, mix = _augmented({name: transfer.feed[name][index.numpy()] for name in order}, config.augment,
                                       rng)
                batch = [torch.from_numpy(feed[name]) for name in order]
                targets = torch.from_numpy(transfer.teacher_outputs(feed))
                if mix is not None and label_batch is not None:
                    partner, weight = mix
                    label_batch = (label_batch, label_batch[partner], torch.from_numpy(weight))
            out = _first_output(module(*[x.to(device) for x in batch]))
            loss = _loss(torch, out, targets.to(device), label_batch, config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
            seen += len(index)
            shown.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
            shown.update(len(index))
        shown.close()
        agreement, accuracy = _evaluate(torch, module, inputs, transfer.targets, labels, transfer.held_out, device,
                                        config.batch_size)
        epoch = Epoch(number, total / max(seen, 1), agreement, accuracy, time.perf_counter() - started)
        report.epochs.append(epoch)
        print(_epoch_line(epoch, config.epochs), file=sys.stderr, flush=True)
    module.eval().cpu()


def _augmented(feed: dict[str, np.ndarray], augment: str, rng: np.random.Generator):
    """The batch `feed` altered as `augment` says, and the mixup partners and weights (None without mixup)."""
    if "flip-shift" in augment:
        feed = {name: flip_shift(images, rng) for name, images in feed.items()}
    if "mixup" not in augment:
        return feed, None
    return mixup(feed, rng)


def mixup(feed: dict[str, np.ndarray], rng: np.random.Generator):
    """Each sample of the batch `feed` blended with another one, w·x + (1 − w)·x_partner, w uniform in [0, 1]
    (mixup, Zhang et al. 2018; the same partner and weight for every input). Blends are inputs the transfer set
    does not have, on which the teacher's function is matched too (Beyer et al. 2022, "function matching").
    Returns the blended feed, the partners' positions and the weights."""
    count = len(next(iter(feed.values())))
    partner = rng.permutation(count)
    weight = rng.random(count).astype(np.float32)
    blended = {}
    for name, values in feed.items():
        w = weight.reshape(-1, *[1] * (values.ndim - 1))
        blended[name] = (w * values + (1 - w) * values[partner]).astype(values.dtype)
    return blended, (partner, weight)


def flip_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`images` (N, C, H, W), each flipped left-right with probability 1/2 and shifted by up to an eighth of its
    side in each direction, the uncovered border filled by reflection (the usual CIFAR / ImageNet crops)."""
    height, width = images.shape[2:]
    pad_h, pad_w = height // 8, width // 8
    padded = np.pad(images, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)), mode="reflect")
    top = rng.integers(0, 2 * pad_h + 1, size=len(images))
    left = rng.integers(0, 2 * pad_w + 1, size=len(images))
    flip = rng.random(len(images)) < 0.5
    out = np.stack([p[:, t:t + height, l:l + width] for p, t, l in zip(padded, top, left)])
    out[flip] = out[flip][..., ::-1]
    return np.ascontiguousarray(out)


def _check_output(output, *inputs) -> None:
    """Before any training: refuse an output that is one of the input model files (or unwritable)."""
    if output is None:
        return
    paths = [p for p in inputs if not isinstance(p, onnx.ModelProto) and Path(str(p)).is_file()]
    for path in paths or [None]:
        model_io.check_output_path(path, output)


def _decoded(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its compact weights decoded into dense initializers of the same names."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    return gs.export_onnx(graph, do_type_check=False)


def _tie(module, layout: encoding.Layout, compressed: onnx.ModelProto):
    """Make the module compute `layout.name` from trainable stored values (and codebooks, scales) with its mask
    and indices fixed; return the function giving the stored initializers' new values by name."""
    stored = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer
              if t.name in (layout.values, layout.codebook, layout.scales)}
    present = module.add_buffer(layout.present)
    weight = module.tensor(layout.name)
    weight.requires_grad_(False)  # the dense tensor is computed from here on
    if layout.values is not None:
        dense = module.add_parameter(weight.detach().numpy())
        module.derive(layout.name, lambda: dense * present())
        return lambda: {layout.values: dense.detach().numpy()[layout.present].astype(stored[layout.values].dtype)}
    rows = layout.index.shape[0]
    dtype = weight.detach().numpy().dtype  # tables stored in float16 train in the weight's dtype
    codebook = module.add_parameter(stored[layout.codebook].astype(dtype))  # (1 or rows, entries)
    exact_zeros = module.add_buffer(codebook.detach().numpy() != 0)  # a 0 entry codes zeros: it stays 0
    scales = None if layout.scales is None else \
        module.add_parameter(stored[layout.scales].astype(dtype))  # (rows, 1)
    index = module.add_buffer(layout.index)
    row_of = module.add_buffer(np.arange(rows)[:, None] if codebook.shape[0] > 1
                               else np.zeros((rows, 1), dtype=np.int64))
    shape = tuple(layout.present.shape)

    def compute():
        values = (codebook * exact_zeros())[row_of(), index()]
        if scales is not None:
            values = values * scales
        return values.reshape(shape) * present()

    module.derive(layout.name, compute)
    written = {layout.codebook: lambda: codebook.detach().numpy()}
    if scales is not None:
        written[layout.scales] = lambda: scales.detach().numpy()
    return lambda: {name: get() for name, get in written.items()}


def _epoch_line(epoch: Epoch, epochs: int) -> str:
    parts = [f"epoch {epoch.number}/{epochs}", f"loss {epoch.loss:.4f}"]
    if epoch.agreement is not None:
        parts.append(f"held-out agreement {epoch.agreement:.2f} %")
    if epoch.accuracy is not None:
        parts.append(f"accuracy {epoch.accuracy:.2f} %")
    parts.append(f"{epoch.seconds:.1f} s")
    return "  ".join(parts)


def _held_out_indices(count: int, share: float) -> np.ndarray:
    """Every k-th sample, k = 1 / share: spread over data that is often sorted by class."""
    if share <= 0 or count < 2:
        return np.zeros(0, dtype=np.int64)
    step = max(int(round(1 / share)), 2)
    return np.arange(step // 2, count, step, dtype=np.int64)


def _student(student, names: list[str]):
    """(torch module, the ONNX student model or None for a torch factory). An ONNX student takes its inputs
    in its own order (`input_names`), a torch one in the data's."""
    if isinstance(student, onnx.ModelProto) or str(student).endswith(".onnx"):
        from onnxcomp.torch_graph import OnnxModule

        model = student if isinstance(student, onnx.ModelProto) else model_io.load(student)
        module = OnnxModule(model)
        missing = [name for name in module.input_names if name not in names]
        if missing:
            raise InputError(f"the student's inputs {', '.join(missing)} are not in the data, which gives "
                             f"{', '.join(names)}; give the student the teacher's input names")
        return module, model

    if ":" not in str(student):
        raise InputError(f"--student {student}: give an .onnx file, or module:factory / file.py:factory")
    return load_factory(str(student)), None


def _first_output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _loss(torch, out, teacher, labels, config: DistillConfig):
    import torch.nn.functional as F

    if config.loss == "kl":
        t = config.temperature
        flat_out, flat_teacher = out.reshape(out.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
        soft = F.kl_div(F.log_softmax(flat_out / t, dim=-1), F.log_softmax(flat_teacher / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
    else:
        soft = F.mse_loss(out, teacher)
    if labels is None or config.alpha == 0:
        return soft
    logits = out.reshape(out.shape[0], -1)
    if isinstance(labels, tuple):  # mixup: each blended sample's cross-entropy on both labels, by its weight
        first, second, weight = labels
        weight = weight.to(out.device)
        hard = (weight * F.cross_entropy(logits, first.to(out.device).long(), reduction="none")
                + (1 - weight) * F.cross_entropy(logits, second.to(out.device).long(), reduction="none")).mean()
    else:
        hard = F.cross_entropy(logits, labels.to(out.device).long())
    return (1 - config.alpha) * soft + config.alpha * hard


def _evaluate(torch, module, inputs, targets, labels, held_out, device, batch_size):
    if not len(held_out):
        return None, None
    module.eval()
    with torch.no_grad():
        index = torch.from_numpy(held_out)
        outs = [_first_output(module(*[x[index[i:i + batch_size]].to(device) for x in inputs])).cpu().numpy()
                for i in range(0, len(index), batch_size)]
    predicted = np.concatenate(outs).reshape(len(held_out), -1).argmax(-1)
    agreement = 100 * float(np.mean(predicted == targets[held_out].reshape(len(held_out), -1).argmax(-1)))
    accuracy = None if labels is None else 100 * float(np.mean(predicted == labels[held_out]))
    return agreement, accuracy


def _check_shapes(module, inputs, teacher_out, device) -> None:
    import torch

    module.eval()
    with torch.no_grad():
        out = _first_output(module(*[x[:2].to(device) for x in inputs]))
    if tuple(out.shape[1:]) != tuple(teacher_out.shape[1:]):
        raise InputError(f"the student's output has shape {list(out.shape[1:])} per sample and the teacher's "
                         f"{list(teacher_out.shape[1:])}; the student must predict what the teacher does")


def _transfer(teacher: onnx.ModelProto, module, student_model) -> tuple[list[dict], onnx.ModelProto | None]:
    """Copy teacher initializers into the student's float tensors of the same name and shape, trained or fixed
    (BatchNormalization statistics too); one row per tensor. An ONNX student's fixed tensors are not written
    back from the module after training, so the returned student model holds the copies."""
    import torch

    from onnxcomp.torch_graph import with_weights

    source = {t.name: numpy_helper.to_array(t) for t in teacher.graph.initializer}
    if student_model is not None:
        named = {name: module.tensor(name) for name in module.slots if module.tensor(name).is_floating_point()}
    else:
        named = dict(module.state_dict(keep_vars=True))
    rows = []
    for name, tensor in named.items():
        row = {"name": name, "shape": list(tensor.shape), "copied": False, "reason": ""}
        if name not in source:
            row["reason"] = "no teacher tensor of that name"
        elif list(source[name].shape) != list(tensor.shape):
            row["reason"] = f"teacher's is {list(source[name].shape)}"
        else:
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(source[name].astype(np.float32)).to(tensor.dtype))
            row["copied"] = True
        rows.append(row)
    if student_model is not None:
        fixed = {row["name"]: source[row["name"]] for row in rows
                 if row["copied"] and row["name"] not in module.trainable_names}
        student_model = with_weights(student_model, fixed) if fixed else student_model
    return rows, student_model


def _export(torch, module, feed, names, teacher_model) -> onnx.ModelProto:

    example = tuple(torch.from_numpy(np.ascontiguousarray(feed[name][:1])) for name in names)
    opset = next((o.version for o in teacher_model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return to_onnx(module, example, names, [v.name for v in teacher_model.graph.output][:1],
                   opset=max(13, min(17, opset)))
