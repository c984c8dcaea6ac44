"""Deterministic procedural face-identity dataset (the built-in default, no downloads).

Each identity gets its own face geometry and colours (face oval and jaw, skin tone, eyes, brows,
nose, mouth, ears, hair, optional beard/glasses, moles) drawn from a random generator seeded by
``(seed, identity)`` only. Each image then adds nuisance seeded by ``(seed, identity, index)``:
in-plane rotation, scale, translation, yaw/pitch (feature shifts and foreshortening), expression
(eye openness, smile, open mouth), gaze, background, illumination (gain, contrast, gradient,
colour cast), Gaussian noise and, sometimes, an occluding rectangle. Shapes are rendered as
anti-aliased implicit functions on a numpy pixel grid, so generation is fast and byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ekd.data.folder import write_pairs  # re-exported: pair lists for eval folders
from ekd.errors import DataError

__all__ = ["render_face", "generate_identity_folder", "write_pairs"]

_SKIN = np.array([[250, 222, 200], [238, 196, 160], [222, 170, 128],
                  [190, 132, 92], [140, 90, 60], [92, 58, 40]], dtype=np.float32)
_HAIR = np.array([[22, 18, 18], [58, 38, 28], [105, 68, 40], [170, 130, 75],
                  [222, 196, 130], [150, 62, 30], [165, 162, 160]], dtype=np.float32)
_IRIS = np.array([[55, 100, 170], [70, 125, 85], [115, 75, 40], [48, 32, 24],
                  [110, 118, 130]], dtype=np.float32)
_FACE_SCALE = 1.05  # one face unit in image half-widths at scale 1
_FACE_Y = -0.08  # mean vertical offset of the face centre (image half-heights)


def _pick(rng: np.random.Generator, table: np.ndarray, jitter: float, blend: bool) -> np.ndarray:
    """A colour from ``table`` (interpolated when ``blend``) with Gaussian jitter."""
    if blend:
        t = rng.uniform(0, len(table) - 1)
        i = int(t)
        j = min(i + 1, len(table) - 1)
        col = table[i] * (1 - (t - i)) + table[j] * (t - i)
    else:
        col = table[int(rng.integers(len(table)))]
    return np.clip(col + rng.normal(0, jitter, 3), 0, 255).astype(np.float32)


@lru_cache(maxsize=4096)
def _identity(seed: int, identity: int) -> dict:
    """Appearance parameters of one identity, in face units (x right, y down); do not mutate."""
    r = np.random.default_rng([seed, identity, 0])
    u = r.uniform
    p: dict = {
        "face_a": u(0.50, 0.64), "face_b": u(0.66, 0.80), "jaw": u(-0.25, 0.6),
        "skin": _pick(r, _SKIN, 8.0, True),
        "eye_y": u(-0.12, 0.04), "eye_dx": u(0.19, 0.30), "eye_rx": u(0.085, 0.13),
        "eye_ratio": u(0.42, 0.72), "iris": _pick(r, _IRIS, 15.0, False),
        "iris_frac": u(0.45, 0.72),
        "brow_gap": u(0.09, 0.17), "brow_thick": u(0.025, 0.06), "brow_arch": u(-0.02, 0.06),
        "brow_slope": u(-0.3, 0.3), "brow_w": u(1.0, 1.45), "brow_dark": u(0.55, 1.0),
        "nose_len": u(0.18, 0.34), "nose_w": u(0.05, 0.11),
        "mouth_gap": u(0.11, 0.19), "mouth_w": u(0.13, 0.26), "lip": u(0.025, 0.055),
        "mouth_curv": u(-0.03, 0.05), "lip_tint": u([0.75, 0.5, 0.5], [0.95, 0.7, 0.72]),
        "ear_ry": u(0.09, 0.16), "ear_y": u(-0.05, 0.12),
        "hair": _pick(r, _HAIR, 12.0, False), "has_hair": r.random() < 0.92,
        "hair_margin": u(0.04, 0.2), "hairline": u(-0.62, -0.28), "hair_tilt": u(-0.25, 0.25),
        "hair_curve": u(-0.4, 0.6), "hair_bottom": u(-0.15, 0.8),
        "beard": r.random() < 0.2, "beard_alpha": u(0.5, 0.85), "beard_top": u(0.02, 0.12),
        "glasses": r.random() < 0.2, "glass_col": _pick(r, _HAIR, 30.0, False),
        "glass_r": u(1.3, 1.7), "glass_t": u(0.015, 0.032),
        "blush": u(0.0, 0.35),
    }
    n = int(r.integers(0, 4))
    p["moles"] = [(u(-0.4, 0.4), u(-0.3, 0.5), u(0.018, 0.035)) for _ in range(n)]
    return p


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in ``[-1, 1]`` (x right, y down), float32."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _unit(x: np.ndarray) -> np.ndarray:
    """Clip to ``[0, 1]`` in place (cheaper than ``np.clip`` on small arrays)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


