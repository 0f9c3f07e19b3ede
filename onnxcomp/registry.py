"""Stable pass names → pass classes. `onnxcomp passes` lists them."""

from __future__ import annotations

from onnxcomp.errors import InputError
from onnxcomp.pass_base import Pass

_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under its `name`."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"two passes are named '{cls.name}'")
    _PASSES[cls.name] = cls
    return cls


def available() -> dict[str, type[Pass]]:
    import onnxcomp.passes  # noqa: F401 - importing the package registers every pass

    return dict(sorted(_PASSES.items()))


def get(name: str) -> type[Pass]:
    passes = available()
    if name not in passes:
        raise InputError(f"unknown pass '{name}'; valid passes: {', '.join(passes)}")
    return passes[name]
