"""Per-box mask losses with partial supervision (Deep-MAC's ``allowed_mask_classes``).

Only instances of the allowed classes train the mask head: the others are dropped before the loss
is computed, so they contribute exactly zero loss and zero gradient (not a small weighted one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The 80 category ids of COCO 2017 instances (the official ids have gaps: 12, 26, 29, 30, 45, 66,
# 68, 69, 71, 83 are unused).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

# The 20 PASCAL VOC classes as COCO ids: person, bicycle, car, motorcycle, airplane, bus, train,
# boat, bird, cat, dog, horse, sheep, cow, bottle, chair, couch, potted plant, dining table, tv.
COCO_VOC_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72,
)  # fmt: skip
COCO_NONVOC_IDS: tuple[int, ...] = tuple(i for i in COCO_CATEGORY_IDS if i not in COCO_VOC_IDS)

# Cityscapes labelIds of the 8 instance classes evaluated by the benchmark.
CITYSCAPES_HUMAN_IDS: tuple[int, ...] = (24, 25)  # person, rider
CITYSCAPES_VEHICLE_IDS: tuple[int, ...] = (26, 27, 28, 31, 32, 33)  # car .. bicycle

MASK_CLASS_PRESETS: dict[str, tuple[int, ...]] = {
    "coco_voc": COCO_VOC_IDS,
    "coco_nonvoc": COCO_NONVOC_IDS,
    "coco_all": COCO_CATEGORY_IDS,
    "cityscapes_vehicles": CITYSCAPES_VEHICLE_IDS,
    "cityscapes_humans": CITYSCAPES_HUMAN_IDS,
}


def resolve_classes(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """A preset name (:data:`MASK_CLASS_PRESETS`), a list of class ids, or None (= all classes)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in MASK_CLASS_PRESETS:
            raise ValueError(
                f"unknown class preset {spec!r}: expected one of {sorted(MASK_CLASS_PRESETS)}"
            )
        return MASK_CLASS_PRESETS[spec]
    return tuple(int(c) for c in spec)


def allowed_mask(
    labels: torch.Tensor, allowed: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """``(N,)`` bool: which instances may train the mask head (all when ``allowed`` is None).

    ``allowed`` as a tensor on the labels' device saves a host-to-device copy per call."""
    if allowed is None:
        return torch.ones_like(labels, dtype=torch.bool)
    if not isinstance(allowed, torch.Tensor):
        allowed = torch.as_tensor(list(allowed), device=labels.device)
    return torch.isin(labels, allowed.to(device=labels.device, dtype=labels.dtype))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice per box: ``(N, M, M)`` logits and targets in [0, 1] -> ``(N,)``."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    allowed: Sequence[int] | torch.Tensor | None = None,
    dice_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Sigmoid BCE (mean over the pixels of a box, then over allowed boxes) plus optional dice.

    Args:
        logits: ``(N, M, M)`` mask logits.
        targets: ``(N, M, M)`` targets in [0, 1] (crops of the ground-truth masks).
        labels: ``(N,)`` class ids of the boxes.
        allowed: class ids whose masks supervise; None = all.
        dice_weight: weight of the dice term.

    Returns:
        ``{"loss", "loss/bce", "loss/dice", "num_supervised"}``; the loss is a graph-connected zero
        when no box is allowed.
    """
    keep = allowed_mask(labels, allowed)  # (N,)
    count = keep.sum()
    # Selecting with torch.where, not by boolean indexing: indexing would read the number of
    # kept boxes to the host (a device sync each step); the other boxes get zero gradient.
    tg = targets.to(logits.dtype)
    per_box = F.binary_cross_entropy_with_logits(logits, tg, reduction="none").flatten(1).mean(1)
    zero = per_box.new_zeros(())
    bce = torch.where(keep, per_box, zero).sum() / count.clamp(min=1)
    dice = (
        torch.where(keep, dice_loss(logits, tg), zero).sum() / count.clamp(min=1)
        if dice_weight > 0
        else zero
    )
    return {
        "loss": bce + dice_weight * dice,
        "loss/bce": bce,
        "loss/dice": dice,
        "num_supervised": count,
    }


class MaskLoss(nn.Module):
    """:func:`mask_loss` with its class filter fixed at construction.

    Args:
        allowed_mask_classes: preset name, list of class ids, or None (all classes supervise).
        dice_weight: weight of the soft dice term.
    """

    def __init__(
        self, allowed_mask_classes: str | Sequence[int] | None = None, dice_weight: float = 0.0
    ):
        super().__init__()
        self.allowed = resolve_classes(allowed_mask_classes)
        self.dice_weight = float(dice_weight)
        # On the module's device with it: no host-to-device copy of the class ids per step.
        allowed = torch.tensor(self.allowed if self.allowed is not None else [], dtype=torch.long)
        self.register_buffer("_allowed", allowed, persistent=False)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        allowed = self._allowed if self.allowed is not None else None
        return mask_loss(logits, targets, labels, allowed, self.dice_weight)
