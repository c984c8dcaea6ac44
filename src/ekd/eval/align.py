"""Five-point face alignment to the ArcFace 112x112 template (numpy + PIL, no OpenCV).

As InsightFace's IJB evaluation (``recognition/arcface_torch/eval_ijbc.py``, ``Embedding.get``):
the 5 landmarks (left eye, right eye, nose tip, left and right mouth corner, in image pixels)
are mapped onto :data:`ARCFACE_TEMPLATE` by the least-squares similarity transform of Umeyama
("Least-squares estimation of transformation parameters between two point patterns", IEEE PAMI
13(4), 1991 -- what ``skimage.transform.SimilarityTransform.estimate`` computes), and the image is
warped with bilinear interpolation and black borders (``cv2.warpAffine(..., borderValue=0)``).
OpenCV's convention, pixel ``(x, y)`` at integer coordinates of its centre, is reproduced with
PIL's ``Image.transform(AFFINE)``, which addresses pixel corners, by a half-pixel shift.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ekd.data.transforms import load_image, to_tensor
from ekd.errors import DataError

__all__ = ["ARCFACE_TEMPLATE", "umeyama", "warp_affine", "align_face", "AlignedFaceDataset",
           "embed_aligned"]

#: ArcFace's 5-point template for 112x112 crops (InsightFace's 96x112 template shifted by 8 px).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``T`` (3x3, homogeneous) with ``dst ~ T @ src`` (Umeyama 1991).

    With ``mu`` the means, ``Sigma = (dst - mu_d)^T (src - mu_s) / n = U D V^T`` (SVD) and ``S``
    the identity except ``S[-1, -1] = -1`` when the optimal orthogonal matrix would be a
    reflection: rotation ``R = U S V^T``, scale ``c = trace(D S) / var(src)``, translation
    ``t = mu_d - c R mu_s`` (equations 40-42 of the paper).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise DataError(f"landmarks must be two [N, D] arrays of equal shape with N >= 2, got "
                        f"{src.shape} and {dst.shape}")
    n, dim = src.shape
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum() / n
    if not np.isfinite(var_s) or var_s <= 1e-12:
        raise DataError(f"degenerate landmarks (all points coincide): {src.tolist()}")
    sigma = dc.T @ sc / n
    u, d, vt = np.linalg.svd(sigma)
    s = np.ones(dim)
    rank = int(np.linalg.matrix_rank(sigma))
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) < 0:
            s[-1] = -1
    elif np.linalg.det(sigma) < 0:
        s[-1] = -1
    rot = u @ np.diag(s) @ vt
    scale = float(d @ s) / var_s if estimate_scale else 1.0
    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rot
    out[:dim, dim] = mu_d - scale * rot @ mu_s
    return out


def warp_affine(img: Image.Image, matrix: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """``cv2.warpAffine(img, matrix, size)`` (bilinear, black border) with PIL.

    ``matrix`` (2x3 or 3x3) maps input pixel coordinates to output coordinates; ``size`` is
    ``(width, height)`` of the output.
    """
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    inv = np.linalg.inv(m)[:2]  # output (pixel centres) -> input (pixel centres)
    a, t = inv[:, :2], inv[:, 2]
    c = t + 0.5 - a @ np.array([0.5, 0.5])  # PIL samples at corner coordinates + 0.5
    coeffs = (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1])
    return img.transform(size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)


def align_face(img: Image.Image, landmarks: np.ndarray, size: int = 112) -> Image.Image:
    """Warp ``img`` so its 5 ``landmarks`` ([5, 2], pixels) land on the ArcFace template."""
    lmk = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if lmk.shape != (5, 2):
        raise DataError(f"expected 5 landmarks (x, y), got an array of shape {lmk.shape}")
    template = ARCFACE_TEMPLATE * (size / 112.0)
    return warp_affine(img.convert("RGB"), umeyama(lmk, template)[:2], (size, size))


class AlignedFaceDataset(Dataset):
    """Images aligned on the fly from their 5 landmarks (IJB loose crops); items are tensors."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], landmarks: np.ndarray,
                 input_size: int = 112) -> None:
        self.paths = [str(p) for p in paths]
        self.landmarks = np.asarray(landmarks, dtype=np.float64).reshape(len(self.paths), 5, 2)
        self.input_size = int(input_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        face = align_face(load_image(self.paths[index]), self.landmarks[index], 112)
        return to_tensor(face, self.input_size)


def embed_aligned(model: torch.nn.Module, paths: Sequence[str | os.PathLike[str]],
                  landmarks: np.ndarray, input_size: int = 112, batch_size: int = 128,
                  device: str | torch.device = "cpu", flip: bool = True,
                  progress: bool | str = False, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw (not normalised) float32 embeddings of the aligned faces and of their mirror images
    (``None`` without ``flip``), as InsightFace's IJB ``Embedding`` feeds ``[img, fliplr(img)]``.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(AlignedFaceDataset(paths, landmarks, input_size), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    batches = loader
    if progress:
        from tqdm.auto import tqdm
        label = progress if isinstance(progress, str) else "aligned faces"
        batches = tqdm(loader, desc=label, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    feats, flips = [], []
    try:
        with torch.inference_mode():
            for x in batches:
                x = x.to(device)
                feats.append(model(x).float().cpu().numpy())
                if flip:
                    flips.append(model(torch.flip(x, dims=[3])).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not feats:
        raise DataError("no images to embed")
    return np.concatenate(feats), (np.concatenate(flips) if flip else None)
