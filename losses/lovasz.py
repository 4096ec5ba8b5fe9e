"""Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of the per-class IoU.

For class ``c`` with probabilities ``p_c`` and ground truth ``fg_c`` over the labelled pixels, the
pixel errors ``m_i = |fg_i - p_ci|`` are fed to the Lovasz extension of the Jaccard loss
``Delta_J(M) = |M| / |fg_c ∪ M|``: sort the errors in decreasing order and weight each by the
increment of ``Delta_J`` when its pixel joins the mismatch set. The loss averages the classes
present in the target (SCHP's and Berman's ``classes="present"``) or all classes.

Memory: the classes are processed in chunks of at most ``CHUNK_ELEMENTS // N`` classes (one at
a time at SCHP's scale), so the sort and its weights cost a few ``(N,)`` vectors per class
(``N`` pixels of the batch) instead of several ``(N, C)`` matrices (about 2 GB per output at SCHP's
16 x 473 x 473 x 20). The loss is piecewise linear in the probabilities with weights fixed
by the sort, so its gradient is written into one probabilities-sized tensor during the forward
pass (:class:`_LovaszSoftmaxFunction`) instead of autograd keeping every class's sort.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LovaszSoftmaxLoss", "lovasz_grad", "lovasz_softmax"]


def lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Increments of the Jaccard loss along a sorted mismatch order.

    Args:
        fg_sorted: ``(P,)`` float 0/1 ground truth ordered by decreasing error, or ``(P, K)``
            for ``K`` independent problems (one per column).

    Returns:
        Weights of the same shape, ``Delta_J(M_i) - Delta_J(M_{i-1})`` with ``M_i`` the first
        ``i`` pixels of the order.
    """
    gts = fg_sorted.sum(0, keepdim=True)  # (1,) or (1, K)
    intersection = gts - fg_sorted.cumsum(0)  # (P,) or (P, K)
    union = gts + (1.0 - fg_sorted).cumsum(0)  # >= 1 after the first pixel
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
            _lovasz_flat(probs[i : i + 1], target[i : i + 1], ignore_index, classes)
            for i in range(probs.shape[0])
        ]
        return torch.stack(losses).mean()
    return _lovasz_flat(probs, target, ignore_index, classes)


# Classes share one sort while the (pixels x classes) block stays under this many elements: a
# few 16 MB temporaries at most, one class at a time at SCHP's 16 x 473 x 473, all classes at
# once for small CPU batches (where per-class kernel launches would dominate).
CHUNK_ELEMENTS = 1 << 22


def _lovasz_flat(
    probs: Tensor,
    target: Tensor,
    ignore_index: int,
    classes: str,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Lovasz-softmax of ``(B, C, H, W)`` probabilities and ``(B, H, W)`` labels, by class chunks.

    No host sync: every pixel takes part in the sort, the ignored ones with the key -1 so that
    they come after every labelled pixel (errors are >= 0) and change no weight before them; every
    class is computed, and ``classes="present"`` weights the classes absent from the target by 0.
    """
    batch, num_classes = probs.shape[:2]
    probs = probs.contiguous()
    hw = probs[0, 0].numel()
    labels = target.reshape(-1)  # (B, H, W) -> (N,), N = B * HW
    valid = labels != ignore_index  # (N,)
    # Flat positions of every pixel in class 0's plane of probs: b * C * HW + hw, so class c's
    # probabilities are probs.view(-1)[base + c * HW] (no (N, C) copy is made).
    pixel = torch.arange(labels.numel(), device=labels.device)
    base = (pixel // hw) * (num_classes * hw) + pixel % hw  # (N,)
    if classes == "all":
        class_weights = probs.new_ones(num_classes)
    else:
        # Labels outside 0..C-1 (other than ignore_index) belong to no class.
        inside = valid & (labels >= 0) & (labels < num_classes)
        bins = torch.where(inside, labels, torch.full_like(labels, num_classes))
        counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins))  # (C + 1,); bincount would sync
        class_weights = (counts[:num_classes] > 0).to(probs.dtype)  # (C,)
    chunk = max(1, chunk_elements // labels.numel())
    want_grad = torch.is_grad_enabled() and probs.requires_grad
    return _LovaszSoftmaxFunction.apply(probs, labels, valid, base, class_weights, chunk, want_grad)


class _LovaszSoftmaxFunction(torch.autograd.Function):
    """Weighted mean over the classes of the per-class Lovasz extensions, with its exact gradient.

    ``loss_c = sum_k e_(k) g_k`` with ``e_(k)`` the errors in decreasing order and ``g`` the
    :func:`lovasz_grad` of that order, so ``d loss_c / d p_ci = sign(p_ci - fg_ci) g_rank(i)``
    (``sign(0) = 0``, as autograd's ``abs``); the loss is ``sum_c w_c loss_c / max(sum_c w_c, 1)``
    (``w_c`` 0 or 1). It is computed ``chunk`` classes at a time in the forward pass and stored
    densely; the backward pass only scales it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        probs: Tensor,
        labels: Tensor,
        valid: Tensor,
        base: Tensor,
        class_weights: Tensor,
        chunk: int,
        want_grad: bool,
    ) -> Tensor:
        flat = probs.view(-1)  # (B * C * H * W,)
        plane = probs[0, 0].numel()
        num_classes = class_weights.numel()
        grad = torch.zeros_like(flat) if want_grad else None
        total = flat.new_zeros(())
        for start in range(0, num_classes, chunk):
            cls = torch.arange(start, min(start + chunk, num_classes), device=labels.device)
            index = base[:, None] + cls[None, :] * plane  # (N, K) positions in flat
            p = flat[index]  # (N, K)
            fg = ((labels[:, None] == cls[None, :]) & valid[:, None]).to(p.dtype)  # (N, K)
            diff = p - fg  # (N, K)
            # Ignored pixels sort last (key -1) and then weigh 0 (error clamped to 0).
            key = torch.where(valid[:, None], diff.abs(), torch.full_like(diff, -1.0))
            errors, order = torch.sort(key, dim=0, descending=True)  # per class column
            weights = lovasz_grad(fg.gather(0, order)) * class_weights[cls]  # (N, K)
            total = total + (errors.clamp(min=0.0) * weights).sum()
            if grad is not None:
                # d loss_c / d p at the sorted pixels; positions are unique, so no accumulation.
                # (sorted keys >= 0: the labelled pixels; the ignored get no gradient)
                sign = torch.sign(diff.gather(0, order)) * (errors >= 0)
                grad.index_put_((index.gather(0, order),), sign * weights)
        scale = 1.0 / class_weights.sum().clamp(min=1.0)  # () tensor: no host sync
        if grad is not None:
            ctx.save_for_backward(grad.view_as(probs), scale)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad, scale = ctx.saved_tensors
        return grad * (grad_output * scale), None, None, None, None, None, None


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
