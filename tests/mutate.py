"""Mutation check: break one named feature at a time on purpose and see whether its tests notice.

    .venv/bin/python tests/mutate.py [--only NAME,NAME] [--list]      (or: make mutate)

Each mutant is a source edit (an exact snippet and its replacement) applied to a copy of the project in a
temporary folder, never to the working tree; the tests that guard the feature then run against that copy. A
mutant the tests do not fail on "survived": the feature can break without the suite saying so. A snippet that
no longer occurs exactly once is reported as "stale" (the code moved on; update the mutant), not counted.
Run outside CI: each mutant costs a pytest run. Prints one line per mutant and the score (killed / applied).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("onnxcomp", "passes", "tests", "models", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("init-from-teacher copies nothing", "onnxcomp/distillation.py",
           "report.transferred, student_model = _transfer(teacher_model, module, student_model)",
           "report.transferred = []",
           ("tests/test_distill.py::test_init_from_teacher_copies_matching_tensors",)),
    Mutant("a TOML recipe runs the default passes", "onnxcomp/recipe.py",
           "return parse(str(recipe)) if _is_named(recipe) else load_toml(recipe)",
           "return parse(str(recipe)) if _is_named(recipe) else "
           "parse('fold-constants,flush-denormals,fuse-bn,cleanup')",
           ("tests/test_cli.py",)),
    Mutant("check_budgets ignores the accuracy budget", "onnxcomp/api.py",
           "if drop > max_accuracy_drop:", "if False:", ("tests/test_cli.py",)),
    Mutant("fuse-bn forgets epsilon", "passes/fuse_bn.py",
           "scale = gamma / np.sqrt(var + epsilon)", "scale = gamma / np.sqrt(var)", ("tests/test_fuse_bn.py",)),
    Mutant("saving writes the output in place (not atomic)", "onnxcomp/model_io.py",
           'fd, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")',
           "temp_name = str(path); fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)",
           ("tests/test_model_io.py", "tests/test_signals.py")),
    Mutant("no check after a modifying pass", "onnxcomp/manager.py",
           "if record.modified and check:", "if False:", ("tests/test_pipeline.py",)),
    Mutant("large initializers' payloads unchecked", "onnxcomp/model_io.py",
           "if size < needed:", "if False:", ("tests/test_properties.py",)),
    Mutant("text fields not checked for UTF-8", "onnxcomp/model_io.py",
           "        _check_text_fields(model)\n", "        pass\n", ("tests/test_properties.py",)),
    Mutant("no type check of the input", "onnxcomp/manager.py",
           "type_error = _type_error(model)", "type_error = None", ("tests/test_properties.py",)),
    Mutant("the input's Constant names are not put back", "onnxcomp/manager.py",
           'tensor.ClearField("name")', "pass", ("tests/test_properties.py",)),
    Mutant("Ctrl-C is not caught", "onnxcomp/cli.py",
           "except KeyboardInterrupt:", "except ZeroDivisionError:", ("tests/test_signals.py",)),
    Mutant("the output-unit axis of Gemm ignores transB (int8's per-channel scales)", "passes/layers.py",
           'if op == "Conv" or (op == "Gemm" and int(self.node.attrs.get("transB", 0))):',
           'if op in ("Conv", "Gemm"):', ("tests/test_quantize.py",)),
    Mutant("cleanup keeps unused initializers", "passes/cleanup.py",
           "graph.cleanup(", "(lambda **_: graph)(", ("tests/test_cleanup.py",)),
    Mutant("the budget search ignores the noise of a drop", "onnxcomp/search.py",
           "self.drop + NOISE_MARGIN * self.drop_error <= max_drop", "self.drop <= max_drop",
           ("tests/test_search.py",)),
    Mutant("no table row is kept exact", "passes/layers.py",
           "if count[row] >= FREQUENT_SHARE * samples)", "if False)", ("tests/test_tables.py",)),
    Mutant("int8 quantizes Add/Mul away from int8 work", "passes/quantize.py",
           "    chosen = _fed_by_int8_work(chosen)\n", "", ("tests/test_quantize.py",)),
    Mutant("int8's dynamic mode ignores the budget", "passes/quantize.py",
           "quantize_dynamic(graph, config), **stats}", "quantize_dynamic(graph, replace(config, exclude=())), **stats}",
           ("tests/test_quantize_dynamic.py",)),
]


def copy_project(target: Path) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, target / name)
    # the installed package maps onnxcomp.passes to passes/; the copy must import its own (mutated) passes
    (target / "onnxcomp" / "passes").symlink_to(target / "passes", target_is_directory=True)


def apply(mutant: Mutant, root: Path) -> bool:
    path = root / mutant.path
    text = path.read_text(encoding="utf-8")
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
    return True


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, float]:
    """(whether the tests passed, seconds) on the copy at `root`."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - started  # a mutant that hangs the tests is caught by them
    return result.returncode == 0, time.perf_counter() - started


def imports_the_copy(root: Path) -> bool:
    env = dict(os.environ, PYTHONPATH=str(root))
    probe = "import onnxcomp, onnxcomp.passes.cleanup as c; print(onnxcomp.__file__); print(c.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    return result.returncode == 0 and all(line.startswith(str(root)) for line in result.stdout.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant names (or parts of them) to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    args = parser.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [m for m in MUTANTS if any(w in m.name for w in wanted)]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}  ({mutant.path}; {' '.join(mutant.tests)})")
        return 0
    killed = applied = 0
    survivors = []
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix="onnxcomp-mutant-") as folder:
            root = Path(folder)
            copy_project(root)
            if not imports_the_copy(root):
                print(f"error: the copy in {root} does not import its own onnxcomp; cannot mutate", file=sys.stderr)
                return 2
            if not apply(mutant, root):
                print(f"stale     {mutant.name}: the snippet in {mutant.path} no longer occurs exactly once")
                continue
            applied += 1
            passed, seconds = run_tests(root, mutant.tests, args.timeout)
        verdict = "SURVIVED" if passed else "killed"
        killed += not passed
        if passed:
            survivors.append(mutant.name)
        print(f"{verdict:9s} {mutant.name} ({seconds:.0f} s)", flush=True)
    print(f"\nscore: {killed} of {applied} mutants killed" + (f"; survived: {', '.join(survivors)}" if survivors
                                                               else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
