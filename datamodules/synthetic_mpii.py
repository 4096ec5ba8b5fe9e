"""A procedurally generated MPII-style pose set in the mmpose/HRNet json form, for CPU smoke runs.

One frontal stick figure per image (right limbs on the image's left, as for a person facing the
camera, so a horizontal flip with the MPII joint swap stays consistent); limbs of one kind share a
colour, kinds differ. Written like the real release: ``images/*.jpg``,
``annotations/mpii_{train,val}.json`` (1-based coordinates, ``joints_vis``) and
``annotations/mpii_gt_val.mat`` (``pos_gt_src``, ``jnt_missing``, ``headboxes_src``), so the real
loading path is what the smoke runs exercise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io
from PIL import Image

from datamodules.files import generated_folder
from datamodules.pose_transforms import MPII_JOINTS

MARKER_NAME = ".synthetic_mpii.json"
SYNTHETIC_VERSION = 1
# (joint a, joint b, BGR-free RGB colour, thickness as a fraction of the person height)
_LIMBS = (
    (0, 1, (220, 60, 60), 0.05),  # shins
    (5, 4, (220, 60, 60), 0.05),
    (1, 2, (60, 200, 60), 0.06),  # thighs
    (4, 3, (60, 200, 60), 0.06),
    (10, 11, (230, 200, 40), 0.04),  # forearms
    (15, 14, (230, 200, 40), 0.04),
    (11, 12, (60, 90, 230), 0.05),  # upper arms
    (14, 13, (60, 90, 230), 0.05),
    (7, 8, (200, 200, 200), 0.04),  # neck
)


def ensure_synthetic_mpii(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    image_size: int = 96,
    size_jitter: int = 8,
    missing_prob: float = 0.1,
    seed: int = 0,
) -> Path:
    """Generate the set under ``root`` unless an identical one (same parameters) is there, in a
    temporary folder renamed into place when complete (:func:`datamodules.files.generated_folder`).

    Args:
        num_train, num_val: persons (= images) per split.
        image_size: mean image side; each side varies by up to ``size_jitter`` px.
        missing_prob: probability that each ankle/wrist is left unlabelled.
        seed: generation seed.
    """
    root = Path(root)
    params: dict[str, Any] = {
        "version": SYNTHETIC_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "size_jitter": int(size_jitter),
        "missing_prob": float(missing_prob),
        "seed": int(seed),
    }
    return generated_folder(root, params, lambda out: _generate(out, params), MARKER_NAME)


def random_pose(rng: np.random.Generator, height: float, center: np.ndarray) -> np.ndarray:
    """(16, 2) joints of a frontal figure of ``height`` px centred on ``center`` (image pixels)."""

    def at(origin: np.ndarray, length: float, degrees: float) -> np.ndarray:
        t = np.deg2rad(degrees)  # 0 = straight down, positive = towards the image's right
        return origin + length * np.array([np.sin(t), np.cos(t)])

    h = height
    j = np.zeros((16, 2))
    tilt = rng.normal(0, 8)
    j[6] = (0.0, 0.05 * h)  # pelvis
    j[7] = at(j[6], 0.30 * h, 180 + tilt)  # thorax
    j[8] = at(j[7], 0.06 * h, 180 + tilt)  # upper neck
    j[9] = at(j[8], 0.14 * h, 180 + tilt + rng.normal(0, 8))  # head top
    across = np.array([np.cos(np.deg2rad(tilt)), -np.sin(np.deg2rad(tilt))])
    j[12], j[13] = j[7] - 0.11 * h * across, j[7] + 0.11 * h * across  # r / l shoulder
    j[2], j[3] = j[6] - 0.08 * h * across, j[6] + 0.08 * h * across  # r / l hip
    for side, (sho, elb, wri, hip, kne, ank) in (
        (-1, (12, 11, 10, 2, 1, 0)),
        (1, (13, 14, 15, 3, 4, 5)),
    ):
        upper = side * rng.uniform(10, 120)
        j[elb] = at(j[sho], 0.16 * h, upper)
        j[wri] = at(j[elb], 0.14 * h, upper + side * rng.uniform(-60, 90))
        thigh = side * rng.uniform(-5, 35)
        j[kne] = at(j[hip], 0.22 * h, thigh)
        j[ank] = at(j[kne], 0.21 * h, thigh + rng.uniform(-20, 20))
    # Centre the figure's bounding box on ``center``.
    mid = (j.min(0) + j.max(0)) / 2
    return j - mid + center


def render_person(
    rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, float]:
    """One image with one figure.

    Returns:
        image (H, W, 3) uint8, joints (16, 2) 0-based pixels, the figure's height in px.
    """
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 120, 3)
    grad = rng.uniform(-0.5, 0.5, 2)
    image = base[None, None] + (grad[0] * ys + grad[1] * xs)[..., None]
    image = np.clip(image + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    height = rng.uniform(0.55, 0.8) * h
    center = np.array([w / 2, h / 2]) + rng.uniform(-0.1, 0.1, 2) * (w, h)
    joints = random_pose(rng, height, center)
    canvas = np.ascontiguousarray(image)
    torso = joints[[12, 13, 3, 2]].round().astype(np.int32)
    cv2.fillConvexPoly(canvas, torso, (150, 80, 170), lineType=cv2.LINE_AA)
    for a, b, colour, thick in _LIMBS:
        pa, pb = (tuple(int(round(v)) for v in joints[k]) for k in (a, b))
        cv2.line(canvas, pa, pb, colour, max(1, int(thick * height)), lineType=cv2.LINE_AA)
    head = (joints[8] + joints[9]) / 2
    radius = max(2, int(0.45 * np.linalg.norm(joints[9] - joints[8])))
    cv2.circle(canvas, tuple(int(round(v)) for v in head), radius, (240, 190, 150), -1, cv2.LINE_AA)
    return canvas, joints, float(height)


def _generate(out: Path, params: dict[str, Any]) -> None:
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    n0, jit = params["image_size"], params["size_jitter"]
    next_id = 1
    for split_idx, (split, count) in enumerate(
        (("train", params["num_train"]), ("val", params["num_val"]))
    ):
        entries, pos, missing, boxes = [], [], [], []
        for i in range(count):
            rng = np.random.default_rng([params["seed"], split_idx, i])
            size = (
                int(rng.integers(n0 - jit, n0 + jit + 1)),
                int(rng.integers(n0 - jit, n0 + jit + 1)),
            )
            image, joints, height = render_person(rng, size)
            name = f"{next_id:09d}.jpg"
            next_id += 1
            Image.fromarray(image).save(out / "images" / name, quality=92)
            vis = np.ones(16, np.int64)
            for k in (0, 5, 10, 15):
                if rng.random() < params["missing_prob"]:
                    vis[k] = 0
            ones = joints + 1.0  # 1-based like the release
            scale = height / 200.0
            mid = (joints.min(0) + joints.max(0)) / 2
            # objpos: loaders move it down by 15 * scale px, which lands on the figure's centre.
            objpos = mid - np.array([0.0, 15.0 * scale]) + 1.0
            entries.append(
                {
                    "image": name,
                    "center": [round(float(v), 3) for v in objpos],
                    "scale": round(scale, 6),
                    "joints": [
                        [round(float(x), 3), round(float(y), 3)] if v else [-1.0, -1.0]
                        for (x, y), v in zip(ones, vis, strict=True)
                    ],
                    "joints_vis": [int(v) for v in vis],
                }
            )
            head_mid = (ones[8] + ones[9]) / 2
            half = 0.5 * np.linalg.norm(joints[9] - joints[8]) * 1.2
            boxes.append([head_mid - half, head_mid + half])  # [(x1, y1), (x2, y2)]
            pos.append(np.round(ones, 3) * vis[:, None])
            missing.append(1 - vis)
        (out / "annotations" / f"mpii_{split}.json").write_text(json.dumps(entries))
        if split == "val":
            scipy.io.savemat(
                out / "annotations" / "mpii_gt_val.mat",
                {
                    "dataset_joints": np.array([[n] for n in MPII_JOINTS], dtype=object).T,
                    "jnt_missing": np.stack(missing, 1),  # (16, N)
                    "pos_gt_src": np.stack(pos, 2),  # (16, 2, N)
                    "headboxes_src": np.stack(boxes, 2),  # (2, 2, N)
                },
            )
