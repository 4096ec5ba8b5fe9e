"""Segmentation metrics from one confusion matrix (rows = ground truth, columns = prediction).

- `confusion_matrix_update`: count a batch of predictions into a `(C, C)` matrix.
- `ConfusionMatrix`: the DDP-synced torchmetrics state that accumulates it over an epoch.
- `segmentation_scores`: PA, per-class precision / recall / IoU, their means, and MPA (percent).
- `format_scores_table` / `scores_to_json`: terminal table and the results.json layout.

Definitions (all in percent; `n_ij` = pixels of ground-truth class i predicted as j):
    PA          = sum_i n_ii / sum_ij n_ij
    precision_i = n_ii / sum_j n_ji   (over pixels PREDICTED as i: eq. 4 of the RIM paper as written)
    recall_i    = n_ii / sum_j n_ij   (over ground-truth pixels of i)
    mPrecision  = nanmean_i precision_i
    mRecall     = nanmean_i recall_i  (= mAcc, mmsegmentation's name for it)
    IoU_i       = n_ii / (sum_j n_ij + sum_j n_ji - n_ii);  mIoU = nanmean_i IoU_i
    MPA         = mRecall or mPrecision, by ``mpa`` (default ``recall``: the reading the RIM paper's
                  tables behave like, see docs/rim.md); ``CPA`` is the per-class vector MPA averages.
A zero denominator makes the entry NaN (undefined), and NaNs are left out of the means. So a class
absent from both ground truth and prediction does not count towards mIoU, a class never predicted
does not count towards mPrecision, and a class absent from the ground truth not towards mRecall.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

SCALAR_KEYS = ("PA", "MPA", "mIoU", "mAcc", "mPrecision", "mRecall")
VECTOR_KEYS = ("IoU", "precision", "recall", "CPA")
#: The two readings of the RIM paper's class pixel accuracy (eq. 4) and so of its MPA (eq. 10).
MPA_DEFINITIONS = ("recall", "precision")


def check_mpa_definition(mpa: str, key: str = "metrics.mpa") -> str:
    """Returns ``mpa`` if it is one of :data:`MPA_DEFINITIONS`, else raises naming ``key``."""
    if mpa not in MPA_DEFINITIONS:
        raise ValueError(f"{key}={mpa!r}: expected one of {', '.join(MPA_DEFINITIONS)}")
    return mpa


def mpa_label(mpa: str) -> str:
    """How a table header names MPA under the definition ``mpa``: ``"MPA (mean recall)"``."""
    return f"MPA (mean {check_mpa_definition(mpa)})"


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


def make_process_private(module: torch.nn.Module) -> None:
    """Gives this process its own copy of ``module``'s weights, buffers and metric states.

    ``ddp_spawn`` on CPU pickles the module into every process through shared memory: without
    private copies the processes would step one set of weights several times and add into one
    metric state, which the metric sync then sums again (every count doubled on 2 processes).
    Call it from ``LightningModule.setup``.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_shared():
            tensor.data = tensor.data.clone()
    for child in module.modules():
        if isinstance(child, Metric):
            child.reset()  # fresh default tensors, owned by this process


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


def segmentation_scores(
    confusion: torch.Tensor | np.ndarray, mpa: str = "recall"
) -> dict[str, Any]:
    """All segmentation scores of a confusion matrix, in percent (definitions in the module doc).

    Args:
        confusion: `(C, C)` counts, rows = ground truth, columns = prediction.
        mpa: which per-class accuracy `MPA` and `CPA` follow: ``"recall"`` or ``"precision"``.

    Returns:
        `PA`, `MPA`, `mIoU`, `mAcc`, `mPrecision`, `mRecall` as Python floats, `mpa_definition`;
        `IoU`, `precision`, `recall`, `CPA` as `(C,)` float64 CPU tensors. Undefined entries are
        NaN and left out of the means.
    """
    check_mpa_definition(mpa)
    conf = torch.as_tensor(confusion).detach().to("cpu", torch.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got {tuple(conf.shape)}")
    diag = conf.diagonal()  # (C,) correctly classified pixels
    gt = conf.sum(dim=1)  # (C,) ground-truth pixels per class
    predicted = conf.sum(dim=0)  # (C,) predicted pixels per class
    total = conf.sum()

    precision = _ratio(diag, predicted)
    recall = _ratio(diag, gt)
    iou = _ratio(diag, gt + predicted - diag)
    pa = float(100.0 * diag.sum() / total) if total > 0 else math.nan
    cpa = recall if mpa == "recall" else precision
    return {
        "PA": pa,
        "MPA": _nanmean(cpa),
        "mpa_definition": mpa,
        "CPA": cpa,
        "IoU": iou,
        "mIoU": _nanmean(iou),
        "precision": precision,
        "mPrecision": _nanmean(precision),
        "recall": recall,
        "mRecall": _nanmean(recall),
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
        `{"PA", "MPA", "mIoU", "mAcc", "mPrecision", "mRecall": float | None,
        "mpa_definition": "recall" | "precision", "IoU" | "precision" | "recall" | "CPA":
        {name: float | None}, "confusion": (C, C) nested list of int}` (`confusion` when the
        scores carry it).
    """
    _check_names(scores, class_names)
    result: dict[str, Any] = {key: _json_float(scores[key]) for key in SCALAR_KEYS if key in scores}
    result["mpa_definition"] = scores.get("mpa_definition", "precision")
    for key in VECTOR_KEYS:
        if key in scores:
            result[key] = {
                name: _json_float(v) for name, v in zip(class_names, scores[key], strict=True)
            }
    if scores.get("confusion") is not None:
        result["confusion"] = torch.as_tensor(scores["confusion"]).to(torch.int64).tolist()
    return result


def format_scores_table(scores: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Plain-text table for the terminal: per-class IoU, precision, recall, then the summaries.

    The header line says which per-class accuracy MPA averages. Undefined (NaN) values print as
    `-`.
    """
    _check_names(scores, class_names)

    def fmt(value: Any) -> str:
        value = float(value)
        return "-" if math.isnan(value) else f"{value:.2f}"

    mpa = str(scores.get("mpa_definition", "recall"))
    width = max([len("class"), *(len(n) for n in class_names)])
    header = f"{'class':<{width}}  {'IoU':>7}  {'prec.':>7}  {'recall':>7}"
    lines = [
        f"{mpa_label(mpa)}; precision = correct / predicted, recall = correct / ground truth",
        header,
        "-" * len(header),
    ]
    for i, name in enumerate(class_names):
        row = [fmt(scores[key][i]) for key in ("IoU", "precision", "recall")]
        lines.append(f"{name:<{width}}  {row[0]:>7}  {row[1]:>7}  {row[2]:>7}")
    lines.append("-" * len(header))
    summary = [
        f"PA {fmt(scores['PA'])}",
        f"MPA({mpa}) {fmt(scores['MPA'])}",
        f"mIoU {fmt(scores['mIoU'])}",
        f"mPrecision {fmt(scores['mPrecision'])}",
        f"mRecall(=mAcc) {fmt(scores['mRecall'])}",
    ]
    lines.append("  ".join(summary))
    return "\n".join(lines)
