"""Edges of parsing maps: targets from labels, the class-balanced edge loss, parsing-edge consistency.

CE2P / SCHP supervise an edge branch with the boundaries of the label map. :func:`edge_targets`
reproduces SCHP's ``generate_edge_tensor``: a pixel is a boundary seed when its label differs
from the pixel above it, to its right, to its lower right or to its lower left (pairs touching an
ignored pixel do not count), and the seeds are dilated with a ``width x width`` box. :func:`soft_parsing_edges` is the same construction on class
probabilities (``1 - <p(x), p(y)>`` is the chance two pixels differ), so the edges implied by a
parsing prediction can be compared with the edge branch without an argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BalancedEdgeLoss",
    "ParsingEdgeConsistencyLoss",
    "balanced_edge_loss",
    "edge_logit",
    "edge_targets",
    "parsing_edge_consistency",
    "soft_parsing_edges",
]


def _pairs(height: int, width: int) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """(seed, partner) slices of SCHP's four neighbour relations, both ``(H', W')``."""
    h, w = height, width
    return [
        (
            (slice(1, h), slice(0, w)),
            (slice(0, h - 1), slice(0, w)),
        ),  # lower pixel of a column pair
        ((slice(0, h), slice(0, w - 1)), (slice(0, h), slice(1, w))),  # left pixel of a row pair
        (
            (slice(0, h - 1), slice(0, w - 1)),
            (slice(1, h), slice(1, w)),
        ),  # upper-left of a diagonal
        ((slice(0, h - 1), slice(1, w)), (slice(1, h), slice(0, w - 1))),  # upper-right, anti-diag.
    ]


