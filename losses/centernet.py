"""CenterNet's object-centre heatmap loss: what Deep-MAC's backbone learns from every class's boxes.

Deep-MAC sits on CenterNet (Zhou et al. 2019, "Objects as Points"): in the partially supervised
setting only the mask head is restricted to the seen classes, while the backbone also learns to
detect every class from its boxes. This is the centre part of that detection loss: per class one
heatmap at the feature stride with a Gaussian peak at each object's centre cell, scored with the
penalty-reduced pixel-wise focal loss (CenterNet Eq. 1, alpha = 2, beta = 4), normalised by the
number of objects. The Gaussian's standard deviation follows the TF Object Detection API's
CenterNet target assigner: ``(2 r + 1) / 6`` with ``r`` the corner displacement that keeps a box
at ``min_overlap`` IoU (0.7 in the Deep-MAC configs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from losses.mask import resolve_classes


def _smallest_positive_roots(a: float, b: Tensor, c: Tensor, rule: str) -> Tensor:
    """The root of ``a r^2 + b r + c`` each rule keeps, per box (float64 ``(N,)`` tensors)."""
    disc = (b * b - 4 * a * c).clamp(min=0).sqrt()
    if rule == "centernet":
        # The TF release keeps CenterNet's expression, which divides by 2 instead of 2a.
        return (-b + disc) / 2
    lo, hi = (-b - disc) / (2 * a), (-b + disc) / (2 * a)
    inf = torch.full_like(lo, math.inf)
    best = torch.minimum(torch.where(lo >= 0, lo, inf), torch.where(hi >= 0, hi, inf))
    return torch.where(torch.isinf(best), torch.zeros_like(best), best)


def overlap_radii(
    height: Tensor, width: Tensor, min_overlap: float = 0.7, rule: str = "centernet"
) -> Tensor:
    """Corner displacement ``r`` that keeps IoU >= ``min_overlap`` (CenterNet's three cases),
    for ``(N,)`` box heights and widths, on their device (float64).

    Cases: both corners shifted the same way (neither box inside the other), the displaced box
    shrunk inside the ground truth, and grown around it; ``r`` is the smallest of the three roots.

    Args:
        height, width: box sizes (feature cells).
        min_overlap: IoU to keep.
        rule: ``"centernet"`` (the release's expression, the default) or ``"exact"`` (the
            quadratics' smallest non-negative roots, as fixed in CornerNet).
    """
    if rule not in ("centernet", "exact"):
        raise ValueError(f"rule={rule!r}: expected 'centernet' or 'exact'")
    h, w, o = height.double(), width.double(), float(min_overlap)
    offset = _smallest_positive_roots(1.0, -(h + w), w * h * (1 - o) / (1 + o), rule)
    inside = _smallest_positive_roots(4.0, -2 * (h + w), (1 - o) * w * h, rule)
    around = _smallest_positive_roots(4 * o, 2 * o * (h + w), (o - 1) * w * h, rule)
    return torch.minimum(torch.minimum(offset, inside), around).clamp(min=0)


def overlap_radius(
    height: float, width: float, min_overlap: float = 0.7, rule: str = "centernet"
) -> float:
    """:func:`overlap_radii` of one box: ``r`` (float, >= 0)."""
    h, w = (torch.tensor([float(v)], dtype=torch.float64) for v in (height, width))
    return float(overlap_radii(h, w, min_overlap, rule)[0])


def centre_heatmap_batch(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    class_ids: Sequence[int] | Tensor,
    size: tuple[int, int],
    stride: float,
    min_overlap: float = 0.7,
    rule: str = "centernet",
    device: torch.device | str | None = None,
) -> Tensor:
    """A batch's Gaussian centre heatmaps, built on ``device`` without a host transfer.

    Args:
        boxes: per image ``(N_i, 4)`` xyxy in input pixels.
        labels: per image ``(N_i,)`` class ids; classes outside ``class_ids`` are left out.
        class_ids: the heatmap's channels, in order (a ``(K,)`` tensor already on ``device``
            avoids a host-to-device copy).
        size: ``(h, w)`` of the heatmap (input size / stride).
        stride: input pixels per heatmap cell.
        min_overlap, rule: see :func:`overlap_radius`.
        device: where to build them (default: the first image's boxes').

    Returns:
        ``(B, K, h, w)`` float targets in ``[0, 1]``: exactly 1 at each object's centre cell
        ``floor(centre / stride)``, ``exp(-d^2 / (2 sigma^2))`` around it (the maximum where
        objects of a class overlap).
    """
    h, w = size
    k = len(class_ids)
    device = torch.device(device) if device is not None else boxes[0].device
    out = torch.zeros(len(boxes) * k + 1, h * w, device=device)  # the last row takes the others
    counts = [len(b) for b in boxes]  # host metadata (shapes), no transfer
    if sum(counts):
        box = torch.cat([b.detach().to(device).float().reshape(-1, 4) for b in boxes])  # (N, 4)
        lab = torch.cat([x.to(device).reshape(-1).long() for x in labels])  # (N,)
        # Fills, not copies from host lists: a host-to-device copy would wait for the device.
        image = torch.cat(
            [torch.full((n,), i, device=device, dtype=torch.long) for i, n in enumerate(counts)]
        )
        ids = (
            class_ids.to(device)
            if isinstance(class_ids, Tensor)
            else torch.tensor([int(c) for c in class_ids], device=device)
        )
        match = lab[:, None] == ids[None, :]  # (N, K)
        channel = match.long().argmax(1)
        row = torch.where(match.any(1), image * k + channel, len(boxes) * k)  # (N,)
        x1, y1, x2, y2 = (box / stride).double().unbind(1)  # (N,) each, float32 / stride
        cx = torch.floor((x1 + x2) / 2).clamp(0, w - 1)
        cy = torch.floor((y1 + y2) / 2).clamp(0, h - 1)
        sigma = (2 * overlap_radii(y2 - y1, x2 - x1, min_overlap, rule) + 1) / 6
        ys = torch.arange(h, device=device, dtype=torch.float32)
        xs = torch.arange(w, device=device, dtype=torch.float32)
        d2 = (xs[None, None, :] - cx.float()[:, None, None]) ** 2 + (
            ys[None, :, None] - cy.float()[:, None, None]
        ) ** 2  # (N, h, w)
        g = torch.exp(-d2 / (2 * sigma * sigma).float()[:, None, None])
        out.scatter_reduce_(0, row[:, None].expand(-1, h * w), g.reshape(-1, h * w), "amax")
    return out[:-1].reshape(len(boxes), k, h, w)


def centre_heatmap_targets(
    boxes: Tensor,
    labels: Tensor,
    class_ids: Sequence[int],
    size: tuple[int, int],
    stride: float,
    min_overlap: float = 0.7,
    rule: str = "centernet",
) -> Tensor:
    """One image's ``(K, h, w)`` centre heatmap (:func:`centre_heatmap_batch` of one image)."""
    return centre_heatmap_batch([boxes], [labels], class_ids, size, stride, min_overlap, rule)[0]


def penalty_reduced_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """CenterNet Eq. 1 summed over the cells, divided by the number of peaks (at least 1).

    Args:
        logits: ``(B, K, h, w)``.
        targets: ``(B, K, h, w)`` in ``[0, 1]``, peaks exactly 1.

    Returns:
        scalar loss.
    """
    logits, targets = logits.float(), targets.float()
    pos = targets >= 1
    # log p and log(1 - p) from the logits directly: no log(0) for saturated cells.
    log_p = nn.functional.logsigmoid(logits)
    log_1mp = nn.functional.logsigmoid(-logits)
    p = logits.sigmoid()
    pos_term = (1 - p) ** alpha * log_p
    neg_term = (1 - targets) ** beta * p**alpha * log_1mp
    loss = -(torch.where(pos, pos_term, neg_term)).sum()
    return loss / pos.sum().clamp(min=1)


class CentreHeatmapLoss(nn.Module):
    """All-class centre-heatmap loss of a batch (the backbone's detection signal).

    Args:
        class_ids: heatmap channels: a preset of :data:`losses.mask.MASK_CLASS_PRESETS` (e.g.
            ``coco_all``) or a list of class ids; every instance of these classes counts,
            whatever classes train the mask head.
        weight: factor on the loss (the Deep-MAC configs weigh centres 1 and masks 5; rimlab's
            mask loss has weight 1, so 0.2 keeps that ratio).
        min_overlap, rule: Gaussian size, see :func:`overlap_radius`.
        alpha, beta: focal-loss exponents.
    """

    def __init__(
        self,
        class_ids: str | Sequence[int] = "coco_all",
        weight: float = 0.2,
        min_overlap: float = 0.7,
        rule: str = "centernet",
        alpha: float = 2.0,
        beta: float = 4.0,
    ) -> None:
        super().__init__()
        resolved = resolve_classes(class_ids)
        if not resolved:
            raise ValueError("class_ids: the centre heatmap needs at least one class")
        self.class_ids = tuple(resolved)
        # On the module's device with it, for centre_heatmap_batch.
        self.register_buffer("_ids", torch.tensor(self.class_ids), persistent=False)
        self.weight, self.min_overlap, self.rule = float(weight), float(min_overlap), rule
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(
        self,
        logits: torch.Tensor,
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
        stride: float,
    ) -> dict[str, torch.Tensor]:
        """Args:
            logits: ``(B, K, h, w)`` heatmap logits, ``K = len(class_ids)``.
            boxes, labels: per image ``(N_i, 4)`` xyxy input pixels and ``(N_i,)`` class ids.
            stride: input pixels per heatmap cell.

        Returns:
            ``{"loss": weight * focal, "loss/centre": focal}``.
        """
        size = tuple(logits.shape[-2:])
        targets = centre_heatmap_batch(
            boxes, labels, self._ids, size, stride, self.min_overlap, self.rule, logits.device
        )  # (B, K, h, w), built on the device: no host transfer in a training step
        focal = penalty_reduced_focal_loss(logits, targets, self.alpha, self.beta)
        return {"loss": self.weight * focal, "loss/centre": focal.detach()}
