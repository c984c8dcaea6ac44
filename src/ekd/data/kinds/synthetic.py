"""``data.kind: synthetic``: the built-in procedural identity folder (:mod:`ekd.data.synthetic_faces`),
generated once into ``data.synthetic.cache_dir``."""

from __future__ import annotations

from pathlib import Path

from ekd.data.folder import ImageFolderDataset
from ekd.data.kinds.folder import folder_fingerprint
from ekd.data.kinds.registry import DatasetKind, register_kind
from ekd.data.synthetic_benchmark import make_synthetic_benchmark


def _build(data_config) -> ImageFolderDataset:  # noqa: ANN001 - ekd.config.DataConfig
    synthetic = data_config.synthetic
    paths = make_synthetic_benchmark(Path(synthetic.cache_dir), synthetic.train_identities,
                                     synthetic.train_images, synthetic.eval_identities, synthetic.eval_images,
                                     synthetic.image_size, synthetic.num_pairs, synthetic.seed)
    return ImageFolderDataset(paths["train"], input_size=data_config.input_size, train=False,
                              on_corrupt=data_config.on_corrupt)


register_kind(DatasetKind("synthetic", ImageFolderDataset, _build,
                          lambda ds: folder_fingerprint(ds.root, ds.samples), lambda ds: str(ds.root)))