def _ellipse(U, V, cx, cy, rx, ry, px, taper: float = 0.0):
    """Soft (anti-aliased) coverage of an ellipse; ``taper`` narrows it below its centre."""
    du = (U - cx) / rx
    dv = (V - cy) / ry
    if taper:
        du *= 1.0 + taper * np.maximum(dv, 0.0) ** 2
    r = np.sqrt(du * du + dv * dv)
    return _unit(0.5 - (r - 1.0) * (min(rx, ry) / px))


def _band(U, V, cx, cy, half_w, thick, bend, slope, px):
    """Soft coverage of a curved stroke ``y = cy + slope*dx + bend*(1-(dx/half_w)^2)``."""
    dx = U - cx
    x = dx / half_w
    curve = cy + slope * dx + bend * (1 - x * x)
    half_t = 0.5 * thick * (1 - 0.45 * np.minimum(x * x, 1.0))
    a = _unit(0.5 - (np.abs(V - curve) - half_t) / px)
    return a * _unit(0.5 - (np.abs(dx) - half_w) / px)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of standard-normal samples; images read random slices of it (fast)."""
    bank = np.random.default_rng(20220601).standard_normal(1 << 20, dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _rgb(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(3, 1, 1)


class _Canvas:
    """Channel-first float image plus its face-space coordinates under a similarity pose."""

    def __init__(self, size: int, theta: float, scale: float, tx: float, ty: float) -> None:
        X, Y = _grid(size)
        self.size, self.scale, self.t = size, scale, (tx, ty)
        self.c, self.s = float(np.cos(theta)), float(np.sin(theta))
        dx, dy = X - tx, Y - ty
        self.U = (self.c * dx + self.s * dy) / scale
        self.V = (-self.s * dx + self.c * dy) / scale
        self.px = 2.0 / size / scale  # one pixel in face units
        self.img = np.empty((3, size, size), np.float32)

    def window(self, cx: float, cy: float, rad: float):
        """Pixel slices covering the face-space disc ``(cx, cy, rad)``, or None if off-image."""
        x = self.scale * (self.c * cx - self.s * cy) + self.t[0]
        y = self.scale * (self.s * cx + self.c * cy) + self.t[1]
        r = rad * self.scale + 4.0 / self.size
        n = self.size
        x0, x1 = max(int((x - r + 1) * 0.5 * n), 0), min(int((x + r + 1) * 0.5 * n) + 1, n)
        y0, y1 = max(int((y - r + 1) * 0.5 * n), 0), min(int((y + r + 1) * 0.5 * n) + 1, n)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def blend(self, win, alpha, color) -> None:
        """In place on the window: ``img = img * (1 - alpha) + color * alpha``."""
        view = self.img[:, win[0], win[1]] if win is not None else self.img
        view += alpha * (color - view)

    def ellipse(self, cx, cy, rx, ry, color, opacity: float = 1.0, soft: float = 1.0) -> None:
        """Draw a filled soft ellipse."""
        win = self.window(cx, cy, max(rx, ry) + soft * self.px)
        if win is not None:
            a = _ellipse(self.U[win], self.V[win], cx, cy, rx, ry, soft * self.px)
            self.blend(win, a * opacity if opacity != 1.0 else a, color)

    def band(self, cx, cy, half_w, thick, bend, slope, color, opacity: float = 1.0) -> None:
        """Draw a soft curved stroke (brows, lips)."""
        win = self.window(cx, cy + 0.5 * bend, half_w + thick + abs(bend) + abs(slope) * half_w)
        if win is not None:
            a = _band(self.U[win], self.V[win], cx, cy, half_w, thick, bend, slope, self.px)
            self.blend(win, a * opacity if opacity != 1.0 else a, color)


@dataclass
class _Pose:
    """Where the face's inner features sit in one image (yaw and pitch moved them)."""

    fa: float  # face half-width
    fb: float  # face half-height
    fcy: float  # face centre height
    fx: float  # horizontal shift of the inner features (yaw)
    fy: float  # vertical shift (pitch)
    eye_y: float
    tip_y: float
    mouth_y: float
    yaw: float


