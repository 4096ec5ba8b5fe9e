"""Learning-rate schedules stepped once per optimisation step.

A schedule with ``lr_interval: epoch`` is still stepped every optimisation step, but its factor
is read at the first step of the current epoch (:func:`epoch_start_step`): the learning rate then
changes only between epochs, as with a scheduler stepped once per epoch (SCHP's), and resuming
mid-epoch needs no separate epoch counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LR_INTERVALS = ("step", "epoch")


def check_lr_interval(lr_interval: str) -> str:
    """Returns ``lr_interval`` if it is one of :data:`LR_INTERVALS`, else raises ``ValueError``."""
    if lr_interval not in LR_INTERVALS:
        raise ValueError(f"lr_interval={lr_interval!r}: expected one of {LR_INTERVALS}")
    return lr_interval


def epoch_start_step(step: int, steps_per_epoch: int) -> int:
    """The first optimisation step of the epoch that contains ``step`` (0-based)."""
    spe = max(1, int(steps_per_epoch))
    return (int(step) // spe) * spe


def cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then half a cosine from 1 down to ``min_ratio`` at
    ``total_steps``; constant at ``min_ratio`` afterwards.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_schedule(
    optimizer: Optimizer,
    steps_per_epoch: int,
    total_epochs: int,
    start_epoch: int = 0,
    warmup_epochs: float = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Per-step cosine annealing over ``total_epochs``, entered at ``start_epoch``.

    A run that trains epochs ``[start_epoch, ...)`` of a longer schedule (RIM's stage 2 trains epochs
    70..99 of the 100-epoch curve) sees exactly the learning rates the uninterrupted run would see.

    Args:
        optimizer: the optimizer whose ``lr`` is the peak learning rate.
        steps_per_epoch: optimisation steps per epoch.
        total_epochs: length of the whole cosine curve in epochs.
        start_epoch: the epoch of the curve this run starts at.
        warmup_epochs: linear warm-up length in epochs (at the start of the curve).
        min_lr_ratio: final learning rate as a fraction of the peak.
    """
    total = int(steps_per_epoch * total_epochs)
    offset = int(steps_per_epoch * start_epoch)
    warmup = int(steps_per_epoch * warmup_epochs)

    def factor(step: int) -> float:
        return cosine_factor(step + offset, total, warmup, min_lr_ratio)

    return LambdaLR(optimizer, factor)


def poly_factor(step: int, total_steps: int, power: float = 0.9, min_ratio: float = 0.0) -> float:
    """mmsegmentation's PolyLR as a multiplier: ``(1 - min) * (1 - step / total)^power + min``."""
    t = min(1.0, step / max(1, total_steps))
    return (1.0 - min_ratio) * (1.0 - t) ** power + min_ratio


def poly_schedule(
    optimizer: Optimizer,
    steps_per_epoch: int,
    total_epochs: int,
    start_epoch: int = 0,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Per-step polynomial decay over ``total_epochs``, entered at ``start_epoch`` (see
    :func:`cosine_schedule`); mmsegmentation's Cityscapes recipes use ``power=0.9`` and a floor of
    ``1e-4`` (``min_lr_ratio=0.01`` at ``lr=0.01``).
    """
    total = int(steps_per_epoch * total_epochs)
    offset = int(steps_per_epoch * start_epoch)

    def factor(step: int) -> float:
        return poly_factor(step + offset, total, power, min_lr_ratio)

    return LambdaLR(optimizer, factor)


def multistep_factor(
    step: int,
    steps_per_epoch: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_start: float = 0.001,
) -> float:
    """mmengine's ``LinearLR`` warm-up (per step, ``warmup_start`` -> 1 over ``warmup_steps``)
    times its ``MultiStepLR`` (per epoch, ``gamma`` at every milestone epoch reached)."""
    warm = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        warm = warmup_start + (1.0 - warmup_start) * step / warmup_steps
    epoch = int(step) // max(1, int(steps_per_epoch))
    return warm * float(gamma) ** sum(epoch >= int(m) for m in milestones)


def multistep_schedule(
    optimizer: Optimizer,
    steps_per_epoch: int,
    milestones: Sequence[int] = (170, 200),
    gamma: float = 0.1,
    warmup_steps: int = 500,
    warmup_start: float = 0.001,
    total_epochs: int | None = None,
) -> LambdaLR:
    """mmpose's DeepPose schedule (``td-reg_res50_8xb64-210e_mpii-256x256``: 500 warm-up steps
    from 0.001, x0.1 at epochs 170 and 200), stepped every step. ``total_epochs`` is accepted
    and unused (the cascade driver sets it on every scheduler)."""

    def factor(step: int) -> float:
        return multistep_factor(
            step, steps_per_epoch, milestones, gamma, warmup_steps, warmup_start
        )

    return LambdaLR(optimizer, factor)


def per_step_optimization(
    trainer: Any,
    optimizer_factory: Callable[..., Optimizer],
    scheduler_factory: Callable[..., Any] | None,
    params: list,
) -> dict[str, Any]:
    """``configure_optimizers``' answer for a schedule stepped every optimisation step.

    The scheduler factories of ``conf/`` take ``steps_per_epoch``, derived here from Lightning's
    estimate of the run's optimisation steps (so gradient accumulation and ``limit_train_batches``
    are accounted for).
    """
    optimizer = optimizer_factory(params=params)
    if scheduler_factory is None:
        return {"optimizer": optimizer}
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    steps = trainer.estimated_stepping_batches
    steps_per_epoch = max(1, math.ceil(steps / max_epochs)) if math.isfinite(steps) else 1
    scheduler = scheduler_factory(optimizer=optimizer, steps_per_epoch=steps_per_epoch)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
