"""The package's layout: imports point one way (from the entry points down to the networks),
there are no import cycles, and every name is imported from the module that defines it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cellsam_trt

PACKAGE = Path(cellsam_trt.__file__).parent
TESTS = Path(__file__).parent

# Layers from the top down: a module may import from its own layer's folder and from lower
# layers, never from a higher one. The leaves (file formats, axes, progress bars) are used
# everywhere and import nothing of the package.
LAYERS = [
    ("cli", "napari_plugin", "bench"),
    ("api", "compat", "interactive", "stack", "tiling", "scale"),
    ("large",),
    ("graphs",),
    ("dev",),
    ("engine",),
    ("runtime",),
    ("modeling",),
    ("io", "axes", "progress", "version", "lazy"),
]
# Packages whose __init__ gathers public names, and the documented import paths kept for
# scripts written against earlier releases: the only modules that import a name to offer it.
FACADES = {"cellsam_trt", "cellsam_trt.runtime", "cellsam_trt.modeling", "cellsam_trt.tiling", "cellsam_trt.scale"}


def module_name(path: Path, root: Path, prefix: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


MODULES = {module_name(p, PACKAGE, "cellsam_trt"): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, module: str) -> list[tuple[int, str, str | None]]:
    """Every import in a file (module level and inside functions): (line, module, name or
    None for ``import x``), relative imports resolved against ``module``."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_package else -1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out += [(node.lineno, source, a.name) for a in node.names]
    return out


def edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import submodule`` counts as the
    submodule; a package's own ``__init__`` is not counted for its submodules)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for _, source, name in imports_of(path, module):
            if name and f"{source}.{name}" in MODULES:
                targets.add(f"{source}.{name}")
            elif source in MODULES:
                targets.add(source)
        graph[module] = targets - {module}
    return graph


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder there")


def test_imports_point_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in edges().items() for target in targets
              if layer_of(module) is not None and layer_of(target) is not None and layer_of(target) < layer_of(module)]
    assert not upward, "imports that climb back up:\n" + "\n".join(sorted(upward))


def test_there_is_no_import_cycle():
    graph = edges()
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def defined_names(path: Path) -> set[str]:
    """Names a module binds at its top level other than by importing them from the package."""
    names = set()

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.Import):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("cellsam_trt"):
                names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                walk(node.body)
                walk(node.orelse)
                for handler in getattr(node, "handlers", []):
                    walk(handler.body)

    walk(ast.parse(path.read_text()).body)
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    defined = {module: defined_names(path) for module, path in MODULES.items()}
    files = {module: path for module, path in MODULES.items()}
    files.update({module_name(p, TESTS, "tests"): p for p in TESTS.rglob("*.py")})
    wrong = []
    for module, path in files.items():
        for line, source, name in imports_of(path, module):
            if not source.startswith("cellsam_trt") or name is None or source in FACADES:
                continue
            if f"{source}.{name}" in MODULES or name in defined.get(source, ()):
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} from {source}, which does not define it")
    assert not wrong, "\n".join(wrong)


def test_only_the_facades_import_names_to_offer_them():
    offered = [str(path.relative_to(PACKAGE.parent)) for module, path in MODULES.items()
               if module not in FACADES and ("noqa: F401" in path.read_text() or "__all__" in path.read_text())]
    assert not offered, f"modules that re-export names (only {sorted(FACADES)} may): {offered}"


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
