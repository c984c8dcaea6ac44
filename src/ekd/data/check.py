"""``check_folder``: everything wrong with an identity folder, found before training starts.

It lists the identity folders of ``root/<identity>/<image>`` exactly as
:class:`~ekd.data.folder.ImageFolderDataset` does and reports

* identity folders without images (left out of the dataset, so labels shift);
* identities with a single image (they cannot form positive pairs for EKD's P x K sampler);
* files that cannot be decoded (corrupt or truncated; ``decode=True``);
* duplicate files (same SHA-256 of the bytes): within one identity (harmless but wasteful) and
  across identities (label noise: the same face under two labels);
* files in the identity folders that are not images by extension, and files at the root.

A missing root or a root without identity folders raises :class:`~ekd.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ekd.data.folder import IMAGE_EXTENSIONS
from ekd.data.transforms import load_image
from ekd.errors import DataError

__all__ = ["FolderReport", "check_folder"]


@dataclass
class FolderReport:
    """Findings of :func:`check_folder`; paths are relative to ``root``."""

    root: str
    identities: int = 0
    images: int = 0
    empty_identities: list[str] = field(default_factory=list)
    single_image_identities: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates_within: list[list[str]] = field(default_factory=list)  # each group: one identity
    duplicates_across: list[list[str]] = field(default_factory=list)  # groups spanning identities
    other_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No unreadable file, no duplicate across identities and no empty identity folder."""
        return not (self.unreadable or self.duplicates_across or self.empty_identities)

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "identities": self.identities,
                "images": self.images, "empty_identities": self.empty_identities,
                "single_image_identities": self.single_image_identities,
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "duplicates_within_identity": self.duplicates_within,
                "duplicates_across_identities": self.duplicates_across,
                "other_files": self.other_files}

    def format(self, limit: int = 10) -> str:
        """A human-readable summary (at most ``limit`` examples per finding)."""
        def show(items: list) -> str:
            shown = [" = ".join(i) if isinstance(i, list) else str(i) for i in items[:limit]]
            more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
            return "".join(f"\n    {s}" for s in shown + more)

        lines = [f"{self.root}: {self.identities} identities, {self.images} images"
                 + (" -- OK" if self.ok else " -- PROBLEMS FOUND")]
        findings = [
            ("unreadable image file(s) (skipped by on_corrupt=skip, fatal with on_corrupt=error)",
             [f"{p}: {r}" for p, r in self.unreadable]),
            ("duplicate image(s) under different identities (label noise)", self.duplicates_across),
            ("identity folder(s) without images (left out; labels of later identities shift)",
             self.empty_identities),
            ("duplicate image(s) within one identity", self.duplicates_within),
            ("identity(ies) with a single image (no positive pair)", self.single_image_identities),
            ("file(s) ignored (not an image extension, or at the root)", self.other_files),
        ]
        for title, items in findings:
            if items:
                lines.append(f"  {len(items)} {title}:{show(items)}")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(root: str | os.PathLike[str], decode: bool = True,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                 progress: bool = False) -> FolderReport:
    """Scan ``root/<identity>/<image>``; ``decode=False`` only hashes (faster, no decode check);
    ``progress``: a bar over the identity folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {'is not a folder' if root.exists() else 'not found'}: {root}")
    report = FolderReport(str(root))
    exts = tuple(e.lower() for e in extensions)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list the dataset folder {root}: {exc}") from None
    folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    report.other_files = [e.name for e in entries if not e.is_dir() and not e.name.startswith(".")]
    if not folders:
        raise DataError(f"dataset folder {root} has no identity sub-folders")
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for name in tqdm(folders, desc=f"checking {root.name}", unit="id", disable=not progress):
        try:
            files = sorted(e.name for e in os.scandir(root / name)
                           if e.is_file() and not e.name.startswith("."))
        except OSError as exc:
            report.unreadable.append((name, f"cannot list the folder: {exc}"))
            continue
        images = [f for f in files if f.lower().endswith(exts)]
        report.other_files += [f"{name}/{f}" for f in files if not f.lower().endswith(exts)]
        if not images:
            report.empty_identities.append(name)
            continue
        report.identities += 1
        report.images += len(images)
        if len(images) == 1:
            report.single_image_identities.append(name)
        for f in images:
            rel, path = f"{name}/{f}", root / name / f
            try:
                digest = _sha256(path)
                if decode:
                    load_image(path)
            except (OSError, DataError) as exc:
                report.unreadable.append((rel, str(exc)))
                continue
            by_hash.setdefault(digest, []).append((name, rel))
    for group in by_hash.values():
        if len(group) > 1:
            rels = [rel for _, rel in group]
            across = len({ident for ident, _ in group}) > 1
            (report.duplicates_across if across else report.duplicates_within).append(rels)
    return report
