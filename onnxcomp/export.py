"""export: a torch module to ONNX, for the pass pipeline and validation (needs onnxcomp[torch]).

    onnxcomp export models/digits_student.py:small_student --input-shape 1,1,8,8 -o student.onnx

The module comes from `package.module:factory` or `path/to/file.py:factory` (a function returning a
torch.nn.Module), with weights from a state dict when given. It is exported in eval mode with the TorchScript
exporter (the newer exporter needs onnxscript) and a free batch axis. By default torch folds each
BatchNormalization that follows a convolution into it; `keep_batchnorm` keeps them as nodes (no constant
folding), for a graph that mirrors the module, or to let onnxcomp's exact fuse-bn do it and report it.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from pathlib import Path

import onnx

from onnxcomp import model_io
from onnxcomp.errors import InputError, first_line


def require_torch(purpose: str):
    """torch, or an input error that says which command needs it and how to install it."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{purpose} needs PyTorch, which is not installed: pip install 'onnxcomp[torch]' "
                         "(the CPU build: pip install torch==2.13.0)") from None
    return torch


def load_factory(text: str, what: str = "--student"):
    """The torch.nn.Module that `module:factory` or `file.py:factory` builds."""
    where, colon, factory = str(text).rpartition(":")
    if not colon or not where or not factory:
        raise InputError(f"{what} {text}: give module:factory or file.py:factory")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"{what} {text}: {path} not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise InputError(f"{what} {text}: cannot import {where} ({exc})") from None
    make = getattr(module, factory, None)
    if not callable(make):
        raise InputError(f"{what} {text}: {where} has no function {factory}")
    built = make()
    import torch

    if not isinstance(built, torch.nn.Module):
        raise InputError(f"{what} {text}: {factory}() returned {type(built).__name__}, not a torch.nn.Module")
    return built


def to_onnx(module, examples: tuple, input_names: list[str], output_names: list[str], *, opset: int = 17,
            keep_batchnorm: bool = False, free_axes: dict[str, dict[int, str]] | None = None) -> onnx.ModelProto:
    """`module` (eval mode) exported with a free batch axis on every input and output, and the further free axes
    `free_axes` names ({tensor name: {axis: dimension name}}, such as a token sequence's length)."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    axes = {name: {0: "N", **(free_axes or {}).get(name, {})} for name in input_names + output_names}
    torch.onnx.export(module, examples, buffer, input_names=input_names, output_names=output_names, dynamo=False,
                      opset_version=opset, do_constant_folding=not keep_batchnorm,
                      training=torch.onnx.TrainingMode.EVAL, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def export(factory: str, input_shape: list[int], output: str | Path, *, weights: str | Path | None = None,
           input_name: str = "input", output_name: str = "output", opset: int = 17,
           keep_batchnorm: bool = False) -> onnx.ModelProto:
    """Build the module, load `weights` (a state dict file) when given, export it and write `output`."""
    torch = require_torch("export")
    if not input_shape or any(d < 1 for d in input_shape):
        raise InputError(f"input_shape= needs positive dimensions, e.g. 1,3,224,224; got {input_shape}")
    module = load_factory(factory, "export")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except FileNotFoundError:
            raise InputError(f"{weights}: weights file not found") from None
        except (RuntimeError, TypeError, ValueError, OSError) as exc:
            first = first_line(exc)
            raise InputError(f"{weights}: not a state dict for this module ({first})") from None
    example = torch.zeros(*input_shape)
    try:
        model = to_onnx(module, (example,), [input_name], [output_name], opset=opset, keep_batchnorm=keep_batchnorm)
    except RuntimeError as exc:
        first = first_line(exc)
        raise InputError(f"export {factory}: torch could not export it with input shape {input_shape} ({first})") \
            from None
    model_io.save(model, output)
    return model
