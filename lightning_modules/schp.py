"""Self-Correction for Human Parsing (SCHP, Li et al., TPAMI 2020) on any rimlab parsing net.

After ``schp_start`` epochs of ordinary training the learning rate runs in cosine cycles of
``cycle_epochs`` (:func:`schp_schedule`). At the end of every cycle (the first "cycle" end is epoch
``schp_start`` itself):

1. model aggregation: the current weights are averaged into the running SCHP model,
   ``w_avg <- w_avg * n / (n + 1) + w / (n + 1)`` with ``n`` the models averaged so far
   (:func:`average_into`);
2. its BatchNorm statistics are re-estimated on the training set (:func:`reestimate_bn`), since an
   average of weights has no statistics of its own;
3. label refinement: from then on the SCHP model's predictions, mixed with the ground truth as
   ``(1 - 1/(n+1)) * p_schp + 1/(n+1) * one_hot(y)``, are the parsing (and edge) targets of a soft
   cross-entropy (:class:`SCHPLitModule`).

:class:`SCHPCycle` (a callback: the schedule lives outside the module) decides when; the module
holds the state, so the averaged weights (``schp_net.*``), the number of averaged models
(``schp_cycles``) and the epoch of the last update (``schp_epoch``) travel in every checkpoint's
``state_dict`` and survive a resume. The refined labels are recomputed online from the averaged
model each step (as in SCHP's code), so that model *is* the refined-label state.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.parsing import ParsingLitModule
from lightning_modules.schedulers import cosine_factor

log = logging.getLogger(__name__)

__all__ = [
    "SCHPCycle",
    "SCHPLitModule",
    "average_into",
    "reestimate_bn",
    "schp_lr_factor",
    "schp_schedule",
]


# ---------------------------------------------------------------------- learning rate


def schp_lr_factor(
    step: int,
    steps_per_epoch: int,
    schp_start: int,
    cycle_epochs: int,
    warmup_epochs: float = 10,
    min_lr_ratio: float = 0.01,
    cycle_lr_ratio: float = 0.5,
) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (SCHP's ``SGDRScheduler``).

    Linear warm-up over ``warmup_epochs``; half a cosine from 1 to ``min_lr_ratio`` until epoch
    ``schp_start``; then cosine cycles of ``cycle_epochs`` from ``cycle_lr_ratio`` down to
    ``min_lr_ratio`` (SCHP: base lr 7e-3, ``eta_min = lr / 100``, cycles restart at ``lr / 2``).
    Each cycle ends where :class:`SCHPCycle` averages the weights.
    """
    spe = max(1, int(steps_per_epoch))
    start = schp_start * spe
    if step < start:
        return cosine_factor(step, start, warmup_epochs * spe, min_lr_ratio)
    # A cycle is the same half cosine scaled to start at cycle_lr_ratio.
    cycle = cycle_epochs * spe
    return cycle_lr_ratio * cosine_factor(
        (step - start) % cycle, cycle, 0, min_lr_ratio / cycle_lr_ratio
    )


def schp_schedule(
    optimizer: Optimizer,
    steps_per_epoch: int,
    schp_start: int,
    cycle_epochs: int,
    warmup_epochs: float = 10,
    min_lr_ratio: float = 0.01,
    cycle_lr_ratio: float = 0.5,
) -> LambdaLR:
    """Per-step :func:`schp_lr_factor` (the ``module.scheduler`` partial of SCHP experiments)."""

    def factor(step: int) -> float:
        return schp_lr_factor(
            step,
            steps_per_epoch,
            schp_start,
            cycle_epochs,
            warmup_epochs,
            min_lr_ratio,
            cycle_lr_ratio,
        )

    return LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- model aggregation


