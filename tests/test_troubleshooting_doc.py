"""docs/troubleshooting.md covers every module that raises ekd's own errors."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERRORS = {"ConfigError", "DataError", "CheckpointError", "EkdError"}


def _raising_modules() -> list[Path]:
    out = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
               and isinstance(n.exc.func, ast.Name) and n.exc.func.id in ERRORS for n in ast.walk(tree)):
            out.append(path.relative_to(ROOT / "src"))
    return out


def test_every_raising_module_is_documented():
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    modules = _raising_modules()
    assert len(modules) > 20
    missing = [str(m) for m in modules
               if str(m) not in doc and not (f"{m.parent}/" in doc and f"`{m.name}`" in doc)]
    assert not missing, f"add a section for these modules' error messages: {missing}"
