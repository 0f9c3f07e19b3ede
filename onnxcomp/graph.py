"""Small helpers over onnx-graphsurgeon graphs.

graphsurgeon names edges from the tensor's point of view: `tensor.inputs` are the nodes that produce it and
`tensor.outputs` the nodes that consume it. These helpers say what they mean instead.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcomp import model_io, runtime
from onnxcomp.errors import first_line


def import_model(model: onnx.ModelProto, folder: str | None = None) -> gs.Graph:
    """A graphsurgeon graph of `model` (which this may edit: pass a copy).

    From IR 4 on, an initializer that is also a graph input is a default the caller may override: it enters
    the graph as a plain input, so no pass folds it as a constant. `export_model` gives it back its value.
    `folder` is where the external data of a model read without its weights lies (model_io.load with
    weights=False): each such constant is read from there when a pass asks for it, never all at once.
    """
    _densify_sparse_initializers(model)
    overridable = _overridable_initializers(model) if model.ir_version >= 4 else set()
    if overridable:  # rebuilding the list copies every weight: only when there is something to take out
        kept = [t for t in model.graph.initializer if t.name not in overridable]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    graph = gs.import_onnx(model)
    if folder is not None:
        for constant in constant_tensors(graph):
            lazy = constant._values
            if isinstance(lazy, LazyValues) and lazy.tensor.data_location == onnx.TensorProto.EXTERNAL:
                constant._values = StoredValues(lazy.tensor, folder)
                constant.data_location = None  # graphsurgeon would write it into an export of changed values
    return graph


class StoredValues(LazyValues):
    """The values of a constant that lie in a file (external data, or a model file's own bytes), read on each
    use: `load()` gives the array, `tensor` a TensorProto holding the values (what graphsurgeon exports). The
    weights a pass leaves alone are thus never all in memory at once, however large the model."""

    def __init__(self, reference: onnx.TensorProto, folder: str):
        stated = LazyValues(reference)  # its shape and type, without reading `tensor`
        self.reference, self.folder = reference, folder
        self.shape, self.dtype, self.nbytes = stated.shape, stated.dtype, stated.nbytes
        # the file as the run found it: rewritten in place meanwhile, it would mix new weights into the old graph
        self.stamp = model_io.data_stamp(reference, folder)

    @property
    def tensor(self) -> onnx.TensorProto:
        return model_io.read_tensor(self.reference, self.folder, self.stamp)

    @tensor.setter
    def tensor(self, reference: onnx.TensorProto) -> None:
        self.reference = reference

    def load(self) -> np.ndarray:
        return np.array(model_io.tensor_array(self.reference, self.folder, self.stamp))


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` keeping the model-level fields of `template` that graphsurgeon does not carry."""
    model = gs.export_onnx(graph, do_type_check=False)
    # a pass may have raised the opset (int8 needs 13), which may need a newer IR version too
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(template.ir_version, needed)
    model.doc_string = template.doc_string
    model.domain = template.domain
    model.model_version = template.model_version
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    # graphsurgeon exports the functions passes defined (the decoders of compact weights); keep the template's
    # others, and drop those no node calls any longer (decoders whose weights a later pass folded)
    defined = {(f.domain, f.name) for f in model.functions}
    functions = list(model.functions) + [f for f in template.functions if (f.domain, f.name) not in defined]
    called = _called_functions(model.graph, functions)
    del model.functions[:]
    model.functions.extend(f for f in functions if (f.domain, f.name) in called)
    custom = {f.domain for f in functions} - {f.domain for f in model.functions}
    used = {node.domain for node in model.graph.node}
    kept_imports = [o for o in model.opset_import if o.domain not in custom or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept_imports)
    if model.functions:
        model.ir_version = max(model.ir_version, 8)  # model-local functions came with IR 8
    inputs = {value.name for value in model.graph.input}
    if template.ir_version >= 4:
        overridable = _overridable_initializers(template)
        model.graph.initializer.extend(t for t in template.graph.initializer
                                       if t.name in overridable and t.name in inputs)
    elif model.ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input too
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name not in inputs)
    return model


def _called_functions(graph: onnx.GraphProto, functions: list[onnx.FunctionProto]) -> set[tuple[str, str]]:
    """(domain, name) of the functions that `graph` (with its subgraphs) calls, directly or through others."""
    bodies = {(f.domain, f.name): f for f in functions}
    called: set[tuple[str, str]] = set()
    pending = [list(graph.node)]
    while pending:
        for node in pending.pop():
            key = (node.domain, node.op_type)
            if key in bodies and key not in called:
                called.add(key)
                pending.append(list(bodies[key].node))
            pending.extend(list(subgraph.node) for subgraph in node_subgraphs(node))
    return called