@torch.no_grad()
def average_into(average: nn.Module, model: nn.Module, count: int) -> None:
    """``w_avg <- w_avg * n / (n + 1) + w / (n + 1)`` for every parameter, in place.

    Buffers (BatchNorm statistics) are left alone: :func:`reestimate_bn` recomputes them.

    Args:
        average: the running average (its parameters are overwritten).
        model: the current model (same architecture).
        count: ``n``, the number of models already in the average (0: copy ``model``).
    """
    alpha = 1.0 / (count + 1)
    avg_params = dict(average.named_parameters())
    for name, param in model.named_parameters():
        target = avg_params[name]
        target.mul_(1.0 - alpha).add_(param.detach().to(target.dtype), alpha=alpha)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    images: Iterable[Tensor],
    forward: Any = None,
) -> int:
    """Recomputes every BatchNorm's running statistics from ``images`` (SCHP's ``bn_re_estimate``).

    The statistics are reset, then batch ``k`` of size ``b_k`` enters with momentum
    ``b_k / (n_k + b_k)`` (``n_k`` images before it), which makes the running mean and variance the
    batch-size-weighted averages of the per-batch mean and unbiased variance.

    Args:
        model: the network; left in eval mode.
        images: ``(B, 3, H, W)`` batches on the model's device.
        forward: ``callable(model, images)``; default ``model(images)``.

    Returns:
        The number of images seen.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        for x in images:
            b = int(x.shape[0])
            for m in bns:
                m.momentum = b / (seen + b)
            if forward is None:
                model(x)
            else:
                forward(model, x)
            seen += b
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    return seen


# ---------------------------------------------------------------------- the system


class SCHPLitModule(ParsingLitModule):
    """:class:`ParsingLitModule` with SCHP's averaged model and self-corrected targets.

    Takes every argument of :class:`ParsingLitModule`, plus:

    Args:
        soft_targets: train against the refined labels once the average exists (SCHP); off
            gives model aggregation alone.
        eval_with: ``"schp"`` validates / tests / predicts with the averaged model once it exists
            (what SCHP reports), ``"net"`` with the current weights.

    State (in ``state_dict``): ``schp_net.*`` the averaged weights and statistics,
    ``schp_cycles`` the number of models averaged, ``schp_epoch`` the 1-based epoch of the last
    update (0: none yet).
    """

    def __init__(
        self, *args: Any, soft_targets: bool = True, eval_with: str = "schp", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if eval_with not in ("schp", "net"):
            raise ValueError(f"eval_with={eval_with!r}: expected 'schp' or 'net'")
        self.soft_targets = soft_targets
        self.eval_with = eval_with
        self.schp_net = copy.deepcopy(self.net)
        self.schp_net.requires_grad_(False)
        self.schp_net.eval()
        self.register_buffer("schp_cycles", torch.zeros((), dtype=torch.long))
        self.register_buffer("schp_epoch", torch.zeros((), dtype=torch.long))
        # Host-side copies, so a training step needs no GPU sync to read them.
        self._cycles_seen = 0  # refreshed from schp_cycles at every epoch start
        self._schp_side = "side_outputs" in inspect.signature(self.schp_net.forward).parameters

    @property
    def has_average(self) -> bool:
        """Whether at least one model has been averaged in."""
        return int(self.schp_cycles) > 0

    def train(self, mode: bool = True) -> SCHPLitModule:
        """The averaged model stays in eval mode (its statistics are re-estimated, not tracked)."""
        super().train(mode)
        self.schp_net.eval()
        return self

    # ------------------------------------------------------------------ cycle end

    def schp_update(self, images: Iterable[Tensor], epoch: int) -> None:
        """Averages the current weights in and re-estimates the average's BatchNorm statistics.

        Args:
            images: training batches ``(B, 3, H, W)`` on the module's device.
            epoch: the 1-based epoch whose end this is (stored as ``schp_epoch``).
        """
        count = int(self.schp_cycles)
        average_into(self.schp_net, self.net, count)
        seen = reestimate_bn(self.schp_net, images)
        if self._trainer is not None and self.trainer.world_size > 1:
            # Each rank saw its own shard: average the statistics so every rank holds the same model.
            for m in self.schp_net.modules():
                if isinstance(m, _BatchNorm) and m.running_mean is not None:
                    m.running_mean.copy_(
                        self.trainer.strategy.reduce(m.running_mean, reduce_op="mean")
                    )
                    m.running_var.copy_(
                        self.trainer.strategy.reduce(m.running_var, reduce_op="mean")
                    )
        self.schp_cycles.fill_(count + 1)
        self._cycles_seen = count + 1
        self.schp_epoch.fill_(epoch)
        log.info(
            "SCHP cycle end at epoch %d: %d model(s) averaged, BatchNorm re-estimated on %d images",
            epoch,
            count + 1,
            seen,
        )

    # ------------------------------------------------------------------ refined targets

    def extra_loss_inputs(
        self, batch: dict[str, Any], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """SCHP's refined labels for this batch (empty before the first average).

        Returns:
            ``soft_target`` ``(B, C, H, W)`` = ``(1 - a) softmax(schp(x)) + a one_hot(y)`` and,
            for nets with an edge branch, ``soft_edge`` ``(B, H, W)`` = ``(1 - a) p_edge + a
            edge(y)``, with ``a = 1 / (n + 1)``, ``n`` the models averaged.
        """
        if not (self.soft_targets and self._cycles_seen > 0):
            return {}
        from losses.edge import edge_logit, edge_targets

        image, target = batch["image"], batch["mask"]
        alpha = 1.0 / (self._cycles_seen + 1)
        with torch.no_grad():
            if self._schp_side:
                schp_out = self.schp_net(image, side_outputs=True)  # CE2P: edges too
            else:
                schp_out = self.schp_net(image)
            size = target.shape[-2:]
            logits = schp_out["out"].float()
            if logits.shape[-2:] != size:
                # (B, C, h, w) -> (B, C, H, W)
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            valid = target != self.ignore_index
            # (B, H, W) -> (B, H, W, C) -> (B, C, H, W); ignored pixels get class 0 (masked later)
            one_hot = F.one_hot(torch.where(valid, target, 0), logits.shape[1])
            one_hot = one_hot.permute(0, 3, 1, 2).float()
            extra = {"soft_target": (1 - alpha) * logits.softmax(1) + alpha * one_hot}
            edge = schp_out.get("edge")
            if edge is not None and "edge" in outputs:
                if edge.shape[-2:] != size:
                    edge = F.interpolate(edge, size=size, mode="bilinear", align_corners=False)
                hard = edge_targets(target, getattr(self.loss, "edge_width", 3), self.ignore_index)
                hard = (hard == 1).float()
                extra["soft_edge"] = (1 - alpha) * torch.sigmoid(edge_logit(edge)) + alpha * hard
        return extra

    def on_train_epoch_start(self) -> None:
        # One sync per epoch (the buffer may have been restored from a checkpoint since).
        self._cycles_seen = int(self.schp_cycles)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("train/schp_cycles", float(self._cycles_seen))

    def load_init_weights(self, path: str) -> None:
        """The net weights and, when the checkpoint has them, the SCHP average and its counters.

        ``train=false ckpt_path=<schp ckpt>`` evaluates through this: without the average it would
        silently score the last cycle's weights instead of the model SCHP reports.
        """
        super().load_init_weights(path)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        keep = {k: v for k, v in state.items() if k.startswith("schp_")}
        if keep:
            missing = [k for k in self.state_dict() if k.startswith("schp_") and k not in keep]
            if missing:
                raise ValueError(f"{path}: incomplete SCHP state (missing {missing[:3]} ...)")
            self.load_state_dict(keep, strict=False)

    # ------------------------------------------------------------------ evaluation

    def predict_logits(self, image: Tensor) -> Tensor:
        """Scores of the averaged model once it exists (``eval_with="schp"``), else the net's."""
        if self.eval_with == "net" or not self.has_average:
            return super().predict_logits(image)
        if self.inference is None:
            return self.schp_net(image)["out"]
        return self.inference(lambda x: self.schp_net(x)["out"], image)


