"""The one way onnxcomp runs a model over data: an ONNX Runtime session, batch by batch, failures as InputError.

Calibration, layer statistics, sensitivity probes, int8's accuracy checks, the distillation teacher and
validation all run models through `Runner`, so sessions, batching, providers and error messages are the same
everywhere.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from onnxcomp import graph as graphs
from onnxcomp import runtime
from onnxcomp.errors import InputError, first_line


class Runner:
    """`model` in a session on `provider`; `outputs` picks the tensors to fetch (any intermediate tensor: the
    model is cut to what they depend on), by default the model's outputs. `role` names the run in errors."""

    def __init__(self, model: onnx.ModelProto | str, *, provider: str = "cpu", optimization: str = "all",
                 outputs: list[str] | None = None, spinning: bool = True, role: str = "the model"):
        if outputs is not None:
            model = with_outputs(model if isinstance(model, onnx.ModelProto) else onnx.load(model), outputs)
        self.session = runtime.session(model, provider, optimization, spinning=spinning)
        self.outputs = list(outputs) if outputs is not None else [o.name for o in self.session.get_outputs()]
        self.provider, self.role = provider, role

    def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """{output name: value} for one feed."""
        names = self.outputs if outputs is None else outputs
        try:
            values = self.session.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for data the model rejects
            raise InputError(f"onnxruntime could not run {self.role} on {self.provider} with this data: "
                             f"{first_line(exc)}") from None
        for name, value in zip(names, values):
            if not isinstance(value, np.ndarray):
                raise InputError(f"{self.role} has a non-tensor output '{name}' ({type(value).__name__}); onnxcomp "
                                 "compares and calibrates on tensor outputs only")
        return dict(zip(names, values))

    def batches(self, dataset, samples: int | None = None, batch_size: int = 32, outputs: list[str] | None = None,
                max_bytes: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples done, {output: value}) for consecutive batches of the first `samples` samples; one batch is
        held at a time.

        With `max_bytes` (and a batch the model leaves free), a batch whose fetched values would take more is
        run and yielded in parts, sized from the first sample's: fetching every activation of a detector at
        320×320 for 16 samples (4.5 GB) took 7× as long per sample as one sample at a time.
        """
        per_sample = None
        for start, stop in dataset.runs(dataset.num_samples if samples is None else samples, batch_size):
            if max_bytes is None or dataset.fixed_batch is not None:
                yield stop, self.run(dataset.batch(start, stop), outputs)
                continue
            while start < stop:
                size = 1 if per_sample is None else max(1, int(max_bytes // per_sample))
                end = min(stop, start + size)
                values = self.run(dataset.batch(start, end), outputs)
                per_sample = per_sample or max(sum(v.nbytes for v in values.values()) / (end - start), 1.0)
                yield end, values
                start = end

    def stacked(self, dataset, output: str | None = None, samples: int | None = None,
                batch_size: int = 32) -> np.ndarray:
        """One output (the first by default) over the samples, concatenated along the batch axis."""
        name = output or self.outputs[0]
        return np.concatenate([values[name] for _, values in self.batches(dataset, samples, batch_size, [name])])


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are `tensors`, without the nodes they do not depend on."""
    producer = {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}
    kept: set[int] = set()
    needed = set(tensors)
    pending = list(needed)  # walked back from the tensors wanted, each node once
    while pending:
        index = producer.get(pending.pop())
        if index is None or index in kept:
            continue
        kept.add(index)
        node = model.graph.node[index]
        reads = list(node.input) + [name for subgraph in graphs.node_subgraphs(node)  # a subgraph's outer reads
                                    for inner in graphs.all_nodes(subgraph) for name in inner.input]
        needed.update(reads)
        pending.extend(reads)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(node for index, node in enumerate(model.graph.node) if index in kept)
    kept_initializers = [t for t in cut.graph.initializer if t.name in needed]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept_initializers)
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(tensors))
    return cut
