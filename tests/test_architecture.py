"""docs/architecture.md and the README's layout section against the code: every name they mention exists."""

from __future__ import annotations

import ast
import graphlib
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
LAYOUT = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


NAMES = sorted(set(re.findall(r"`(bkcompile(?:\.\w+)+)`", ARCHITECTURE)))
PATHS = sorted(set(re.findall(r"`((?:passes|bkcompile|tests|docs|benchmarks)/[\w/]+\.\w+)`", ARCHITECTURE)))


@pytest.mark.parametrize("name", NAMES)
def test_every_name_in_the_architecture_page_exists(name: str) -> None:
    _resolve(name)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_in_the_architecture_page_exists(path: str) -> None:
    assert (ROOT / path).exists()


def test_the_pages_name_enough_to_be_checked() -> None:
    assert len(NAMES) > 30 and len(PATHS) > 10


def test_the_readme_layout_names_every_module_and_only_modules_that_exist() -> None:
    named = set(re.findall(r"`([\w/]+\.py)`", LAYOUT))
    files = [
        p.relative_to(ROOT)
        for folder in ("bkcompile", "passes", "tests", "benchmarks")
        for p in (ROOT / folder).rglob("*.py")
    ]
    for module in files:
        if module.parts[0] in ("bkcompile", "passes") and module.name != "__init__.py":
            assert module.as_posix() in named or module.name in named, f"{module} is not in the README layout"
    known = {p.name for p in files} | {p.as_posix() for p in files}
    assert named <= known, named - known


# --- layers ----------------------------------------------------------------------------------------------------

# The layer of each module, by dotted name; an entry names a module or a package (its modules too, the longest
# entry wins): the folders bkcompile/runtime/ and bkcompile/compiler/ are one entry each. The one place to update
# when a module is added or moved.
BASE = "base"  # the error types and the names and frames they print: every layer may import them
RUNTIME = "runtime"  # the run-time clip: what a compiled graph calls while it trains
COMPILE = "compile"  # the backend entry, its options, the report and the rule registry
PASSES = "passes"  # the graph pipeline (passes/, installed as bkcompile.passes)
TRAINING = "training"  # the training API: optimizer, data, accounting, checkpoints, integrations
API = "api"  # the package's public names and the command line
LAYERS = {
    "bkcompile": API,
    "bkcompile.__main__": API,
    "bkcompile.errors": BASE,
    "bkcompile.frames": BASE,
    "bkcompile.names": BASE,
    "bkcompile.plan": BASE,  # the compile -> run contract
    "bkcompile.policy": BASE,  # the clipping policy, read by the clipping pass and the deferred clip
    "bkcompile.runtime": RUNTIME,  # a folder: each of its modules
    "bkcompile.compiler": COMPILE,
    "bkcompile.passes": PASSES,
    "bkcompile.accountant": TRAINING,
    "bkcompile.audit": TRAINING,
    "bkcompile.checkpoint": TRAINING,
    "bkcompile.data": TRAINING,
    "bkcompile.integrations": TRAINING,
    "bkcompile.optimizer": TRAINING,
    "bkcompile.private": TRAINING,
    "bkcompile.prv": TRAINING,
    "bkcompile.randomness": TRAINING,
}
# What each layer may import. The run time imports neither the compile side nor the passes: what a graph needs
# at run time is handed over when it is compiled.
MAY_IMPORT = {
    BASE: {BASE},
    RUNTIME: {BASE, RUNTIME},
    COMPILE: {BASE, RUNTIME, COMPILE, PASSES},
    PASSES: {BASE, RUNTIME, COMPILE, PASSES},
    TRAINING: {BASE, RUNTIME, COMPILE, TRAINING},
    API: {BASE, RUNTIME, COMPILE, PASSES, TRAINING, API},
}
# Imports against the layers that the code still has, each to be removed; an entry that no longer holds fails, so
# the list only shrinks.
KNOWN_CROSSINGS: set[tuple[str, str]] = set()
# Where each folder's modules are installed (pyproject.toml's package-dir).
PACKAGE_DIRS = {"bkcompile": "bkcompile", "passes": "bkcompile.passes"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *(p for p in parts if p != "__init__")))
            if not (folder == "bkcompile" and name.startswith("bkcompile.passes")):
                found[name] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str | None:
    entries = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return LAYERS[max(entries, key=len)] if entries else None


def _is_type_checking(test: ast.expr) -> bool:
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute)
        and (test.attr == "TYPE_CHECKING")
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project's modules an import statement names (``from pkg import mod`` names the module ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            found.add(f"{base}.{alias.name}")
        elif base in MODULES:
            found.add(base)
    return found


def imports(module: str) -> tuple[set[str], set[str]]:
    """(what ``module`` imports when it is imported, what it imports anywhere: in functions, for type checking)."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                top.update(_targets(statement, module))
            elif isinstance(statement, ast.If) and not _is_type_checking(statement.test):
                visit(statement.body)
                visit(statement.orelse)
            elif isinstance(statement, ast.Try):
                visit(statement.body)

    visit(tree.body)
    anywhere = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            anywhere.update(_targets(node, module))
    return top - {module}, anywhere - {module}


IMPORTS = {module: imports(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    assert {m for m in MODULES if layer_of(m) is None} == set()
    assert set(LAYERS.values()) <= set(MAY_IMPORT)
    assert len(MODULES) > 60  # the walk found the package (bkcompile/ and passes/)


def test_no_module_imports_against_the_layers() -> None:
    crossings = {
        (module, target)
        for module, (_, anywhere) in IMPORTS.items()
        for target in anywhere
        if layer_of(target) not in MAY_IMPORT[layer_of(module)]
    }
    assert crossings - KNOWN_CROSSINGS == set(), "imports against the layers (see MAY_IMPORT)"
    assert KNOWN_CROSSINGS - crossings == set(), "gone: remove them from KNOWN_CROSSINGS"


def test_the_run_time_imports_neither_the_compile_side_nor_the_passes() -> None:
    assert MAY_IMPORT[RUNTIME].isdisjoint({COMPILE, PASSES, TRAINING})
    runtime = {m for m in MODULES if layer_of(m) == RUNTIME}
    assert {f"bkcompile.runtime.{name}" for name in ("ledger", "norms", "deferred", "distributed")} <= runtime


def test_no_import_cycle_among_the_modules() -> None:
    """Module-level imports only (an import inside a function runs after every module is loaded)."""
    graph = {module: top for module, (top, _) in IMPORTS.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_no_module_builds_a_privacy_error_by_hand() -> None:
    """A refusal's text has one shape: the passes build it with ``node_error``, the run time with ``run_error``."""
    from bkcompile import errors

    refusals = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.PrivacyError)
    }
    by_hand = [
        f"{module}:{node.lineno}"
        for module, path in MODULES.items()
        if module != "bkcompile.errors"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in refusals
    ]
    assert by_hand == []
