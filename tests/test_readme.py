"""README facts: the layout table lists every package, the quoted CPU rate is the measured one."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_layout_lists_every_package():
    packages = sorted(p.name for p in (ROOT / "src" / "ekd").iterdir()
                      if p.is_dir() and (p / "__init__.py").is_file())
    assert "deploy" in packages
    missing = [p for p in packages if f"`src/ekd/{p}/`" not in README]
    assert not missing, f"README layout table lacks {missing}"


def test_quoted_training_rate_matches_the_results_file():
    results = json.loads((ROOT / "docs" / "results" / "kd_table_cpu.json").read_text())
    found = re.search(r"no KD: (\d+); (\d+) × (\d+) steps × (\d+) images", README)
    assert found, "README quotes the CPU training rate of the KD table"
    rate, epochs, steps, batch = (int(g) for g in found.groups())
    seconds = results["summaries"]["T2"]["no KD"]["train_seconds"]
    assert rate == round(epochs * steps * batch / seconds)


def test_results_block_is_the_one_the_report_wrote():
    """README's cpu2 results block is exactly what ``bench/kd_table.py`` wrote from the committed
    cells (``docs/results/kd_table_cpu2_summary.md``): it is never edited by hand."""
    block = (ROOT / "docs" / "results" / "kd_table_cpu2_summary.md").read_text().rstrip("\n")
    assert block.startswith("<!-- kd_table:cpu2 begin") and block in README

