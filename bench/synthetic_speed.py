"""Rendering speed of ekd's synthetic faces (``ekd.data.synthetic_faces.render_face``), one process.

Usage: ``python -m bench.synthetic_speed [--images 150] [--size 64]``; prints images/s (this
used to be a report-only test; speed is measured here, not asserted in the test suite).
"""

from __future__ import annotations

import argparse
import time

import torch

from ekd.data.synthetic_faces import render_face


def render_rate(images: int, size: int) -> float:
    """Images rendered per second at ``size`` px, after one warm-up render."""
    render_face(0, 0, 0, size)
    start = time.perf_counter()
    for j in range(images):
        render_face(0, j % 15, j, size)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rate = render_rate(args.images, args.size)
    print(f"synthetic render speed at {args.size} px: {rate:.0f} images/s (one process)")


if __name__ == "__main__":
    main()
