"""How the project's modules find each other: by the package layout alone, run from the repository root (no program
edits the import path or silences the import-order check), and the benchmarks import each other as a tree (no
cycle, lazy imports inside functions included)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from helpers import REPO

# A noqa comment for pycodestyle's import codes (E4xx: an import after code, which a path edit needs) hides an import
# that only works once the path is edited.
IMPORT_CHECK_SILENCED = re.compile(r"#\s*noqa\b.*\bE4\d\d")
PATH_EDITS = {"insert", "append", "extend"}


def python_files(root: Path = REPO) -> list[Path]:
    """The project's Python files: every one under `root` but in hidden folders (.venv, .git) or an environment's
    site-packages."""
    return sorted(
        path
        for path in root.rglob("*.py")
        if not any(part.startswith(".") or part == "site-packages" for part in path.relative_to(root).parts)
    )


def module_name(path: Path, root: Path = REPO) -> str:
    """The dotted name `python3 -m` and `import` give the file at `path`: bench/gpu.py is bench.gpu, and a package's
    __init__.py is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name that `tree` imports, wherever the import stands (module level, a function, a branch), with
    relative imports made absolute and importlib.import_module("...") counted as an import; `from a import b` gives
    a.b (b may be a module or a name in a)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            names.add(node.args[0].value)
    return names


def import_graph(files: list[Path], root: Path = REPO) -> dict[str, set[str]]:
    """{module: the modules among `files` that it imports} for each of `files`: an imported name counts as the
    longest of its dotted prefixes that names one of them (from bench import workload: bench.workload; from
    distillation.data.batching import X: distillation.data.batching)."""
    modules = {module_name(path, root): path for path in files}
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            prefixes = (".".join(parts[:length]) for length in range(len(parts), 0, -1))
            target = next((prefix for prefix in prefixes if prefix in modules), None)
            if target is not None and target != module:
                imported.add(target)
        graph[module] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when the graph is a tree (acyclic)."""
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in finished:
            return None
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        finished.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def edits_the_import_path(tree: ast.Module) -> bool:
    """Whether `tree` changes sys.path anywhere: a call to one of its PATH_EDITS methods, or an assignment to it."""

    def is_sys_path(node) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        )

    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in PATH_EDITS
            and is_sys_path(node.func.value)
        ):
            return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(
                is_sys_path(target) or (isinstance(target, ast.Subscript) and is_sys_path(target.value))
                for target in targets
            ):
                return True
    return False


def silences_the_import_check(source: str) -> bool:
    comments = (
        token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    )
    return any(IMPORT_CHECK_SILENCED.search(comment) for comment in comments)


def test_no_program_edits_the_import_path():
    files = python_files()
    assert REPO / "bench" / "gpu.py" in files and REPO / "tests" / "test_layers.py" in files  # the walk finds them
    offenders = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        if edits_the_import_path(ast.parse(source)) or silences_the_import_check(source):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"these files edit sys.path or silence the import-order check: {offenders}"


def test_the_path_checks_see_an_edit_and_a_silenced_import():
    edited = "import sys\ndef main():\n    sys.path.append('x')\n"
    assigned = "import sys\nsys.path[:0] = ['x']\n"
    assert edits_the_import_path(ast.parse(edited)) and edits_the_import_path(ast.parse(assigned))
    assert not edits_the_import_path(ast.parse("import sys\nprint(sys.path[0])\n"))
    code = "E4" + "02"  # spelt in two, so that a grep of the tree for the code finds no file
    assert silences_the_import_check(f"import os\nimport models  # noqa: {code}\n")
    assert not silences_the_import_check(f"x = 'noqa: {code}'  # a string, not a comment\n")


def test_the_benchmarks_import_each_other_as_a_tree():
    graph = import_graph(sorted((REPO / "bench").glob("*.py")))
    assert find_cycle(graph) is None, f"an import cycle among the benchmarks: {' -> '.join(find_cycle(graph))}"
    # The graph holds the imports it should: a function's lazy one would count as well (see the next test).
    assert graph["bench.throughput"] >= {"bench.real_shape", "bench.workload"}
    assert graph["bench.real_shape"] >= {"bench.trl_peer", "bench.workload"}
    assert "bench.workload" in graph["bench.gpu"] and not graph["bench.workload"]


def test_the_graph_counts_lazy_relative_and_importlib_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high\n")  # lazy, and a cycle with high
    (package / "high.py").write_text("from . import low\nimport importlib\nimportlib.import_module('pkg.side')\n")
    (package / "side.py").write_text("from pkg.low import f\nimport os\n")
    graph = import_graph(sorted(package.glob("*.py")), root=tmp_path)
    assert graph == {
        "pkg": set(),
        "pkg.low": {"pkg.high"},
        "pkg.high": {"pkg.low", "pkg.side"},
        "pkg.side": {"pkg.low"},
    }
    assert find_cycle(graph) == ["pkg.high", "pkg.low", "pkg.high"]
    graph["pkg.low"] = set()
    assert find_cycle(graph) is None


# The layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    {"distillation.base"},
    {"distillation.settings"},
    {"distillation.data"},
    {"distillation.kernels"},
    {"dataset", "loss", "models"},  # the root modules the original project and its users name
    {"distillation.runtime"},
    {"distillation.run"},
    {"distillation.training"},
    {"distill"},
]
LOW_LAYERS = ("distillation.base", "distillation.settings")  # read a config without loading torch
HEAVY_LIBRARIES = ("torch", "transformers")


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(f"{name}.") for name in layer):
            return index
    raise AssertionError(f"{module} belongs to no layer; add its folder to LAYERS")


def project_modules() -> list[Path]:
    """The program's modules: the root ones and the package's, not tests, benchmarks or assets."""
    return sorted([*REPO.glob("*.py"), *(REPO / "distillation").rglob("*.py")])


def test_the_package_layers_import_only_downward():
    graph = import_graph(project_modules())
    assert {"distill", "loss", "distillation.settings.config", "distillation.training.trainer"} <= set(graph)
    upward = [
        f"{module} -> {imported}"
        for module, imports in sorted(graph.items())
        for imported in sorted(imports)
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, f"imports from a higher layer: {upward}"
    assert find_cycle(graph) is None, f"an import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["distill"] >= {"distillation.training.trainer", "models"}  # the graph holds real imports


def test_the_low_layers_load_neither_torch_nor_transformers():
    """errors, storage and the config import neither library, directly or through a project module they import."""
    files = project_modules()
    graph = import_graph(files)
    names = {
        module_name(path): imported_names(
            ast.parse(path.read_text(encoding="utf-8")), module_name(path), path.name == "__init__.py"
        )
        for path in files
    }
    for module in (name for name in graph if name.startswith(LOW_LAYERS)):
        reached, frontier = {module}, [module]
        while frontier:
            for imported in graph[frontier.pop()] - reached:
                reached.add(imported)
                frontier.append(imported)
        heavy = sorted(
            {
                f"{name} (in {reached_module})"
                for reached_module in reached
                for name in names[reached_module]
                if name.split(".")[0] in HEAVY_LIBRARIES
            }
        )
        assert not heavy, f"{module} loads {heavy}"
