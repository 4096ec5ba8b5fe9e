"""MPII Human Pose (16 joints): the official ``RELEASE`` .mat, the mmpose/HRNet json form, person
and joint crops for DeepPose cascades, and the LightningDataModule.

Read ``../shared/DATASETS.md`` section 5. Conventions kept here:

- every coordinate is 0-based (the files are MATLAB 1-based; evaluation against the official
  ``mpii_gt_val.mat`` adds 1 back, see :mod:`lightning_modules.pose_metrics`);
- a joint is *labelled* when it is present in the annotation, whatever ``is_visible`` says;
- ``head_size`` = 0.6 x the head-box diagonal (the PCKh normaliser);
- ``center``/``scale`` are the raw ``objpos`` (0-based) and person height / 200; crops add the
  +15 * scale vertical shift and the 1.25 enlargement (:func:`datamodules.pose_transforms.person_box`).

Raw item (``transform=None``): ``image`` (H, W, 3) uint8, ``keypoints`` (16, 3) float32 (x, y,
labelled), ``visible`` (16,) float32 (the file's ``is_visible``; 1 when missing), ``head_size``
float (NaN without a head box), ``center`` (2,) float32, ``scale`` float, ``name`` str, ``index``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import read_image, split_loader
from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD, DatasetError
from datamodules.pose_transforms import (
    MPII_FLIP_PAIRS,
    MPII_JOINTS,
    apply_affine,
    crop_affine,
    crop_image,
    flip_permutation,
    person_box,
    sample_displacements,
    torso_diameter,
)

log = logging.getLogger(__name__)

NUM_JOINTS = 16
MAT_NAME = "mpii_human_pose_v1_u12_1.mat"
HEAD_SIZE_FACTOR = 0.6

# -- the official .mat ----------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    """A struct or cell array as a list: ``squeeze_me`` turns one-element arrays into a bare struct
    and empty fields into empty arrays.

    A numeric array is a list of its elements (``single_person`` saved as a plain vector instead of
    a cell, one rect id per image); a 0-d array or a bare value is a one-element list.
    """
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return []
        return [value] if value.ndim == 0 else list(value.ravel())
    return [value]


def _scalar(value: Any) -> float | None:
    """A numeric field that may be a number, a (1,)/(1, 1) array, a string or empty; None if empty."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        value = value.ravel()[0]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    return float(value)


def _field(struct: Any, name: str) -> Any:
    """``struct.name``, or None when the field is absent or empty."""
    value = getattr(struct, name, None)
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return None
    return value


def _rect_head_size(rect: Any) -> float:
    coords = [_scalar(_field(rect, k)) for k in ("x1", "y1", "x2", "y2")]
    if any(c is None for c in coords):
        return float("nan")
    x1, y1, x2, y2 = coords
    return HEAD_SIZE_FACTOR * float(np.hypot(x2 - x1, y2 - y1))


