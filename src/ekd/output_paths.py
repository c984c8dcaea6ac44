"""Check output locations before any work starts, so a bad ``--out`` fails in a second, not after
an hour of embedding or training. Errors name the option and the path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ekd.errors import EkdError

__all__ = ["prepare_output_dir", "prepare_output_file"]


def _probe(folder: Path, message: str) -> None:
    """Create and delete a scratch file in ``folder`` (permission bits alone mislead root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise EkdError(f"{message} ({exc.strerror or exc})") from None


def _make_writable_folder(folder: Path, cannot_create: str, not_writable: str) -> None:
    """Create ``folder`` (with parents) and check that a file can be written into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EkdError(f"{cannot_create} ({exc.strerror or exc})") from None
    _probe(folder, not_writable)


def prepare_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the folder ``path`` (with parents) and check that files can be written into it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EkdError(f"{option} {out}: exists and is not a folder; give a folder for the outputs")
    _make_writable_folder(out, f"{option} {out}: cannot create the output folder",
                          f"{option} {out}: the output folder is not writable")
    return out


def prepare_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Check that the file ``path`` can be written: not a folder; its folder creatable and
    writable."""
    out = Path(path)
    if out.is_dir():
        raise EkdError(f"{option} {out}: is a folder; give a file name")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise EkdError(f"{option} {out}: {parent} is not a folder")
    _make_writable_folder(parent, f"{option} {out}: cannot create the folder {parent}",
                          f"{option} {out}: the folder {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise EkdError(f"{option} {out}: the file exists and is not writable")
    return out
