"""Person and joint crops for pose regression (DeepPose): the geometry in plain numpy and the
crop transforms the datamodule applies (:class:`PersonCrop`, :class:`JointCrops`).

Coordinates are 0-based pixels with pixel centres on integers (MPII's 1-based values minus 1).
A crop is a square box of side ``side`` pixels around ``center``, optionally rotated and mirrored.
Its *normalised frame* maps the box to ``[-0.5, 0.5]^2`` with the box centre at 0: this is the
paper's ``N(y; b) = (y - b_c) / b_w``, the frame in which every stage regresses joints.

:func:`crop_affine` gives the (2, 3) image -> normalised map ``A``; :func:`invert_affine` its exact
inverse (the un-crop). The pixel grid of an ``S x S`` crop is ``u = S * n + (S - 1) / 2``, so the box
edge ``c - side / 2`` lands on the pixel edge ``-0.5`` and the box centre on the crop's centre.
The person box adds the +15 * scale vertical shift and the 1.25 enlargement to MPII's ``objpos``
and ``scale`` (:func:`person_box`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from datamodules.batch import normalize_255

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
NUM_JOINTS = len(MPII_JOINTS)
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


# -- the crop transforms -------------------------------------------------------------------------


def to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array -> (3, H, W) tensor of its dtype (uint8, or float in [0, 255])."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 normalised with the ImageNet statistics, on the images'
    device (the model calls it on stage >= 2 batches, which travel as uint8)."""
    return normalize_255(images)


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised with the ImageNet statistics."""
    return normalise_images(to_uint8_tensor(image))


#: Laws of PersonCrop's jitter draws (``v`` in [-1, 1]).
JITTER_LAWS = ("uniform", "truncnorm")


def _jitter(rng: np.random.Generator, law: str) -> float:
    """One draw in [-1, 1]: uniform, or a standard normal truncated to [-1, 1] (by rejection:
    the same law as scipy's ``truncnorm(-1, 1)``, which mmpose's RandomBBoxTransform uses)."""
    if law == "uniform":
        return float(rng.uniform(-1.0, 1.0))
    while True:
        v = float(rng.standard_normal())
        if -1.0 <= v <= 1.0:
            return v


def _rng(seed: int | None) -> np.random.Generator:
    # Without a seed (evaluation, or a loader without EpochShuffleSampler) draw one from torch, which
    # EpochSeed / the DataLoader worker seeding keep reproducible.
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return np.random.default_rng(seed)


class PersonCrop:
    """Stage-1 transform: the person box (+shift, x enlarge), scale/rotation jitter and flip.

    Output item: ``image`` (3, S, S) float32; ``target`` (K, 2) joints in the crop's normalised
    frame (flipped joints swapped to their mirror ids); ``labelled`` (K,); ``keypoints`` (K, 2)
    ground truth in image pixels (unflipped); ``head_size``; ``affine`` (K, 2, 3) image ->
    normalised map of each joint's frame (one shared frame here); ``box_side``; ``index``; ``name``.

    Args:
        size: crop side S in pixels.
        shift: vertical centre shift in units of ``scale`` px (15 for MPII).
        enlarge: box side = 200 * scale * enlarge.
        train: apply the random jitter and flip.
        scale_jitter: box side x (1 + j * v).
        rotate: rotation r * v degrees, applied with probability ``rotate_prob``.
        flip_pairs: mirror joint pairs (flip with probability 0.5 when non-empty and ``train``).
        translate: the box centre moves by ``t * v`` box sides in x and in y (the slides' random
            crop); 0 = off.
        noise: standard deviation of Gaussian pixel noise added to the crop, as a fraction of the
            intensity range (0.02 = 5.1 grey levels; the slides' random noise); 0 = off.
        jitter: the law of each ``v``: ``uniform`` on [-1, 1], or ``truncnorm`` (a standard normal
            truncated to [-1, 1], mmpose's ``RandomBBoxTransform``).
    """

    def __init__(
        self,
        size: int,
        shift: float = 15.0,
        enlarge: float = 1.25,
        train: bool = False,
        scale_jitter: float = 0.25,
        rotate: float = 30.0,
        rotate_prob: float = 0.6,
        flip_pairs: Sequence[Sequence[int]] = MPII_FLIP_PAIRS,
        translate: float = 0.0,
        noise: float = 0.0,
        jitter: str = "uniform",
    ) -> None:
        if jitter not in JITTER_LAWS:
            raise ValueError(f"jitter={jitter!r}: expected one of {JITTER_LAWS}")
        self.size = int(size)
        self.shift, self.enlarge = float(shift), float(enlarge)
        self.train = bool(train)
        self.scale_jitter, self.rotate, self.rotate_prob = scale_jitter, rotate, rotate_prob
        self.translate, self.noise, self.jitter = float(translate), float(noise), jitter
        self.flip_pairs = [tuple(p) for p in flip_pairs]
        self.perm = flip_permutation(NUM_JOINTS, self.flip_pairs)

    def box(self, item: dict[str, Any]) -> tuple[np.ndarray, float]:
        return person_box(item["center"], item["scale"], self.shift, self.enlarge)

    def __call__(self, item: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        center, side = self.box(item)
        base_side = side
        rotation, flip = 0.0, False
        rng = _rng(seed) if self.train else None
        if rng is not None:
            side *= 1.0 + self.scale_jitter * _jitter(rng, self.jitter)
            if rng.random() < self.rotate_prob:
                rotation = self.rotate * _jitter(rng, self.jitter)
            flip = bool(self.flip_pairs) and rng.random() < 0.5
            if self.translate > 0:
                # Drawn after the others: runs without translation keep their random streams.
                offset = [_jitter(rng, self.jitter) for _ in range(2)]
                center = center + self.translate * base_side * np.asarray(offset)
        affine = crop_affine(center, side, rotation, flip)
        kp = item["keypoints"]
        target = apply_affine(affine, kp[:, :2])
        labelled = kp[:, 2].copy()
        if flip:
            # The mirrored left wrist looks like a right wrist: it becomes that joint's target.
            target, labelled = target[self.perm], labelled[self.perm]
        crop = crop_image(item["image"], affine, self.size)
        if rng is not None and self.noise > 0:
            noisy = crop + rng.normal(0.0, 255.0 * self.noise, crop.shape)
            # (S, S, 3) float in [0, 255]: normalise_images takes pixel units whatever the dtype
            crop = np.clip(noisy, 0.0, 255.0).astype(np.float32)
        return {
            "image": normalise_images(to_uint8_tensor(crop)),
            "target": torch.from_numpy(target.astype(np.float32)),
            "labelled": torch.from_numpy(labelled.astype(np.float32)),
            "keypoints": torch.from_numpy(kp[:, :2].astype(np.float64)),
            "head_size": torch.tensor(item["head_size"], dtype=torch.float64),
            "affine": torch.from_numpy(np.repeat(affine[None], NUM_JOINTS, 0)),
            "box_side": torch.tensor(base_side, dtype=torch.float64),
            "index": int(item["index"]),
            "name": item["name"],
        }


class JointCrops:
    """Stage s >= 2 transform: one crop per joint, centred on the previous estimate, side
    ``sigma * diam`` (diam = torso diameter of that estimate).

    Training (``displacement`` given): the previous estimate is simulated as ground truth plus a
    displacement drawn from ``N(mean_j, cov_j)`` of stage s-1's training errors (in units of the
    person-box side), and diam is the ground truth's (the paper's ``D_A^s``); crops are flipped
    with probability 0.5 (the crop of joint j then trains the output of its mirror joint).
    Evaluation (``centers`` given): the crops sit on the given estimates.

    Output item: ``image`` (K, 3, S, S) uint8 (normalised by the model, see
    :func:`normalise_images`); ``target`` (K, 2) joint j in crop j's normalised frame;
    ``slot`` (K,) the network output read for crop j; ``labelled``; ``keypoints``; ``head_size``;
    ``affine`` (K, 2, 3); ``box_side``; ``index``; ``name``.

    Args:
        size: crop side S.
        sigma: crop side as a multiple of diam.
        shift, enlarge: the person box (for the displacement unit and diam fallback).
        displacement: ``(mean (K, 2), cov (K, 2, 2))`` for training, else None.
        centers: (N, K, 2) previous estimates in image pixels, indexed by person, for evaluation.
        diam_ratio: diam / box side used when the ground truth has no labelled torso diagonal.
        min_diam: lower bound of diam / box side (a collapsed predicted torso).
        flip_pairs: mirror joint pairs (training flips).
    """

    def __init__(
        self,
        size: int,
        sigma: float = 1.0,
        shift: float = 15.0,
        enlarge: float = 1.25,
        displacement: tuple[np.ndarray, np.ndarray] | None = None,
        centers: np.ndarray | None = None,
        diam_ratio: float = 0.3,
        min_diam: float = 0.1,
        flip_pairs: Sequence[Sequence[int]] = MPII_FLIP_PAIRS,
    ) -> None:
        if (displacement is None) == (centers is None):
            raise ValueError("JointCrops needs exactly one of displacement (train) or centers")
        self.size, self.sigma = int(size), float(sigma)
        self.shift, self.enlarge = float(shift), float(enlarge)
        self.displacement = displacement
        self.centers = None if centers is None else np.asarray(centers, np.float64)
        self.diam_ratio, self.min_diam = float(diam_ratio), float(min_diam)
        self.flip_pairs = [tuple(p) for p in flip_pairs]
        self.perm = flip_permutation(NUM_JOINTS, self.flip_pairs)

    def __call__(self, item: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        kp = item["keypoints"]
        labelled = kp[:, 2] > 0
        box_center, box_side = person_box(item["center"], item["scale"], self.shift, self.enlarge)
        slot = np.arange(NUM_JOINTS)
        flips = np.zeros(NUM_JOINTS, bool)
        if self.displacement is not None:
            rng = _rng(seed)
            delta = sample_displacements(*self.displacement, rng) * box_side
            # Unlabelled joints have no ground truth to displace: their (unscored) crops sit on
            # the box centre.
            base = np.where(labelled[:, None], kp[:, :2], box_center[None])
            centers = base + delta
            diam = float(torso_diameter(kp[:, :2], labelled))
            if not np.isfinite(diam):
                diam = self.diam_ratio * box_side
            if self.flip_pairs:
                flips = rng.random(NUM_JOINTS) < 0.5
                slot = np.where(flips, self.perm, slot)
        else:
            centers = self.centers[int(item["index"])]
            diam = float(torso_diameter(centers))
        diam = max(diam, self.min_diam * box_side)
        side = self.sigma * diam
        affines = np.stack(
            [crop_affine(centers[j], side, 0.0, flips[j]) for j in range(NUM_JOINTS)]
        )
        # uint8 (K, 3, S, S): 16 float crops per person would be 4x the memory and host-to-device
        # traffic; the model normalises them on its device (normalise_images).
        crops = [to_uint8_tensor(crop_image(item["image"], a, self.size)) for a in affines]
        target = apply_affine(affines, kp[:, :2])  # (K, 2): joint j in crop j's frame
        return {
            "image": torch.stack(crops),
            "target": torch.from_numpy(target.astype(np.float32)),
            "slot": torch.from_numpy(slot.astype(np.int64)),
            "labelled": torch.from_numpy(labelled.astype(np.float32)),
            "keypoints": torch.from_numpy(kp[:, :2].astype(np.float64)),
            "head_size": torch.tensor(item["head_size"], dtype=torch.float64),
            "affine": torch.from_numpy(affines),
            "box_side": torch.tensor(box_side, dtype=torch.float64),
            "index": int(item["index"]),
            "name": item["name"],
        }
