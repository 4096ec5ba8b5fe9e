"""Regionally balanced sampling (RBSM) of RIM (Li & Han 2023, section 3.1).

Instead of re-sampling whole images, every class region of every training image is kept in the
loss with a class-dependent probability ``s_i = eta / x_i`` (eq. 3), where ``x`` is a per-class
distribution: the number of samples per class (NRBS) or, in the paper's ARBS, the class pixel
accuracy (CPA, eq. 4) of the model after a few epochs. Classes that are rare (NRBS) or poorly
predicted (ARBS) are kept more often. The sampler outputs a pixel mask (eq. 5); the loss turns
pixels outside it into ``ignore_index`` (``losses.ParsingLoss``).

Pure torch: the Lightning side decides when to call ``set_statistics`` (e.g. with the CPA of the
validation confusion matrix after ``cpa_epoch`` epochs for ARBS).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RegionalBalancedSampler",
    "class_pixel_accuracy",
    "class_region_counts",
    "keep_probabilities",
]

SOURCES = ("arbs", "nrbs")


def keep_probabilities(x: Tensor, min_prob: float = 0.0) -> Tensor:
    """Per-class keep probabilities ``s_i = eta / x_i`` of eq. 3.

    ``eta`` is the smallest defined ``x_j``, so the class with the smallest statistic is always kept
    (probability 1) and every other class is kept in inverse proportion to its statistic; the
    expected kept amount ``x_i * s_i`` is then the same for every class. ``x`` is scale-free
    (counts, frequencies and accuracies all work).

    A class whose statistic is undefined (``x_i <= 0`` or NaN, e.g. a class the model never
    predicted, so its CPA is 0/0) gets probability 1: there is no evidence to under-sample it. If no
    class has ``x_i > 0`` all probabilities are 1.

    Args:
        x: ``(C,)`` per-class statistic.
        min_prob: floor on the probabilities, in ``[0, 1]``, so that no class is (almost) never seen.

    Returns:
        ``(C,)`` probabilities in ``[min_prob, 1]``, in ``x``'s floating dtype (float64 for integer
        input). Computed on ``x``'s device without host synchronisation.
    """
    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
    if x.dim() != 1:
        raise ValueError(f"x must have shape (C,), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    defined = x > 0  # False for NaN as well
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    eta = torch.where(defined, x, inf).amin()  # inf when no class is defined; then all are 1 below
    probs = torch.where(defined, eta / x, torch.ones_like(x))
    return probs.clamp(min=min_prob, max=1.0)


def class_pixel_accuracy(confusion: Tensor) -> Tensor:
    """Class pixel accuracy (CPA, eq. 4): the precision of each predicted class.

    ``CPA(i) = confusion[i, i] / sum_g confusion[g, i]``: of the pixels predicted as ``i``, the share
    whose ground truth is ``i``.

    Args:
        confusion: ``(C, C)`` confusion matrix, rows = ground truth, columns = prediction.

    Returns:
        ``(C,)`` float64 CPA; NaN for classes that no pixel was predicted as.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must have shape (C, C), got {tuple(confusion.shape)}")
    confusion = confusion.double()
    predicted = confusion.sum(dim=0)  # (C,) pixels predicted as each class
    correct = confusion.diagonal()
    nan = torch.full_like(predicted, float("nan"))
    return torch.where(predicted > 0, correct / predicted, nan)


