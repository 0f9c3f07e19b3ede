"""Recipes: which passes to run, with which options.

On the command line: `fuse-bn,prune:sparsity=0.5,granularity=tensor,share:bits=5`. A comma starts a new pass,
unless the next item is `key=value`, which adds an option to the pass before it. List options separate their
items with `|`.

A named recipe stands for its passes (see RECIPES): `deep-compression,int8` is the Deep Compression pipeline
followed by int8. A named recipe takes no options; to change one, write its passes out. `--recipe NAME` takes a
named recipe as well as a TOML file.

A pass's strength (STRENGTHS: prune's sparsity, or its flops with structure=channel; share's bits) is free when
the user did not write it: the pass is named alone, or comes from a named recipe, whose strengths are defaults.
An accuracy budget searches the free strengths (onnxcomp/search.py); `free_strengths` says which they are.

In a TOML file, a list of tables:

    [[pass]]
    name = "fuse-bn"

    [[pass]]
    name = "prune"
    sparsity = 0.5
"""

from __future__ import annotations

import sys
from pathlib import Path

from onnxcomp import registry
from onnxcomp.errors import InputError
from onnxcomp.pass_base import Pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


RECIPES = {
    # Han et al. 2015 without retraining: exact BN folding, then pruning, then weight sharing; the prune mask
    # and the codebook indices are stored packed, decoded by ONNX Runtime when it creates the session.
    # 30 % and 5 bits keep both shared real models within about a point of fp32 post-training (benchmarks/);
    # smaller files need retraining, or a model known to take them (ResNet-20: 40 % and 3 bits, −0.93, 10.14×).
    # min-size=0: the allocation gives the small first and last layers the bits they need (ResNet-20's go to
    # 5–6), instead of leaving them dense; short-names last, as the names are then most of what is left.
    "deep-compression": "fold-constants,fuse-bn,prune:sparsity=0.3,share:bits=5,min-size=0,short-names",
}


# The option that sets how much a pass compresses; a budget search chooses it when the user left it free.
STRENGTHS = {"prune": "sparsity", "share": "bits", "int8": "float_layers"}


def _strength(name: str, options: dict) -> str | None:
    """The pass's strength option: STRENGTHS, but for prune:structure=channel the share of FLOPs it keeps
    (`flops`), unless a latency target fixes how far it goes."""
    if name == "prune" and str(_option(options, "structure")) == "channel":
        return None if _option(options, "latency") is not None else "flops"
    return STRENGTHS.get(name)


def parse(text: str) -> list[Pass]:
    """Turn `name[:key=value[,key=value]][,name...]` into configured passes."""
    specs = _specs(text)
    if not specs:
        raise InputError("the recipe names no pass; see `onnxcomp passes` for the list")
    return [registry.get(name).from_options(options) for name, options, _ in specs]


def load(recipe: str | Path) -> list[Pass]:
    """A named recipe (RECIPES) or a TOML recipe file."""
    return parse(str(recipe)) if _is_named(recipe) else load_toml(recipe)


def _is_named(recipe: str | Path) -> bool:
    """A recipe name, unless a file of that name lies in the working folder (then the file is meant)."""
    return str(recipe) in RECIPES and not Path(recipe).is_file()


def free_strengths(text: str | None = None, recipe: str | Path | None = None) -> dict[int, str]:
    """{position in the pipeline: option} of the passes whose strength (STRENGTHS) the user left free, for a
    recipe string, or a recipe (name or TOML file) as `load` reads it."""
    if recipe is not None and not _is_named(recipe):
        entries = [(entry["name"], entry, False) for entry in _toml_entries(Path(recipe))]
    else:
        entries = _specs(str(recipe) if recipe is not None else text or "")
    strengths = {position: (_strength(name, options), options, from_recipe)
                 for position, (name, options, from_recipe) in enumerate(entries)}
    return {position: strength for position, (strength, options, from_recipe) in strengths.items()
            if strength is not None and (from_recipe or _option(options, strength) is None)}


def _option(options: dict, key: str):
    """An option's value whichever way it was spelled (`min-size` or `min_size`)."""
    return next((value for name, value in options.items() if name.replace("-", "_") == key), None)


def _specs(text: str) -> list[tuple[str, dict[str, str], bool]]:
    """(pass name, options, whether a named recipe gave it) for each pass of a recipe string."""
    specs: list[tuple[str, dict[str, str], bool]] = []
    after_recipe = None  # the named recipe the previous item expanded, which takes no options
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, first_option = item.partition(":")
        name = name.strip()
        if "=" in name:  # `key=value` continues the previous pass's options
            if not specs:
                raise InputError(f"recipe '{text}': option '{item}' comes before any pass name")
            if after_recipe:
                raise _recipe_options(after_recipe)
            key, _, value = item.partition("=")
            specs[-1][1][key.strip()] = value.strip()
            continue
        if name in RECIPES:
            if first_option:
                raise _recipe_options(name)
            specs.extend((inner, options, True) for inner, options, _ in _specs(RECIPES[name]))
            after_recipe = name
            continue
        after_recipe = None
        options: dict[str, str] = {}
        if first_option:
            key, equals, value = first_option.partition("=")
            if not equals:
                raise InputError(f"recipe '{text}': option '{first_option}' of '{name}' needs the form key=value")
            options[key.strip()] = value.strip()
        specs.append((name, options, False))
    return specs


def _recipe_options(name: str) -> InputError:
    return InputError(f"recipe '{name}' takes no options; write its passes out instead: {RECIPES[name]}")


def load_toml(path: str | Path) -> list[Pass]:
    """Read a TOML recipe file (see the module docstring)."""
    path = Path(path)
    passes = []
    for entry in _toml_entries(path):
        options = dict(entry)
        passes.append(registry.get(options.pop("name")).from_options(options))
    return passes


def _toml_entries(path: Path) -> list[dict]:
    """The [[pass]] tables of a TOML recipe file, each with a name."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found; give a TOML file or a named recipe "
                         f"({', '.join(RECIPES)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the recipe ({exc.strerror or exc}); give a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid TOML recipe ({exc})") from None
    entries = document.get("pass")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: a recipe needs one or more [[pass]] tables, each with a name")
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: a recipe needs one or more [[pass]] tables, each with a name")
        if not isinstance(entry.get("name"), str):
            raise InputError(f"{path}: [[pass]] number {position} has no name")
    return entries
