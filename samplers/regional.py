"""Regionally balanced sampling (RBSM) of RIM (Li & Han 2023, section 3.1).

Instead of re-sampling whole images, every class region of every training image is kept in the
loss with a class-dependent probability ``s_i = eta / x_i`` (eq. 3), where ``x`` is a per-class
distribution: the number of samples per class (NRBS) or, in the paper's ARBS, the class pixel
accuracy (CPA, eq. 4) of the model early in training. Classes that are rare (NRBS) or poorly
predicted (ARBS) are kept more often. The sampler outputs a pixel mask (eq. 5); the loss turns
pixels outside it into ``ignore_index`` (``losses.ParsingLoss``).

Three choices the paper leaves open are switches (docs/rim.md has the evidence for the defaults):

- ``cpa``: eq. 4 divides by the pixels *predicted* as the class (precision), but the paper's
  numbers behave like the share of the class's ground-truth pixels predicted right (recall).
- ``eta``: eq. 3's constant; ``"min"`` (the smallest ``x_j``, so that class is always kept) or a
  number in the units of ``x``.
- ``nrbs_count``: what NRBS counts as a "sample" of a class: the images containing it (its
  regions, the sampling unit) or its pixels.

Pure torch: the Lightning side decides when to call ``set_statistics`` (at the start of RIM stage
2, with the confusion matrix of the training batches of stage-1 epoch ``schedule.cpa_epoch``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RegionalBalancedSampler",
    "class_pixel_accuracy",
    "class_region_counts",
    "expected_kept_share",
    "keep_probabilities",
    "sampling_statistics",
]

SOURCES = ("arbs", "nrbs")
#: ``cpa``: the two readings of eq. 4 (recall: as the paper's tables were computed; precision: as
#: eq. 4 is written).
CPA_READINGS = ("recall", "precision")
#: ``nrbs_count``: what NRBS counts per class.
NRBS_COUNTS = ("regions", "pixels")


def check_eta(eta: str | float) -> str | float:
    """``"min"`` or a positive finite float; raises ``ValueError`` naming ``sampler.eta`` otherwise."""
    if isinstance(eta, str):
        if eta == "min":
            return eta
        try:
            eta = float(eta)
        except ValueError:
            raise ValueError(f"sampler.eta={eta!r}: expected 'min' or a positive number") from None
    eta = float(eta)
    if not (eta > 0 and eta < float("inf")):
        raise ValueError(f"sampler.eta={eta}: expected 'min' or a positive number")
    return eta


def keep_probabilities(x: Tensor, min_prob: float = 0.0, eta: str | float = "min") -> Tensor:
    """Per-class keep probabilities ``s_i = min(1, eta / x_i)`` of eq. 3.

    With ``eta="min"``, ``eta`` is the smallest defined ``x_j``: that class is always kept
    (probability 1) and every other class in inverse proportion to its statistic, so the expected
    kept amount ``x_i * s_i`` is the same for every class; ``x`` is then scale-free (counts,
    frequencies and accuracies all work). A number ``eta`` is in the units of ``x`` (a CPA in
    ``[0, 1]`` for ARBS, a share of the total count for NRBS); classes with ``x_i <= eta`` are
    then always kept.

    A class whose statistic is undefined (``x_i <= 0`` or NaN, e.g. a class the model never
    predicted right) gets probability 1: there is no evidence to under-sample it. If no class has
    ``x_i > 0`` all probabilities are 1.

    Args:
        x: ``(C,)`` per-class statistic.
        min_prob: floor on the probabilities, in ``[0, 1]``, so that no class is (almost) never seen.
        eta: ``"min"`` or a positive number (see above).

    Returns:
        ``(C,)`` probabilities in ``[min_prob, 1]``, in ``x``'s floating dtype (float64 for integer
        input). Computed on ``x``'s device without host synchronisation.
    """
    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
    if x.dim() != 1:
        raise ValueError(f"x must have shape (C,), got {tuple(x.shape)}")
    eta = check_eta(eta)
    if not x.is_floating_point():
        x = x.double()
    defined = x > 0  # False for NaN as well
    if eta == "min":
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        # inf when no class is defined; then all are 1 below
        eta_t = torch.where(defined, x, inf).amin()
    else:
        eta_t = torch.tensor(float(eta), dtype=x.dtype, device=x.device)
    probs = torch.where(defined, eta_t / x, torch.ones_like(x))
    return probs.clamp(min=min_prob, max=1.0)


def class_pixel_accuracy(confusion: Tensor, reading: str = "recall") -> Tensor:
    """Class pixel accuracy (CPA, eq. 4) of every class, under one of its two readings.

    - ``"recall"``: ``confusion[i, i] / sum_j confusion[i, j]``, the share of the class's
      ground-truth pixels predicted as ``i``. What the paper's tables behave like (MPA +6-8
      points under rebalancing while PA moves by under 1) and what the widely copied
      ``SegmentationMetric.classPixelAccuracy`` computes despite its "precision" comment.
    - ``"precision"``: ``confusion[i, i] / sum_g confusion[g, i]``, of the pixels predicted as
      ``i`` the share whose ground truth is ``i``: eq. 4 as written.

    Args:
        confusion: ``(C, C)`` confusion matrix, rows = ground truth, columns = prediction.
        reading: ``"recall"`` or ``"precision"``.

    Returns:
        ``(C,)`` float64 CPA in ``[0, 1]``; NaN where the denominator is 0 (a class absent from
        the ground truth for recall, never predicted for precision).
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must have shape (C, C), got {tuple(confusion.shape)}")
    if reading not in CPA_READINGS:
        raise ValueError(f"sampler.cpa={reading!r}: expected one of {', '.join(CPA_READINGS)}")
    confusion = confusion.double()
    # recall: (C,) ground-truth pixels of each class; precision: (C,) pixels predicted as it
    denominator = confusion.sum(dim=1 if reading == "recall" else 0)
    correct = confusion.diagonal()
    nan = torch.full_like(denominator, float("nan"))
    return torch.where(denominator > 0, correct / denominator, nan)