def _dilate(seeds: Tensor, width: int) -> Tensor:
    """Box dilation (max over a ``width x width`` window) of ``(B, H, W)`` float maps."""
    if width <= 1:
        return seeds
    if width % 2 == 0:
        raise ValueError(f"edge width must be odd, got {width}")
    # (B, H, W) -> (B, 1, H, W) -> max-pooled, same size -> (B, H, W)
    return F.max_pool2d(seeds[:, None], width, stride=1, padding=width // 2)[:, 0]


def edge_targets(target: Tensor, width: int = 3, ignore_index: int = 255) -> Tensor:
    """Binary boundary map of a label map (SCHP's ``generate_edge_tensor``).

    Args:
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        width: odd side of the dilation box (SCHP: 3); 1 keeps the one-pixel seeds.
        ignore_index: label value of unlabelled pixels.

    Returns:
        ``(B, H, W)`` int64: 1 on boundaries, 0 elsewhere, ``ignore_index`` where the label is.
    """
    valid = target != ignore_index
    seeds = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
    for (sy, sx), (py, px) in _pairs(*target.shape[-2:]):
        a, b = target[:, sy, sx], target[:, py, px]
        differ = (a != b) & valid[:, sy, sx] & valid[:, py, px]
        seeds[:, sy, sx] = torch.maximum(seeds[:, sy, sx], differ.float())
    edges = (_dilate(seeds, width) > 0).long()
    return edges.masked_fill(~valid, ignore_index)


def soft_parsing_edges(probs: Tensor, valid: Tensor | None = None, width: int = 3) -> Tensor:
    """Edge probability implied by a parsing prediction, built like :func:`edge_targets`.

    For each neighbour pair the chance that the two pixels differ is ``1 - sum_c p_c(x) p_c(y)``;
    the seeds take the maximum over the pixel's relations and are dilated with a max filter. On
    one-hot probabilities this equals :func:`edge_targets` exactly.

    Args:
        probs: ``(B, C, H, W)`` class probabilities.
        valid: ``(B, H, W)`` bool labelled pixels; pairs touching another pixel do not count.
        width: odd dilation size.

    Returns:
        ``(B, H, W)`` float32 in [0, 1].
    """
    probs = probs.float()
    height, width_px = probs.shape[-2:]
    seeds = probs.new_zeros((probs.shape[0], height, width_px))
    for (sy, sx), (py, px) in _pairs(height, width_px):
        # (B, C, H', W') x (B, C, H', W') -> (B, H', W'): chance the pair has different classes
        differ = 1.0 - (probs[:, :, sy, sx] * probs[:, :, py, px]).sum(1)
        if valid is not None:
            differ = differ * (valid[:, sy, sx] & valid[:, py, px])
        # (B, H', W') -> (B, H, W): zeros where the relation has no partner; out of place so
        # autograd keeps every partial map
        pad = (sx.start, width_px - sx.stop, sy.start, height - sy.stop)
        seeds = torch.maximum(seeds, F.pad(differ, pad))
    return _dilate(seeds, width).clamp(0.0, 1.0)


def edge_logit(edge: Tensor) -> Tensor:
    """``(B, 2, H, W)`` two-class (softmax) or ``(B, 1, H, W)`` sigmoid edge scores -> ``(B, H, W)``
    logit of "edge" (for two classes ``l_1 - l_0``: softmax over two equals a sigmoid of it)."""
    if edge.shape[1] == 2:
        return edge[:, 1].float() - edge[:, 0].float()
    if edge.shape[1] == 1:
        return edge[:, 0].float()
    raise ValueError(f"edge scores must have 1 or 2 channels, got {edge.shape[1]}")


def balanced_edge_loss(
    edge: Tensor,
    target_edges: Tensor,
    soft_target: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Class-balanced binary cross-entropy of the edge branch (CE2P / SCHP).

    Edge pixels are weighted by the fraction of non-edge pixels in the batch and non-edge pixels
    by the fraction of edge pixels; the weighted sum is divided by the sum of weights (what
    ``F.cross_entropy(weight=[w_neg, w_pos])`` computes for SCHP's two-class edge output).

    Args:
        edge: ``(B, 2, H, W)`` or ``(B, 1, H, W)`` edge scores (see :func:`edge_logit`).
        target_edges: ``(B, H, W)`` int64 0/1 (:func:`edge_targets`), ``ignore_index`` excluded;
            also sets the class weights when ``soft_target`` is given.
        soft_target: optional ``(B, H, W)`` edge probabilities replacing the 0/1 targets (SCHP's
            self-corrected edges).
        ignore_index: value of excluded pixels.

    Returns:
        Scalar float32; 0 (attached to the graph) when the batch has no edge pixel or no
        labelled pixel (both classes need a weight).
    """
    z = edge_logit(edge)  # (B, H, W)
    valid = target_edges != ignore_index
    pos = (target_edges == 1) & valid
    n_pos = pos.sum().float()
    n_all = valid.sum().float().clamp(min=1)
    w_pos = (n_all - n_pos) / n_all
    w_neg = n_pos / n_all
    weights = torch.where(pos, w_pos, torch.where(valid, w_neg, torch.zeros_like(w_neg)))
    goal = soft_target.float() if soft_target is not None else pos.float()
    bce = F.binary_cross_entropy_with_logits(z, goal, reduction="none")  # (B, H, W)
    total = torch.where(valid, bce * weights, bce.new_zeros(())).sum()
    return total / weights.sum().clamp(min=1e-12)


def parsing_edge_consistency(
    parsing: Tensor,
    edge: Tensor,
    target: Tensor,
    width: int = 3,
    ignore_index: int = 255,
) -> Tensor:
    """Agreement of the edge branch with the edges implied by the parsing prediction.

    Smooth-L1 between the edge probability ``sigmoid(edge_logit)`` and
    :func:`soft_parsing_edges` of ``softmax(parsing)``, averaged over labelled pixels. SCHP's
    released ``ConsistencyLoss`` compares argmax maps, which has no gradient (and, restricted to
    pixels where both maps are 1, is identically 0); this is the differentiable form of the same
    constraint (the paper's Eq. for the consistency term), pulling both branches together.

    Args:
        parsing: ``(B, C, H, W)`` parsing logits.
        edge: ``(B, 2 or 1, H, W)`` edge scores.
        target: ``(B, H, W)`` int64 labels (only which pixels are labelled is used).
        width: dilation of the implied edges, the same as the edge targets'.
        ignore_index: label value of unlabelled pixels.

    Returns:
        Scalar float32; 0 (attached) when no pixel is labelled.
    """
    valid = target != ignore_index
    implied = soft_parsing_edges(parsing.float().softmax(1), valid, width)  # (B, H, W)
    predicted = torch.sigmoid(edge_logit(edge))  # (B, H, W)
    per_pixel = F.smooth_l1_loss(predicted, implied, reduction="none")
    total = torch.where(valid, per_pixel, per_pixel.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1)


class BalancedEdgeLoss(nn.Module):
    """Edge targets from the labels + :func:`balanced_edge_loss`.

    Args:
        width: dilation of the edge targets (SCHP: 3).
        ignore_index: label value of unlabelled pixels.
    """

    name = "edge"

    def __init__(self, width: int = 3, ignore_index: int = 255) -> None:
        super().__init__()
        self.width = width
        self.ignore_index = ignore_index

    def forward(self, edge: Tensor, target: Tensor, soft_target: Tensor | None = None) -> Tensor:
        """Loss of ``(B, 2, H, W)`` edge scores for a ``(B, H, W)`` label map; a float32 scalar."""
        edges = edge_targets(target, self.width, self.ignore_index)
        return balanced_edge_loss(edge, edges, soft_target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"width={self.width}, ignore_index={self.ignore_index}"


class ParsingEdgeConsistencyLoss(nn.Module):
    """Module form of :func:`parsing_edge_consistency`."""

    name = "consistency"

    def __init__(self, width: int = 3, ignore_index: int = 255) -> None:
        super().__init__()
        self.width = width
        self.ignore_index = ignore_index

    def forward(self, parsing: Tensor, edge: Tensor, target: Tensor) -> Tensor:
        """Consistency of ``(B, C, H, W)`` parsing logits and ``(B, 2, H, W)`` edge scores."""
        return parsing_edge_consistency(parsing, edge, target, self.width, self.ignore_index)
