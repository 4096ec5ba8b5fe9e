"""Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of the per-class IoU.

For class ``c`` with probabilities ``p_c`` and ground truth ``fg_c`` over the labelled pixels, the
pixel errors ``m_i = |fg_i - p_ci|`` are fed to the Lovasz extension of the Jaccard loss
``Delta_J(M) = |M| / |fg_c ∪ M|``: sort the errors in decreasing order and weight each by the
increment of ``Delta_J`` when its pixel joins the mismatch set. The loss averages the classes
present in the target (SCHP's and Berman's ``classes="present"``) or all classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LovaszSoftmaxLoss", "lovasz_grad", "lovasz_softmax"]


def lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Increments of the Jaccard loss along a sorted mismatch order.

    Args:
        fg_sorted: ``(P, K)`` float 0/1 ground truth of ``K`` independent problems, each column
            ordered by decreasing error.

    Returns:
        ``(P, K)`` weights ``Delta_J(M_i) - Delta_J(M_{i-1})`` with ``M_i`` the first ``i``
        pixels of the order.
    """
    gts = fg_sorted.sum(0, keepdim=True)  # (1, K)
    intersection = gts - fg_sorted.cumsum(0)  # (P, K)
    union = gts + (1.0 - fg_sorted).cumsum(0)  # (P, K), >= 1 after the first pixel
    jaccard = 1.0 - intersection / union
    # First differences along the order; the first entry is Delta_J(M_1) - Delta_J(empty set).
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


def lovasz_softmax(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    classes: str = "present",
    per_image: bool = False,
) -> Tensor:
    """Lovasz-softmax loss of ``logits`` against ``target``.

    Args:
        logits: ``(B, C, H, W)`` class scores (softmax is applied here), any float dtype.
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: label value of unlabelled pixels.
        classes: ``"present"`` averages over the classes present in the target, ``"all"`` over
            every class (absent ones contribute their false-positive mass).
        per_image: compute the loss per image and average, instead of over the whole batch.

    Returns:
        Scalar float32 loss; 0 (attached to the graph) when no pixel is labelled.
    """
    if classes not in ("present", "all"):
        raise ValueError(f"classes={classes!r}: expected 'present' or 'all'")
    probs = logits.float().softmax(1)
    if per_image:
        losses = [
            _lovasz_flat(*_flatten(probs[i : i + 1], target[i : i + 1], ignore_index), classes)
            for i in range(probs.shape[0])
        ]
        return torch.stack(losses).mean()
    return _lovasz_flat(*_flatten(probs, target, ignore_index), classes)


def _flatten(probs: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(B, C, H, W)``, ``(B, H, W)`` -> labelled pixels ``(P, C)`` and their labels ``(P,)``."""
    num_classes = probs.shape[1]
    probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)  # (B, C, H, W) -> (BHW, C)
    labels = target.reshape(-1)  # (BHW,)
    valid = labels != ignore_index
    # Boolean indexing syncs with the host once; the sort below needs the real pixel count anyway.
    return probs[valid], labels[valid]


def _lovasz_flat(probs: Tensor, labels: Tensor, classes: str) -> Tensor:
    """Lovasz-softmax of ``(P, C)`` probabilities and ``(P,)`` labels, all classes at once."""
    num_classes = probs.shape[1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    fg = (labels[:, None] == torch.arange(num_classes, device=labels.device)).float()  # (P, C)
    errors = (fg - probs).abs()  # (P, C)
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)  # per class column
    fg_sorted = fg.gather(0, order)  # (P, C)
    per_class = (errors_sorted * lovasz_grad(fg_sorted)).sum(0)  # (C,)
    if classes == "all":
        return per_class.mean()
    present = fg.sum(0) > 0  # (C,)
    return (per_class * present).sum() / present.sum().clamp(min=1)


class LovaszSoftmaxLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`lovasz_softmax`.

    Args:
        ignore_index: label value of unlabelled pixels.
        classes: ``"present"`` or ``"all"``.
        per_image: per-image average instead of one batch-wide loss.
    """

    name = "lovasz"

    def __init__(
        self, ignore_index: int = 255, classes: str = "present", per_image: bool = False
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.classes = classes
        self.per_image = per_image

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``(B, C, H, W)`` logits against a ``(B, H, W)`` target; a float32 scalar."""
        return lovasz_softmax(logits, target, self.ignore_index, self.classes, self.per_image)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, classes={self.classes!r}"
