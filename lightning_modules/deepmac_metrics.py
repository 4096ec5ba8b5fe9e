"""Mask AP with ground-truth boxes given (the protocol that isolates the mask head) and mask IoU.

Every ground-truth instance becomes one detection of score 1 whose mask is the predicted one; COCOeval
on segmentation then measures only mask quality. Scores are reported per class group (``seen``: the
classes whose masks trained the head, ``unseen``: the others, ``all``). COCO crowd regions
(``iscrowd=1``) follow COCO's rule: not ground truth, and a prediction matching one (intersection over
the prediction's area at the IoU threshold) is ignored rather than counted as a false positive.
Under DDP each process accumulates its shard; :func:`gather_accumulator` merges them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules.errors import require

_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W)`` binary masks -> COCO RLEs with str counts (JSON-safe)."""
    require("pycocotools", "Deep-MAC's mask AP")
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
    """Collects per-image ground truth and predictions (as RLEs) for :func:`mask_ap_scores`.

    One record per image (plain Python values, so shards of several processes can be gathered with
    ``all_gather_object`` and merged by :meth:`merge`). ``key`` is the image's index in the
    evaluated dataset: merging sorts by it and keeps the first copy of a repeated key, which undoes
    the interleaving and the padding of a ``DistributedSampler``. The order matters: every
    detection has score 1, so COCOeval's ranking of tied detections follows the image order.
    """

    records: list[dict[str, Any]] = field(default_factory=list)

    def update(
        self,
        gt_masks: np.ndarray,
        pred_masks: np.ndarray,
        labels: Sequence[int],
        crowd_masks: np.ndarray | None = None,
        crowd_labels: Sequence[int] | None = None,
        key: int | None = None,
    ) -> None:
        """One image.

        Args:
            gt_masks: ``(N, H, W)`` binary ground truth.
            pred_masks: ``(N, H, W)`` binary predictions, row ``i`` for ground-truth instance ``i``.
            labels: ``(N,)`` class ids.
            crowd_masks: ``(K, H, W)`` binary crowd regions (COCO ``iscrowd=1``): not ground truth;
                a prediction matching one is ignored instead of counted as a false positive.
            crowd_labels: ``(K,)`` their class ids.
            key: the image's dataset index (see the class docstring); None: arrival order.
        """
        h, w = gt_masks.shape[-2:]
        rec: dict[str, Any] = {
            "key": None if key is None else int(key),
            "height": int(h),
            "width": int(w),
            "gts": [],
            "crowds": [],
            "dts": [],
            "ious": [],
        }
        self.records.append(rec)
        if len(labels):
            gt_rles, dt_rles = encode_masks(gt_masks), encode_masks(pred_masks)
            rec["gts"] = [(int(c), g) for c, g in zip(labels, gt_rles, strict=True)]
            rec["dts"] = dt_rles
            rec["ious"] = [float(v) for v in mask_iou(pred_masks, gt_masks)]
        if crowd_labels is not None and len(crowd_labels):
            rec["crowds"] = [
                (int(c), r) for c, r in zip(crowd_labels, encode_masks(crowd_masks), strict=True)
            ]

    def reset(self) -> None:
        self.records = []

    def present_classes(self) -> list[int]:
        """Class ids of the (non-crowd) ground-truth instances seen so far."""
        return sorted({c for r in self.records for c, _ in r["gts"]})

    @classmethod
    def merge(cls, shards: Sequence[MaskAPAccumulator]) -> MaskAPAccumulator:
        """One accumulator from the shards of several processes (see the class docstring)."""
        records = [r for s in shards for r in s.records]
        if records and all(r["key"] is not None for r in records):
            unique: dict[int, dict[str, Any]] = {}
            for r in records:
                unique.setdefault(r["key"], r)  # a padded sampler repeats images: keep one
            records = [unique[k] for k in sorted(unique)]
        return cls(records=list(records))

    def coco(self) -> tuple[list[dict], list[dict], list[dict], list[tuple[int, float]]]:
        """COCO ``images``, ground truth (crowds with ``iscrowd=1``), detections, ``(label, IoU)``."""
        from pycocotools import mask as mask_utils

        images, gts, dts, ious = [], [], [], []
        for image_id, rec in enumerate(self.records, start=1):
            images.append({"id": image_id, "height": rec["height"], "width": rec["width"]})
            for (lab, g), d, iou in zip(rec["gts"], rec["dts"], rec["ious"], strict=True):
                x, y, bw, bh = mask_utils.toBbox(g).tolist()
                gts.append(_gt_ann(len(gts) + 1, image_id, lab, g, 0))
                # The ground-truth box is the detection, score 1: only the mask differs.
                dts.append(
                    {
                        "image_id": image_id,
                        "category_id": lab,
                        "segmentation": d,
                        "score": 1.0,
                        "bbox": [x, y, bw, bh],
                    }
                )
                ious.append((lab, iou))
            for lab, r in rec["crowds"]:
                gts.append(_gt_ann(len(gts) + 1, image_id, lab, r, 1))
        return images, gts, dts, ious

    def compute(self, groups: Mapping[str, Sequence[int] | None]) -> dict[str, Any]:
        return mask_ap_scores(*self.coco(), groups)