def render_face(seed: int, identity: int, index: int, size: int = 64) -> np.ndarray:
    """Render image ``index`` of ``identity`` as a ``uint8`` array ``[size, size, 3]``: the
    image's nuisances are drawn first (a fixed draw order keeps generation deterministic), then
    the head, eyes, nose and mouth are painted, then light and sensor noise are applied."""
    p = _identity(seed, identity)
    r = np.random.default_rng([seed, identity, 1, index])
    u = r.uniform

    # --- per-image nuisance (fixed draw order keeps generation deterministic) ---
    theta = float(np.clip(r.normal(0, 0.16), -0.35, 0.35))
    scale = u(0.82, 1.08) * _FACE_SCALE
    tx, ty = (float(v) for v in np.clip(r.normal(0, 0.06, 2), -0.15, 0.15))
    ty += _FACE_Y
    yaw, pitch = u(-0.7, 0.7), u(-0.5, 0.5)
    eye_open = 0.12 if r.random() < 0.08 else u(0.55, 1.15)
    smile, mouth_open = r.normal(0, 0.035), max(0.0, r.normal(0, 0.03))
    gaze = u(-0.35, 0.35)
    bg1, bg2 = (_rgb(u(25, 230) + r.normal(0, 35, 3)) for _ in range(2))
    bg_dir = r.normal(0, 1, 2).tolist()
    gain, contrast = u(0.65, 1.3), u(0.7, 1.2)
    grad = r.normal(0, 0.25, 2).tolist()
    cast = _rgb(1 + r.normal(0, 0.06, 3))
    sigma = u(2.0, 14.0) * (1.0 if r.random() < 0.5 else -1.0)
    noise_at = int(r.integers(0, max((1 << 20) - 3 * size * size, 0) + 1))
    occlude = r.random() < 0.3
    occ = u(0.2, 0.45, 2), u(0, 1, 2), _rgb(u(0, 255, 3))

    cv = _Canvas(size, theta, scale, tx, ty)
    X, Y = _grid(size)
    w = _unit(0.5 + 0.5 * (bg_dir[0] * X + bg_dir[1] * Y))
    cv.img[...] = bg1 + w * (bg2 - bg1)

    skin = _rgb(p["skin"])
    fx, fy = yaw * 0.13, pitch * 0.07
    eye_y = p["eye_y"] + fy
    tip_y = eye_y + p["nose_len"] * (1 - 0.25 * abs(pitch))
    pose = _Pose(p["face_a"] * (1 - 0.08 * abs(yaw)), p["face_b"], 0.05, fx, fy, eye_y, tip_y,
                 tip_y + p["mouth_gap"], yaw)
    hair = _rgb(p["hair"])

    outer = _paint_head(cv, p, pose, skin, hair)
    _paint_eyes(cv, p, pose, skin, hair, eye_open, gaze)
    _paint_nose(cv, p, pose, skin)
    _paint_mouth(cv, p, pose, skin, smile, mouth_open)
    if p["has_hair"]:
        line = p["hairline"] + p["hair_tilt"] * cv.U + p["hair_curve"] * cv.U * cv.U
        cv.blend(None, outer * _unit(0.5 - (cv.V - line) / cv.px), hair)

    img = cv.img
    if occlude:
        (ow, oh), (ox, oy), ocol = occ
        w0, h0 = int(ow * size), int(oh * size)
        x0, y0 = int(ox * (size - w0)), int(oy * (size - h0))
        img[:, y0:y0 + h0, x0:x0 + w0] = ocol

    # illumination: contrast, gain with a linear gradient, colour cast; then sensor noise
    light = np.maximum(1 + grad[0] * X + grad[1] * Y, 0.2) * (gain * contrast)
    img += 128.0 * (1.0 - contrast) / contrast
    img *= light * cast
    if img.size <= 1 << 20:
        noise = _noise_bank()[noise_at:noise_at + img.size].reshape(img.shape)
    else:  # very large images: draw fresh noise
        noise = r.standard_normal(img.shape, dtype=np.float32)
    img += noise * sigma + 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _paint_head(cv: _Canvas, p: dict, pose: _Pose, skin: np.ndarray, hair: np.ndarray) -> np.ndarray | None:
    """Hair behind the head, ears, the face (elliptic top, superelliptic jaw, radial shading),
    blush, moles and beard; returns the hair's outer mask (None without hair)."""
    U, V, px = cv.U, cv.V, cv.px
    fa, fb, fcy, fx, fy = pose.fa, pose.fb, pose.fcy, pose.fx, pose.fy
    outer = None
    if p["has_hair"]:
        m = p["hair_margin"]
        outer = _ellipse(U, V, -0.3 * fx, fcy - 0.5 * m, fa + m, fb + m, px)
        cv.blend(None, outer * _unit(0.5 - (V - p["hair_bottom"]) / px), hair * 0.8)
    for side in (-1.0, 1.0):
        shift = -0.5 * fx * (1 + side * (1.0 if pose.yaw > 0 else -1.0))
        cv.ellipse(side * fa * 0.97 + shift, p["ear_y"] + fy, 0.07, p["ear_ry"], skin * 0.88)
    face = _ellipse(U, V, -0.3 * fx, fcy, fa, fb, px, p["jaw"])
    rad = np.minimum(((U + 0.3 * fx) / fa) ** 2 + ((V - fcy) / fb) ** 2, 1.2)
    cv.blend(None, face, skin * (1.0 - 0.16 * rad))
    if p["blush"] > 0.05:
        for side in (-1.0, 1.0):
            cv.ellipse(side * p["eye_dx"] * 1.2 + fx, pose.mouth_y - 0.1, 0.12, 0.08,
                       _rgb([220, 90, 90]), p["blush"], soft=3.0)
    for mx, my, mr in p["moles"]:
        cv.ellipse(mx + fx, my + fy, mr, mr, skin * 0.45, 0.85)
    if p["beard"]:
        top = pose.mouth_y - p["beard_top"]
        cv.blend(None, face * _unit(0.5 - (top - V) / (2 * px)) * p["beard_alpha"], hair)
    return outer


