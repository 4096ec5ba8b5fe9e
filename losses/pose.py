"""Joint regression losses (DeepPose): squared L2 (the paper) and smooth L1 (mmpose) over labelled
joints."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def joint_l2(pred: Tensor, target: Tensor, labelled: Tensor) -> Tensor:
    """Mean over labelled joints of ``||pred_j - target_j||^2`` (the paper's L2 loss).

    Args:
        pred: (B, K, 2).
        target: (B, K, 2).
        labelled: (B, K) 1 where the joint is annotated; others contribute nothing, gradient
            included.

    Returns:
        scalar; 0 (with a graph) when nothing is labelled.
    """
    mask = labelled.to(pred.dtype)
    # Masked before squaring: a NaN target of an unlabelled joint must reach neither the value
    # nor, through the square's backward, the gradient.
    diff = torch.where(mask[..., None] > 0, pred - target, torch.zeros_like(pred))
    sq = (diff**2).sum(-1)  # (B, K)
    return sq.sum() / mask.sum().clamp_min(1.0)


class JointL2Loss(nn.Module):
    """``loss(pred, target, labelled) -> {"loss": ..., "loss/l2": ...}``, scaled by ``weight``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, pred: Tensor, target: Tensor, labelled: Tensor) -> dict[str, Tensor]:
        l2 = joint_l2(pred, target, labelled)
        return {"loss": self.weight * l2, "loss/l2": l2.detach()}


def joint_smooth_l1(
    pred: Tensor,
    target: Tensor,
    labelled: Tensor,
    beta: float = 1.0,
    reduction: str = "elements",
    crop_size: int | None = None,
) -> Tensor:
    """Smooth L1 over the coordinates of labelled joints (mmpose's ``SmoothL1Loss`` with
    ``use_target_weight=True``, whose DeepPose recipe uses it).

    Args:
        pred, target: (B, K, 2) in the crop's normalised frame (a shift of mmpose's [0, 1] frame:
            the differences, hence the loss, are the same).
        labelled: (B, K) joint weights; 0 joints contribute nothing, gradient included.
        beta: the L2-to-L1 switch point (``F.smooth_l1_loss``'s, 1.0 in mmpose).
        reduction: ``elements`` = mean over all B*K*2 coordinates, weighted-out ones included
            (mmpose's mean of ``smooth_l1(pred * w, target * w)``); ``labelled`` = mean over the
            coordinates of labelled joints.
        crop_size: S of an S x S crop: joints whose target pixel lies outside ``[0, S - 1]`` get
            weight 0 too (mmpose's ``RegressionLabel`` codec); None keeps them.

    Returns:
        scalar.
    """
    weight = labelled.to(pred.dtype) > 0
    if crop_size is not None:
        # pixel u = S n + (S - 1) / 2 lies in [0, S - 1] iff |n| <= (S - 1) / (2 S)
        bound = (crop_size - 1) / (2.0 * crop_size)
        weight = weight & (target.abs() <= bound).all(-1)
    mask = weight[..., None].expand_as(pred)
    # masked before the loss: a NaN target of an unlabelled joint reaches neither value nor grad
    diff = torch.where(mask, pred - target, torch.zeros_like(pred))
    per = torch.nn.functional.smooth_l1_loss(
        diff, torch.zeros_like(diff), reduction="none", beta=beta
    )
    if reduction == "elements":
        return per.sum() / max(1, per.numel())
    if reduction == "labelled":
        return per.sum() / mask.sum().clamp_min(1).to(per.dtype)
    raise ValueError(f"reduction={reduction!r}: expected 'elements' or 'labelled'")


class JointSmoothL1Loss(nn.Module):
    """``loss(pred, target, labelled) -> {"loss": ..., "loss/smooth_l1": ...}`` (see
    :func:`joint_smooth_l1`), scaled by ``weight``."""

    def __init__(
        self,
        weight: float = 1.0,
        beta: float = 1.0,
        reduction: str = "elements",
        crop_size: int | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("elements", "labelled"):
            raise ValueError(f"reduction={reduction!r}: expected 'elements' or 'labelled'")
        self.weight, self.beta = float(weight), float(beta)
        self.reduction = reduction
        self.crop_size = None if crop_size is None else int(crop_size)

    def forward(self, pred: Tensor, target: Tensor, labelled: Tensor) -> dict[str, Tensor]:
        value = joint_smooth_l1(pred, target, labelled, self.beta, self.reduction, self.crop_size)
        return {"loss": self.weight * value, "loss/smooth_l1": value.detach()}
