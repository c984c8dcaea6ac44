"""The layout's import rules (DEVELOPERS.md, "Layout shows the architecture"), imports inside
functions counted everywhere:

- ``models/``, ``heads/``, ``distill/`` and ``data/`` never import ``engine/``, ``eval/`` or the CLI;
- ``ekd``'s packages form the layers of :data:`EKD_LAYERS` (docs/architecture.md): a package
  imports only packages of lower layers, and every package has a layer;
- no two modules of ``ekd`` or of ``bench`` import each other, directly or through others;
- the config modules (``ekd.config*``) sit at the bottom: they import no ``ekd.eval``,
  ``ekd.models`` or ``ekd.distill`` (the checks that need those registries run where they are
  known);
- ``ekd`` never imports ``bench``; ``bench`` uses ekd's public names only (no ``_private``
  module, name or attribute of another object) and never patches ``sys.path`` (it is a package,
  run as ``python -m bench.<name>``);
- ``bench`` has four layers, bottom to top (``bench/__init__.py``); a module imports its own
  layer or lower ones, and a module not listed in :data:`BENCH_LAYERS` is a command:

  0. facts — what a cell is and how it is judged: ``kd_profiles``, ``kd_choices``,
     ``kd_protocols``, ``kd_significance``, ``kd_convergence_criterion``;
  1. cells — the committed cell store and the cell runner: ``kd_cells``;
  2. reports — from the committed cells alone: ``kd_summary``, ``kd_report``;
  3. commands — ``kd_table``, ``kd_convergence``, ``ekd_ablation``, ``kd_tuning``,
     ``gpu_check``, ``step_time``, ... (one may use another's helpers, never in a circle).

Each rule has a planted violation below that the checker must catch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# -- the whole repository: ekd, its config modules and the benchmarks (bench/) -------------------

REPO = SRC.parent
BENCH_LAYERS = {
    "facts": ("bench.kd_profiles", "bench.kd_choices", "bench.kd_protocols", "bench.kd_significance",
              "bench.kd_convergence_criterion"),
    "cells": ("bench.kd_cells",),
    "reports": ("bench.kd_summary", "bench.kd_report"),
}
LAYER_ORDER = ("facts", "cells", "reports", "commands")
CONFIG_MUST_NOT_IMPORT = ("ekd.eval", "ekd.models", "ekd.distill")


def modules_under(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file for every module of ``package`` in ``root``."""
    out = {}
    for path in (root / package).rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def graph_of(known: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, known) for name, path in known.items()}


def _repository_graph() -> dict[str, set[str]]:
    return graph_of({**modules_under(SRC, "ekd"), **modules_under(REPO, "bench")})


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str, layers: dict[str, tuple[str, ...]] = BENCH_LAYERS) -> int:
    for layer, members in layers.items():
        if name in members:
            return LAYER_ORDER.index(layer)
    return LAYER_ORDER.index("commands")


def bench_layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYER_ORDER[layer_of(m)]}) imports {d} ({LAYER_ORDER[layer_of(d)]})"
            for m, deps in graph.items() if _within(m, "bench") and m != "bench"
            for d in deps if _within(d, "bench") and layer_of(d) > layer_of(m)]


def ekd_imports_of_bench(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in graph.items() if _within(m, "ekd")
            for d in deps if _within(d, "bench")]


def config_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("ekd.config")
            for d in deps if any(_within(d, p) for p in CONFIG_MUST_NOT_IMPORT)]


