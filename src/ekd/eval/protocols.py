"""Evaluation protocols: pair lists and all-pairs scoring.

* :func:`read_lfw_pairs` -- the LFW View-2 ``pairs.txt`` format (Huang et al., "Labeled Faces
  in the Wild", 2007): a header ``"<sets>\\t<n>"`` then, per set, ``n`` genuine lines
  ``name n1 n2`` followed by ``n`` impostor lines ``name1 n1 name2 n2``; image
  ``<root>/<name>/<name>_<nnnn>.<ext>``. The pair order is kept, so each set is one
  contiguous fold of :func:`ekd.eval.metrics.verification_accuracy`.
* :func:`read_pair_list` -- a generic ``path1 path2 label`` list.
* :func:`cap_per_identity` and :func:`all_pairs_scores` -- the LFW all-pairs protocol used by
  the benchmark: every identity with at least 2 images, its first 10 images in file-name order,
  every unordered pair among all kept images scored by cosine similarity (TPR at FPR).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekd.errors import DataError

__all__ = ["PairList", "read_lfw_pairs", "read_pair_list", "all_pairs_scores", "cap_per_identity"]

_MISSING_MODES = ("error", "skip")
_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


@dataclass
class PairList:
    """Image pairs to verify: ``paths1[i]`` vs ``paths2[i]``, genuine if ``issame[i]``.

    ``skipped`` counts pairs dropped by ``missing="skip"`` because an image file was absent.
    """

    paths1: list[str]
    paths2: list[str]
    issame: np.ndarray
    skipped: int = 0

    def __post_init__(self) -> None:
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if not (len(self.paths1) == len(self.paths2) == self.issame.size):
            raise DataError(
                f"PairList lengths differ: {len(self.paths1)} paths1, {len(self.paths2)} paths2, "
                f"{self.issame.size} issame"
            )

    def __len__(self) -> int:
        return len(self.paths1)

    def unique_paths(self) -> list[str]:
        """Every image path used by the pairs, once, in first-use order."""
        return list(dict.fromkeys(p for pair in zip(self.paths1, self.paths2) for p in pair))


def _read_lines(path: Path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"pair list not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"pair list is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read the pair list {path}: {exc}") from None


def _is_file(path: Path) -> bool:
    """``path.is_file()`` that answers False for names the OS refuses (too long, NUL, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _check_missing_mode(missing: str) -> None:
    if missing not in _MISSING_MODES:
        raise DataError(f"missing must be one of {_MISSING_MODES}, got {missing!r}")


class _PairCollector:
    """Accumulates the pairs of a list file, applying the ``missing`` policy to absent images."""

    def __init__(self, source: Path, missing: str) -> None:
        _check_missing_mode(missing)
        self.source, self.missing = source, missing
        self.paths1: list[str] = []
        self.paths2: list[str] = []
        self.issame: list[bool] = []
        self.skipped = 0

    def add(self, p1: Path, p2: Path, same: bool, line_no: int) -> None:
        absent = [p for p in (p1, p2) if not _is_file(p)]
        if absent:
            if self.missing == "error":
                raise DataError(f"{self.source}:{line_no}: image not found: {absent[0]}")
            self.skipped += 1
            return
        self.paths1.append(str(p1))
        self.paths2.append(str(p2))
        self.issame.append(same)

    def finish(self) -> PairList:
        if not self.paths1:
            raise DataError(f"{self.source}: no usable pairs"
                            + (f" ({self.skipped} skipped)" if self.skipped else ""))
        if self.skipped:
            warnings.warn(f"{self.source}: skipped {self.skipped} pair(s) whose image file is "
                          "missing", stacklevel=3)
        return PairList(self.paths1, self.paths2, np.asarray(self.issame, dtype=bool), self.skipped)


def read_lfw_pairs(
    pairs_txt: Path, images_root: Path, ext: str = "jpg", missing: str = "error"
) -> PairList:
    """Read an LFW View-2 ``pairs.txt`` (also View-1 files, whose header is a single ``n``).

    Lines ``name n1 n2`` are genuine pairs, ``name1 n1 name2 n2`` impostor pairs; the image is
    ``images_root/name/name_{n:04d}.{ext}``. The order of the file is kept (sets = folds).
    A missing image raises :class:`DataError` naming it (``missing="error"``) or drops the pair
    (``missing="skip"``: counted in ``PairList.skipped`` and reported by a warning; the folds are
    then no longer of equal size).
    """
    pairs_txt, images_root = Path(pairs_txt), Path(images_root)
    pairs = _PairCollector(pairs_txt, missing)
    lines = _read_lines(pairs_txt)
    header_no = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_no is None:
        raise DataError(f"{pairs_txt}: empty file")
    header = lines[header_no].split()
    try:
        counts = [int(v) for v in header]
    except ValueError:
        counts = []
    if len(counts) not in (1, 2) or min(counts) < 1:
        raise DataError(
            f"{pairs_txt}:{header_no + 1}: expected a header '<sets> <pairs per set>', "
            f"got {lines[header_no].strip()!r}"
        )
    sets, per_set = (1, counts[0]) if len(counts) == 1 else counts
    ext = ext.lstrip(".")

    n_lines = 0
    for no, line in enumerate(lines[header_no + 1 :], start=header_no + 2):
        fields = line.split()
        if not fields:
            continue
        n_lines += 1
        try:
            if len(fields) == 3:
                name1 = name2 = fields[0]
                num1, num2 = int(fields[1]), int(fields[2])
            elif len(fields) == 4:
                name1, name2 = fields[0], fields[2]
                num1, num2 = int(fields[1]), int(fields[3])
            else:
                raise ValueError
            if num1 < 0 or num2 < 0:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{pairs_txt}:{no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {line.strip()!r}"
            ) from None
        pairs.add(images_root / name1 / f"{name1}_{num1:04d}.{ext}",
                  images_root / name2 / f"{name2}_{num2:04d}.{ext}", len(fields) == 3, no)
    expected = sets * per_set * 2
    if n_lines != expected:
        raise DataError(
            f"{pairs_txt}: header announces {sets} set(s) of {per_set} genuine + {per_set} "
            f"impostor pairs ({expected} lines) but the file has {n_lines} pair lines"
        )
    return pairs.finish()


def read_pair_list(path: Path, root: Path | None = None, missing: str = "error") -> PairList:
    """Read a generic pair list: ``path1 path2 label`` per line, whitespace separated.

    ``label`` is ``1``/``0`` or ``true``/``false`` (any case). Blank lines and ``#`` comments
    are ignored; relative paths are resolved against ``root`` (default: the list's folder).
    Malformed lines raise :class:`DataError` with ``file:line``. Missing images: as in
    :func:`read_lfw_pairs`.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    pairs = _PairCollector(path, missing)
    for no, line in enumerate(_read_lines(path), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DataError(
                f"{path}:{no}: expected 'path1 path2 label', got {len(fields)} field(s): "
                f"{line.strip()!r}"
            )
        label = fields[2].lower()
        if label not in _TRUE and label not in _FALSE:
            raise DataError(f"{path}:{no}: label must be 1/0 or true/false, got {fields[2]!r}")
        # an absolute field overrides base
        pairs.add(base / fields[0], base / fields[1], label in _TRUE, no)
    return pairs.finish()


def all_pairs_scores(
    emb: np.ndarray, labels: np.ndarray, block_elems: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score and genuine flag of every unordered pair ``i < j`` (row-major order).

    ``emb`` must already be L2-normalised, so the cosine is the dot product. Scores are
    float32, computed block-wise by matrix products of about ``block_elems`` entries (the
    upper triangle only), so 6,500 embeddings (~21M pairs) need ~105 MB of output plus a
    few tens of MB of work space.
    """
    e = np.asarray(emb)
    lab = np.asarray(labels).reshape(-1)
    if e.ndim != 2:
        raise DataError(f"embeddings must be 2-D [N, D], got shape {e.shape}")
    if lab.shape[0] != e.shape[0]:
        raise DataError(f"labels have {lab.shape[0]} entries but embeddings {e.shape[0]} rows")
    if e.shape[0] < 2:
        raise DataError(f"all-pairs scoring needs at least 2 embeddings, got {e.shape[0]}")
    e = np.ascontiguousarray(e, dtype=np.float32)
    codes = np.unique(lab, return_inverse=True)[1].reshape(-1).astype(np.int64)
    n = e.shape[0]
    total = n * (n - 1) // 2
    scores = np.empty(total, dtype=np.float32)
    same = np.empty(total, dtype=bool)
    pos = 0
    i0 = 0
    while i0 < n - 1:
        width = n - i0
        i1 = min(n - 1, i0 + max(1, block_elems // width))
        rows = i1 - i0
        upper = np.arange(width)[None, :] > np.arange(rows)[:, None]  # j > i within the block
        block = e[i0:i1] @ e[i0:].T
        m = int(upper.sum())
        scores[pos : pos + m] = block[upper]
        same[pos : pos + m] = (codes[i0:i1, None] == codes[None, i0:])[upper]
        pos += m
        i0 = i1
    return scores, same


def cap_per_identity(
    paths: list[str], labels: np.ndarray, max_per_identity: int | None
) -> np.ndarray:
    """Indices kept by the all-pairs protocol, in increasing order.

    Every identity with at least 2 images is kept with its first ``max_per_identity`` images in
    file-name order (all of them if ``None``); identities with a single image are dropped.
    The LFW all-pairs protocol = every identity with >= 2 images, its first 10 images in
    file-name order, all pairs among them (``max_per_identity=10``).
    """
    lab = np.asarray(labels).reshape(-1)
    if len(paths) != lab.shape[0]:
        raise DataError(f"{len(paths)} paths but {lab.shape[0]} labels")
    if max_per_identity is not None and max_per_identity < 2:
        raise DataError(f"max_per_identity must be >= 2 or None, got {max_per_identity}")
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(lab.tolist()):
        groups.setdefault(key, []).append(i)
    kept: list[int] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: (os.path.basename(str(paths[i])), str(paths[i])))
        kept.extend(members[:max_per_identity])
    return np.asarray(sorted(kept), dtype=np.int64)
