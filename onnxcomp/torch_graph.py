"""An ONNX graph run by torch operators, so that its weights can be trained (distill, heal).

The weights and biases of Conv, ConvTranspose, Gemm and MatMul, and the scale and shift of BatchNormalization,
become torch parameters under their ONNX initializer names; the other initializers are buffers. `forward`
evaluates the nodes in graph order with torch functions. `weights()` gives the trained values back by name,
to be written into the same ONNX graph: the model that comes out has exactly the structure that went in, which
a converter to torch modules and an exporter back would not promise.

BatchNormalization runs in inference form (its running statistics are constants): training a deployed graph
keeps its normalisation as it was exported. Operators outside OPS are an error that names them.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnxcomp.errors import InputError

TRAINABLE_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
                    "BatchNormalization": (1, 2)}


class OnnxModule(torch.nn.Module):
    """`model`'s main graph as a torch module: forward(*inputs) returns the graph's outputs as a tuple."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unsupported:
            raise InputError(f"operators {', '.join(unsupported)} cannot be trained here yet; supported: "
                             f"{', '.join(sorted(OPS))}")
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        trainable = {node.input[i] for node in graph.node for i in TRAINABLE_INPUTS.get(node.op_type, ())
                     if i < len(node.input) and node.input[i] in initializers
                     and initializers[node.input[i]].dtype.kind == "f"}
        self.slots: dict[str, str] = {}  # ONNX name → attribute name (ONNX names may contain dots)
        self.parameters_by_name = torch.nn.ParameterDict()
        for index, (name, value) in enumerate(initializers.items()):
            slot = f"t{index}"
            self.slots[name] = slot
            tensor = torch.from_numpy(np.array(value, copy=True))
            if name in trainable:
                self.parameters_by_name[slot] = torch.nn.Parameter(tensor)
            else:
                self.register_buffer(slot, tensor, persistent=False)
        self.nodes = [(n.op_type, list(n.input), list(n.output),
                       {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in graph.node]
        overridable = set(initializers)
        self.input_names = [v.name for v in graph.input if v.name not in overridable]
        self.output_names = [v.name for v in graph.output]
        self.trainable_names = [name for name in initializers if name in trainable]
        self.derived: dict[str, object] = {}  # name → function computing the tensor from other parameters
        self.extra = torch.nn.ParameterDict()  # the parameters those functions read

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.derived:
            return self.derived[name]()
        slot = self.slots[name]
        return self.parameters_by_name[slot] if slot in self.parameters_by_name else getattr(self, slot)

    def add_parameter(self, value: np.ndarray) -> torch.nn.Parameter:
        """A new trainable tensor, for `derive` functions to read."""
        parameter = torch.nn.Parameter(torch.from_numpy(np.array(value)))
        self.extra[f"p{len(self.extra)}"] = parameter
        return parameter

    def add_buffer(self, value: np.ndarray):
        """A new fixed tensor, for `derive` functions to read: returns the function that gives it. `.to()` moves
        it with the module once, and replaces it, so it is read through the module each time."""
        slot = f"f{len(list(self.buffers(recurse=False)))}"
        self.register_buffer(slot, torch.from_numpy(np.ascontiguousarray(value)), persistent=False)
        return lambda: getattr(self, slot)

    def derive(self, name: str, compute) -> None:
        """Compute tensor `name` with `compute()` at every use (a weight tied to shared values or a mask), so
        that its gradients reach the parameters `compute` reads."""
        self.derived[name] = compute

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the graph takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        values: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for op, names, outputs, attrs in self.nodes:
            args = [None if not name else values[name] if name in values else self.tensor(name) for name in names]
            result = OPS[op](args, attrs)
            for name, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                values[name] = value
        return tuple(values[name] for name in self.output_names)

    def weights(self) -> dict[str, np.ndarray]:
        """The trainable tensors' current values by ONNX name."""
        return {name: self.tensor(name).detach().cpu().numpy().copy() for name in self.trainable_names}


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the named initializers replaced (same dtype and shape)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in weights:
            value = np.asarray(weights[tensor.name]).astype(numpy_helper.to_array(tensor).dtype)
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return result


# ---------------------------------------------------------------------------------------------- operators

def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def _pads_for(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int], attrs: dict) -> list:
    """ONNX pads [begin..., end...] for a window op, from `pads` or `auto_pad`."""
    spatial = x.shape[2:]
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                 for size, k, s, d in zip(spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        large = [t - t // 2 for t in total]
        return (small + large) if auto == "SAME_UPPER" else (large + small)
    if auto == "VALID":
        return [0] * (2 * len(spatial))
    return list(attrs.get("pads", [0] * (2 * len(spatial))))


def _padded(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """(x padded where begin and end pads differ, the symmetric pads left for the op itself)."""
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if begin == end:
        return x, begin
    torch_pads = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), [0] * rank


def _conv(args, attrs):
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    rank = weight.dim() - 2
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    x, pads = _padded(x, _pads_for(x, kernel, strides, dilations, attrs))
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return conv(x, weight, bias, strides, pads, dilations, int(attrs.get("group", 1)))


def _conv_transpose(args, attrs):
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    rank = weight.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:] or "output_shape" in attrs or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise InputError("ConvTranspose with asymmetric pads, auto_pad or output_shape cannot be trained here yet")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    return conv(x, weight, bias, list(attrs.get("strides", [1] * rank)), pads[:rank],
                list(attrs.get("output_padding", [0] * rank)), int(attrs.get("group", 1)),
                list(attrs.get("dilations", [1] * rank)))


def _gemm(args, attrs):
    a, b = args[0], args[1]
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    result = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        result = result + attrs.get("beta", 1.0) * args[2]
    return result


def _pool(args, attrs, kind: str):
    x = args[0]
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    ceil = bool(attrs.get("ceil_mode", 0))
    pads = _pads_for(x, kernel, strides, dilations, attrs)
    if kind == "max":
        x, pads = _padded(x, pads, value=-math.inf)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return pool(x, kernel, strides, pads, dilations, ceil)
    include = bool(attrs.get("count_include_pad", 0))
    if include:  # padding that counts: pad explicitly
        x, pads = _padded(x, pads)
    elif pads[:rank] != pads[rank:]:
        raise InputError("AveragePool with asymmetric pads that exclude padding cannot be trained here yet")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return pool(x, kernel, strides, pads[:rank], ceil, include)


def _clip(args, attrs):
    low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    return torch.clamp(args[0], min=None if low is None else float(low), max=None if high is None else float(high))


def _flatten(args, attrs):
    x = args[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(args, attrs):
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(args, attrs, position: int = 1) -> list[int] | None:
    if len(args) > position and args[position] is not None:
        return _ints(args[position])
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(args, attrs):
    axes = _axes(args, attrs)
    x = args[0]
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(args, attrs):
    x = args[0]
    rank = x.dim() + len(_axes(args, attrs))
    for axis in sorted(a % rank for a in _axes(args, attrs)):
        x = x.unsqueeze(axis)
    return x


def _pad(args, attrs):
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    x = args[0]
    pads = _ints(args[1]) if len(args) > 1 else list(attrs["pads"])
    value = float(args[2]) if len(args) > 2 and args[2] is not None and args[2].numel() else float(attrs.get("value", 0.0))
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(x.dim()))
    full_begin, full_end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        full_begin[axis % x.dim()], full_end[axis % x.dim()] = pads[i], pads[i + len(axes)]
    torch_pads = []
    for b, e in zip(reversed(full_begin), reversed(full_end)):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, mode={"edge": "replicate"}.get(mode, mode), value=value if mode == "constant" else None)


def _slice(args, attrs):
    x = args[0]
    starts, ends = _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 0:
            raise InputError("Slice with negative steps cannot be trained here yet")
        size = x.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return x[tuple(index)]


def _reduce_mean(args, attrs):
    axes = _axes(args, attrs)
    keep = bool(attrs.get("keepdims", 1))
    return args[0].mean(dim=axes, keepdim=keep) if axes else args[0].mean(dim=None).reshape([1] * args[0].dim() if keep else [])


def _constant(args, attrs):
    if "value" in attrs:
        return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.array(attrs[key], dtype=dtype))
    raise InputError("Constant without a numeric value cannot be trained here")


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda a, _: torch.matmul(a[0], a[1]),
    "Add": lambda a, _: a[0] + a[1],
    "Sub": lambda a, _: a[0] - a[1],
    "Mul": lambda a, _: a[0] * a[1],
    "Div": lambda a, _: a[0] / a[1],
    "Relu": lambda a, _: F.relu(a[0]),
    "LeakyRelu": lambda a, attrs: F.leaky_relu(a[0], attrs.get("alpha", 0.01)),
    "Sigmoid": lambda a, _: torch.sigmoid(a[0]),
    "Tanh": lambda a, _: torch.tanh(a[0]),
    "HardSigmoid": lambda a, attrs: torch.clamp(attrs.get("alpha", 0.2) * a[0] + attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda a, _: F.hardswish(a[0]),
    "Clip": _clip,
    "BatchNormalization": lambda a, attrs: F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0,
                                                        attrs.get("epsilon", 1e-5)),
    "MaxPool": lambda a, attrs: _pool(a, attrs, "max"),
    "AveragePool": lambda a, attrs: _pool(a, attrs, "average"),
    "GlobalAveragePool": lambda a, _: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda a, _: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, attrs: a[0].permute(*(attrs.get("perm") or reversed(range(a[0].dim())))),
    "Concat": lambda a, attrs: torch.cat([t for t in a if t is not None], dim=attrs["axis"]),
    "Softmax": lambda a, attrs: torch.softmax(a[0], dim=attrs.get("axis", -1)),
    "Identity": lambda a, _: a[0],
    "Dropout": lambda a, _: a[0],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "ReduceMean": _reduce_mean,
    "Pad": _pad,
    "Slice": _slice,
    "Constant": _constant,
}