def sampling_statistics(
    source: str,
    *,
    confusion: Tensor | None = None,
    cpa: str = "recall",
    region_counts: Tensor | None = None,
    pixel_counts: Tensor | None = None,
    nrbs_count: str = "regions",
) -> Tensor:
    """The per-class distribution ``x`` of eq. 3 for ARBS or NRBS.

    Args:
        source: ``"arbs"`` (from ``confusion``) or ``"nrbs"`` (from the training set's counts).
        confusion: ``(C, C)`` confusion matrix of the early stage-1 epoch (ARBS).
        cpa: its reading, see :func:`class_pixel_accuracy`.
        region_counts: ``(C,)`` number of training images containing each class (NRBS).
        pixel_counts: ``(C,)`` labelled training pixels of each class (NRBS).
        nrbs_count: which count NRBS uses, ``"regions"`` or ``"pixels"``.

    Returns:
        ``(C,)`` float64: the CPA in ``[0, 1]`` (ARBS) or the count's share of its total (NRBS).
    """
    if source == "arbs":
        if confusion is None:
            raise ValueError("ARBS needs the early confusion matrix")
        return class_pixel_accuracy(confusion, cpa)
    if source != "nrbs":
        raise ValueError(f"sampler.source={source!r}: expected one of {', '.join(SOURCES)}")
    if nrbs_count not in NRBS_COUNTS:
        raise ValueError(
            f"sampler.nrbs_count={nrbs_count!r}: expected one of {', '.join(NRBS_COUNTS)}"
        )
    counts = region_counts if nrbs_count == "regions" else pixel_counts
    if counts is None:
        raise ValueError(f"NRBS with nrbs_count={nrbs_count} needs the training set's counts")
    counts = torch.as_tensor(counts).double()
    return counts / counts.sum().clamp(min=1)