def _rect_points(rect: Any, path: Path, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(16, 3) 0-based keypoints with labelled flags and (16,) is_visible, or None without joints."""
    annopoints = _field(rect, "annopoints")
    points = _as_list(_field(annopoints, "point")) if annopoints is not None else []
    if not points:
        return None
    kp = np.zeros((NUM_JOINTS, 3), np.float32)
    vis = np.zeros(NUM_JOINTS, np.float32)
    for p in points:
        try:
            jid = _scalar(_field(p, "id"))
            x, y = _scalar(_field(p, "x")), _scalar(_field(p, "y"))
            v = _scalar(_field(p, "is_visible"))
        except (TypeError, ValueError) as e:
            raise DatasetError(path, f"{where}: unreadable joint field ({e})") from e
        if jid is None or x is None or y is None:
            raise DatasetError(path, f"{where}: a joint lacks id, x or y")
        j = int(jid)
        if not 0 <= j < NUM_JOINTS or jid != j:
            raise DatasetError(path, f"{where}: joint id {jid} outside 0..{NUM_JOINTS - 1}")
        if kp[j, 2] > 0:
            raise DatasetError(path, f"{where}: joint id {j} appears twice")
        kp[j] = (x - 1.0, y - 1.0, 1.0)  # MATLAB 1-based -> 0-based
        # An empty is_visible counts as visible (pose-hg-train); it never decides "labelled".
        vis[j] = 1.0 if v is None else float(v > 0)
    return kp, vis


def load_release_mat(path: str | Path) -> tuple[dict[str, list[dict[str, Any]]], Counter]:
    """Reads the official ``RELEASE`` struct into per-person records.

    Training images (``img_train == 1``, or every image when the field is absent) give persons with
    joints; test images give persons with ``objpos`` and ``scale`` only (no labels). Persons without
    joints (training) or without ``objpos``/``scale`` are skipped and counted.

    Returns:
        ``({"train": [...], "test": [...]}, skipped)`` where a record has ``name``, ``keypoints``
        (16, 3), ``visible`` (16,), ``head_size``, ``center`` (2,) 0-based, ``scale``, ``image_index``
        and ``rect_index`` (0-based), ``single_person`` (bool); ``skipped`` counts reasons.
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises MatReadError, ValueError, OSError, ... on bad files
        raise DatasetError(path, f"unreadable MAT file ({e})") from e
    release = mat.get("RELEASE")
    if release is None or _field(release, "annolist") is None:
        raise DatasetError(path, "no RELEASE.annolist (is this mpii_human_pose_v1_u12_1.mat?)")
    annolist = _as_list(release.annolist)
    img_train_field = _field(release, "img_train")
    img_train = (
        np.ones(len(annolist), np.int64)
        if img_train_field is None
        else np.atleast_1d(np.asarray(img_train_field)).astype(np.int64).ravel()
    )
    if len(img_train) != len(annolist):
        raise DatasetError(
            path, f"img_train has {len(img_train)} entries but annolist has {len(annolist)}"
        )
    single_field = _field(release, "single_person")
    singles = _as_list(single_field) if single_field is not None else []
    records: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    skipped: Counter = Counter()
    for i, anno in enumerate(annolist):
        image = _field(anno, "image")
        name = _field(image, "name") if image is not None else None
        if not isinstance(name, str) or not name:
            raise DatasetError(path, f"annolist({i + 1}).image.name is missing")
        single = set()
        if i < len(singles):
            single = {int(v) - 1 for v in np.atleast_1d(np.asarray(singles[i])).ravel() if v == v}
        split = "train" if img_train[i] == 1 else "test"
        for r, rect in enumerate(_as_list(_field(anno, "annorect"))):
            where = f"annolist({i + 1}).annorect({r + 1}) of {name}"
            objpos = _field(rect, "objpos")
            try:
                cx = _scalar(_field(objpos, "x")) if objpos is not None else None
                cy = _scalar(_field(objpos, "y")) if objpos is not None else None
                scale = _scalar(_field(rect, "scale"))
            except (TypeError, ValueError) as e:
                raise DatasetError(path, f"{where}: unreadable objpos/scale ({e})") from e
            if cx is None or cy is None:
                skipped[f"{split}: no objpos"] += 1
                continue
            if scale is None or not scale > 0:
                skipped[f"{split}: no scale"] += 1
                continue
            points = _rect_points(rect, path, where) if split == "train" else None
            if split == "train" and points is None:
                skipped["train: no annopoints"] += 1
                continue
            if points is None:
                kp, vis = np.zeros((NUM_JOINTS, 3), np.float32), np.zeros(NUM_JOINTS, np.float32)
            else:
                kp, vis = points
            records[split].append(
                {
                    "name": name,
                    "keypoints": kp,
                    "visible": vis,
                    "head_size": _rect_head_size(rect),
                    "center": np.array([cx - 1.0, cy - 1.0], np.float32),
                    "scale": float(scale),
                    "image_index": i,
                    "rect_index": r,
                    "single_person": r in single,
                }
            )
    return records, skipped


# -- the mmpose / HRNet json form ------------------------------------------------------------------


def load_json_annotations(
    path: str | Path, gt_val_mat: str | Path | None = None, skipped: Counter | None = None
) -> list[dict[str, Any]]:
    """Reads ``mpii_{train,val,test}.json``; head sizes come from ``mpii_gt_val.mat`` when given.

    The gt mat must list the same persons in the same order: its joints are checked against the
    json's (a mismatch means the files belong to different splits or versions). Persons without a
    usable box (``center`` of -1, the form's "missing", or ``scale <= 0``) are skipped and counted
    in ``skipped``: no crop can be made for them.

    Returns:
        records like :func:`load_release_mat` (``visible`` = labelled: the json dropped occlusion)
        with ``source_index``, the person's position in the json (= its row in the gt mat).
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(path, f"unreadable json ({e})") from e
    if not isinstance(entries, list):
        raise DatasetError(path, "expected a list of person objects")
    records = []
    for n, e in enumerate(entries):
        try:
            center = np.asarray(e["center"], np.float64).reshape(2)
            scale = float(e["scale"])
            name = str(e["image"])
            kp = np.zeros((NUM_JOINTS, 3), np.float32)
            if "joints" in e:
                joints = np.asarray(e["joints"], np.float64).reshape(NUM_JOINTS, 2)
                vis = np.asarray(e.get("joints_vis", np.ones(NUM_JOINTS)), np.float64)
                labelled = vis.reshape(NUM_JOINTS) > 0
                kp[labelled, :2] = joints[labelled] - 1.0
                kp[:, 2] = labelled
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(path, f"entry {n}: malformed person ({err!r})") from err
        records.append(
            {
                "name": name,
                "keypoints": kp,
                "visible": kp[:, 2].copy(),
                "head_size": float("nan"),
                "center": (center - 1.0).astype(np.float32),
                "scale": scale,
                "source_index": n,
                "_center_1based": center,
            }
        )
    if gt_val_mat is not None:
        head_sizes, gt_joints, missing = load_gt_val_mat(gt_val_mat)
        if len(head_sizes) != len(records):
            raise DatasetError(
                gt_val_mat, f"{len(head_sizes)} persons but {path.name} has {len(records)}"
            )
        for n, rec in enumerate(records):
            labelled = rec["keypoints"][:, 2] > 0
            if not np.array_equal(labelled, ~missing[n]) or not np.allclose(
                rec["keypoints"][labelled, :2], gt_joints[n][labelled] - 1.0, atol=1.0
            ):
                raise DatasetError(
                    gt_val_mat, f"person {n} disagrees with {path.name}: different split or order"
                )
            rec["head_size"] = float(head_sizes[n])
    kept = []
    for rec in records:
        center = rec.pop("_center_1based")
        # -1 is the json form's "no objpos"; a person box needs a positive scale.
        if not np.isfinite(center).all() or (center == -1).any():
            reason = "no center (-1)"
        elif not rec["scale"] > 0:
            reason = "scale <= 0"
        else:
            kept.append(rec)
            continue
        if skipped is not None:
            skipped[reason] += 1
    return kept


def load_gt_val_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mpii_gt_val.mat`` (HRNet ``gt_valid.mat``).

    Returns:
        ``head_size`` (N,) = 0.6 x head-box diagonal, ``joints`` (N, 16, 2) 1-based as stored,
        ``missing`` (N, 16) bool (``jnt_missing``).
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
        boxes = np.asarray(mat["headboxes_src"], np.float64)  # (2, 2, N): [corner, xy, person]
        pos = np.asarray(mat["pos_gt_src"], np.float64)  # (16, 2, N)
        missing = np.asarray(mat["jnt_missing"]) > 0  # (16, N)
    except Exception as e:  # a bad file (MatReadError, ...) or a missing variable (KeyError)
        raise DatasetError(path, f"unreadable gt mat ({e!r})") from e
    if boxes.ndim == 2:  # one person: scipy squeezes nothing, but savemat may drop the last axis
        boxes, pos, missing = boxes[..., None], pos[..., None], missing.reshape(-1, 1)
    head = HEAD_SIZE_FACTOR * np.linalg.norm(boxes[1] - boxes[0], axis=0)
    return head, pos.transpose(2, 0, 1), missing.T


# -- the dataset ----------------------------------------------------------------------------------


def find_annotation(root: Path, names: Sequence[str]) -> Path | None:
    """The first existing ``root/<dir>/<name>`` among the usual folders."""
    for name in names:
        for sub in ("", "annotations", "annot", "mpii_human_pose_v1_u12_2"):
            candidate = root / sub / name if sub else root / name
            if candidate.is_file():
                return candidate
    return None


_JSON_NAMES = {
    "train": ("mpii_train.json", "train.json"),
    "val": ("mpii_val.json", "valid.json"),
    "trainval": ("mpii_trainval.json", "trainval.json"),
    "test": ("mpii_test.json", "test.json"),
}


class MPIIDataset(Dataset):
    """One split of MPII, one item per person (see the module docstring for the raw item).

    Args:
        root: folder with ``images/`` and the annotations (directly or in ``annotations/``).
        split: ``train``, ``val`` (Tompson's 2,958 persons, json + ``mpii_gt_val.mat``), ``test``,
            or ``trainval`` (json only).
        format: ``mat`` (official ``RELEASE`` file; ``val`` still comes from the json files, and
            ``train`` then leaves out every image that holds a val person), ``json``, or ``auto``
            (the .mat when present).
        transform: callable on the raw item (``transform(item, seed=...)`` when the sampler gives a
            seed); None returns the raw item.
        image_dir: image folder (default ``root/images``).
        single_person: keep only the ``single_person`` rects of the .mat.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        format: str = "auto",
        transform: Any | None = None,
        image_dir: str | Path | None = None,
        single_person: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images"
        self.skipped: Counter = Counter()
        mat_path = find_annotation(self.root, (MAT_NAME,))
        if format == "auto":
            format = "mat" if mat_path is not None and split in ("train", "test") else "json"
        if format not in ("mat", "json"):
            raise ValueError(f"format={format!r}: expected 'mat', 'json' or 'auto'")
        self.format = format
        if format == "mat" and split in ("train", "test"):
            if mat_path is None:
                raise DatasetError(self.root, f"{MAT_NAME} not found")
            self.source = mat_path
            records, self.skipped = load_release_mat(mat_path)
            self.records = records[split]
            if single_person:
                self.records = [r for r in self.records if r["single_person"]]
            if split == "train":
                self.records = self._without_val_images(self.records)
        else:
            if split not in _JSON_NAMES:
                raise ValueError(f"split={split!r}: expected one of {sorted(_JSON_NAMES)}")
            path = find_annotation(self.root, _JSON_NAMES[split])
            if path is None:
                raise DatasetError(self.root, f"{_JSON_NAMES[split][0]} not found")
            self.source = path
            gt = find_annotation(self.root, ("mpii_gt_val.mat", "gt_valid.mat"))
            if split == "val" and gt is None:
                raise DatasetError(
                    self.root, "mpii_gt_val.mat not found: val head sizes come from it"
                )
            self.records = load_json_annotations(
                path, gt if split == "val" else None, skipped=self.skipped
            )
        if self.skipped:
            log.info(
                "MPII %s (%s): skipped %s",
                split,
                self.source.name,
                ", ".join(f"{n} x {why}" for why, n in sorted(self.skipped.items())),
            )
        if not self.records:
            raise DatasetError(self.source, f"split '{split}' has no usable person")
        self.has_labels = split != "test"

    def _without_val_images(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # HRNet/bearpaw: train leaves out every person of an image holding a val person.
        val_json = find_annotation(self.root, _JSON_NAMES["val"])
        if val_json is None:
            log.warning(
                "MPII train from %s: no mpii_val.json, so val images are not excluded", MAT_NAME
            )
            return records
        val_images = {r["name"] for r in load_json_annotations(val_json)}
        kept = [r for r in records if r["name"] not in val_images]
        self.skipped["train: image holds a val person"] += len(records) - len(kept)
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def annotation(self, index: int) -> dict[str, Any]:
        """The record of person ``index`` without its image."""
        rec = self.records[index]
        return {
            "keypoints": rec["keypoints"].copy(),
            "visible": rec["visible"].copy(),
            "head_size": float(rec["head_size"]),
            "center": rec["center"].copy(),
            "scale": float(rec["scale"]),
            "name": rec["name"],
            "index": int(index),
        }

    def load(self, index: int) -> dict[str, Any]:
        """Raw item ``index`` (image decoded)."""
        item = self.annotation(index)
        item["image"] = read_image(self.image_dir / item["name"])
        return item

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        item = self.load(index)
        if self.transform is None:
            return item
        return self.transform(item) if seed is None else self.transform(item, seed=seed)

    def arrays(self) -> dict[str, np.ndarray]:
        """All annotations stacked: ``keypoints`` (N, 16, 3), ``head_size`` (N,), ``center``
        (N, 2), ``scale`` (N,)."""
        return {
            "keypoints": np.stack([r["keypoints"] for r in self.records]),
            "head_size": np.array([r["head_size"] for r in self.records], np.float64),
            "center": np.stack([r["center"] for r in self.records]).astype(np.float64),
            "scale": np.array([r["scale"] for r in self.records], np.float64),
        }


# -- crops ------------------------------------------------------------------------------------------


def to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array -> (3, H, W) tensor of its dtype (uint8, or float in [0, 255])."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 normalised with the ImageNet statistics, on the images'
    device (the model calls it on stage >= 2 batches, which travel as uint8)."""
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


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
            # (S, S, 3) float in [0, 255]: normalise_images divides by 255 whatever the dtype
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


class _Subset(Dataset):
    """Persons ``indices`` of a dataset (items keep their original ``index``)."""

    def __init__(self, dataset: MPIIDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = i if isinstance(i, tuple) else (i, None)
        j = self.indices[i]
        return self.dataset[j] if seed is None else self.dataset[(j, seed)]


# -- the datamodule ---------------------------------------------------------------------------------


class MPIIDataModule(LightningDataModule):
    """MPII for a DeepPose cascade: person crops for stage 1, joint crops for stages >= 2.

    The cascade driver calls :meth:`configure_stage` before each stage's fit; :meth:`predict_loader`
    serves the un-augmented crops the driver runs the cascade on.

    Args:
        root: the MPII folder (``images/`` + annotations), or where the synthetic set goes.
        format: ``auto`` | ``mat`` | ``json`` (see :class:`MPIIDataset`).
        batch_size: persons per training batch (a stage >= 2 batch holds 16 crops per person).
        eval_batch_size: persons per evaluation batch (default ``batch_size``).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        input_size: crop side S (the stage's network input; the driver sets it per stage).
        center_shift, enlarge: the person box (+shift * scale px down, 200 * scale * enlarge side).
        scale_jitter, rotate, rotate_prob, flip, translate, noise, jitter: stage-1 augmentation
            (:class:`PersonCrop`).
        sigma: stage >= 2 crop side / diam (the driver sets it per stage).
        min_diam: lower bound of diam / person-box side.
        single_person: keep only the .mat's ``single_person`` rects.
        synthetic: keyword arguments of :func:`datamodules.synthetic_mpii.ensure_synthetic_mpii`;
            when given, ``prepare_data`` generates a synthetic set in the json form under ``root``.
        num_joints, joint_names, flip_pairs: the skeleton (MPII's).
    """

    def __init__(
        self,
        root: str,
        format: str = "auto",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        input_size: int = 220,
        center_shift: float = 15.0,
        enlarge: float = 1.25,
        scale_jitter: float = 0.25,
        rotate: float = 30.0,
        rotate_prob: float = 0.6,
        flip: bool = True,
        translate: float = 0.0,
        noise: float = 0.0,
        jitter: str = "uniform",
        sigma: float = 1.0,
        min_diam: float = 0.1,
        single_person: bool = False,
        synthetic: dict[str, Any] | None = None,
        num_joints: int = NUM_JOINTS,
        joint_names: Sequence[str] = MPII_JOINTS,
        flip_pairs: Sequence[Sequence[int]] = MPII_FLIP_PAIRS,
    ) -> None:
        super().__init__()
        if int(num_joints) != NUM_JOINTS:
            raise ValueError(f"num_joints={num_joints}: MPII has {NUM_JOINTS}")
        self.root = Path(root)
        self.format = format
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.input_size = int(input_size)
        self.center_shift, self.enlarge = float(center_shift), float(enlarge)
        self.scale_jitter, self.rotate = float(scale_jitter), float(rotate)
        self.rotate_prob = float(rotate_prob)
        self.translate, self.noise, self.jitter = float(translate), float(noise), str(jitter)
        self.flip_pairs = [tuple(int(v) for v in p) for p in flip_pairs] if flip else []
        self.all_flip_pairs = [tuple(int(v) for v in p) for p in flip_pairs]
        self.sigma, self.min_diam = float(sigma), float(min_diam)
        self.single_person = bool(single_person)
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.joint_names = list(joint_names)
        self.stage = 1
        self.displacement: tuple[np.ndarray, np.ndarray] | None = None
        self.val_centers: np.ndarray | None = None
        self._datasets: dict[str, MPIIDataset] = {}

    # -- data on disk

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from datamodules.synthetic_mpii import ensure_synthetic_mpii

            ensure_synthetic_mpii(self.root, **self.synthetic)

    def dataset(self, split: str) -> MPIIDataset:
        """The raw dataset of ``split`` (built once)."""
        if split not in self._datasets:
            self.prepare_data()
            self._datasets[split] = MPIIDataset(
                self.root, split, format=self.format, single_person=self.single_person
            )
        return self._datasets[split]

    def diam_ratio(self, split: str = "train") -> float:
        """Median torso diameter / person-box side over ``split`` (the diam fallback)."""
        a = self.dataset(split).arrays()
        diam = torso_diameter(a["keypoints"][..., :2], a["keypoints"][..., 2])
        side = 200.0 * a["scale"] * self.enlarge
        ratio = diam / side
        ratio = ratio[np.isfinite(ratio)]
        return float(np.median(ratio)) if len(ratio) else 0.3

    # -- stages

    def set_stage_options(
        self,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        scale_jitter: float | None = None,
        rotate: float | None = None,
        rotate_prob: float | None = None,
        flip: bool | None = None,
        min_diam: float | None = None,
        translate: float | None = None,
        noise: float | None = None,
        jitter: str | None = None,
    ) -> None:
        """Loader and augmentation settings of one cascade stage (the constructor's meaning;
        None keeps the current value, an ``eval_batch_size`` of None follows ``batch_size``)."""
        if batch_size is not None:
            self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or self.batch_size)
        if num_workers is not None:
            self.num_workers = int(num_workers)
        if scale_jitter is not None:
            self.scale_jitter = float(scale_jitter)
        if rotate is not None:
            self.rotate = float(rotate)
        if rotate_prob is not None:
            self.rotate_prob = float(rotate_prob)
        if flip is not None:
            self.flip_pairs = list(self.all_flip_pairs) if flip else []
        if min_diam is not None:
            self.min_diam = float(min_diam)
        if translate is not None:
            self.translate = float(translate)
        if noise is not None:
            self.noise = float(noise)
        if jitter is not None:
            self.jitter = str(jitter)

    def configure_stage(
        self,
        stage: int,
        input_size: int | None = None,
        sigma: float | None = None,
        displacement: tuple[np.ndarray, np.ndarray] | None = None,
        val_centers: np.ndarray | None = None,
    ) -> None:
        """Serve stage ``stage``: person crops (1) or joint crops around simulated (train) and
        given (val, (N_val, K, 2) image pixels) previous estimates (>= 2)."""
        if stage >= 2 and (displacement is None or val_centers is None):
            raise ValueError("stages >= 2 need the displacement statistics and val_centers")
        self.stage = int(stage)
        if input_size is not None:
            self.input_size = int(input_size)
        if sigma is not None:
            self.sigma = float(sigma)
        self.displacement, self.val_centers = displacement, val_centers

    def person_transform(self, train: bool) -> PersonCrop:
        return PersonCrop(
            self.input_size,
            self.center_shift,
            self.enlarge,
            train=train,
            scale_jitter=self.scale_jitter,
            rotate=self.rotate,
            rotate_prob=self.rotate_prob,
            flip_pairs=self.flip_pairs,
            translate=self.translate,
            noise=self.noise,
            jitter=self.jitter,
        )

    def joint_transform(
        self,
        displacement: tuple[np.ndarray, np.ndarray] | None = None,
        centers: np.ndarray | None = None,
        split: str = "train",
    ) -> JointCrops:
        return JointCrops(
            self.input_size,
            self.sigma,
            self.center_shift,
            self.enlarge,
            displacement=displacement,
            centers=centers,
            diam_ratio=self.diam_ratio(split) if displacement is not None else 0.3,
            min_diam=self.min_diam,
            flip_pairs=self.flip_pairs,
        )

    # -- loaders

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return split_loader(dataset, train, self)

    def _stage_dataset(self, split: str, train: bool) -> MPIIDataset:
        base = self.dataset(split)
        ds = MPIIDataset.__new__(MPIIDataset)
        ds.__dict__.update(base.__dict__)  # shares the records; only the transform differs
        if self.stage == 1:
            ds.transform = self.person_transform(train)
        elif train:
            ds.transform = self.joint_transform(displacement=self.displacement, split=split)
        else:
            ds.transform = self.joint_transform(centers=self.val_centers, split=split)
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self._stage_dataset("train", train=True)
        if len(ds) < self.batch_size:
            raise ValueError(
                f"train has {len(ds)} persons, fewer than batch_size={self.batch_size}"
            )
        return self._loader(ds, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stage_dataset("val", train=False), train=False)

    def predict_loader(
        self,
        split: str,
        centers: np.ndarray | None = None,
        indices: Sequence[int] | None = None,
        input_size: int | None = None,
        sigma: float | None = None,
    ) -> DataLoader:
        """Un-augmented crops of ``split`` for running the cascade: person crops when ``centers``
        is None, else joint crops on ``centers`` ((N, K, 2), indexed like the dataset).

        Args:
            indices: only these persons (e.g. the training persons whose errors are measured).
        """
        base = self.dataset(split)
        size = int(input_size or self.input_size)
        if centers is None:
            transform = PersonCrop(size, self.center_shift, self.enlarge, train=False)
        else:
            transform = JointCrops(
                size,
                float(sigma if sigma is not None else self.sigma),
                self.center_shift,
                self.enlarge,
                centers=centers,
                min_diam=self.min_diam,
            )
        ds = MPIIDataset.__new__(MPIIDataset)
        ds.__dict__.update(base.__dict__)
        ds.transform = transform
        dataset: Dataset = ds if indices is None else _Subset(ds, indices)
        return self._loader(dataset, train=False)