def upgrade_opset(graph: gs.Graph, opset: int) -> None:
    """Convert `graph` in place to `opset` of the default domain with ONNX's version converter."""
    from onnx import version_converter

    model = gs.export_onnx(graph, do_type_check=False)
    # graphsurgeon does not list initializers as inputs, which IR 3 requires; IR 4 does not
    model.ir_version = max(model.ir_version, 4)
    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain RuntimeErrors
        from onnxcomp.pass_base import PreconditionError

        raise PreconditionError(f"cannot convert the model from opset {graph.opset} to {opset}: "
                                f"{first_line(exc)}") from None
    upgraded = gs.import_onnx(converted)
    graph.nodes, graph.inputs, graph.outputs = upgraded.nodes, upgraded.inputs, upgraded.outputs
    graph.opset = opset
    graph.import_domains = upgraded.import_domains


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold: If branches, Loop and Scan bodies."""
    return [g for a in node.attribute for g in list(a.graphs) + ([a.g] if a.HasField("g") else [])]


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph`, then those of the subgraphs its nodes hold, nested ones included."""
    for node in graph.node:
        yield node
        for subgraph in node_subgraphs(node):
            yield from all_nodes(subgraph)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, a subgraph's reads from the outer graph included."""
    return list(node.input) + [name for subgraph in node_subgraphs(node)
                               for inner in all_nodes(subgraph) for name in inner.input]


def unused_initializer_count(model: onnx.ModelProto) -> int:
    """Initializers no node (in any subgraph) or graph output reads, leaving out overridable ones."""
    read = {value.name for value in model.graph.output}
    for node in all_nodes(model.graph):
        read.update(node.input)
    inputs = {value.name for value in model.graph.input}
    return sum(t.name not in read and t.name not in inputs for t in model.graph.initializer)


def _densify_sparse_initializers(model: onnx.ModelProto) -> None:
    """Store sparse initializers densely: graphsurgeon drops them, and ONNX Runtime densifies them at load."""
    for sparse in model.graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices)
        dims = tuple(sparse.dims)
        dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        dense[flat] = values
        model.graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
    del model.graph.sparse_initializer[:]


def _overridable_initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer} & {value.name for value in model.graph.input}


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for graph inputs and initializers."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor`."""
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(tensor is out for out in graph.outputs)


def constant_value(tensor: gs.Tensor, *, keep: bool = True) -> np.ndarray | None:
    """The value of a tensor known before inference: an initializer or the output of a Constant node.

    Returns None when the value depends on inputs. Weights live in Constant nodes in some exporters (Paddle).
    `keep=False` reads a weight still in the input model without keeping the array in the graph, for a pass
    that replaces it: kept, the arrays of the replaced weights stayed in memory until the pass ended.
    """
    if isinstance(tensor, gs.Constant):
        lazy = tensor._values  # .values would load it and keep the array
        if not keep and isinstance(lazy, LazyValues):
            return np.asarray(lazy.load())
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is None or node.op != "Constant" or not is_standard(node):
        return None
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else numpy_helper.to_array(value))
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None  # sparse_value and string values are not weights we rewrite


class Names:
    """Fresh tensor and node names for one pass run: the names in use are collected once, not per call."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        self.tried: dict[str, int] = {}  # base → last suffix tried: many names from one base stay linear
        for scope in scopes(graph):  # subgraphs see outer names
            self.taken.update(scope.tensors().keys())
            self.taken.update(node.name for node in scope.nodes)

    def new(self, base: str) -> str:
        candidate, index = base, self.tried.get(base, 0)
        if index:
            candidate = f"{base}_{index}"
        while candidate in self.taken:
            index += 1
            candidate = f"{base}_{index}"
        self.tried[base] = index
        self.taken.add(candidate)
        return candidate

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new initializer; never reuses a tensor another node may share."""
        return gs.Constant(self.new(base), np.array(values, order="C"))  # keeps 0-d scalars 0-d


def digest(graph: gs.Graph) -> str:
    """A digest of the graph with its weights: two graphs that compute the same way give the same digest."""
    return hashlib.sha1(gs.export_onnx(graph).SerializeToString(deterministic=True)).hexdigest()


def is_standard(node: gs.Node) -> bool:
    """True for operators of the default ONNX domain."""
    return node.domain in (None, "", "ai.onnx")


