"""Segmentation metrics from one confusion matrix (rows = ground truth, columns = prediction).

- `confusion_matrix_update`: count a batch of predictions into a `(C, C)` matrix.
- `ConfusionMatrix`: the DDP-synced torchmetrics state that accumulates it over an epoch.
- `segmentation_scores`: PA, CPA, MPA, IoU, mIoU, recall, mAcc (percent) from the matrix.
- `format_scores_table` / `scores_to_json`: terminal table and the results.json layout.

Definitions (all in percent; `n_ij` = pixels of class i predicted as j):
    PA     = sum_i n_ii / sum_ij n_ij
    CPA_i  = n_ii / sum_j n_ji     (over pixels PREDICTED as i: the RIM paper's class pixel accuracy)
    MPA    = nanmean_i CPA_i
    recall_i = n_ii / sum_j n_ij   (over ground-truth pixels of i)
    mAcc   = nanmean_i recall_i    (mmsegmentation's mAcc)
    IoU_i  = n_ii / (sum_j n_ij + sum_j n_ji - n_ii)
    mIoU   = nanmean_i IoU_i
A zero denominator makes the entry NaN (undefined), and NaNs are left out of the means. So a class
absent from both ground truth and prediction does not count towards mIoU, and a class never
predicted does not count towards MPA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

SCALAR_KEYS = ("PA", "MPA", "mIoU", "mAcc")
VECTOR_KEYS = ("IoU", "CPA", "recall")


def _count(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram of int64 `index` (values in `[0, num_bins)`) as a `(num_bins,)` int64 tensor.

    CPU uses `bincount`. On accelerators `bincount` reads the maximum back to the host to size
    its output, so there we scatter-add into a preallocated histogram instead: no host sync, and
    deterministic because the additions are integer.
    """
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=num_bins)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def confusion_matrix_update(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion matrix of one batch of class-index predictions.

    Pixels whose target equals `ignore_index` (or lies outside `[0, C)`) are not counted. Pixels
    whose prediction lies outside `[0, C)` are dropped too instead of spilling into a
    neighbouring cell (argmax predictions never are). Runs without host synchronisation.

    Args:
        pred: predicted class indices, any integer dtype, e.g. `(N,)` or `(B, H, W)`.
        target: ground-truth class indices, same shape as `pred`.
        num_classes: C.
        ignore_index: target value to ignore.

    Returns:
        `(C, C)` int64 counts on `pred`'s device, rows = ground truth, columns = prediction.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = pred.reshape(-1).long()  # (N,)
    target = target.reshape(-1).long().to(pred.device)  # (N,)
    valid = (
        (target != ignore_index)
        & (target >= 0)
        & (target < num_classes)
        & (pred >= 0)
        & (pred < num_classes)
    )
    # Invalid pixels go to an extra overflow bin that is cut off below; masking with
    # `index[valid]` would need the number of valid pixels on the host.
    overflow = num_classes * num_classes
    index = torch.where(valid, target * num_classes + pred, torch.full_like(pred, overflow))
    counts = _count(index, overflow + 1)[:overflow]  # (C * C,)
    return counts.reshape(num_classes, num_classes)  # (C*C,) -> (C, C)


class ConfusionMatrix(Metric):
    """Epoch-level `(C, C)` confusion matrix, summed over processes under DDP.

    Args:
        num_classes: C.
        ignore_index: target value to ignore.
        **kwargs: passed to `torchmetrics.Metric` (e.g. `sync_on_compute`).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch.

        Args:
            preds: class indices `(B, H, W)` or logits/probabilities `(B, C, H, W)` (argmax'ed).
            target: `(B, H, W)` ground-truth class indices, `ignore_index` = ignore.
        """
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)  # (B, C, H, W) -> (B, H, W)
        self.confmat += confusion_matrix_update(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> torch.Tensor:
        """The summed `(C, C)` int64 matrix (rows = ground truth, columns = prediction)."""
        return self.confmat


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """`100 * num / den` with NaN where `den == 0` (float64)."""
    out = torch.full_like(num, math.nan)
    defined = den > 0
    out[defined] = 100.0 * num[defined] / den[defined]
    return out


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x))  # all-NaN gives NaN


def segmentation_scores(confusion: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """All segmentation scores of a confusion matrix, in percent (definitions in the module doc).

    Args:
        confusion: `(C, C)` counts, rows = ground truth, columns = prediction.

    Returns:
        `PA`, `MPA`, `mIoU`, `mAcc` as Python floats; `CPA`, `IoU`, `recall` as `(C,)` float64
        CPU tensors. Undefined entries are NaN and left out of the means.
    """
    conf = torch.as_tensor(confusion).detach().to("cpu", torch.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got {tuple(conf.shape)}")
    diag = conf.diagonal()  # (C,) correctly classified pixels
    gt = conf.sum(dim=1)  # (C,) ground-truth pixels per class
    predicted = conf.sum(dim=0)  # (C,) predicted pixels per class
    total = conf.sum()

    cpa = _ratio(diag, predicted)
    recall = _ratio(diag, gt)
    iou = _ratio(diag, gt + predicted - diag)
    pa = float(100.0 * diag.sum() / total) if total > 0 else math.nan
    return {
        "PA": pa,
        "CPA": cpa,
        "MPA": _nanmean(cpa),
        "IoU": iou,
        "mIoU": _nanmean(iou),
        "recall": recall,
        "mAcc": _nanmean(recall),
    }


def _check_names(scores: Mapping[str, Any], class_names: Sequence[str]) -> None:
    num_classes = len(scores["IoU"])
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")


def _json_float(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def scores_to_json(scores: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """The results.json layout of `segmentation_scores` output; NaN becomes `null`.

    Returns:
        `{"PA", "MPA", "mIoU", "mAcc": float | None, "IoU": {name: ..}, "CPA": {name: ..}}`.
    """
    _check_names(scores, class_names)
    result: dict[str, Any] = {key: _json_float(scores[key]) for key in SCALAR_KEYS}
    for key in ("IoU", "CPA"):
        result[key] = {
            name: _json_float(v) for name, v in zip(class_names, scores[key], strict=True)
        }
    return result


def format_scores_table(scores: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Plain-text table for the terminal: per-class IoU, CPA, recall, then the summary scores.

    Undefined (NaN) values print as `-`.
    """
    _check_names(scores, class_names)

    def fmt(value: Any) -> str:
        value = float(value)
        return "-" if math.isnan(value) else f"{value:.2f}"

    width = max([len("class"), *(len(n) for n in class_names)])
    header = f"{'class':<{width}}  {'IoU':>7}  {'CPA':>7}  {'recall':>7}"
    lines = [header, "-" * len(header)]
    for i, name in enumerate(class_names):
        row = [fmt(scores[key][i]) for key in ("IoU", "CPA", "recall")]
        lines.append(f"{name:<{width}}  {row[0]:>7}  {row[1]:>7}  {row[2]:>7}")
    lines.append("-" * len(header))
    lines.append("  ".join(f"{key} {fmt(scores[key])}" for key in SCALAR_KEYS))
    return "\n".join(lines)
