"""Mask AP with ground-truth boxes given (the protocol that isolates the mask head) and mask IoU.

Every ground-truth instance becomes one detection of score 1 whose mask is the predicted one; COCOeval
on segmentation then measures only mask quality. Scores are reported per class group (``seen``: the
classes whose masks trained the head, ``unseen``: the others, ``all``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W)`` binary masks -> COCO RLEs with str counts (JSON-safe)."""
    from pycocotools import mask as mask_utils

    # pycocotools wants (H, W, N) in Fortran order: (N, H, W) -> (H, W, N)
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return list(rles)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-instance IoU of aligned ``(N, H, W)`` binary masks -> ``(N,)`` (1 when both are empty)."""
    p, g = pred.reshape(len(pred), -1).astype(bool), gt.reshape(len(gt), -1).astype(bool)
    inter = (p & g).sum(1)
    union = (p | g).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass
class MaskAPAccumulator:
    """Collects per-image ground truth and predictions (as RLEs) for :func:`mask_ap_scores`."""

    images: list[dict[str, Any]] = field(default_factory=list)
    gts: list[dict[str, Any]] = field(default_factory=list)
    dts: list[dict[str, Any]] = field(default_factory=list)
    ious: list[tuple[int, float]] = field(default_factory=list)

    def update(self, gt_masks: np.ndarray, pred_masks: np.ndarray, labels: Sequence[int]) -> None:
        """One image: ``(N, H, W)`` binary ground truth and predictions, ``(N,)`` class ids."""
        image_id = len(self.images) + 1
        h, w = gt_masks.shape[-2:]
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        if len(labels) == 0:
            return
        from pycocotools import mask as mask_utils

        gt_rles, dt_rles = encode_masks(gt_masks), encode_masks(pred_masks)
        for lab, g, d in zip(labels, gt_rles, dt_rles, strict=True):
            area = float(mask_utils.area(g))
            x, y, bw, bh = mask_utils.toBbox(g).tolist()
            self.gts.append(
                {
                    "id": len(self.gts) + 1,
                    "image_id": image_id,
                    "category_id": int(lab),
                    "segmentation": g,
                    "area": area,
                    "bbox": [x, y, bw, bh],
                    "iscrowd": 0,
                }
            )
            # The ground-truth box is the detection, score 1: only the mask differs.
            self.dts.append(
                {
                    "image_id": image_id,
                    "category_id": int(lab),
                    "segmentation": d,
                    "score": 1.0,
                    "bbox": [x, y, bw, bh],
                }
            )
        for lab, iou in zip(labels, mask_iou(pred_masks, gt_masks), strict=True):
            self.ious.append((int(lab), float(iou)))

    def reset(self) -> None:
        self.images, self.gts, self.dts, self.ious = [], [], [], []

    def compute(self, groups: Mapping[str, Sequence[int] | None]) -> dict[str, Any]:
        return mask_ap_scores(self.images, self.gts, self.dts, self.ious, groups)


def _coco_eval(images, gts, dts, cat_ids: list[int]) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = sorted({a["category_id"] for a in gts})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c} for c in cats]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in dts])
        ev = COCOeval(gt, dt, "segm")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval gives -1 where a statistic has no ground truth (e.g. no large objects).
    return {
        name: (float(v) * 100 if v >= 0 else float("nan"))
        for name, v in zip(_STAT_NAMES, ev.stats[:6], strict=True)
    }


def mask_ap_scores(
    images: list[dict[str, Any]],
    gts: list[dict[str, Any]],
    dts: list[dict[str, Any]],
    ious: list[tuple[int, float]],
    groups: Mapping[str, Sequence[int] | None],
) -> dict[str, Any]:
    """COCO mask AP (x100) and mean mask IoU (x100) per class group.

    Args:
        groups: ``{"seen": [ids], "unseen": [ids], "all": None}``; None = every class present.

    Returns:
        ``{"<group>": {"AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "num_instances"}, ...,
        "per_class_IoU": {id: IoU}}``; a group without instances has NaN scores.
    """
    present = sorted({a["category_id"] for a in gts})
    lab_iou: dict[int, list[float]] = {}
    for lab, iou in ious:
        lab_iou.setdefault(lab, []).append(iou)
    out: dict[str, Any] = {}
    for name, ids in groups.items():
        cat_ids = present if ids is None else [c for c in present if c in set(int(i) for i in ids)]
        n = sum(len(lab_iou.get(c, [])) for c in cat_ids)
        if n == 0:
            out[name] = {
                **{k: float("nan") for k in _STAT_NAMES},
                "mIoU": float("nan"),
                "num_instances": 0,
            }
            continue
        scores = _coco_eval(images, gts, dts, cat_ids)
        # mean over the group's instances (every instance weighs the same, as in Deep-MAC's IoU)
        scores["mIoU"] = 100 * float(np.mean([v for c in cat_ids for v in lab_iou.get(c, [])]))
        scores["num_instances"] = n
        out[name] = scores
    out["per_class_IoU"] = {int(c): 100 * float(np.mean(v)) for c, v in sorted(lab_iou.items())}
    return out


def flat_scores(scores: Mapping[str, Any]) -> dict[str, float]:
    """``{"AP_seen": .., "mIoU_unseen": .., ...}`` for logging (numbers only)."""
    flat = {}
    for group, vals in scores.items():
        if group == "per_class_IoU" or not isinstance(vals, Mapping):
            continue
        for key, v in vals.items():
            if key != "num_instances":
                flat[f"{key}_{group}"] = float(v)
    return flat
