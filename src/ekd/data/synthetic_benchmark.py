"""The built-in synthetic benchmark: training identities, disjoint evaluation identities and a
pair list, generated once into a folder (:func:`ekd.data.synthetic_faces.render_face` draws the faces)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ekd.data.folder import write_pairs
from ekd.data.synthetic_faces import generate_identity_folder
from ekd.errors import DataError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["make_synthetic_benchmark"]


def make_synthetic_benchmark(out: Path, train_identities: int, train_images: int,
                             eval_identities: int, eval_images: int, image_size: int,
                             num_pairs: int, seed: int, progress: bool = False
                             ) -> dict[str, Path]:
    """Create ``out/train``, ``out/eval`` (disjoint identities) and ``out/pairs.txt``.

    Skips the work when ``out/DONE`` records the same parameters. Returns the three paths.
    Processes that call it at once on the same ``out`` (students trained side by side) take turns
    on a lock file, so one generates and the others find it done.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock"):
        return _make_synthetic_benchmark(out, train_identities, train_images, eval_identities,
                                         eval_images, image_size, num_pairs, seed, progress)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where there is none)."""
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _make_synthetic_benchmark(out: Path, train_identities: int, train_images: int,
                              eval_identities: int, eval_images: int, image_size: int,
                              num_pairs: int, seed: int, progress: bool) -> dict[str, Path]:
    params = {"version": 1, "train_identities": int(train_identities),
              "train_images": int(train_images), "eval_identities": int(eval_identities),
              "eval_images": int(eval_images), "image_size": int(image_size),
              "num_pairs": int(num_pairs), "seed": int(seed)}
    paths = {"train": out / "train", "eval": out / "eval", "pairs": out / "pairs.txt"}
    done, busy = out / "DONE", out / "GENERATING"
    if done.is_file():
        try:
            same = json.loads(done.read_text()) == params
        except (OSError, ValueError):
            same = False
        if same and all(p.exists() for p in paths.values()):
            return paths
    owned = done.exists() or busy.exists()
    for key in ("train", "eval"):
        if paths[key].exists():
            if not owned and any(paths[key].iterdir()):
                raise DataError(f"{paths[key]} exists and was not made by ekd's synthetic "
                                f"generator; choose another output folder than {out}")
            shutil.rmtree(paths[key])
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    busy.write_text(json.dumps(params))
    generate_identity_folder(paths["train"], train_identities, train_images, image_size, seed,
                             first_identity=0, progress=progress)
    generate_identity_folder(paths["eval"], eval_identities, eval_images, image_size, seed,
                             first_identity=train_identities, progress=progress)
    write_pairs(paths["eval"], paths["pairs"], num_pairs, seed)
    done.write_text(json.dumps(params, indent=1))
    busy.unlink()
    return paths
