"""The layout's import rules (DEVELOPERS.md, "Layout shows the architecture"): ``models/``,
``heads/``, ``distill/`` and ``data/`` never import ``engine/``, ``eval/`` or the CLI, and no two
modules of ``ekd`` import each other, directly or through others (imports inside functions
count too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LOWER = ("ekd.models", "ekd.heads", "ekd.distill", "ekd.data")
UPPER = ("ekd.engine", "ekd.eval", "ekd.commands", "ekd.teachers")


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "ekd").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ``ekd`` modules that ``name`` imports (``from a import b`` counts ``a.b`` when it is
    a module, else ``a``); relative imports resolved against the package."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_lower_layers_never_import_the_engine_evaluation_or_cli():
    wrong = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith(LOWER)
             for d in deps if d.startswith(UPPER)]
    assert not wrong, wrong


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Import cycles (``a -> b -> a``), except a package's ``__init__`` importing its own
    modules that import the package back (re-exports, not a cycle of the design)."""
    seen: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = "open"
        for dep in sorted(graph[node]):
            if seen.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in seen:
                visit(dep, path + [dep])
        seen[node] = "done"

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    packages = [min(c, key=len) for c in cycles]
    return [" -> ".join(c) for c, pkg in zip(cycles, packages)
            if not all(m == pkg or m.startswith(pkg + ".") for m in c)]


def test_no_import_cycles():
    cycles = find_cycles(_graph())
    assert not cycles, cycles


def test_the_checker_sees_a_planted_violation(tmp_path):
    pkg = tmp_path / "ekd" / "data"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ekd.engine.trainer import train\n")
    known = {"ekd.data.x": pkg / "x.py", "ekd.engine.trainer": Path("t.py")}
    assert imports_of("ekd.data.x", pkg / "x.py", known) == {"ekd.engine.trainer"}


def test_the_cycle_finder_sees_a_planted_cycle_and_skips_reexports():
    graph = {"ekd.a": {"ekd.b"}, "ekd.b": {"ekd.c"}, "ekd.c": {"ekd.a"},
             "ekd.p": {"ekd.p.x"}, "ekd.p.x": {"ekd.p"}}
    assert find_cycles(graph) == ["ekd.a -> ekd.b -> ekd.c -> ekd.a"]
