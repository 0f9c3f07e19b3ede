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
from onnxcomp import model_io, runtime
from onnxcomp.errors import InputError, first_line


class Runner:
    """`model` in a session on `provider`; `outputs` picks the tensors to fetch (any intermediate tensor: the
    model is cut to what they depend on), by default the model's outputs. `role` names the run in errors."""

    def __init__(self, model: onnx.ModelProto | str, *, provider: str = "cpu", optimization: str = "all",
                 outputs: list[str] | None = None, spinning: bool = True, role: str = "the model",
                 folder: str | None = None):
        """`model` is a model or the path of one; `folder` is where the external data of a model in memory lies
        (see runtime.session)."""
        if outputs is not None:
            if isinstance(model, str):
                model, folder = graph_of(model)
            model = with_outputs(model, outputs)
        self.session = runtime.session(model, provider, optimization, spinning=spinning, folder=folder)
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


class PrefixRuns:
    """Runs over the same batches of successive prefixes of one model, each resuming from the tensors that the
    earlier runs computed: for a pass that measures layer inputs in graph order while it changes the layers
    before them (prune's sequential waves). Each run computes only what the earlier runs did not, so a model
    measured at 50 points costs about one full run instead of 25.

    Tensors computed and read later are kept per batch up to `max_bytes`; past that, the runs start from the
    model's inputs again. The caller must not change what a kept tensor depends on: a run's model may differ
    from the earlier ones only in nodes the earlier runs did not compute.
    """

    def __init__(self, dataset, samples: int, batch_size: int, *, provider: str = "cpu",
                 role: str = "the model", max_bytes: int = 1 << 30):
        self.dataset, self.samples, self.batch_size = dataset, samples, batch_size
        self.provider, self.role, self.max_bytes = provider, role, max_bytes
        self.kept: dict[str, list[np.ndarray]] = {}  # tensor → its value per batch
        self.computed: set[str] = set()  # outputs of the nodes run so far

    def batches(self, model: onnx.ModelProto | str, outputs: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples done, {output: value}) per batch, as Runner.batches, from the kept tensors on."""
        model, folder = graph_of(model)
        cut, ran = _cut(model, outputs, self._available())
        self.computed |= ran
        later = _read_later(model, self.computed)
        produced = [name for name in ran if name in later and name not in self.kept]
        new: dict[str, list[np.ndarray]] = {name: [] for name in produced}
        last = len(self.dataset.runs(self.samples, self.batch_size)) - 1
        for index, stop, values in self._resumed(cut, list(dict.fromkeys(outputs + produced)), folder):
            for name in produced:
                new[name].append(values[name])
            if index == last:  # before the last yield: a caller zipping two runs stops after it
                self._keep(new, later)
            yield stop, {name: values[name] for name in outputs}

    def branch(self, model: onnx.ModelProto | str, outputs: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(samples done, {output: value}) per batch of `model`, resumed from the kept tensors without keeping
        anything: a probe of a change to nodes not computed yet, the runs after it unaffected."""
        model, folder = graph_of(model)
        for _, stop, values in self._resumed(_cut(model, outputs, self._available())[0], outputs, folder):
            yield stop, values

    def _available(self) -> dict[str, np.dtype]:
        return {name: values[0].dtype for name, values in self.kept.items()}

    def _resumed(self, cut: onnx.ModelProto, outputs: list[str],
                 folder: str | None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(batch index, samples done, values) of the cut model, fed the kept tensors it reads."""
        resumed = [i.name for i in cut.graph.input if i.name in self.kept]
        runner = Runner(cut, provider=self.provider, outputs=outputs, role=self.role, folder=folder)
        for index, (start, stop) in enumerate(self.dataset.runs(self.samples, self.batch_size)):
            feed = self.dataset.batch(start, stop)
            feed.update({name: self.kept[name][index] for name in resumed})
            yield index, stop, runner.run(feed)

    def _keep(self, new: dict[str, list[np.ndarray]], later: set[str]) -> None:
        self.kept = {name: values for name, values in {**self.kept, **new}.items() if name in later}
        if sum(v.nbytes for values in self.kept.values() for v in values) > self.max_bytes:
            self.kept, self.computed = {}, set()  # too large to keep: the next run starts from the inputs


def _read_later(model: onnx.ModelProto, computed: set[str]) -> set[str]:
    """The tensors that nodes not yet computed read (a node is known by its outputs)."""
    return {name for node in model.graph.node if not computed.issuperset(filter(None, node.output))
            for name in graphs.node_reads(node)}


def graph_of(model: onnx.ModelProto | str) -> tuple[onnx.ModelProto, str | None]:
    """(`model`, None) for a model in memory; for the path of one, (its graph without the weights, the folder
    ORT reads them from): a cut of it then holds no weights, and its session reads only those it keeps."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    return model_io.load(model, weights=False), model_io.folder_of(model)


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are `tensors`, without the nodes they do not depend on."""
    return _cut(model, tensors, {})[0]


def _cut(model: onnx.ModelProto, tensors: list[str], available: dict) -> tuple[onnx.ModelProto, set[str]]:
    """(`model` cut to compute `tensors`, the outputs of the nodes it runs); the tensors of `available`
    ({name: dtype}) become inputs, not computed again."""
    producer = {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}
    kept: set[int] = set()
    needed = set(tensors)
    inputs: list[str] = []
    pending = list(needed)  # walked back from the tensors wanted, each node once
    while pending:
        name = pending.pop()
        if name in available:
            inputs.append(name)
            continue
        index = producer.get(name)
        if index is None or index in kept:
            continue
        kept.add(index)
        reads = graphs.node_reads(model.graph.node[index])
        needed.update(reads)
        pending.extend(reads)
    cut = onnx.ModelProto()  # copied field by field: a CopyFrom and a filter held the weights three times
    model_io.copy_fields(model, cut, skip="graph")
    model_io.copy_fields(model.graph, cut.graph, skip=("node", "initializer"))
    cut.graph.node.extend(node for index, node in enumerate(model.graph.node) if index in kept)
    cut.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    resumed = set(inputs)
    kept_info = [info for info in cut.graph.value_info if info.name not in resumed]
    del cut.graph.value_info[:]
    cut.graph.value_info.extend(kept_info)
    cut.graph.input.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(available[name])), None) for name in dict.fromkeys(inputs))
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(tensors))
    ran = {name for index in kept for name in model.graph.node[index].output if name}
    return cut, ran
