"""The pass contract: every graph transformation is a `Pass` with a frozen `Config`.

A pass edits an onnx-graphsurgeon graph in place and returns a `PassResult`. It does no file I/O and keeps no
state on itself between runs, so one configured pass can run on many models. The `PassManager` clones the input,
cleans up and checks the model after each modifying pass.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxcomp.errors import InputError, OnnxcompError


class PreconditionError(OnnxcompError):
    """The graph is not one this pass can work on; the message says why, in a user's words."""


class PostconditionError(OnnxcompError):
    """A pass broke its own promise about the graph it returned: a bug in the pass, not in the input."""

    exit_code = 3


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, int | float | str] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # one row per layer the pass changed, when it says more


@dataclass
class PassContext:
    """What a pass may read besides the graph: data for calibration, and where to log."""

    calibration_data: Any = None  # onnxcomp.data.Dataset or None
    provider: str = "cpu"
    seed: int = 0
    max_accuracy_drop: float | None = None  # points; passes with an accuracy-aware mode aim for it
    input_model: Any = None  # the onnx.ModelProto the pipeline started from (heal's teacher); set by PassManager
    # Initializers of the input model that nothing reads: the import already dropped them, cleanup reports them.
    unused_initializers: int = 0
    # What a pass measured on its input, for a budget search that runs the pass again on the same input at
    # another strength (int8's layer order); None outside a search.
    memo: dict | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxcomp"))


@dataclass(frozen=True)
class NoOptions:
    """This pass has no options."""


class Pass(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type] = NoOptions
    # Whether the pass works inside subgraphs (If branches, Loop bodies); the manager reports the nodes left
    # there by the passes that do not.
    visits_subgraphs: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: dict[str, str | int | float | bool | list]) -> "Pass":
        """Build the pass from textual or TOML options, converting each to its declared type."""
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        hints = typing.get_type_hints(cls.Config)
        values = {}
        for key, raw in options.items():
            key_name = key.replace("-", "_")
            if key_name not in fields:
                valid = ", ".join(f.replace("_", "-") for f in fields) or "none"
                raise InputError(f"pass '{cls.name}' has no option '{key}'; valid options: {valid}")
            values[key_name] = _convert(cls.name, key, raw, hints[key_name])
        try:
            return cls(cls.Config(**values))
        except ValueError as exc:
            raise InputError(f"pass '{cls.name}': {exc}") from None

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PreconditionError when the pass cannot run on this graph."""

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Transform `graph` in place."""

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PostconditionError when the transformed graph breaks the pass's promise."""

    def describe(self) -> str:
        options = [f"{f.name.replace('_', '-')}={getattr(self.config, f.name)}"
                   for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != f.default]
        return self.name + (":" + ",".join(options) if options else "")


def _convert(pass_name: str, key: str, raw: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # `float | None`: an optional value given as text
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split("|") if s]
            (item_kind, *_rest) = typing.get_args(kind)
            return tuple(_convert(pass_name, key, item, item_kind) for item in items)
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError):
        type_name = getattr(kind, "__name__", str(kind))
        raise InputError(f"pass '{pass_name}': option '{key}' must be {type_name}, got '{raw}'") from None
