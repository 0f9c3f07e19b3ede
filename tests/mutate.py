"""Mutation check: break the code on purpose and see whether the tests notice.

    .venv/bin/python tests/mutate.py [--only NAME,NAME] [--list]      (or: make mutate)
    .venv/bin/python tests/mutate.py --random N --seed S [--modules PATH,PATH] [--json FILE] [--list]

Each mutant is a source edit applied to a copy of the project in a temporary folder, never to the working tree;
the tests that guard the edited code then run against that copy. A mutant the tests do not fail on "survived":
the code can break that way without the suite saying so. Run outside CI: each mutant costs a pytest run.
Prints one line per mutant and the score (killed / applied); a run whose tests time out counts as killed.

Named mutants (the default) break one feature each: an exact snippet and its replacement, with the tests that
guard the feature. A snippet that no longer occurs exactly once is reported as "stale" (the code moved on;
update the mutant), not counted.

Random mutants (--random N) give the core (CORE: onnxcomp/ and passes/) a mutation score: every module is parsed
with `ast`, its mutation sites collected (comparison, `and`/`or`, `+`/`-`, True/False, a number n → n+1, `not x`
→ `x`, `return x` → `return None`, a call statement removed), and N sites are drawn with the seed, spread evenly
over the modules. Each is edited into its module at its byte offsets, the rest of the file left byte for byte,
and the module's fast tests (COVERING, without the `assets` and `cuda` markers and the SLOW tests) run against
it, first once without a mutant: where that run fails, the module's mutants are "unscored" (every one would
be killed); otherwise three times its length (at least 60 s) is each mutant's time limit.
Code whose breakage nobody can observe is not drawn: docstrings, `if TYPE_CHECKING:`, annotations, the
messages of raised errors, progress bars and logging. Survivors judged equivalent (no input can tell them from
the original) are listed in EQUIVALENT with the reason and left out of the score's denominator.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import hashlib
import json
import os
import random
import shutil
import signal
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
    Mutant("the passes load a model file whole", "onnxcomp/api.py",
           "model_io.load(source, weights=folder is None)", "model_io.load(source)",
           ("tests/test_memory.py",)),
    Mutant("calibration runs an export held in memory", "onnxcomp/graph.py",
           "    if not _worth_a_file(graph):\n", "    if True:\n",
           ("tests/test_weights_on_disk.py", "tests/test_memory.py")),
    Mutant("validation opens a large candidate's compact layouts as they are", "onnxcomp/validate.py",
           "if not large or not any(", "if True or not any(", ("tests/test_weights_on_disk.py",)),
    Mutant("int32 positions for every weight", "onnxcomp/encoding.py",
           "return count * 8 + 16 >= 2**31", "return False", ("tests/test_encoding.py",)),
]


CORE = ("onnxcomp/api.py", "onnxcomp/manager.py", "onnxcomp/model_io.py", "onnxcomp/runner.py",
        "onnxcomp/validate.py", "onnxcomp/data.py", "onnxcomp/recipe.py", "onnxcomp/errors.py",
        "passes/fuse_bn.py", "passes/cleanup.py", "passes/quantize.py", "passes/prune.py", "passes/share.py",
        "passes/layers.py", "passes/kmeans.py", "passes/int4.py", "passes/fp16.py")

# The fast tests that exercise each core module, fastest first (-x stops at the first failure). A test file, or
# (file, words): its test functions whose names contain a word, where the whole file (test_bad_input.py: 100 s
# of CLI runs) would cost more than the part about the module. Most tests reach a module through the CLI or a
# pass name, not an import, so the table is written by hand.
COVERING: dict[str, tuple] = {
    "onnxcomp/api.py": ("tests/test_pipeline.py", "tests/test_cli.py", "tests/test_real_inputs.py",
                        "tests/test_search.py", ("tests/test_bad_input.py", ("budget", "provider", "together"))),
    "onnxcomp/manager.py": ("tests/test_pipeline.py", "tests/test_cleanup.py", "tests/test_fuse_bn.py",
                            "tests/test_properties.py"),
    "onnxcomp/model_io.py": ("tests/test_model_io.py", "tests/test_signals.py",
                             ("tests/test_bad_input.py", ("model", "external", "output", "report"))),
    "onnxcomp/runner.py": ("tests/test_data.py", "tests/test_validate.py", "tests/test_prune.py",
                           ("tests/test_bad_input.py", ("rejects",))),
    "onnxcomp/validate.py": ("tests/test_validate.py", "tests/test_cli.py", "tests/test_real_inputs.py",
                             ("tests/test_bad_input.py", ("validat",))),
    "onnxcomp/data.py": ("tests/test_data.py", "tests/test_text.py", "tests/test_real_inputs.py",
                         ("tests/test_bad_input.py", ("data", "preprocess", "random"))),
    "onnxcomp/recipe.py": ("tests/test_recipe.py", "tests/test_pipeline.py", "tests/test_cli.py",
                           ("tests/test_bad_input.py", ("recipe", "pass"))),
    "onnxcomp/errors.py": ("tests/test_pipeline.py", "tests/test_recipe.py", "tests/test_cli.py",
                           ("tests/test_bad_input.py", ("rejects", "budget"))),
    "passes/fuse_bn.py": ("tests/test_fuse_bn.py", "tests/test_fold_constants.py"),
    "passes/cleanup.py": ("tests/test_cleanup.py", "tests/test_short_names.py", "tests/test_fuse_bn.py"),
    "passes/quantize.py": ("tests/test_quantize.py", "tests/test_quantize_dynamic.py",
                           "tests/test_equalize.py"),
    "passes/prune.py": ("tests/test_tables.py", "tests/test_prune.py"),
    "passes/share.py": ("tests/test_tables.py", "tests/test_share.py"),
    "passes/layers.py": ("tests/test_tables.py", "tests/test_quantize.py", "tests/test_int4.py", "tests/test_prune.py"),
    "passes/kmeans.py": ("tests/test_kmeans.py", "tests/test_share.py"),
    "passes/int4.py": ("tests/test_int4.py",),
    "passes/fp16.py": ("tests/test_fp16.py",),
}
# No test is marked slow; these are, and they are about a module outside the core (the search's Ray backend).
SLOW = ("tests/test_search.py::test_search_on_a_local_ray_head_gives_the_serial_front",)
# Without the real models (assets) and the GPU (cuda); Hypothesis seeded, so that reruns draw the same graphs.
FAST = ("-m", "not assets and not cuda", "--hypothesis-seed=0", *(f"--deselect={test}" for test in SLOW))

# Survivors judged equivalent: (module, its line's code, change) → why no input tells the mutant from the code.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("onnxcomp/runner.py", "def batches(self, dataset, samples: int | None = None, batch_size: int = 32, "
     "outputs: list[str] | None = None,", "`32` → `33`"):
        "unreachable: every caller of Runner.batches passes batch_size (stacked passes its own default)",
    ("onnxcomp/validate.py", "return (self.mismatches, math.isnan(sqnr), -sqnr if not math.isnan(sqnr) else 0.0)",
     "`0.0` → `1.0`"):
        "the constant only follows isnan(sqnr) = True, which already orders the output; NaN outputs tie either way",
    ("onnxcomp/validate.py", "if ref_top1 and sum(map(len, ref_top1)) == usable:", "`and` → `or`"):
        "a non-empty ref_top1 holds every batch (the scores output is chosen on the first), so the sum is usable; "
        "an empty one sums to 0, and a validation has at least one sample",
    ("passes/cleanup.py", "node.inputs.clear()", "removed `node.inputs.clear()`"):
        "the Identity is left without outputs and the graph cleanup that follows removes it: the same model bytes",
}

COMPARISONS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
BOOLEANS = {"and": "or", "or": "and"}
ARITHMETIC = {"+": "-", "-": "+", "+=": "-=", "-=": "+="}
PROGRESS = {"progress.bar", "progress.each", "bar", "each", "tqdm"}  # only what the user sees on a terminal
LOG_METHODS = {"debug", "info", "warning", "error", "exception"}
DISPLAY_ONLY = {"show", "progress"}  # arguments that switch a progress bar


@dataclass(frozen=True)
class Site:
    """One random mutant: bytes start..end of a module replaced by `new`."""
    path: str
    line: int  # of the change itself, where the expression spans several
    start: int
    end: int
    new: str
    change: str
    code: str  # the site's line, stripped: names it in EQUIVALENT across edits that move lines
    mutated: str  # the same line with the change made

    def apply(self, root: Path) -> None:
        path = root / self.path
        data = path.read_bytes()
        path.write_bytes(data[:self.start] + self.new.encode() + data[self.end:])


class SiteFinder(ast.NodeVisitor):
    """The mutation sites of one module's source, in source order."""

    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.sites = path, data, []
        self.line_starts = [0]
        for line in data.splitlines(keepends=True):  # bytes split at \n, \r\n and \r only, as Python's lines
            self.line_starts.append(self.line_starts[-1] + len(line))
        self.bars: set[str] = set()  # names bound to progress bars: their .update() calls only draw
        self.substantial: list[bool] = []  # per enclosing function: more than one statement

    def find(self) -> list[Site]:
        tree = ast.parse(self.data)
        for node in ast.walk(tree):
            if isinstance(node, ast.withitem) and _is_progress(node.context_expr) and node.optional_vars:
                self.bars.add(ast.unparse(node.optional_vars))
            elif isinstance(node, ast.Assign) and _is_progress(node.value):
                self.bars.update(ast.unparse(target) for target in node.targets)
        self.visit(tree)
        return self.sites

    def offset(self, line: int, column: int) -> int:
        return self.line_starts[line - 1] + column  # ast's columns count UTF-8 bytes

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def text(self, start: int, end: int) -> str:
        return self.data[start:end].decode()

    def add(self, start: int, end: int, new: str, change: str) -> None:
        number = bisect.bisect_right(self.line_starts, start)  # the line of the change, not of its expression
        first, after = self.line_starts[number - 1], self.line_starts[number]
        line = self.data[first:after].decode().strip()
        mutated = (self.data[first:start] + new.encode() + self.data[end:]).decode().splitlines()[0].strip()
        self.sites.append(Site(self.path, number, start, end, new, change, line, mutated))

    def operator(self, before: ast.AST, after: ast.AST, swaps: dict[str, str]) -> None:
        """The operator between two operands, swapped; skipped where a comment or a `\\` sits beside it."""
        start, end = self.end(before), self.start(after)
        gap = self.text(start, end)
        token = gap.replace("(", " ").replace(")", " ").strip()
        if token in swaps:
            at = start + len(gap[:gap.index(token)].encode())
            self.add(at, at + len(token.encode()), swaps[token], f"`{token}` → `{swaps[token]}`")

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for before, after in zip(operands, operands[1:]):
            self.operator(before, after, COMPARISONS)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        for before, after in zip(node.values, node.values[1:]):
            self.operator(before, after, BOOLEANS)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if _is_text(node.left) or _is_text(node.right):
            return  # a message built from pieces
        if isinstance(node.op, (ast.Add, ast.Sub)):
            self.operator(node.left, node.right, ARITHMETIC)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, (ast.Add, ast.Sub)) and not _is_text(node.value):
            self.operator(node.target, node.value, ARITHMETIC)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, bool):
            self.add(self.start(node), self.end(node), str(not node.value), f"`{node.value}` → `{not node.value}`")
        elif isinstance(node.value, (int, float)):
            old = self.text(self.start(node), self.end(node))
            self.add(self.start(node), self.end(node), repr(node.value + 1), f"`{old}` → `{node.value + 1!r}`")

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            operand = _short(ast.unparse(node.operand))
            self.add(self.start(node), self.start(node.operand), "", f"`not {operand}` → `{operand}`")
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        value = node.value
        if value is not None and not (isinstance(value, ast.Constant) and value.value is None) \
                and self.substantial and self.substantial[-1]:
            self.add(self.start(value), self.end(value), "None",
                     f"`return {_short(ast.unparse(value))}` → `return None`")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant):
            return  # a docstring
        if isinstance(node.value, ast.Call) and not self.quiet(node.value):
            self.add(self.start(node), self.end(node), "pass", f"removed `{_short(ast.unparse(node.value))}`")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = ast.unparse(node.func)
        if name in PROGRESS and name.endswith("each") and node.args:
            self.visit(node.args[0])  # the items are real; the rest only labels the bar
        elif not self.quiet(node):
            self.visit(node.func)
            for argument in node.args:
                self.visit(argument)
            for keyword in node.keywords:
                if keyword.arg not in DISPLAY_ONLY:
                    self.visit(keyword.value)

    def quiet(self, call: ast.Call) -> bool:
        """A call that only draws or logs: a progress bar, a bar's update, a logger's message, a print."""
        name = ast.unparse(call.func)
        owner, _, method = name.rpartition(".")
        return (name in PROGRESS or owner in self.bars or name in ("print", "warnings.warn")
                or (method in LOG_METHODS and owner.split(".")[-1] in ("log", "logger", "logging")))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit_defaults(node.args)
        self.substantial.append(len(body) > 1)  # `return x` → `return None` in a one-line function is too plain
        for statement in body:
            self.visit(statement)
        self.substantial.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit_defaults(node.args)
        self.visit(node.body)

    def visit_defaults(self, arguments: ast.arguments) -> None:
        """Default values, not annotations; a default that switches a progress bar is skipped."""
        positional = arguments.posonlyargs + arguments.args
        pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
        pairs += [(arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults) if default]
        for arg, default in pairs:
            if arg.arg not in DISPLAY_ONLY:
                self.visit(default)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_If(self, node: ast.If) -> None:
        if ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        """An error's message and type are the error path's business: the tests of messages are elsewhere."""

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        """An f-string is a message; its format specs are not behaviour."""