class SCHPCycle(pl.Callback):
    """Ends SCHP cycles: after the last training batch of epochs ``schp_start``,
    ``schp_start + cycle_epochs``, ... (1-based) it calls :meth:`SCHPLitModule.schp_update`.

    The update runs before that epoch's validation, so the validation scores and the checkpoints
    written then already contain the new average; ``schp_epoch`` keeps a resumed run from
    averaging the same epoch twice.

    Args:
        schp_start: epochs of ordinary training before the first average (SCHP: 100 of 150).
        cycle_epochs: length of a cycle (SCHP: 10).
        bn_batches: training batches used to re-estimate BatchNorm (None: one epoch's worth,
            ``trainer.num_training_batches``, i.e. the whole training set like SCHP).
    """

    def __init__(self, schp_start: int, cycle_epochs: int, bn_batches: int | None = None) -> None:
        if schp_start < 1 or cycle_epochs < 1:
            raise ValueError(f"schp_start={schp_start}, cycle_epochs={cycle_epochs}: must be >= 1")
        self.schp_start = int(schp_start)
        self.cycle_epochs = int(cycle_epochs)
        self.bn_batches = bn_batches

    def is_cycle_end(self, epoch: int) -> bool:
        """Whether the end of 1-based ``epoch`` ends a cycle."""
        return epoch >= self.schp_start and (epoch - self.schp_start) % self.cycle_epochs == 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 != trainer.num_training_batches:
            return
        epoch = trainer.current_epoch + 1
        if not self.is_cycle_end(epoch) or int(pl_module.schp_epoch) >= epoch:
            return
        if not isinstance(pl_module, SCHPLitModule):
            raise TypeError("the SCHPCycle callback needs module=schp (SCHPLitModule)")
        pl_module.schp_update(self._images(trainer, pl_module), epoch)

    def _images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Tensor]:
        """Training images for the BatchNorm re-estimation, from a fresh training loader."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("SCHP's BatchNorm re-estimation needs a datamodule")
        limit = self.bn_batches or trainer.num_training_batches
        loader = datamodule.train_dataloader()
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            yield batch["image"].to(pl_module.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"schp_start": self.schp_start, "cycle_epochs": self.cycle_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("schp_start"), state_dict.get("cycle_epochs"))
        if saved != (self.schp_start, self.cycle_epochs):
            log.warning(
                "resuming SCHP with schp_start/cycle_epochs %s, the checkpoint was written with %s",
                (self.schp_start, self.cycle_epochs),
                saved,
            )
