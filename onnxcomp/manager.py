"""PassManager: runs configured passes in order on a copy of a model and records what each did."""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph as graphs
from onnxcomp import model_io
from onnxcomp.errors import InputError, first_line
from onnxcomp.pass_base import Pass, PassContext, PassResult, PostconditionError


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict = field(default_factory=dict)
    automatic: bool = False  # run by the manager (final cleanup), not asked for by the user
    layers: list[dict] = field(default_factory=list)


class PassManager:
    """Run passes in order: requires → run → ensures, then clean up, sort and check the model.

    The input model is never modified. After the last pass, `cleanup` runs once more if any pass changed the
    graph and the pipeline did not already end with it.
    """

    def __init__(self, passes: list[Pass], *, final_cleanup: bool = True, check: bool = True):
        self.passes = list(passes)
        self.final_cleanup = final_cleanup
        self.check = check

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None, *,
            folder: str | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """The optimized model and a record of each pass. `folder` is where the weights of a model read without
        them lie (model_io.load with weights=False): the passes read each weight from there when they need it,
        and the result holds them all."""
        # The run's own context: what the manager and the passes note in it stays out of the caller's object.
        ctx = dataclasses.replace(ctx or PassContext(), input_model=model)
        # Check outputs only against a valid input: a pass is not to blame for a model the checker already rejects.
        input_error = _check_error(model)
        if input_error is not None:
            _require_runnable(model, f"onnx.checker says {input_error}", folder)
        else:  # a type error (an int64 tensor into Conv) passes the plain checker; ORT has the last word
            type_error = _type_error(model)
            if type_error is not None:
                _require_runnable(model, f"type inference says {type_error}", folder)
        check = self.check and input_error is None
        if self.check and not check:
            ctx.log.warning("the input model does not pass onnx.checker (%s); outputs are not checked either",
                            input_error)
        ctx.unused_initializers = graphs.unused_initializer_count(model)
        graph, export = self._import(model, folder)
        records: list[PassRecord] = []

        def step(current: Pass, automatic: bool) -> None:
            record = self._run_one(current, graph, ctx)
            record.automatic = automatic
            records.append(record)
            if record.modified and check:
                with graphs.weights_as_inputs(graph):
                    error = _check_error(export())
                if error:
                    raise PostconditionError(f"pass '{current.name}' produced an invalid model: {error}")

        for current in self.passes:
            step(current, automatic=False)
        modified = any(record.modified for record in records)
        if self.final_cleanup and modified and self.passes[-1].name != "cleanup":
            from onnxcomp.registry import get

            step(get("cleanup")(), automatic=True)
        if not modified:  # byte for byte the input: a no-op pipeline must not reformat the model
            if folder is not None:
                return model_io.with_weights(model, folder), records
            unchanged = onnx.ModelProto()
            unchanged.CopyFrom(model)
            return unchanged, records
        return _final_export(graph, export), records

    def _import(self, model: onnx.ModelProto, folder: str | None):
        """The graph the passes edit, and the function that exports it, without copying `model`'s weights where
        that is safe: graphsurgeon reads the weights it does not change straight from `model`'s tensors and,
        exporting, writes only their names, which are put back. import_model edits the model it imports (sparse
        and overridable initializers), and heal exports the graph itself: then the passes work on a copy."""
        inputs = {value.name for value in model.graph.input}
        overridable = model.ir_version >= 4 and any(tensor.name in inputs for tensor in model.graph.initializer)
        if model.graph.sparse_initializer or overridable or any(current.name == "heal" for current in self.passes):
            template = model if folder is None else model_io.with_weights(model, folder)
            working = onnx.ModelProto()
            working.CopyFrom(template)
            graph = graphs.import_model(working)
            return graph, lambda: graphs.export_model(graph, template)
        names = [tensor.name if tensor.HasField("name") else None for tensor in model_io.all_tensors(model)]
        graph = graphs.import_model(model, folder)

        def export() -> onnx.ModelProto:
            exported = graphs.export_model(graph, model)
            for tensor, name in zip(model_io.all_tensors(model), names):
                if name is None:
                    tensor.ClearField("name")  # a Constant's value gets an empty name, which proto2 keeps
                elif tensor.name != name:
                    tensor.name = name
            return exported

        return graph, export

    @staticmethod
    def _run_one(current: Pass, graph, ctx: PassContext) -> PassRecord:
        started = time.perf_counter()
        current.requires(graph, ctx)
        result = current.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{current.name}' returned {type(result).__name__}, not PassResult")
        if result.modified:
            # nodes only, here and in the passes: graphsurgeon's sort of the function list recurses without end on a
            # graph with subgraphs, and the decoding functions call no other function
            graph.cleanup(remove_unused_graph_inputs=False).toposort(mode="nodes")
            # the nodes and tensors a pass removed are cycles, which hold the arrays of the weights it replaced
            # until a collection: 1.2 GB after fuse-bn on a 1.2 GB model
            gc.collect()
        current.ensures(graph, ctx)
        seconds = time.perf_counter() - started
        stats = dict(result.stats)
        if not current.visits_subgraphs:
            inside = sum(len(scope.nodes) for scope in graphs.scopes(graph)[1:])
            if inside:
                stats["skipped:inside-subgraphs"] = inside
        ctx.log.info("%s: %s in %.3f s %s", current.name, "modified" if result.modified else "no change",
                     seconds, stats)
        return PassRecord(current.name, result.modified, seconds, stats, layers=list(result.layers))


