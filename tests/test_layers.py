"""The package's layers, bottom to top: no import runs upward and no two modules import each other.

A module may import modules of its own package or of a lower layer, at module level or inside a
function alike (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metakd"

# top-level module or package -> layer; see the README's "Code layout"
LAYER = {
    "errors": 0, "methods": 0, "flops": 0,  # tables and pure helpers, no package imports
    "config": 1, "storage": 1, "synthetic": 1, "pretrained": 1,  # the schema, artifacts on storage
    "losses": 2, "loader": 2, "data": 2, "report": 2, "tracking": 2,  # the method's parts; result tables
    "models": 3, "preflight": 3,
    "pruning": 4,
    "train": 5,  # what trains one model
    "jobs": 6,  # who trains what, where and when
    "export": 7,  # take a student away
    "sweep": 8,  # the search
    "cli": 9, "__init__": 9, "results": 9,  # results: the public `metakd.results.load`
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``metakd`` module ``path`` imports (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "metakd":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{target}.{alias.name}"
                out.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "metakd")
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1] if len(parts) > 1 else "__init__"]


def modules() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_top_level_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert tops <= set(LAYER), sorted(tops - set(LAYER))


def test_no_import_runs_upward():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in modules().items() for t in targets
              if t.split(".")[:2] != m.split(".")[:2] and layer(t) >= layer(m) and t != "metakd"]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in modules().items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