def _is_progress(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) in PROGRESS


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _short(code: str, width: int = 40) -> str:
    code = " ".join(code.split())
    return code if len(code) <= width else code[:width - 3] + "..."


def draw(tree: Path, modules: list[str], count: int, seed: int) -> list[Site]:
    """`count` sites of the project at `tree`, spread evenly over `modules`: round-robin over the modules in an
    order drawn from the seed, taking each module's sites in an order drawn from (seed, module), so that editing
    one module does not change what is drawn from the others."""
    order = list(modules)
    random.Random(seed).shuffle(order)
    queues = {}
    for module in order:
        queues[module] = SiteFinder(module, (tree / module).read_bytes()).find()
        random.Random(f"{seed}:{module}").shuffle(queues[module])
    chosen: list[Site] = []
    while len(chosen) < count and any(queues.values()):
        for module in order:
            if queues[module] and len(chosen) < count:
                chosen.append(queues[module].pop())
    return sorted(chosen, key=lambda site: (modules.index(site.path), site.line, site.start))


def selection(tree: Path, module: str) -> list[str]:
    """The pytest arguments that select the module's fast tests (COVERING) in the project at `tree`."""
    chosen = []
    for entry in COVERING[module]:
        if isinstance(entry, str):
            chosen.append(entry)
            continue
        path, words = entry
        names = [node.name for node in ast.parse((tree / path).read_bytes()).body
                 if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
        chosen += [f"{path}::{name}" for name in names if any(word in name for word in words)]
    return [*FAST, *chosen]


def copy_project(target: Path, tree: Path = REPO) -> None:
    for name in COPIED:
        source = tree / name
        if source.is_dir():
            shutil.copytree(source, target / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, target / name)
    # the installed package maps onnxcomp.passes to passes/; the copy must import its own (mutated) passes
    if not (target / "onnxcomp" / "passes").is_symlink():
        (target / "onnxcomp" / "passes").symlink_to("../passes", target_is_directory=True)


def apply(mutant: Mutant, root: Path) -> bool:
    path = root / mutant.path
    text = path.read_text(encoding="utf-8")
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
    return True


def run_tests(root: Path, tests: list[str] | tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """("passed", "failed" or "timeout"; seconds; the first test that failed) of pytest on the copy at `root`."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    log = root / "pytest.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        # a session of its own, so that a timeout ends the CLI processes the tests started along with pytest
        process = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                   cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timeout", time.perf_counter() - started, ""
    seconds = time.perf_counter() - started
    failures = [line.split(" - ")[0].split(maxsplit=1)[1] for line in log.read_text(errors="replace").splitlines()
                if line.startswith(("FAILED ", "ERROR "))]
    return ("passed" if status == 0 else "failed"), seconds, failures[0] if failures else f"pytest status {status}"


def imports_the_copy(root: Path) -> bool:
    env = dict(os.environ, PYTHONPATH=str(root))
    probe = "import onnxcomp, onnxcomp.passes.cleanup as c; print(onnxcomp.__file__); print(c.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    return result.returncode == 0 and all(line.startswith(str(root)) for line in result.stdout.split())


def run_named(args) -> int:
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
            outcome, seconds, _ = run_tests(root, mutant.tests, args.timeout)
        passed = outcome == "passed"
        verdict = "SURVIVED" if passed else "killed"
        killed += not passed
        if passed:
            survivors.append(mutant.name)
        print(f"{verdict:9s} {mutant.name} ({seconds:.0f} s)", flush=True)
    print(f"\nscore: {killed} of {applied} mutants killed" + (f"; survived: {', '.join(survivors)}" if survivors
                                                               else ""))
    return 1 if survivors else 0


def baseline(tree: Path, module: str, limit: float) -> tuple[float, str]:
    """(seconds, "") of the module's fast tests on an unmutated copy, or (seconds, why they cannot score it)."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-mutant-") as folder:
        root = Path(folder)
        copy_project(root, tree)
        if not imports_the_copy(root):
            return 0.0, f"the copy in {root} does not import its own onnxcomp"
        outcome, seconds, failed = run_tests(root, selection(tree, module), limit)
    return seconds, "" if outcome == "passed" else f"its tests do not pass without a mutant ({outcome}: {failed})"


def mutant_result(tree: Path, site: Site, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxcomp-mutant-") as folder:
        root = Path(folder)
        copy_project(root, tree)
        site.apply(root)
        outcome, seconds, failed = run_tests(root, selection(tree, site.path), timeout)
    verdict = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[outcome]
    equivalent = EQUIVALENT.get((site.path, site.code, site.change)) if verdict == "survived" else None
    return {"module": site.path, "line": site.line, "change": site.change, "code": site.code,
            "mutated": site.mutated, "verdict": verdict,
            "killed_by": failed if verdict == "killed" else None, "equivalent": equivalent,
            "seconds": round(seconds, 1)}


def run_random(args) -> int:
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else list(CORE)
    unknown = [m for m in modules if m not in COVERING]
    if unknown:
        print(f"error: no tests are known for {', '.join(unknown)} (add them to COVERING)", file=sys.stderr)
        return 2
    # one copy of the working tree for the whole run: the sites' offsets stay true while someone edits the tree
    with tempfile.TemporaryDirectory(prefix="onnxcomp-snapshot-") as folder:
        tree = Path(folder)
        copy_project(tree)
        sites = draw(tree, modules, args.random, args.seed)
        if args.list:
            for site in sites:
                print(f"{site.path}:{site.line}  {site.change}")
            return 0
        return score_random(args, tree, sites)


def score_random(args, tree: Path, sites: list[Site]) -> int:
    started = time.perf_counter()
    summary: dict[str, dict] = {}
    results = []
    for site in sites:
        if site.path not in summary:
            seconds, problem = baseline(tree, site.path, args.timeout)
            summary[site.path] = {"sha256": hashlib.sha256((tree / site.path).read_bytes()).hexdigest(),
                                  "tests": selection(tree, site.path)[len(FAST):], "baseline_s": round(seconds, 1),
                                  "timeout_s": round(min(args.timeout, max(60.0, 3 * seconds))), "problem": problem}
            print(f"baseline  {site.path}: " + (problem or f"its tests pass in {seconds:.0f} s"), flush=True)
        if summary[site.path]["problem"]:  # a failing test would kill every mutant: the module cannot be scored
            print(f"unscored  {site.path}:{site.line}  {site.change}", flush=True)
            continue
        result = mutant_result(tree, site, summary[site.path]["timeout_s"])
        results.append(result)
        note = {"killed": f"  [{result['killed_by']}]", "survived": ""}.get(result["verdict"], "")
        if result["equivalent"]:
            note = f"  (equivalent: {result['equivalent']})"
        print(f"{result['verdict']:9s} {site.path}:{site.line}  {site.change}  ({result['seconds']:.0f} s){note}",
              flush=True)
    score = tally(results)
    print(f"\nscore: {score['killed']} of {score['applied']} killed ({score['timeouts']} by timeout); "
          f"{score['equivalent']} survivors judged equivalent, so {score['killed']} of "
          f"{score['applied'] - score['equivalent']} non-equivalent mutants killed ({score['percent']}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "seed": args.seed, "requested": args.random,
            "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.perf_counter() - started),
            "modules": summary, "score": score, "mutants": results}, indent=1, ensure_ascii=False) + "\n")
    return 1 if score["killed"] < score["applied"] - score["equivalent"] else 0


def tally(results: list[dict]) -> dict:
    applied = len(results)
    killed = sum(r["verdict"] in ("killed", "timeout") for r in results)
    equivalent = sum(bool(r["equivalent"]) for r in results)
    scored = applied - equivalent
    return {"applied": applied, "killed": killed, "timeouts": sum(r["verdict"] == "timeout" for r in results),
            "equivalent": equivalent, "survived": applied - killed - equivalent,
            "percent": round(100 * killed / scored, 1) if scored else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant names (or parts of them) to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run, at most")
    parser.add_argument("--random", type=int, metavar="N", help="draw N mutants of the core instead of the named ones")
    parser.add_argument("--seed", type=int, default=0, help="the seed that draws the random mutants")
    parser.add_argument("--modules", help="comma-separated modules to draw from (default: CORE)")
    parser.add_argument("--json", help="write the random run's results to this file")
    args = parser.parse_args(argv)
    return run_random(args) if args.random else run_named(args)


if __name__ == "__main__":
    sys.exit(main())