def _gt_ann(ann_id: int, image_id: int, label: int, rle: dict, iscrowd: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label,
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "iscrowd": iscrowd,
    }


def gather_accumulator(acc: MaskAPAccumulator) -> MaskAPAccumulator:
    """The accumulator of the whole evaluated set: every process's shard, merged (on every rank).

    Without an initialised process group of more than one process, ``acc`` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return acc
    shards: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, acc)
    return MaskAPAccumulator.merge(shards)


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
        # Every instance is a detection: COCO's cap of 100 per image and class would drop the
        # instances of a crowded image beyond it (Cityscapes frames); raise it to the largest count.
        per_image: dict[tuple[int, int], int] = {}
        for d in dts:
            k = (d["image_id"], d["category_id"])
            per_image[k] = per_image.get(k, 0) + 1
        ev.params.maxDets = [1, 10, max([100, *per_image.values()])]
        ev.evaluate()
        ev.accumulate()
    return _stats(ev)


def _stats(ev: Any) -> dict[str, float]:
    """COCOeval.summarize's first six numbers (x100) at the largest ``maxDets``; NaN where COCOeval
    has no ground truth (e.g. no large objects)."""
    p = ev.params
    prec = ev.eval["precision"]  # (T iou thresholds, R recalls, K classes, A areas, M maxDets)
    iou_thrs = list(np.round(p.iouThrs, 2))
    area = {name: i for i, name in enumerate(p.areaRngLbl)}

    def mean(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(s.mean()) * 100 if s.size else float("nan")

    m = len(p.maxDets) - 1
    return {
        "AP": mean(prec[:, :, :, area["all"], m]),
        "AP50": mean(prec[iou_thrs.index(0.5), :, :, area["all"], m]),
        "AP75": mean(prec[iou_thrs.index(0.75), :, :, area["all"], m]),
        "APs": mean(prec[:, :, :, area["small"], m]),
        "APm": mean(prec[:, :, :, area["medium"], m]),
        "APl": mean(prec[:, :, :, area["large"], m]),
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
        images, gts, dts: COCO images, ground truth (crowd regions with ``iscrowd=1``) and
            detections (:meth:`MaskAPAccumulator.coco`).
        ious: ``(class id, mask IoU)`` per ground-truth instance.
        groups: ``{"seen": [ids], "unseen": [ids], "all": None}``; None = every class present.

    Returns:
        ``{"<group>": {"AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "num_instances"}, ...,
        "per_class_IoU": {id: IoU}}``; a group without instances has NaN scores.
    """
    # Crowd regions (iscrowd=1) are not instances: a class with only crowds is not "present".
    present = sorted({a["category_id"] for a in gts if not a.get("iscrowd", 0)})
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