def private_reaches(path: Path) -> list[str]:
    """Where a module reaches into another module's or object's privates: ``from x import _y``,
    ``import a._b``, ``obj._attr`` (``self`` and ``cls`` aside), and ``sys.path`` patches."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                found.append(f"{where} imports a private name ({node.module})")
        elif isinstance(node, ast.Import):
            if any(p.startswith("_") and not p.startswith("__") for a in node.names for p in a.name.split(".")):
                found.append(f"{where} imports a private module")
        elif isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where} reads {ast.unparse(node)}")
            if node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{where} touches sys.path")
    return found


def test_bench_modules_import_their_own_layer_or_lower_ones():
    wrong = bench_layer_violations(_repository_graph())
    assert not wrong, wrong


def test_ekd_never_imports_bench():
    wrong = ekd_imports_of_bench(_repository_graph())
    assert not wrong, wrong


def test_no_import_cycles_in_ekd_or_bench():
    cycles = find_cycles(_repository_graph())
    assert not cycles, cycles


def test_bench_uses_public_names_only_and_runs_as_a_package():
    assert (REPO / "bench" / "__init__.py").is_file()
    wrong = [w for path in sorted((REPO / "bench").rglob("*.py")) for w in private_reaches(path)]
    assert not wrong, wrong


#: ekd's packages, bottom to top (docs/architecture.md): a package imports lower layers only.
EKD_LAYERS = (
    ("ekd", "ekd.errors"),  # the version string, the error types
    ("ekd.utils", "ekd.config", "ekd.output_paths", "ekd.functional"),  # shared helpers, typed configs
    ("ekd.data", "ekd.models", "ekd.heads"),  # building blocks
    ("ekd.distill", "ekd.eval"),  # distillers (on heads), evaluation protocols (on data)
    ("ekd.teachers", "ekd.deploy"),  # teacher kinds, deployment (on models, data, eval)
    ("ekd.engine",),  # the training loop
    ("ekd.commands",),  # the ekd command line
    ("ekd.__main__",),  # python -m ekd
)


def package_of(module: str) -> str:
    """``ekd.engine.trainer`` -> ``ekd.engine``; ``ekd.errors`` -> ``ekd.errors``; ``ekd`` -> ``ekd``."""
    return ".".join(module.split(".")[:2])


def ekd_layer_violations(graph: dict[str, set[str]], layers=EKD_LAYERS) -> list[str]:  # noqa: ANN001
    """Imports from a package to one of the same or a higher layer, and packages with no layer."""
    level = {package: i for i, row in enumerate(layers) for package in row}
    wrong = []
    for module, deps in graph.items():
        if not module.startswith("ekd"):
            continue
        mine = package_of(module)
        if mine not in level:
            wrong.append(f"{mine} has no layer in EKD_LAYERS")
            continue
        for dep in deps:
            theirs = package_of(dep)
            if dep.startswith("ekd") and theirs != mine and level.get(theirs, len(layers)) >= level[mine]:
                wrong.append(f"{module} imports {dep} (layer {level.get(theirs, '?')} >= {level[mine]})")
    return sorted(set(wrong))


def test_ekd_packages_import_lower_layers_only():
    wrong = ekd_layer_violations(_graph())
    assert not wrong, wrong


def test_the_layer_checker_sees_an_upward_import_and_an_unplaced_package():
    graph = {"ekd.teachers.cache": {"ekd.engine.distributed"}, "ekd.engine.trainer": {"ekd.teachers.cache"},
             "ekd.newthing.x": set(), "ekd.models.iresnet": {"ekd.errors"}}
    assert ekd_layer_violations(graph) == [
        "ekd.newthing has no layer in EKD_LAYERS",
        "ekd.teachers.cache imports ekd.engine.distributed (layer 5 >= 4)"]


def test_config_modules_import_no_eval_models_or_distill():
    wrong = config_violations(_repository_graph())
    assert not wrong, wrong


def _plant(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    """A fake tree under ``root`` (``{"ekd/x.py": source}``) and its import graph."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    known = {}
    for package in {name.split("/")[0] for name in files}:
        known.update(modules_under(root, package))
    return graph_of(known)


def test_the_checker_sees_ekd_importing_bench(tmp_path):
    graph = _plant(tmp_path, {"ekd/__init__.py": "",
                              "ekd/engine/x.py": "def f():\n    from bench.kd_table import Table\n",
                              "bench/__init__.py": "", "bench/kd_table.py": "Table = 1\n"})
    assert ekd_imports_of_bench(graph) == ["ekd.engine.x imports bench.kd_table"]


def test_the_checker_sees_a_bench_module_importing_a_higher_layer(tmp_path):
    graph = _plant(tmp_path, {"bench/__init__.py": "", "bench/kd_report.py": "def write_report(): ...\n",
                              "bench/kd_cells.py": "from bench.kd_profiles import Cell\n",
                              "bench/kd_profiles.py": "def f():\n    from bench.kd_report import write_report\n",
                              "bench/kd_table.py": "import bench.kd_report as R\n"})
    assert bench_layer_violations(graph) == ["bench.kd_profiles (facts) imports bench.kd_report (reports)"]


def test_the_cycle_finder_sees_a_bench_circle_through_a_function_level_import(tmp_path):
    graph = _plant(tmp_path, {"bench/__init__.py": "", "bench/kd_convergence.py": "from bench.kd_table import smoke\n",
                              "bench/kd_table.py": "def main():\n    from bench.kd_report import write_report\n",
                              "bench/kd_report.py": "def section():\n    from bench.kd_convergence import lines\n"})
    assert find_cycles(graph) == ["bench.kd_convergence -> bench.kd_table -> bench.kd_report -> bench.kd_convergence"]


def test_the_checker_sees_config_importing_a_registry(tmp_path):
    graph = _plant(tmp_path, {"ekd/__init__.py": "", "ekd/config.py": "from ekd import config_checks\n",
                              "ekd/config_checks.py": "def check():\n    from ekd.distill import DISTILLERS\n",
                              "ekd/distill/__init__.py": "DISTILLERS = {}\n"})
    assert config_violations(graph) == ["ekd.config_checks imports ekd.distill"]


def test_the_checker_sees_private_reaches_and_path_patches(tmp_path):
    script = tmp_path / "step.py"
    script.write_text("import sys\nfrom ekd.distill._utils import margin_target\nfrom ekd.x import _y\n"
                      "sys.path.insert(0, 'bench')\n\n\ndef f(trainer, self):\n"
                      "    return trainer._mirror(1), self._ok, trainer.__class__\n")
    found = private_reaches(script)
    assert [w.split(" ", 1)[1] for w in found] == [
        "imports a private name (ekd.distill._utils)", "imports a private name (ekd.x)",
        "touches sys.path", "reads trainer._mirror"], found
