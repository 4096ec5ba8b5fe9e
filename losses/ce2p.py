"""The CE2P / SCHP training loss: parsing (CE + Lovasz), balanced edges, consistency, soft targets.

SCHP's ``CriterionAll`` (lambda_1 = lambda_2 = 1, lambda_3 = 0.1): for every parsing output
(the fusion output ``out`` and the context branch ``parsing``) ``0.5 * Lovasz + 0.5 * CE`` (the CE
becomes a soft cross-entropy against the self-corrected labels once SCHP has them), the
class-balanced edge loss on ``edge``, and the parsing-edge consistency of each parsing output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.edge import balanced_edge_loss, edge_targets, parsing_edge_consistency
from losses.functional import cross_entropy
from losses.lovasz import lovasz_softmax

__all__ = ["SOFT_REDUCTIONS", "CE2PLoss", "soft_cross_entropy"]

SOFT_REDUCTIONS = ("per_pixel", "official")
"""How the soft (self-corrected) terms are averaged: ``per_pixel`` divides the sum over pixels
and classes by the number of labelled pixels; ``official`` also divides by the number of
classes, as SCHP's ``F.kl_div`` (PyTorch's default ``reduction='mean'``: pixels x classes)."""


def soft_cross_entropy(
    logits: Tensor, soft_target: Tensor, target: Tensor, ignore_index: int = 255
) -> Tensor:
    """Cross-entropy against a distribution: ``-sum_c q_c log softmax(logits)_c`` per pixel.

    Equals ``KL(q || p) + H(q)``: the same gradient as SCHP's KL term, with the target used as the
    probabilities it is (SCHP's code applies a second softmax to them).

    Args:
        logits: ``(B, C, H, W)`` scores.
        soft_target: ``(B, C, H, W)`` probabilities ``q`` (rows sum to 1 on labelled pixels).
        target: ``(B, H, W)`` hard labels; only ``!= ignore_index`` (which pixels count) is used.
        ignore_index: label value of unlabelled pixels.

    Returns:
        Scalar float32 mean over labelled pixels; 0 (attached) when there are none.
    """
    valid = target != ignore_index
    # (B, C, H, W) -> (B, H, W)
    per_pixel = -(soft_target.float() * F.log_softmax(logits.float(), dim=1)).sum(1)
    total = torch.where(valid, per_pixel, per_pixel.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1)


class CE2PLoss(nn.Module):
    """Named-term loss of a CE2P net (``{"out", "parsing", "edge"}`` outputs).

    ``loss = parsing_weight * sum_k (ce_weight * CE_k + lovasz_weight * Lovasz_k)
    + edge_weight * Edge + consistency_weight * sum_k Consistency_k (+ aux_weight * CE(aux))``
    over the parsing outputs ``k`` in ``parsing_keys`` present in the outputs. With
    ``soft_target`` (and ``soft_edge``) the CE terms become soft cross-entropies against them
    (logged as ``loss/soft_ce``), the Lovasz term keeps the hard labels (as in SCHP).

    Args:
        ce_weight: weight of the (soft) cross-entropy per parsing output (SCHP: 0.5).
        lovasz_weight: weight of Lovasz-softmax per parsing output (SCHP: 0.5).
        parsing_weight: SCHP's lambda_1.
        edge_weight: SCHP's lambda_2.
        consistency_weight: SCHP's lambda_3.
        aux_weight: cross-entropy weight on an ``aux`` output, if the net has one.
        edge_width: dilation of the edge targets.
        parsing_keys: output names that are parsing logits.
        ignore_index: label value of unlabelled pixels.
        soft_reduction: ``per_pixel`` or ``official`` (:data:`SOFT_REDUCTIONS`). SCHP's KL terms
            are means over pixels x classes, so for the same target their gradients are C times
            (parsing, C classes) and 2 times (edges, two classes) smaller than a per-pixel mean;
            ``official`` divides the soft parsing term by C and the soft edge term by 2 to match.
            The hard-label terms (before the first average) are unaffected.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        lovasz_weight: float = 0.5,
        parsing_weight: float = 1.0,
        edge_weight: float = 1.0,
        consistency_weight: float = 0.1,
        aux_weight: float = 0.0,
        edge_width: int = 3,
        parsing_keys: Sequence[str] = ("out", "parsing"),
        ignore_index: int = 255,
        soft_reduction: str = "per_pixel",
    ) -> None:
        super().__init__()
        if soft_reduction not in SOFT_REDUCTIONS:
            raise ValueError(
                f"soft_reduction={soft_reduction!r}: expected one of {SOFT_REDUCTIONS}"
            )
        self.soft_reduction = soft_reduction
        self.ce_weight = ce_weight
        self.lovasz_weight = lovasz_weight
        self.parsing_weight = parsing_weight
        self.edge_weight = edge_weight
        self.consistency_weight = consistency_weight
        self.aux_weight = aux_weight
        self.edge_width = edge_width
        self.parsing_keys = tuple(parsing_keys)
        self.ignore_index = ignore_index

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        target: Tensor,
        sample_mask: Tensor | None = None,
        soft_target: Tensor | None = None,
        soft_edge: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Total loss and named terms.

        Args:
            outputs: ``{"out": (B, C, H, W), "parsing": (B, C, H, W), "edge": (B, 2, H, W)}``
                logits at the target's resolution (``parsing`` / ``edge`` optional).
            target: ``(B, H, W)`` int64 labels, ``ignore_index`` for unlabelled pixels.
            sample_mask: optional ``(B, H, W)`` bool of a regional sampler: parsing terms only
                see the pixels inside it.
            soft_target: optional ``(B, C, H, W)`` parsing probabilities (SCHP's refined labels).
            soft_edge: optional ``(B, H, W)`` edge probabilities (SCHP's refined edges).

        Returns:
            ``{"loss", "loss/main", "loss/ce" or "loss/soft_ce", "loss/lovasz", "loss/edge",
            "loss/consistency", "loss/aux"}`` (edge / consistency / aux when active); ``main`` is
            the parsing term of ``out`` alone.
        """
        parsing_target = target
        if sample_mask is not None:
            parsing_target = target.masked_fill(~sample_mask.to(torch.bool), self.ignore_index)
        ce_name = "loss/soft_ce" if soft_target is not None else "loss/ce"
        zero = outputs["out"].new_zeros((), dtype=torch.float32)
        ce_sum, lovasz_sum, cons_sum, main = zero, zero, zero, zero
        edge = outputs.get("edge")
        for key in self.parsing_keys:
            logits = outputs.get(key)
            if logits is None:
                continue
            if soft_target is not None:
                ce = soft_cross_entropy(logits, soft_target, parsing_target, self.ignore_index)
                if self.soft_reduction == "official":
                    # SCHP's kl_div(reduction='mean') also averages over the C classes
                    ce = ce / logits.shape[1]
            else:
                ce = cross_entropy(logits, parsing_target, self.ignore_index)
            lov = lovasz_softmax(logits, parsing_target, self.ignore_index)
            term = self.ce_weight * ce + self.lovasz_weight * lov
            if key == "out":
                main = term
            ce_sum, lovasz_sum = ce_sum + ce, lovasz_sum + lov
            if edge is not None and self.consistency_weight > 0:
                cons_sum = cons_sum + parsing_edge_consistency(
                    logits, edge, target, self.edge_width, self.ignore_index
                )
        total = self.parsing_weight * (self.ce_weight * ce_sum + self.lovasz_weight * lovasz_sum)
        terms = {"loss/main": main, ce_name: ce_sum, "loss/lovasz": lovasz_sum}
        if edge is not None and self.edge_weight > 0:
            edges = edge_targets(target, self.edge_width, self.ignore_index)
            edge_term = balanced_edge_loss(edge, edges, soft_edge, self.ignore_index)
            if soft_edge is not None and self.soft_reduction == "official":
                # SCHP's edge KL is a mean over pixels x 2 classes
                edge_term = edge_term / 2
            terms["loss/edge"] = edge_term
            total = total + self.edge_weight * edge_term
        if edge is not None and self.consistency_weight > 0:
            terms["loss/consistency"] = cons_sum
            total = total + self.consistency_weight * cons_sum
        aux = outputs.get("aux")
        if aux is not None and self.aux_weight > 0:
            terms["loss/aux"] = cross_entropy(aux, target, self.ignore_index)
            total = total + self.aux_weight * terms["loss/aux"]
        return {"loss": total, **terms}

    def scored_outputs(self) -> set[str]:
        """The training-only outputs this loss weights: ``"aux"`` when ``aux_weight > 0``."""
        return {"aux"} if self.aux_weight > 0 else set()

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, lovasz_weight={self.lovasz_weight}, "
            f"edge_weight={self.edge_weight}, consistency_weight={self.consistency_weight}, "
            f"parsing_keys={self.parsing_keys}, soft_reduction={self.soft_reduction}"
        )
