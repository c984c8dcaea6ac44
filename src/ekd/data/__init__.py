"""Data layer: image loading, identity folders, RecordIO ``.rec`` and ``.bin`` files, the balanced
batch sampler and the built-in synthetic faces (:mod:`.synthetic_faces` draws them,
:mod:`.synthetic_benchmark` writes the train/eval folders and pairs); :mod:`.kinds`: the
``data.kind`` registry, one module per kind."""

from ekd.data.check import FolderReport, check_folder
from ekd.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, ListDataset, write_pairs
from ekd.data.rec_folder import pack_folder, unpack_rec
from ekd.data.record_dataset import RecordDataset
from ekd.data.recordio import RecordIOReader, RecordIOWriter
from ekd.data.robust import ON_CORRUPT, CorruptSampleWarning
from ekd.data.synthetic_benchmark import make_synthetic_benchmark
from ekd.data.synthetic_faces import generate_identity_folder, render_face
from ekd.data.transforms import denormalize, load_image, random_flip, to_tensor
from ekd.data.verification_bin import BinDataset, load_bin, read_bin, write_bin

__all__ = [
    "BinDataset",
    "CorruptSampleWarning",
    "FolderReport",
    "ON_CORRUPT",
    "check_folder",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ListDataset",
    "RecordDataset",
    "RecordIOReader",
    "RecordIOWriter",
    "load_bin",
    "pack_folder",
    "unpack_rec",
    "read_bin",
    "write_bin",
    "denormalize",
    "generate_identity_folder",
    "load_image",
    "make_synthetic_benchmark",
    "random_flip",
    "render_face",
    "to_tensor",
    "write_pairs",
]