def _paint_eyes(cv: _Canvas, p: dict, pose: _Pose, skin: np.ndarray, hair: np.ndarray,
                eye_open: float, gaze: float) -> None:
    """Eyes (outline, sclera, iris, pupil; the eye turned away foreshortened), brows, glasses."""
    U, V, px = cv.U, cv.V, cv.px
    fx, eye_y, yaw = pose.fx, pose.eye_y, pose.yaw
    rx0, ry0 = p["eye_rx"], p["eye_rx"] * p["eye_ratio"] * eye_open
    white, black = _rgb([238, 236, 230]), _rgb([12, 10, 10])
    iris = _rgb(p["iris"])
    for side in (-1.0, 1.0):
        rx = rx0 * (1 - 0.3 * max(0.0, side * yaw))
        ex = side * p["eye_dx"] + fx
        win = cv.window(ex, eye_y, rx + 2 * px)
        if win is not None:
            Uw, Vw = U[win], V[win]
            cv.blend(win, _ellipse(Uw, Vw, ex, eye_y, rx + 1.2 * px, ry0 + 1.2 * px, px),
                     skin * 0.4)
            sclera = _ellipse(Uw, Vw, ex, eye_y, rx, ry0, px)
            cv.blend(win, sclera, white)
            ir = p["eye_rx"] * p["iris_frac"] * 0.6
            ix = ex + gaze * rx * 0.4
            cv.blend(win, sclera * _ellipse(Uw, Vw, ix, eye_y, ir, ir, px), iris)
            cv.blend(win, sclera * _ellipse(Uw, Vw, ix, eye_y, ir * 0.45, ir * 0.45, px), black)
        cv.band(ex, eye_y - p["brow_gap"] - ry0 * 0.3, rx * p["brow_w"], p["brow_thick"],
                -p["brow_arch"], side * p["brow_slope"] * 0.3, hair * p["brow_dark"])
        if p["glasses"]:
            gr = p["eye_rx"] * p["glass_r"]
            win = cv.window(ex, eye_y, gr + p["glass_t"])
            if win is not None:
                d = np.sqrt(((U[win] - ex) / gr) ** 2 + ((V[win] - eye_y) / (0.8 * gr)) ** 2)
                ring = _unit(0.5 - (np.abs(d - 1) * 0.8 * gr - p["glass_t"]) / px)
                cv.blend(win, ring, _rgb(p["glass_col"]) * 0.6)
    if p["glasses"]:
        gap = p["eye_dx"] - p["eye_rx"] * p["glass_r"]
        cv.band(fx, eye_y - 0.02, max(gap, 0.02), p["glass_t"] * 2, -0.02, 0.0,
                _rgb(p["glass_col"]) * 0.6)


