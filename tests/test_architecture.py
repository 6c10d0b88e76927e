"""The package's shape: imports point down the layers DESIGN.md lists (deferred imports inside functions
included), no module imports another in a cycle, and nothing outside ``layers`` touches a layer's private
members."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import loratune

ROOT = Path(loratune.__file__).parent
# Highest first; a package may import only itself and those after it. Top-level modules are the bottom.
ORDER = [
    "cli",
    "serve",
    "experiments",
    "train",
    "inference",
    "data",
    "models",
    "analysis",
    "adapters",
    "layers",
    "kernels",
    "quant",
    "outputs",
    "",
]


def modules() -> dict[str, Path]:
    return {
        ".".join(("loratune", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in ROOT.rglob("*.py")
    }


def imports_of(path: Path) -> set[str]:
    """Every loratune module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("loratune"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loratune"):
            known = modules()
            for alias in node.names:  # `from loratune.layers import execution` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else ""


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in modules().items():
        if name in ("loratune", "loratune.__main__"):
            continue  # the package's front doors: the public API, and `python -m loratune` (the command)
        own = ORDER.index(layer_of(name))
        for imported in imports_of(path):
            if imported == "loratune" or ORDER.index(layer_of(imported)) < own:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {i for i in imports_of(path) if i != "loratune"} for name, path in modules().items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for imported in graph.get(node, ()):
            nxt = imported if imported in graph else imported.rsplit(".", 1)[0]
            if state.get(nxt) == 1 and nxt != node:
                cycle.extend([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*trail, nxt]):
                return True
        state[node] = 2
        return False

    # a package's __init__ importing its own modules is not a cycle: only module-to-module edges count
    for name in list(graph):
        if (ROOT / name.removeprefix("loratune").lstrip(".").replace(".", "/") / "__init__.py").exists():
            graph[name] = set()
    for name in graph:
        if name not in state and visit(name, [name]):
            break
    assert not cycle, " -> ".join(cycle)


def test_nothing_outside_layers_reaches_into_a_layers_private_members():
    private = re.compile(r"\blayer\w*\._(?!_)\w+")
    wrong = [
        f"{name}: {hit}"
        for name, path in modules().items()
        if ".layers" not in name
        for hit in private.findall(path.read_text())
    ]
    assert not wrong, wrong


def test_serving_imports_nothing_of_training():
    """``loratune serve`` (its package, and the command line it starts from) never imports the trainer, its
    distributed machinery or its kernels: inference lives below training."""
    import subprocess
    import sys

    code = (
        "import sys, loratune.serve, loratune.cli.main\n"
        "print(sorted(m for m in sys.modules if m.startswith(('loratune.train', 'loratune.experiments'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
