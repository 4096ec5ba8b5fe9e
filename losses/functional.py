"""Pure loss functions for dense prediction.

Every function takes logits ``(B, C, H, W)`` and an int64 target ``(B, H, W)`` whose value
``ignore_index`` marks unlabelled pixels, and returns a scalar averaged over the labelled pixels.
All of them compute in float32 whatever the logits' dtype (bf16/fp16 logits from mixed precision
would otherwise lose the small differences these losses are made of), and none of them synchronises
with the host: "no labelled pixel" is handled by dividing by ``max(count, 1)``, which gives an exact
zero that is still attached to the graph instead of the NaN that ``F.cross_entropy`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "focal_loss", "inter_class_loss"]


def _valid_pixels(target: Tensor, ignore_index: int, valid_mask: Tensor | None) -> Tensor:
    """Pixels that count: labelled and, if given, inside ``valid_mask``. ``(B, H, W)`` bool."""
    valid = target != ignore_index
    if valid_mask is not None:
        valid = valid & valid_mask.to(torch.bool)
    return valid


def _masked_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_pixel`` ``(B, H, W)`` over ``valid`` pixels; 0 (with graph) if there are none."""
    # torch.where, not a multiplication: a NaN/inf logit on an ignored pixel must not leak into the
    # sum (0 * inf = NaN), and its gradient must be exactly zero.
    total = torch.where(valid, per_pixel, per_pixel.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1)


def inter_class_loss(
    logits: Tensor,
    target: Tensor,
    margin: float = 1.0,
    ignore_index: int = 255,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Inter-class hinge loss of RIM's ILM (Li & Han 2023, eqs. 6-7).

    ``L = mean_p sum_{j != y_p} relu(V_j(p) + margin - V_{y_p}(p))`` over the labelled pixels ``p``
    (and only those inside ``valid_mask`` when it is given). The paper sums over pixels; the mean
    keeps the loss weight independent of crop size and comparable to cross-entropy.

    A class ``j`` stops receiving gradient at a pixel once its score is at least ``margin`` below the
    true class score; ignored pixels never receive gradient. The cost is that of one cross-entropy:
    a few ``(B, C, H, W)`` temporaries and no ``(B, C, C, H, W)`` pairwise tensor.

    Args:
        logits: ``(B, C, H, W)`` class scores ``V`` (the network's last heat maps), any float dtype.
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        margin: required gap between the true class score and every other class score.
        ignore_index: label value of unlabelled pixels.
        valid_mask: optional ``(B, H, W)`` bool; pixels where it is False do not count.

    Returns:
        Scalar float32 loss; exactly 0 (still attached to the graph) when no pixel counts.
    """
    valid = _valid_pixels(target, ignore_index, valid_mask)
    # Ignored pixels point at class 0 so that gather stays in range; _masked_mean drops them.
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)  # (B, 1, H, W)
    # Gather before the float32 cast (exact either way): gather saves its input for backward, and
    # a saved float32 copy of bf16 logits would stay alive until backward.
    true_score = logits.gather(1, index).float()  # (B, 1, H, W)
    # (B, C, H, W): the hinge argument V_j + margin - V_y for every class j (V_y broadcast over C).
    # Evaluated in that order because rounding is monotone: whenever V_y >= fl(V_j + margin) the
    # argument is <= 0 exactly, so a met margin gives exactly zero loss and gradient.
    hinge = logits.float() + margin
    # In-place ops on this fresh temporary keep the loss at about one cross-entropy's cost: none of
    # the earlier backward functions needs the overwritten values.
    hinge.sub_(true_score)
    # Drop j = y by masking rather than by subtracting relu(margin) afterwards: exact for any margin
    # (also margin <= 0), and the true class gets no gradient from its own (V_y - V_y) term.
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    hinge.masked_fill_(classes == index, 0.0)  # (B, C, H, W) bool mask
    per_pixel = F.relu_(hinge).sum(dim=1)  # (B, C, H, W) -> (B, H, W)
    return _masked_mean(per_pixel, valid)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Pixel-wise cross-entropy averaged over labelled pixels.

    Same value as ``F.cross_entropy(..., reduction="mean")`` except that a batch without labelled
    pixels (e.g. the regional sampler dropped every class) gives 0 instead of NaN.

    Args:
        logits: ``(B, C, H, W)`` class scores, any float dtype (computed in float32).
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: label value of unlabelled pixels.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        Scalar float32 loss.
    """
    # The kernel's own sum skips ignored pixels (it never reads their scores), so one reduction
    # replaces a (B, H, W) loss map, a masked sum and their backward passes.
    total = F.cross_entropy(
        logits.float(),
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (target != ignore_index).sum().clamp(min=1)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Multi-class focal loss (Lin et al. 2017) averaged over labelled pixels.

    ``FL(p) = -alpha_{y_p} (1 - p_{y_p})^gamma log p_{y_p}``; with ``gamma = 0`` and no ``alpha`` it
    is the cross-entropy.

    Args:
        logits: ``(B, C, H, W)`` class scores, any float dtype (computed in float32).
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        gamma: focusing parameter; larger values down-weight well-classified pixels more.
        alpha: optional class weights, a ``(C,)`` sequence/tensor indexed by the true class, or one
            float applied to every pixel. The result is still divided by the number of labelled
            pixels, not by the sum of weights.
        ignore_index: label value of unlabelled pixels.

    Returns:
        Scalar float32 loss.
    """
    valid = target != ignore_index
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)  # (B, 1, H, W)
    log_prob = F.log_softmax(logits.float(), dim=1).gather(1, index).squeeze(1)  # (B, H, W)
    prob = log_prob.exp()
    per_pixel = -((1.0 - prob) ** gamma) * log_prob if gamma != 0 else -log_prob
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            per_pixel = per_pixel * float(alpha)
        else:
            weights = torch.as_tensor(alpha, dtype=torch.float32, device=logits.device)
            per_pixel = per_pixel * weights[index.squeeze(1)]  # (C,) -> (B, H, W)
    return _masked_mean(per_pixel, valid)
