"""How exactly the installed OpenCV's ``warpAffine`` samples, against float64 arithmetic.

    python bench/opencv_warp.py                       # 200 random rotations/scales of 90x130
    python bench/opencv_warp.py --trials 50 --json out.json

The training augmentation warps labels with ``INTER_NEAREST`` and images with ``INTER_LINEAR``
(``datamodules.transforms``), so its pixels are those of one OpenCV release. For each trial (a
random angle in [-10, 10] degrees and scale in [0.5, 2] about the centre, as the augmentation
draws them) this compares, at every output pixel whose source lies inside the image:

- nearest: OpenCV's label against ``src[floor(y + 0.5), floor(x + 0.5)]`` at the exact
  float64 source point, and, where they differ, how far that point lies from a half-pixel (a
  tie, where a rounding of the coordinates in the last bits decides);
- bilinear: OpenCV's uint8 value against the float64 bilinear value (0.5 is the rounding of the
  result alone; OpenCV's fixed-point weights add the rest).

Prints a table and optionally writes JSON. It explains release-to-release differences of the
recorded augmentation fingerprints; nothing in a training run calls it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def warp_exactness(trials: int = 200, size: tuple[int, int] = (90, 130), seed: int = 0) -> dict:
    """The comparison above over ``trials`` random warps of an ``(h, w)`` label map and image.

    Returns:
        ``{"opencv", "pixels", "nearest_mismatches", "nearest_max_tie_distance",
        "bilinear_max_error", "bilinear_over_half"}``: the pixels compared, the nearest labels
        that differ from the exact pick, the largest distance (px) of a differing pixel's source
        point from the nearest half-pixel in x or y (0 when none differ), the largest bilinear
        error in grey levels, and how many bilinear values are off by more than 0.5.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    labels = rng.integers(0, 250, (h, w)).astype(np.uint8)
    image = rng.integers(0, 256, (h, w)).astype(np.uint8)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    grey = image.astype(np.float64)
    pixels = mismatches = over_half = 0
    tie = max_error = 0.0
    for _ in range(trials):
        angle, scale = rng.uniform(-10.0, 10.0), rng.uniform(0.5, 2.0)
        forward = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)  # (2, 3)
        nearest = cv2.warpAffine(labels, forward, (w, h), flags=cv2.INTER_NEAREST, borderValue=255)
        linear = cv2.warpAffine(image, forward, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
        inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))
        x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]  # (h, w) source x
        y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        inside = (x0 >= 0) & (x0 < w - 1) & (y0 >= 0) & (y0 < h - 1)  # all 4 neighbours exist
        x0, y0 = np.clip(x0, 0, w - 2), np.clip(y0, 0, h - 2)
        exact = labels[
            np.floor(y + 0.5).astype(int).clip(0, h - 1),
            np.floor(x + 0.5).astype(int).clip(0, w - 1),
        ]
        bad = inside & (nearest != exact)
        if bad.any():
            dx = np.abs(x[bad] - np.floor(x[bad]) - 0.5)
            dy = np.abs(y[bad] - np.floor(y[bad]) - 0.5)
            tie = max(tie, float(np.minimum(dx, dy).max()))
        fx, fy = x - x0, y - y0
        value = (
            grey[y0, x0] * (1 - fx) * (1 - fy)
            + grey[y0, x0 + 1] * fx * (1 - fy)
            + grey[y0 + 1, x0] * (1 - fx) * fy
            + grey[y0 + 1, x0 + 1] * fx * fy
        )
        error = np.abs(linear.astype(np.float64) - value)[inside]
        pixels += int(inside.sum())
        mismatches += int(bad.sum())
        max_error = max(max_error, float(error.max()))
        over_half += int((error > 0.5 + 1e-9).sum())
    return {
        "opencv": cv2.__version__,
        "pixels": pixels,
        "nearest_mismatches": mismatches,
        "nearest_max_tie_distance": tie,
        "bilinear_max_error": max_error,
        "bilinear_over_half": over_half,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = warp_exactness(args.trials, seed=args.seed)
    print(f"OpenCV {result['opencv']}, {result['pixels']:,} pixels in {args.trials} warps")
    print(
        f"nearest: {result['nearest_mismatches']} labels differ from the exact pick "
        f"(source within {result['nearest_max_tie_distance']:.1e} px of a half-pixel)"
    )
    print(
        f"bilinear: max error {result['bilinear_max_error']:.3f} grey levels, "
        f"{result['bilinear_over_half']} values off by more than 0.5"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"config": vars(args) | {"json": str(args.json)}, **result})
        )
    return result


if __name__ == "__main__":
    main()
