"""Joint regression losses (DeepPose): squared L2 over labelled joints."""

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
