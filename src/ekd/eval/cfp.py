"""CFP (Celebrities in Frontal-Profile, Sengupta et al., WACV 2016) verification protocol.

Layout of the dataset's own ``Protocol`` folder:

* ``Pair_list_F.txt`` / ``Pair_list_P.txt``: ``<number> <path>`` per line, the path relative to
  the ``Protocol`` folder (``../Data/Images/001/frontal/01.jpg``);
* ``Split/FF/NN/{same,diff}.txt`` and ``Split/FP/NN/{same,diff}.txt`` for folds ``NN`` = ``01``
  ... ``10``: one pair ``a,b`` per line (350 genuine + 350 impostor pairs per fold). In FF both
  numbers index ``Pair_list_F``; in FP the first indexes ``Pair_list_F`` (frontal) and the second
  ``Pair_list_P`` (profile). Fold k holds identities 50(k-1)+1 ... 50k.

:func:`read_cfp_pairs` returns the chosen folds in order, each fold's same and diff pairs
interleaved (same 1, diff 1, same 2, ...). The contiguous 10-fold accuracy of
:func:`ekd.eval.metrics.verification_accuracy` over all ten folds then uses exactly the
protocol's folds; over a single fold (e.g. fold 10, the identities not in ``train/``) it uses ten
sub-folds of 70 pairs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ekd.errors import DataError
from ekd.eval.protocols import PairList

__all__ = ["CFP_SPLITS", "cfp_protocol_dir", "cfp_folds", "read_cfp_list", "read_cfp_pairs"]

CFP_SPLITS = ("FF", "FP")


def cfp_protocol_dir(root: str | os.PathLike[str]) -> Path:
    """The ``Protocol`` folder: ``root`` itself or ``root/Protocol``."""
    root = Path(root)
    for cand in (root, root / "Protocol"):
        if (cand / "Pair_list_F.txt").is_file() and (cand / "Split").is_dir():
            return cand
    raise DataError(f"no CFP protocol under {root}: expected Pair_list_F.txt and Split/ in it "
                    "or in its Protocol/ folder")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"CFP protocol file not found: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DataError(f"cannot read the CFP protocol file {path}: {exc}") from None


def read_cfp_list(path: str | os.PathLike[str]) -> dict[int, str]:
    """``Pair_list_{F,P}.txt``: number -> normalised image path (relative to the list's folder)."""
    path = Path(path)
    out: dict[int, str] = {}
    for no, line in enumerate(_lines(path), start=1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        try:
            num = int(fields[0])
            if len(fields) != 2:
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{no}: expected '<number> <path>', got {line.strip()!r}") from None
        if num in out:
            raise DataError(f"{path}:{no}: number {num} appears twice")
        out[num] = os.path.normpath(path.parent / fields[1].strip())
    if not out:
        raise DataError(f"{path}: empty image list")
    return out


def cfp_folds(root: str | os.PathLike[str], split: str = "FF") -> list[int]:
    """The fold numbers present under ``Split/<split>/`` (``01`` ... ``10``), sorted."""
    split_dir = cfp_protocol_dir(root) / "Split" / _check_split(split)
    if not split_dir.is_dir():
        raise DataError(f"CFP split folder not found: {split_dir}")
    folds = sorted(int(d.name) for d in split_dir.iterdir()
                   if d.is_dir() and d.name.isascii() and d.name.isdigit())
    if not folds:
        raise DataError(f"{split_dir}: no fold folders (01 ... 10)")
    return folds


def _check_split(split: str) -> str:
    s = str(split).upper()
    if s not in CFP_SPLITS:
        raise DataError(f"CFP split must be one of {CFP_SPLITS}, got {split!r}")
    return s


def _read_fold_file(path: Path, first: dict[int, str], second: dict[int, str],
                    lists: tuple[str, str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for no, line in enumerate(_lines(path), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            a, b = (int(v) for v in text.split(","))
        except ValueError:
            raise DataError(f"{path}:{no}: expected 'a,b', got {text!r}") from None
        for num, table, name in ((a, first, lists[0]), (b, second, lists[1])):
            if num not in table:
                raise DataError(f"{path}:{no}: number {num} is not in {name}")
        pairs.append((first[a], second[b]))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def read_cfp_pairs(root: str | os.PathLike[str], split: str = "FF",
                   folds: list[int] | tuple[int, ...] | None = None,
                   missing: str = "error") -> PairList:
    """Pairs of the CFP ``split`` (``FF`` or ``FP``) for ``folds`` (default: all), fold by fold,
    same and diff pairs interleaved.

    ``root`` is the CFP folder (holding ``Protocol/``) or the ``Protocol`` folder itself.
    A fold whose same/diff counts differ keeps the interleaving up to the shorter list and
    appends the rest. ``missing="error"`` raises :class:`DataError` naming an absent image;
    ``"skip"`` drops the pair (with a warning); ``"ignore"`` does not look at the image files
    (for precomputed embeddings).
    """
    if missing not in ("error", "skip", "ignore"):
        raise DataError(f"missing must be 'error', 'skip' or 'ignore', got {missing!r}")
    split = _check_split(split)
    proto = cfp_protocol_dir(root)
    frontal = read_cfp_list(proto / "Pair_list_F.txt")
    if split == "FF":
        second, names = frontal, ("Pair_list_F.txt", "Pair_list_F.txt")
    else:
        second, names = read_cfp_list(proto / "Pair_list_P.txt"), ("Pair_list_F.txt", "Pair_list_P.txt")
    available = cfp_folds(proto, split)
    chosen = list(available) if folds is None else [int(f) for f in folds]
    absent = [f for f in chosen if f not in available]
    if absent or not chosen:
        raise DataError(f"CFP {split}: fold(s) {absent or chosen} not found under "
                        f"{proto / 'Split' / split} (available: {available})")
    paths1: list[str] = []
    paths2: list[str] = []
    issame: list[bool] = []
    skipped = 0
    for fold in chosen:
        fold_dir = proto / "Split" / split / f"{fold:02d}"
        same = _read_fold_file(fold_dir / "same.txt", frontal, second, names)
        diff = _read_fold_file(fold_dir / "diff.txt", frontal, second, names)
        order: list[tuple[tuple[str, str], bool]] = []
        for i in range(max(len(same), len(diff))):
            if i < len(same):
                order.append((same[i], True))
            if i < len(diff):
                order.append((diff[i], False))
        for (p1, p2), label in order:
            if missing != "ignore":
                gone = [p for p in (p1, p2) if not os.path.isfile(p)]
                if gone and missing == "error":
                    raise DataError(f"CFP {split} fold {fold:02d}: image not found: {gone[0]}")
                if gone:
                    skipped += 1
                    continue
            paths1.append(p1)
            paths2.append(p2)
            issame.append(label)
    if skipped:
        warnings.warn(f"CFP {split}: skipped {skipped} pair(s) with a missing image", stacklevel=2)
    if not paths1:
        raise DataError(f"CFP {split} folds {chosen}: no usable pairs")
    return PairList(paths1, paths2, np.asarray(issame, dtype=bool), skipped)