def class_region_counts(target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Number of images each class appears in, the sampling unit of RBSM (an NRBS statistic).

    Accumulate over the training set and pass to ``RegionalBalancedSampler.set_statistics``.

    Args:
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
        num_classes: number of classes ``C``.
        ignore_index: label value of unlabelled pixels.

    Returns:
        ``(C,)`` int64 counts.
    """
    return _presence(target, num_classes, ignore_index).sum(dim=0)


def _presence(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """``(B, C)`` bool: which classes occur (as labelled pixels) in each image."""
    flat = target.flatten(1)  # (B, H, W) -> (B, H*W)
    # Ignored pixels go to an extra column C that is dropped afterwards.
    flat = torch.where(flat == ignore_index, torch.full_like(flat, num_classes), flat)
    present = torch.zeros(flat.shape[0], num_classes + 1, dtype=torch.bool, device=flat.device)
    present.scatter_(1, flat, True)
    return present[:, :num_classes]


class RegionalBalancedSampler(nn.Module):
    """Regionally balanced sampler: draws which class regions of each image enter the main loss.

    For every image ``b`` and class ``c``, ``c`` is kept independently with probability
    ``probs[c]``; the mask is True on labelled pixels whose class was kept (eq. 5). Classes absent
    from an image are drawn too but do not matter.

    State lives in buffers, so it is saved in and restored from checkpoints:

    - ``stats`` ``(C,)`` float64: the distribution ``x`` last passed to ``set_statistics``
      (NaN before),
    - ``probs`` ``(C,)`` float32: ``keep_probabilities(stats, min_prob)`` (ones before),
    - ``ready`` bool scalar: whether statistics were set.

    Args:
        num_classes: number of classes ``C``.
        source: where the statistics come from, ``"arbs"`` (class pixel accuracy, see
            ``class_pixel_accuracy``) or ``"nrbs"`` (sample counts, e.g. ``class_region_counts``).
            Informational for the caller that computes them; the sampler itself is the same.
        min_prob: floor on the keep probabilities.
        ignore_index: label value of unlabelled pixels; they are never in the mask.
        cpa_epoch: for ARBS, the epoch after which the CPA is measured (3 in the paper). Read by
            the caller that calls ``set_statistics``.
    """

    probs: Tensor
    stats: Tensor
    ready: Tensor

    def __init__(
        self,
        num_classes: int,
        source: str = "arbs",
        min_prob: float = 0.0,
        ignore_index: int = 255,
        cpa_epoch: int = 3,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        self.num_classes = num_classes
        self.source = source
        self.min_prob = min_prob
        self.ignore_index = ignore_index
        self.cpa_epoch = cpa_epoch
        self.register_buffer("probs", torch.ones(num_classes, dtype=torch.float32))
        self.register_buffer("stats", torch.full((num_classes,), float("nan"), dtype=torch.float64))
        self.register_buffer("ready", torch.tensor(False))
        # Python mirror of `ready`: lets forward check readiness without a device->host sync.
        self._ready = False
        self.register_load_state_dict_post_hook(_sync_ready_flag)

    @property
    def is_ready(self) -> bool:
        """Whether statistics have been set (directly or through a loaded state dict)."""
        return self._ready

    @torch.no_grad()
    def set_statistics(self, x: Tensor) -> None:
        """Store the per-class distribution ``x`` ``(C,)`` and derive the keep probabilities."""
        if x.shape != (self.num_classes,):
            raise ValueError(
                f"expected statistics of shape ({self.num_classes},), got {tuple(x.shape)}"
            )
        x = x.to(device=self.stats.device, dtype=torch.float64)
        self.stats.copy_(x)
        self.probs.copy_(keep_probabilities(x, self.min_prob))
        self.ready.fill_(True)
        self._ready = True

    @torch.no_grad()
    def forward(self, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a sampling mask.

        Args:
            target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
            generator: optional random generator, for reproducible draws. It may live on another
                device than ``target`` (the ``(B, C)`` draw is then copied over).

        Returns:
            ``(B, H, W)`` bool mask, True on labelled pixels whose class was kept for that image.
        """
        if not self._ready:
            raise RuntimeError(
                "RegionalBalancedSampler used before its statistics were set: call "
                f"set_statistics(x) with a ({self.num_classes},) {self.source.upper()} "
                "distribution first (or load a checkpoint that has them)."
            )
        batch = target.shape[0]
        draw_device = generator.device if generator is not None else target.device
        uniform = torch.rand(batch, self.num_classes, generator=generator, device=draw_device)
        kept = uniform.to(target.device) < self.probs  # (B, C) bool
        valid = target != self.ignore_index
        # Ignored pixels look up class 0 to stay in range; `& valid` removes them again.
        index = torch.where(valid, target, torch.zeros_like(target)).flatten(1)  # (B, H*W)
        mask = kept.gather(1, index).view_as(target)  # (B, H*W) -> (B, H, W)
        return mask & valid

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, source={self.source!r}, min_prob={self.min_prob}, "
            f"ignore_index={self.ignore_index}, cpa_epoch={self.cpa_epoch}"
        )


def _sync_ready_flag(module: nn.Module, incompatible_keys: Any) -> None:
    """Post-load hook: mirror the loaded ``ready`` buffer into the Python flag (one sync, at load)."""
    assert isinstance(module, RegionalBalancedSampler)
    module._ready = bool(module.ready.item())
