"""MPII Human Pose annotation readers: the official ``RELEASE`` .mat, the mmpose/HRNet json form
and the ``mpii_gt_val.mat`` ground truth, as per-person records.

- every coordinate is 0-based (the files are MATLAB 1-based; evaluation against the official
  ``mpii_gt_val.mat`` adds 1 back, see :mod:`lightning_modules.pose_metrics`);
- a joint is *labelled* when it is present in the annotation, whatever ``is_visible`` says;
- ``head_size`` = 0.6 x the head-box diagonal (the PCKh normaliser);
- ``center``/``scale`` are the raw ``objpos`` (0-based) and person height / 200.

A record holds ``keypoints`` (16, 3) float32 (x, y, labelled), ``visible`` (16,) float32,
``head_size``, ``center`` (2,) float32, ``scale`` and the image ``name``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from datamodules.batch import DatasetError
from datamodules.pose_transforms import NUM_JOINTS

MAT_NAME = "mpii_human_pose_v1_u12_1.mat"
HEAD_SIZE_FACTOR = 0.6
#: Split -> the names its json annotation file goes by (mmpose's first, HRNet's second).
JSON_NAMES = {
    "train": ("mpii_train.json", "train.json"),
    "val": ("mpii_val.json", "valid.json"),
    "trainval": ("mpii_trainval.json", "trainval.json"),
    "test": ("mpii_test.json", "test.json"),
}

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


# -- where the files are ------------------------------------------------------------------------


def find_annotation(root: Path, names: Sequence[str]) -> Path | None:
    """The first existing ``root/<dir>/<name>`` among the usual folders."""
    for name in names:
        for sub in ("", "annotations", "annot", "mpii_human_pose_v1_u12_2"):
            candidate = root / sub / name if sub else root / name
            if candidate.is_file():
                return candidate
    return None
