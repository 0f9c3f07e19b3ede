"""heal: fine-tune a compressed model to reproduce the model the pipeline started from, keeping its layout.

Before (after prune / share, post-training):
    W.mask, W.indices, W.codebook, W.scales ─► decode ─► W ─► Conv(W, b) ─► y
After:
    the same mask, indices and decoding; W.codebook, W.scales, W.values and b trained ─► … ─► y

Knowledge distillation (onnxcomp.distillation.heal) with the pipeline's input model as the teacher and the
calibration data as the transfer set (labels, when it has them, add α times the cross-entropy): pruned weights
stay zero, each shared weight keeps its codebook entry and each codebook value moves by the sum of its members'
gradients (Deep Compression's trained quantization). Only the stored values, codebooks, scales and the dense
tensors (biases, layers left dense) change, so the file keeps its size and layout. `augment` (flip-shift, mixup,
flip-shift+mixup) alters each batch at random, the teacher run on the same inputs; the learning rate decays
along a cosine. A model with plain weights (channels removed by prune:structure=channel, layers factorized by
lowrank) has its weights trained as they are, its graph unchanged.
Needs PyTorch (`onnxcomp[torch]`) and calibration data; a share of it (`holdout`) is held out and the teacher
agreement there is reported after each epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcomp import encoding
from onnxcomp import graph as graphs
from onnxcomp.distillation import DistillConfig
from onnxcomp.export import require_torch
from onnxcomp.pass_base import Pass, PassContext, PassResult, PreconditionError
from onnxcomp.registry import register


@dataclass(frozen=True)
class HealConfig:
    """distill's training options, with its defaults and checks (onnxcomp.distillation.DistillConfig documents
    them); the seed and the teacher's execution provider are the pipeline's."""

    epochs: int = DistillConfig.epochs
    learning_rate: float = DistillConfig.learning_rate
    schedule: str = DistillConfig.schedule
    augment: str = DistillConfig.augment
    batch_size: int = DistillConfig.batch_size
    temperature: float = DistillConfig.temperature
    loss: str = DistillConfig.loss
    alpha: float = DistillConfig.alpha
    holdout: float = DistillConfig.holdout
    device: str = DistillConfig.device

    def __post_init__(self):
        self.distill_config()  # the same checks as distill's options

    def distill_config(self, seed: int = 0, provider: str = "cpu") -> DistillConfig:
        return DistillConfig(**dataclasses.asdict(self), seed=seed, provider=provider)


@register
class Heal(Pass):
    name = "heal"
    summary = "fine-tune a compressed model by distillation from the input model, keeping its layout"
    Config = HealConfig

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration_data is None:
            raise PreconditionError("heal trains on calibration data: give calib_data= (typical inputs; labels "
                                    "are used when present)")
        if ctx.input_model is None:
            raise PreconditionError("heal needs the model the pipeline started from as its teacher")
        if not any(node.domain == encoding.DOMAIN for node in graph.nodes) and _weights_unchanged(graph, ctx):
            raise PreconditionError("heal: the weights are the input model's, unchanged; put heal after the "
                                    "passes that compress it (prune, share, lowrank)")
        require_torch("heal")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxcomp.distillation import heal

        model = graphs.export_model(graph, ctx.input_model)
        config = self.config.distill_config(ctx.seed, ctx.provider)
        healed, report = heal(model, ctx.input_model, ctx.calibration_data, config=config, progress=False)
        constants = graphs.weight_initializers(graph)
        changed = 0
        for tensor in healed.graph.initializer:
            if tensor.name in constants:
                value = numpy_helper.to_array(tensor)
                if not np.array_equal(value, np.asarray(constants[tensor.name].values)):
                    constants[tensor.name].values = value
                    changed += 1
        last = report.epochs[-1]
        stats = {"epochs": len(report.epochs), "train_samples": report.train_samples,
                 "held_out_samples": report.held_out_samples, "tensors_trained": changed, "loss": round(last.loss, 4)}
        if last.agreement is not None:
            stats["held_out_agreement"] = round(last.agreement, 2)
            stats["held_out_agreement_first_epoch"] = round(report.epochs[0].agreement, 2)
        if last.accuracy is not None:
            stats["held_out_accuracy"] = round(last.accuracy, 2)
        return PassResult(changed > 0, stats)


def _weights_unchanged(graph: gs.Graph, ctx: PassContext) -> bool:
    """Whether every weight of the graph is an initializer of the input model with the same shape and values."""
    original = {tensor.name: tensor for tensor in ctx.input_model.graph.initializer}
    for name, constant in graphs.weight_initializers(graph).items():
        stored = original.get(name)
        if stored is None or tuple(stored.dims) != tuple(constant.shape):
            return False
        if not np.array_equal(numpy_helper.to_array(stored), np.asarray(constant.values)):
            return False
    return True