def weight_initializers(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Initializers (gs.Constant tensors) of the main graph by name."""
    return {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def scopes(graph: gs.Graph) -> list[gs.Graph]:
    """`graph` and every subgraph in it (If branches, Loop and Scan bodies), nested ones included."""
    return [graph] + list(graph.subgraphs(recursive=True))


def constant_tensors(graph: gs.Graph) -> list[gs.Constant]:
    """Every constant tensor the model holds, once each: initializers and Constant node values, subgraphs
    included."""
    found: dict[int, gs.Constant] = {}
    for scope in scopes(graph):
        for tensor in scope.tensors().values():
            if isinstance(tensor, gs.Constant):
                found.setdefault(id(tensor), tensor)
        for node in scope.nodes:
            value = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(value, gs.Constant):
                found.setdefault(id(value), value)
    return list(found.values())


@contextmanager
def weights_as_inputs(graph: gs.Graph):
    """Within the block, the graph's large constants are graph inputs of their type and shape: an export of the
    graph then holds no copy of its weights, which is all onnx.checker and shape inference need."""
    swapped = [(tensor, tensor._values, tensor.data_location)  # _values, as .values would load them
               for tensor in graph.tensors().values()
               if isinstance(tensor, gs.Constant) and _nbytes(tensor) >= model_io.EXTERNAL_TENSOR_BYTES]
    inputs = list(graph.inputs)
    for tensor, *_ in swapped:
        tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
        tensor.type = "tensor_type"  # what Variable() sets and to_variable() leaves out
    graph.inputs.extend(tensor for tensor, *_ in swapped)
    try:
        yield swapped  # what the block takes out of this list stays a graph input
    finally:
        graph.inputs = inputs
        for tensor, values, location in swapped:
            del tensor.type
            tensor.to_constant(values)
            tensor.data_location = location


@contextmanager
def runnable(graph: gs.Graph) -> Iterator[onnx.ModelProto | str]:
    """The model of `graph` as runner.Runner takes it, for the block: an export when its weights are small,
    else a file in a temporary folder, its weights written one at a time straight from the graph (an export
    would hold them all once more, and ORT's session built from it a third time). The graph may change in the
    block; the model does not."""
    if not _worth_a_file(graph):
        yield gs.export_onnx(graph, do_type_check=False)
        return
    with weights_as_inputs(graph) as swapped:
        skeleton = gs.export_onnx(graph, do_type_check=False)
        stored = [(tensor.name, values) for tensor, values, _ in swapped]
        del swapped
    moved = {name for name, _ in stored}
    # IR 3 lists every initializer among the inputs too, and a cut of the model that drops an initializer would
    # keep its input: the temporary model says IR 4, which states the same model without them.
    skeleton.ir_version = max(skeleton.ir_version, 4)
    kept = [value for value in skeleton.graph.input if value.name not in moved]
    del skeleton.graph.input[:]
    skeleton.graph.input.extend(kept)

    def written() -> Iterator[tuple[onnx.TensorProto, bytes | memoryview]]:
        while stored:  # each let go once written: the block may replace the graph's weights
            yield _stored_tensor(*stored.pop(0))

    with model_io.on_disk(skeleton, written()) as path:
        yield path


def _worth_a_file(graph: gs.Graph) -> bool:
    """Whether the graph's large constants (kept out of an export by weights_as_inputs) pass
    runtime.ON_DISK_BYTES and can all go to external data (strings cannot)."""
    large = [t for t in graph.tensors().values()
             if isinstance(t, gs.Constant) and _nbytes(t) >= model_io.EXTERNAL_TENSOR_BYTES]
    return sum(_nbytes(t) for t in large) > runtime.ON_DISK_BYTES and not any(_is_text(t) for t in large)


def _is_text(tensor: gs.Constant) -> bool:
    """Whether a constant holds strings, which ONNX does not keep in external data."""
    try:
        return np.dtype(tensor.dtype).kind in "OSU"
    except TypeError:
        return False


def _stored_tensor(name: str, values) -> tuple[onnx.TensorProto, bytes | memoryview]:
    """(a TensorProto stating the name, type and shape of a constant's values, the bytes of its values)."""
    tensor = values.tensor if isinstance(values, LazyValues) else None  # read once: StoredValues reads a file
    if tensor is not None and not tensor.HasField("raw_data"):
        values = values.load()  # float_data and the like: numbers, not bytes to copy
    elif tensor is not None:
        header, data = model_io.tensor_weight(tensor)
        header.name = name
        return header, data
    return model_io.array_weight(name, values)


def _nbytes(tensor: gs.Constant) -> int:
    try:
        return math.prod(tensor.shape) * np.dtype(tensor.dtype).itemsize
    except TypeError:  # a type numpy lacks (bfloat16 and others): count one byte an element
        return math.prod(tensor.shape)


def inferred_types(graph: gs.Graph) -> dict[str, onnx.TypeProto]:
    """{tensor name: type} from ONNX shape inference, for the graph's tensors and outputs; empty where inference
    fails. The graph is exported without its weights (weights_as_inputs): inferring on a full export of a 1.2 GB
    model took 5 GB."""
    with weights_as_inputs(graph):
        model = gs.export_onnx(graph, do_type_check=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help; what it cannot type stays unknown
        return {}
    return {value.name: value.type for value in list(inferred.graph.value_info) + list(inferred.graph.output)}


def inferred_rank(tensor: gs.Tensor, types: dict[str, onnx.TypeProto]) -> int | None:
    """The rank of `tensor`, stated in the model or else inferred."""
    if tensor.shape is not None:
        return len(tensor.shape)
    value = types.get(tensor.name)
    if value is None or not value.HasField("tensor_type") or not value.tensor_type.HasField("shape"):
        return None
    return len(value.tensor_type.shape.dim)