def _paint_nose(cv: _Canvas, p: dict, pose: _Pose, skin: np.ndarray) -> None:
    """Bridge shadow, tip, nostrils."""
    nx, nw = pose.fx * 1.5, p["nose_w"]
    eye_y, tip_y = pose.eye_y, pose.tip_y
    cv.ellipse(nx + (1.0 if pose.yaw > -1e-3 else -1.0) * nw * 0.7, (eye_y + tip_y) / 2, nw * 0.35,
               (tip_y - eye_y) * 0.45, skin * 0.78, 0.45, soft=2.0)
    cv.ellipse(nx, tip_y, nw, nw * 0.6, skin * 0.88, 0.5, soft=2.0)
    for side in (-1.0, 1.0):
        cv.ellipse(nx + side * nw * 0.5, tip_y + nw * 0.25, nw * 0.28, nw * 0.17, skin * 0.35)


def _paint_mouth(cv: _Canvas, p: dict, pose: _Pose, skin: np.ndarray, smile: float,
                 mouth_open: float) -> None:
    """Lips as a curved stroke, a dark interior when open."""
    mx, mw, mouth_y = pose.fx * 1.1, p["mouth_w"], pose.mouth_y
    bend = p["mouth_curv"] + smile
    lip_col = skin * _rgb(p["lip_tint"])
    cv.band(mx, mouth_y, mw, p["lip"] + mouth_open, bend, 0.0, lip_col)
    if mouth_open > 0.008:
        cv.ellipse(mx, mouth_y + 0.6 * bend, mw * 0.7, mouth_open * 0.5, _rgb([60, 20, 25]))
    cv.band(mx, mouth_y, mw, 0.3 * p["lip"], bend, 0.0, lip_col * 0.5, 0.5)


def generate_identity_folder(out: Path, num_identities: int, images_per_identity: int,
                             image_size: int = 64, seed: int = 0, first_identity: int = 0,
                             progress: bool = False, ext: str = "png") -> Path:
    """Write ``out/id_<k:05d>/<j:04d>.<ext>`` for identities ``first_identity..+num_identities``.

    Identity ``k`` depends only on ``(seed, k)``, so a second call with a different
    ``first_identity`` yields disjoint identities. Returns ``out``.
    """
    if num_identities < 1 or images_per_identity < 1 or image_size < 16:
        raise DataError(f"invalid synthetic dataset size for {out}: {num_identities} identities, "
                        f"{images_per_identity} images each, {image_size} px (min 16)")
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg"):
        raise DataError(f"unsupported synthetic image format {ext!r} for {out} (png or jpg)")
    out = Path(out)
    kwargs = {"compress_level": 1} if ext == "png" else {"quality": 95, "subsampling": 0}
    ids = range(first_identity, first_identity + num_identities)
    if progress:
        from tqdm import tqdm

        ids = tqdm(ids, desc=f"synthetic faces -> {out}", unit="id")
    for k in ids:
        folder = out / f"id_{k:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(images_per_identity):
            Image.fromarray(render_face(seed, k, j, image_size)).save(
                folder / f"{j:04d}.{ext}", **kwargs)
    return out
