"""Geometry of person and joint crops for pose regression (DeepPose), in plain numpy.

Coordinates are 0-based pixels with pixel centres on integers (MPII's 1-based values minus 1).
A crop is a square box of side ``side`` pixels around ``center``, optionally rotated and mirrored.
Its *normalised frame* maps the box to ``[-0.5, 0.5]^2`` with the box centre at 0: this is the
paper's ``N(y; b) = (y - b_c) / b_w``, the frame in which every stage regresses joints.

:func:`crop_affine` gives the (2, 3) image -> normalised map ``A``; :func:`invert_affine` its exact
inverse (the un-crop). The pixel grid of an ``S x S`` crop is ``u = S * n + (S - 1) / 2``, so the box
edge ``c - side / 2`` lands on the pixel edge ``-0.5`` and the box centre on the crop's centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: MPII joint order (DATASETS.md 5.2).
MPII_JOINTS: tuple[str, ...] = (
    "r_ankle",
    "r_knee",
    "r_hip",
    "l_hip",
    "l_knee",
    "l_ankle",
    "pelvis",
    "thorax",
    "upper_neck",
    "head_top",
    "r_wrist",
    "r_elbow",
    "r_shoulder",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
)
#: Left/right joint pairs swapped by a horizontal flip.
MPII_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 5),
    (1, 4),
    (2, 3),
    (10, 15),
    (11, 14),
    (12, 13),
)
#: Opposing torso joints whose distance is the paper's ``diam(y)``: (l_shoulder, r_hip) and
#: (r_shoulder, l_hip); the mean of the labelled ones is used.
MPII_TORSO_DIAGONALS: tuple[tuple[int, int], ...] = ((13, 2), (12, 3))


def flip_permutation(num_joints: int, flip_pairs: Sequence[Sequence[int]]) -> np.ndarray:
    """Joint index permutation of a horizontal flip: ``perm[j]`` is the mirror partner of ``j``.

    Returns:
        (K,) int64; applying it twice gives the identity.
    """
    perm = np.arange(num_joints, dtype=np.int64)
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


def person_box(
    center: np.ndarray, scale: float, shift: float = 15.0, enlarge: float = 1.25
) -> tuple[np.ndarray, float]:
    """The usual MPII person box: ``objpos`` shifted down by ``shift * scale`` px, side
    ``200 * scale * enlarge`` px (``scale`` = person height / 200 px).

    Args:
        center: (2,) 0-based ``objpos`` (x, y).

    Returns:
        ``(center (2,), side)`` of the square box.
    """
    c = np.asarray(center, dtype=np.float64).copy()
    c[1] += shift * float(scale)
    return c, 200.0 * float(scale) * float(enlarge)


def crop_affine(
    center: np.ndarray, side: float, rotation: float = 0.0, flip: bool = False
) -> np.ndarray:
    """The image -> normalised-crop map ``n = A @ [x, y, 1]``.

    Args:
        center: (2,) box centre in image pixels.
        side: box side in image pixels.
        rotation: degrees; the crop content turns counter-clockwise by this angle.
        flip: mirror the crop horizontally (``n_x -> -n_x``).

    Returns:
        (2, 3) float64.
    """
    t = np.deg2rad(rotation)
    cos, sin = np.cos(t), np.sin(t)
    # Rotating the crop content counter-clockwise = rotating the sampling frame clockwise.
    lin = np.array([[cos, sin], [-sin, cos]], dtype=np.float64) / float(side)
    if flip:
        lin[0] *= -1.0
    c = np.asarray(center, dtype=np.float64)
    return np.concatenate([lin, (-lin @ c)[:, None]], axis=1)


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affine maps (the un-crop of :func:`crop_affine`)."""
    a = np.asarray(affine, dtype=np.float64)
    lin_inv = np.linalg.inv(a[..., :2])
    trans = -(lin_inv @ a[..., 2:])
    return np.concatenate([lin_inv, trans], axis=-1)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies (2, 3) (or broadcastable (..., 2, 3)) maps to points (..., 2)."""
    a = np.asarray(affine, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return np.einsum("...ij,...j->...i", a[..., :2], p) + a[..., 2]


def pixel_affine(affine: np.ndarray, size: int) -> np.ndarray:
    """The image -> crop-pixel map for an ``size x size`` crop of normalised map ``affine``."""
    m = np.asarray(affine, dtype=np.float64) * float(size)
    m[:, 2] += (size - 1) / 2.0
    return m


def crop_image(image: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """Samples the ``size x size`` crop of normalised map ``affine`` (bilinear, black outside).

    Args:
        image: (H, W, 3) uint8.

    Returns:
        (size, size, 3) uint8.
    """
    return cv2.warpAffine(
        image,
        pixel_affine(affine, size),
        (int(size), int(size)),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


def torso_diameter(
    joints: np.ndarray,
    labelled: np.ndarray | None = None,
    diagonals: Sequence[Sequence[int]] = MPII_TORSO_DIAGONALS,
) -> np.ndarray:
    """The paper's ``diam(y)``: mean length of the labelled opposing torso diagonals.

    Args:
        joints: (..., K, 2).
        labelled: (..., K) flags (None: all labelled).

    Returns:
        (...,) float64; NaN where no diagonal has both ends labelled.
    """
    j = np.asarray(joints, dtype=np.float64)
    lab = np.ones(j.shape[:-1], bool) if labelled is None else np.asarray(labelled) > 0
    total = np.zeros(j.shape[:-2])
    count = np.zeros(j.shape[:-2])
    for a, b in diagonals:
        ok = lab[..., a] & lab[..., b]
        length = np.linalg.norm(j[..., a, :] - j[..., b, :], axis=-1)
        total += np.where(ok, length, 0.0)
        count += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# -- the simulated stage-(s-1) errors -------------------------------------------------------------


def error_statistics(
    errors: np.ndarray, labelled: np.ndarray, min_count: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-joint mean and covariance of prediction errors (the paper's ``N_i^{(s-1)}``).

    Args:
        errors: (N, K, 2) ``prediction - ground truth``, in any unit (rimlab: person-box sides).
        labelled: (N, K) flags; only labelled joints count.
        min_count: joints with fewer labelled errors get zero mean and the pooled covariance.

    Returns:
        ``mean`` (K, 2), ``cov`` (K, 2, 2) (unbiased), ``count`` (K,) int64.
    """
    e = np.asarray(errors, dtype=np.float64)
    lab = np.asarray(labelled) > 0
    k = e.shape[1]
    mean = np.zeros((k, 2))
    cov = np.zeros((k, 2, 2))
    count = lab.sum(0).astype(np.int64)
    pooled = np.cov(e[lab].T) if lab.sum() >= 2 else np.eye(2) * 1e-4
    for j in range(k):
        ej = e[lab[:, j], j]
        if len(ej) < min_count:
            cov[j] = pooled
            continue
        mean[j] = ej.mean(0)
        cov[j] = np.cov(ej.T)
    return mean, cov, count


def sample_displacements(
    mean: np.ndarray, cov: np.ndarray, rng: np.random.Generator, num: int | None = None
) -> np.ndarray:
    """Draws one displacement per joint from ``N(mean_j, cov_j)``.

    Uses a Cholesky-free square root (eigen-decomposition, clipped at 0) so that the singular
    covariances of rarely labelled joints still work.

    Args:
        mean: (K, 2).
        cov: (K, 2, 2) symmetric positive semi-definite.
        num: draws per joint (None: one, result (K, 2)).

    Returns:
        (K, 2), or (num, K, 2).
    """
    mean = np.asarray(mean, dtype=np.float64)
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]  # (K, 2, 2), root @ root.T = cov
    shape = (1 if num is None else int(num), *mean.shape)
    z = rng.standard_normal(shape)
    out = mean + np.einsum("kij,nkj->nki", root, z)
    return out[0] if num is None else out