def expected_kept_share(probs: Tensor, pixel_counts: Tensor) -> tuple[float, Tensor, Tensor]:
    """What the sampler keeps of the training set's labelled pixels, in expectation.

    Every region of class ``i`` is kept with probability ``s_i``, so in expectation a share ``s_i``
    of that class's pixels is kept and ``sum_i s_i n_i / sum_i n_i`` of all labelled pixels.

    Args:
        probs: ``(C,)`` keep probabilities ``s``.
        pixel_counts: ``(C,)`` labelled training pixels per class ``n``.

    Returns:
        ``(overall share, (C,) per-class share s_i (NaN for classes with no pixels), (C,) class
        distribution of the kept pixels s_i n_i / sum_j s_j n_j)``, float64 on the CPU.
    """
    p = probs.detach().double().cpu()
    n = torch.as_tensor(pixel_counts).detach().double().cpu()
    kept = p * n  # (C,) expected kept pixels per class
    total = float(n.sum())
    overall = float(kept.sum()) / total if total > 0 else float("nan")
    per_class = torch.where(n > 0, p, torch.full_like(p, float("nan")))
    denom = kept.sum()
    distribution = kept / denom if denom > 0 else torch.full_like(p, float("nan"))
    return overall, per_class, distribution


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
    - ``probs`` ``(C,)`` float32: ``keep_probabilities(stats, min_prob, eta)`` (ones before),
    - ``pixel_counts`` ``(C,)`` float64: the training set's labelled pixels per class, for the
      expected kept share (NaN when not given),
    - ``ready`` bool scalar: whether statistics were set.

    Args:
        num_classes: number of classes ``C``.
        source: where the statistics come from, ``"arbs"`` (class pixel accuracy of the early
            stage-1 epoch) or ``"nrbs"`` (the training set's sample counts); see
            :func:`sampling_statistics`, which the caller uses with the settings below.
        cpa: ARBS's reading of the CPA, ``"recall"`` or ``"precision"``.
        eta: eq. 3's constant, ``"min"`` or a positive number (see :func:`keep_probabilities`).
        nrbs_count: NRBS's count, ``"regions"`` (images containing the class) or ``"pixels"``.
        min_prob: floor on the keep probabilities.
        ignore_index: label value of unlabelled pixels; they are never in the mask.
    """

    probs: Tensor
    stats: Tensor
    ready: Tensor
    pixel_counts: Tensor

    def __init__(
        self,
        num_classes: int,
        source: str = "arbs",
        cpa: str = "recall",
        eta: str | float = "min",
        nrbs_count: str = "regions",
        min_prob: float = 0.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"sampler.source={source!r}: expected one of {', '.join(SOURCES)}")
        if cpa not in CPA_READINGS:
            raise ValueError(f"sampler.cpa={cpa!r}: expected one of {', '.join(CPA_READINGS)}")
        if nrbs_count not in NRBS_COUNTS:
            raise ValueError(
                f"sampler.nrbs_count={nrbs_count!r}: expected one of {', '.join(NRBS_COUNTS)}"
            )
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"sampler.min_prob={min_prob}: must be in [0, 1]")
        self.num_classes = num_classes
        self.source = source
        self.cpa = cpa
        self.eta = check_eta(eta)
        self.nrbs_count = nrbs_count
        self.min_prob = min_prob
        self.ignore_index = ignore_index
        self.register_buffer("probs", torch.ones(num_classes, dtype=torch.float32))
        self.register_buffer("stats", torch.full((num_classes,), float("nan"), dtype=torch.float64))
        self.register_buffer(
            "pixel_counts", torch.full((num_classes,), float("nan"), dtype=torch.float64)
        )
        self.register_buffer("ready", torch.tensor(False))
        # Python mirror of `ready`: lets forward check readiness without a device->host sync.
        self._ready = False
        self.register_load_state_dict_post_hook(_sync_ready_flag)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Checkpoints of samplers without the pixel counts: load them as "unknown".
        key = prefix + "pixel_counts"
        if prefix + "probs" in state_dict and key not in state_dict:
            state_dict[key] = torch.full_like(self.pixel_counts, float("nan"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_ready(self) -> bool:
        """Whether statistics have been set (directly or through a loaded state dict)."""
        return self._ready

    @torch.no_grad()
    def set_statistics(self, x: Tensor, pixel_counts: Tensor | None = None) -> None:
        """Store the per-class distribution ``x`` ``(C,)`` and derive the keep probabilities.

        ``pixel_counts`` ``(C,)``, the training set's labelled pixels per class, is kept for
        :meth:`kept_share`.
        """
        if x.shape != (self.num_classes,):
            raise ValueError(
                f"expected statistics of shape ({self.num_classes},), got {tuple(x.shape)}"
            )
        x = x.to(device=self.stats.device, dtype=torch.float64)
        self.stats.copy_(x)
        self.probs.copy_(keep_probabilities(x, self.min_prob, self.eta))
        if pixel_counts is not None:
            self.pixel_counts.copy_(torch.as_tensor(pixel_counts).to(self.pixel_counts))
        self.ready.fill_(True)
        self._ready = True

    def kept_share(self) -> tuple[float, Tensor, Tensor] | None:
        """:func:`expected_kept_share` of the current probabilities; None without pixel counts."""
        counts = self.pixel_counts.detach().cpu()
        if not bool(torch.isfinite(counts).all()):
            return None
        return expected_kept_share(self.probs, counts)

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
            f"num_classes={self.num_classes}, source={self.source!r}, cpa={self.cpa!r}, "
            f"eta={self.eta!r}, nrbs_count={self.nrbs_count!r}, min_prob={self.min_prob}, "
            f"ignore_index={self.ignore_index}"
        )


def _sync_ready_flag(module: nn.Module, incompatible_keys: Any) -> None:
    """Post-load hook: mirror the loaded ``ready`` buffer into the Python flag (one sync, at load)."""
    assert isinstance(module, RegionalBalancedSampler)
    module._ready = bool(module.ready.item())
