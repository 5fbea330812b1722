"""The code's shape (issue 27): no import cycle between the package's modules or between the benchmarks, no
function over 80 lines and no module over 400 in src/, no stage script over 60 lines. Read with ast, nothing is
imported or run."""

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "image_classifier"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400
MAX_STAGE_LINES = 60


def module_names(root: Path, prefix: str) -> dict[str, Path]:
    """Every .py file under `root` by its dotted module name (a package by its own name, not `__init__`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [*path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([prefix, *parts] if prefix else parts)] = path
    return names


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, except those under `if TYPE_CHECKING:`
    (annotations only: they never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from runtime_imports(node)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports. `from package import x` imports the submodule x when
    there is one, else the package itself."""
    found = set()
    for node in runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's own package upwards
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return (found & known) - {name}


def import_graph(root: Path, prefix: str) -> dict[str, set[str]]:
    modules = module_names(root, prefix)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state:
                cycle = visit(imported, [*path, imported])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_its_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_the_package_modules() -> None:
    cycle = find_cycle(import_graph(PACKAGE, "image_classifier"))
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_import_cycle_between_the_benchmarks() -> None:
    # The benchmarks import each other by file name (their folder is on sys.path when they run).
    cycle = find_cycle(import_graph(REPO / "benchmarks", ""))
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_function_in_src_is_over_80_lines() -> None:
    too_long = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}() has {lines} lines")
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)


def line_counts(folder: Path, limit: int) -> list[str]:
    counts = ((path, len(path.read_text().splitlines())) for path in sorted(folder.rglob("*.py")))
    return [f"{path.relative_to(REPO)} has {lines} lines" for path, lines in counts if lines > limit]


def test_no_module_in_src_is_over_400_lines() -> None:
    too_long = line_counts(REPO / "src", MAX_MODULE_LINES)
    assert not too_long, f"over {MAX_MODULE_LINES} lines: " + "; ".join(too_long)


def test_no_stage_script_is_over_60_lines() -> None:
    too_long = line_counts(REPO / "stages", MAX_STAGE_LINES)
    assert not too_long, f"over {MAX_STAGE_LINES} lines: " + "; ".join(too_long)


def test_each_stage_lists_every_module_it_imports_as_a_dvc_dependency() -> None:
    """A module a stage imports (directly or through other modules) but dvc.yaml does not list would let `dvc
    repro` keep a stale output after that module changed."""
    import yaml

    # Modules that decide nothing a stage writes: the params schema (params.yaml's values are tracked by key),
    # error handling, fixed paths, run bookkeeping and atomic file writing.
    neutral = {"errors", "params", "paths", "run_states", "files"}
    package = import_graph(PACKAGE, "image_classifier")
    paths = module_names(PACKAGE, "image_classifier")
    missing = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        script = REPO / stage["cmd"].split()[-1]
        todo = imported_modules("stage", script, set(package))
        reached: set[str] = set()
        while todo:
            module = todo.pop()
            reached.add(module)
            todo |= package[module] - reached
        deps = set(stage["deps"])
        for module in sorted(reached - {f"image_classifier.{name}" for name in neutral}):
            dep = str(paths[module].relative_to(REPO))
            if dep not in deps:
                missing.append(f"{name}: {dep}")
    assert not missing, "dvc.yaml deps lack: " + ", ".join(missing)