def _final_export(graph: gs.Graph, export) -> onnx.ModelProto:
    """The model of `graph`, whose large weights are moved in one at a time, each array let go once copied: an
    export of the whole graph holds every weight three times at its peak (arrays, tensors, the model's copies).
    The graph is not used again."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
    from onnx_graphsurgeon.ir.tensor import LazyValues

    with graphs.weights_as_inputs(graph) as swapped:
        model = export()
        moved = {tensor.name for tensor, *_ in swapped}
        if model.ir_version >= 4:  # IR 3 lists every initializer among the inputs too
            kept = [value for value in model.graph.input if value.name not in moved]
            del model.graph.input[:]
            model.graph.input.extend(kept)
        while swapped:
            tensor, values, location = swapped.pop(0)
            del tensor.type
            tensor.to_constant(values)
            tensor.data_location = location
            if isinstance(values, LazyValues):  # the input's own tensor: copied, its name left as it was
                stored = model.graph.initializer.add()
                stored.CopyFrom(values.tensor)
                stored.name = tensor.name
            else:
                model.graph.initializer.append(OnnxExporter.export_tensor_proto(tensor))
            del values
            tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))  # lets the array go
    return model


def _require_runnable(model: onnx.ModelProto, complaint: str, folder: str | None) -> None:
    """A model the checker rejects is still a user's model if ONNX Runtime runs it; if neither takes it, it is
    bad input, said in one line before any pass trips over it."""
    from onnxcomp import runtime

    try:
        runtime.session(model, "cpu", optimization="disable", folder=folder)
    except InputError as exc:  # each names some problems more plainly than the other: say both
        raise InputError(f"the model is not valid ONNX: {complaint.rstrip('.')}; {exc}; "
                         "fix or re-export it") from None


def _type_error(model: onnx.ModelProto) -> str | None:
    """The first line of strict shape and type inference's complaint about `model`, or None."""
    try:
        onnx.shape_inference.infer_shapes(model_io.weightless(model), check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        return first_line(exc)
    return None


def _check_error(model: onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's complaint about `model`, or None when it is valid.

    The checker reads a copy without the large weights, whose payloads are checked apart: it would otherwise
    serialize and parse the whole model, two more copies of its weights (and none over 2 GB)."""
    error = model_io.payload_error(model)
    if error is not None:
        return error
    try:
        onnx.checker.check_model(model_io.weightless(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        return first_line(exc)
    return None
