"""``data.kind: synthetic``: the built-in procedural identity folder (:mod:`ekd.data.synthetic`),
generated once into ``data.synthetic.cache_dir``."""

from __future__ import annotations

from pathlib import Path

from ekd.data.folder import ImageFolderDataset
from ekd.data.kinds.folder import folder_fingerprint
from ekd.data.kinds.registry import DatasetKind, register_kind
from ekd.data.synthetic_benchmark import make_synthetic_benchmark


def _build(dc) -> ImageFolderDataset:  # noqa: ANN001 - ekd.config.DataConfig
    s = dc.synthetic
    paths = make_synthetic_benchmark(Path(s.cache_dir), s.train_identities, s.train_images,
                                     s.eval_identities, s.eval_images, s.image_size, s.num_pairs, s.seed)
    return ImageFolderDataset(paths["train"], input_size=dc.input_size, train=False,
                              on_corrupt=dc.on_corrupt)


register_kind(DatasetKind("synthetic", ImageFolderDataset, _build,
                          lambda ds: folder_fingerprint(ds.root, ds.samples), lambda ds: str(ds.root)))
