"""The import layers, read from the source: the library knows nothing of Prefect, tasks know
nothing of flows, the library's sub-packages import only those below them, and its modules
import each other without cycles.

    tailor (library, no Prefect)  <-  tasks (thin Prefect tasks)  <-  flows  <-  tailor.cli (entry point)

Inside the library, lowest first (``LIBRARY_LAYERS``); the modules directly in ``tailor/``
(the command line, preflight checks, the eval command) are the application on top of them.
A module a command line in the library starts (``"-m", "tailor.X"``) counts as imported.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The command line is the application on top of every layer: it starts flows.
ENTRY_POINTS = {"tailor.cli"}
LIBRARY_LAYERS = ["common", "config", "store", "data", "models", "prune", "evaluate", "distill", "report", "registry"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _launched(path: Path) -> set[str]:
    """Modules ``path`` starts in another process: the string after a ``"-m"`` in a list or tuple
    (a command line for ``subprocess`` or ``torchrun``)."""
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.List, ast.Tuple)):
            for flag, name in zip(node.elts, node.elts[1:]):
                if (
                    isinstance(flag, ast.Constant)
                    and flag.value == "-m"
                    and isinstance(name, ast.Constant)
                    and isinstance(name.value, str)
                ):
                    names.add(name.value)
    return names


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions, as absolute names, and every
    module it launches with ``-m``: a dependency all the same."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    names = set(_launched(path))
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names.add(module)
                if node.module is None:
                    names |= {f"{module}.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


@functools.lru_cache(maxsize=None)
def _modules(package: str) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((ROOT / package).rglob("*.py"))}


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("tailor", {"prefect", "prefect_dask", "flows", "tasks"}),
        ("tasks", {"flows"}),
    ],
)
def test_a_layer_imports_nothing_above_it(package, forbidden):
    offending = {
        module: sorted(n for n in names if _top(n) in forbidden)
        for module, names in _modules(package).items()
        if module not in ENTRY_POINTS
    }
    assert {m: n for m, n in offending.items() if n} == {}


def test_the_library_has_no_import_cycles():
    library = _modules("tailor")
    graph = {
        module: {n for n in names if n in library and n != module}
        for module, names in library.items()
        if module not in ENTRY_POINTS
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep) :] + [dep] if dep in trail else [module, dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "tailor" or len(parts) < 2 or parts[1] not in LIBRARY_LAYERS:
        return None
    return LIBRARY_LAYERS.index(parts[1])


def test_the_library_is_only_sub_packages_in_the_declared_layers_and_the_application():
    packages = {p.parent.name for p in (ROOT / "tailor").glob("*/__init__.py")}
    assert packages == set(LIBRARY_LAYERS)


def test_a_library_layer_imports_only_layers_below_it_or_itself():
    upward = {}
    for module, names in _modules("tailor").items():
        own = _layer(module)
        if own is None:
            continue
        above = sorted(
            n
            for n in names
            if (_layer(n) or 0) > own
            or n.split(".")[:2] in (["tailor", m] for m in ("cli", "preflight", "eval_command"))
        )
        if above:
            upward[module] = above
    assert upward == {}


def test_a_module_the_library_launches_exists():
    """A ``-m tailor.X`` command line names a module that is there (a typo fails only at run time)."""
    library = _modules("tailor")
    missing = {
        _module_name(p): sorted(n for n in _launched(p) if _top(n) == "tailor" and n not in library)
        for p in (ROOT / "tailor").rglob("*.py")
    }
    assert {m: n for m, n in missing.items() if n} == {}


def test_importing_the_whole_library_and_its_command_line_loads_no_prefect():
    """The command line reaches the flows only inside the commands that run one, so a
    torchrun worker (``tailor.distill.distributed``, or ``tailor distill``) and any library user
    never import Prefect."""
    import subprocess
    import sys

    modules = sorted(m for m in _modules("tailor"))
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + ("print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks')))")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
