"""One run per ``train.output_dir``: a folder that holds another run is never silently reused.

A folder holds a run when it has any of :data:`RUN_FILES` (what :mod:`ekd.engine.trainer` and
``ekd diagnose`` write). Training into it is refused with a one-line error naming the folder,
unless ``train.resume`` continues that run or ``train.overwrite`` (``ekd train --overwrite``)
starts again, which first deletes the old run's files so that nothing is mixed. A resumed run
continues ``metrics.jsonl`` from its checkpoint's step: rows the previous run wrote after that
checkpoint are dropped, so no step is logged twice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ekd.errors import ConfigError, EkdError

__all__ = ["RUN_FILES", "run_files", "claim_run_folder", "continue_metrics"]

RUN_FILES = ("config.yaml", "metrics.jsonl", "model.pt", "checkpoints", "tensorboard", "diagnose")


def run_files(run_dir: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``run_dir``."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def claim_run_folder(run_dir: Path, resume: str | None, overwrite: bool, clear: bool) -> str | None:
    """Check ``run_dir`` before any heavy work and return the checkpoint to resume from (None
    for a fresh start). ``resume: auto`` means ``run_dir/checkpoints/last.pt`` when it exists.
    With ``overwrite`` the old run's files are deleted when ``clear`` (rank 0 only under
    torchrun; the caller waits for it)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EkdError(f"train.output_dir {run_dir}: exists and is not a folder")
    if resume and overwrite:
        raise ConfigError(f"train.resume={resume} and train.overwrite=true contradict each other: "
                          "continue the run in train.output_dir or start it again, not both")
    if resume == "auto":
        candidate = run_dir / "checkpoints" / "last.pt"
        resume = str(candidate) if candidate.is_file() else None
    held = run_files(run_dir)
    if resume:
        if held and not _inside(Path(resume), run_dir):
            raise EkdError(f"train.output_dir {run_dir} holds another run ({', '.join(held)}); resuming "
                           f"{resume} into it would mix two runs: choose another train.output_dir")
        return resume
    if held and not overwrite:
        raise EkdError(f"train.output_dir {run_dir} holds another run ({', '.join(held)}): continue it "
                       "with --set train.resume=auto, start again with --overwrite (deletes that "
                       "run), or choose another train.output_dir")
    if held and clear:
        for name in held:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return None


def continue_metrics(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the rows of steps up to ``step`` (a resumed checkpoint's):
    rows written after that checkpoint would otherwise be logged twice. Returns the number of
    rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row cut short by a killed process
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
