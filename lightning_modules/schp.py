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

import contextlib
import copy
import inspect
import logging
import types
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.batch import normalize_image
from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.parsing import ParsingLitModule
from lightning_modules.schedulers import check_lr_interval, cosine_factor, epoch_start_step

log = logging.getLogger(__name__)

__all__ = [
    "REFINE_MODES",
    "BNMoments",
    "SCHPCycle",
    "SCHPLitModule",
    "all_reduce_bn_moments",
    "average_into",
    "bn_shard_loader",
    "collect_bn_moments",
    "load_bn_moments",
    "merge_bn_moments",
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
    lr_interval: str = "step",
) -> LambdaLR:
    """:func:`schp_lr_factor` as a scheduler (the ``module.scheduler`` partial of SCHP experiments).

    Args:
        lr_interval: ``step`` moves the learning rate every optimisation step; ``epoch`` holds it
            at the value of the epoch's first step for the whole epoch, as SCHP's
            ``SGDRScheduler`` (stepped once per epoch) does (:func:`epoch_start_step`).
    """
    quantise = check_lr_interval(lr_interval) == "epoch"

    def factor(step: int) -> float:
        if quantise:
            step = epoch_start_step(step, steps_per_epoch)
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


BNMoments = dict[str, Tensor]
"""Per BatchNorm layer (by module name): ``(3, C)`` float64 rows ``[n, sum x, sum x^2]`` of its
input over the pixels seen, ``n`` repeated per channel. Sums, so shards merge by addition."""


@torch.no_grad()
def collect_bn_moments(
    model: nn.Module, images: Iterable[Tensor], forward: Any = None
) -> tuple[BNMoments, int]:
    """Sums of every BatchNorm's input over ``images``, the model running in train mode.

    Train mode is what SCHP's ``bn_re_estimate`` runs: each layer normalises a batch with that
    batch's statistics, so the inputs of deeper layers do not depend on the statistics being
    estimated, and a batch contributes the same sums whichever process sees it. That holds only
    if "that batch" is this process's batch: the ``SyncBatchNorm`` layers of a DDP run
    (``trainer.sync_batchnorm``) run as plain BatchNorm here (:func:`per_process_batch_norm`).

    Args:
        model: the network (its BatchNorm buffers are changed; :func:`load_bn_moments` sets them).
        images: ``(B, 3, H, W)`` batches on the model's device.
        forward: ``callable(model, images)``; default ``model(images)``.

    Returns:
        The moments of each BatchNorm that tracks statistics, and the number of images seen.
    """
    bns = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }
    # Every layer starts at zero, so all ranks hold the same keys even if one saw no batch.
    moments: BNMoments = {
        name: torch.zeros(3, m.num_features, dtype=torch.float64, device=m.running_mean.device)
        for name, m in bns.items()
    }

    def accumulate(name: str, x: Tensor) -> None:
        x = x.detach()
        dims = [d for d in range(x.dim()) if d != 1]
        # Two-pass float32 statistics of the batch (stable), summed in float64 across batches.
        var, mean = torch.var_mean(x.float(), dim=dims, unbiased=False)  # (C,), (C,)
        n = x.numel() // x.shape[1]
        mean, var = mean.double(), var.double()
        rows = torch.stack([torch.full_like(mean, n), n * mean, n * (var + mean * mean)])
        moments[name] += rows

    hooks = [
        m.register_forward_pre_hook(lambda mod, inputs, name=name: accumulate(name, inputs[0]))
        for name, m in bns.items()
    ]
    for m in bns.values():
        m.reset_running_stats()
    was_training = model.training
    model.train()
    seen = 0
    try:
        with per_process_batch_norm(model):
            for x in images:
                if forward is None:
                    model(x)
                else:
                    forward(model, x)
                seen += int(x.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return moments, seen


@contextlib.contextmanager
def per_process_batch_norm(model: nn.Module) -> Iterator[None]:
    """Runs every ``SyncBatchNorm`` of ``model`` as a plain BatchNorm for the duration.

    In train mode under DDP a ``SyncBatchNorm`` normalises with the statistics of all ranks'
    batches together, so the input of every deeper layer, and the moments a rank collects from
    its shard, would depend on which images the other ranks hold: the merged moments would not be
    those of one process reading every shard. ``_BatchNorm.forward`` is the same layer (same
    parameters, buffers and hooks) normalising with this process's batch only; it also runs no
    collective per layer. Restored on exit: training (and the refined labels) synchronise again.
    """
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    for m in syncs:
        # An instance attribute shadows the class's forward; deleting it brings that back.
        m.forward = types.MethodType(_BatchNorm.forward, m)
    try:
        yield
    finally:
        for m in syncs:
            del m.forward


def merge_bn_moments(parts: Iterable[BNMoments]) -> BNMoments:
    """Moments of the union of disjoint image sets: the element-wise sums of theirs."""
    merged: BNMoments = {}
    for part in parts:
        for name, rows in part.items():
            merged[name] = merged[name] + rows if name in merged else rows.clone()
    return merged


def all_reduce_bn_moments(moments: BNMoments) -> BNMoments:
    """Sums the moments of every DDP rank (one ``all_reduce`` of one flat float64 tensor).

    Identity without an initialised process group of more than one process. Every rank must
    call it with the moments of the same BatchNorm layers (the same model), in the same order.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return moments
    names = sorted(moments)
    # {name: (3, C)} -> (sum 3 C,)
    flat = torch.cat([moments[name].reshape(-1) for name in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for name in names:
        size = moments[name].numel()
        out[name] = flat[offset : offset + size].view_as(moments[name])
        offset += size
    return out


def bn_shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """``loader`` restricted to rank ``rank`` of ``world_size`` for BatchNorm re-estimation.

    A loader whose sampler is already a ``DistributedSampler`` over ``world_size`` replicas (the
    rimlab datamodules' training loaders) is returned as is. Otherwise the dataset is split
    like ``DistributedSampler(shuffle=False)``: index ``i`` goes to rank ``i % world_size``, the
    last few indices repeated so that every rank gets the same number of images (and batches).

    Args:
        loader: the training loader.
        rank: this process's global rank.
        world_size: the number of processes.
    """
    if world_size <= 1:
        return loader
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas == world_size:
        return loader
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(
        loader.dataset,
        batch_size=batch_size,
        sampler=DistributedSampler(
            loader.dataset, num_replicas=world_size, rank=rank, shuffle=False
        ),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


@torch.no_grad()
def load_bn_moments(model: nn.Module, moments: BNMoments) -> None:
    """Sets each BatchNorm's running statistics from its moments.

    ``running_mean = sum x / n`` and ``running_var = (sum x^2 - n mean^2) / (n - 1)``: the mean
    and the unbiased variance (BatchNorm's own ``running_var`` convention) over every pixel of
    every image seen. Layers that saw no pixel keep their statistics.
    """
    for name, m in model.named_modules():
        rows = moments.get(name)
        if rows is None or not isinstance(m, _BatchNorm) or m.running_mean is None:
            continue
        n, sum_x, sum_x2 = rows  # (C,) each, float64
        if not bool((n > 0).all()):
            continue
        mean = sum_x / n.clamp(min=1)
        var = ((sum_x2 - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    images: Iterable[Tensor],
    forward: Any = None,
    reduce: Any = None,
) -> int:
    """Recomputes every BatchNorm's running statistics from ``images`` (SCHP's ``bn_re_estimate``).

    The statistics become the mean and unbiased variance of each layer's input over all pixels
    of all images (:func:`collect_bn_moments`, :func:`load_bn_moments`). They are exact sums,
    so under DDP each rank passes its own shard and ``reduce=all_reduce_bn_moments``: the merged
    statistics equal those of one process reading every shard. (SCHP's code averages per-batch
    variances instead, which drops the spread between batch means and depends on the batch size
    and the number of GPUs; see docs/schp.md.)

    Args:
        model: the network; left in eval mode.
        images: ``(B, 3, H, W)`` batches on the model's device.
        forward: ``callable(model, images)``; default ``model(images)``.
        reduce: ``callable(moments) -> moments`` merging the shards of other processes
            (:func:`all_reduce_bn_moments`); None: this process saw every image.

    Returns:
        The number of images this process saw.
    """
    moments, seen = collect_bn_moments(model, images, forward)
    if reduce is not None:
        moments = reduce(moments)
    load_bn_moments(model, moments)
    model.eval()
    return seen


# ---------------------------------------------------------------------- the system

REFINE_MODES = ("train", "eval")
"""Mode of the averaged model while it makes the refined labels: ``train`` (SCHP's code: batch
statistics, dropout active) or ``eval`` (the re-estimated statistics, no dropout)."""


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[None]:
    """Runs ``model`` in train mode without touching its BatchNorm running statistics.

    Train mode normalises with each batch's own statistics and activates dropout (what SCHP's
    averaged model does when it labels a batch); ``track_running_stats`` is switched off for the
    duration, so the re-estimated statistics that evaluation uses stay as they are (SCHP's code
    lets each labelled batch move them by momentum 0.1 until the next re-estimation).
    """
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    model.train()
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
        model.train(was_training)


class SCHPLitModule(ParsingLitModule):
    """:class:`ParsingLitModule` with SCHP's averaged model and self-corrected targets.

    Takes every argument of :class:`ParsingLitModule`, plus:

    Args:
        soft_targets: train against the refined labels once the average exists (SCHP); off
            gives model aggregation alone.
        eval_with: ``"schp"`` validates / tests / predicts with the averaged model once it exists
            (what SCHP reports), ``"net"`` with the current weights.
        refine_mode: ``"train"`` (SCHP's code) makes the refined labels with the averaged model in
            train mode (batch statistics, dropout; :func:`batch_statistics_mode`), ``"eval"`` with
            its re-estimated statistics and no dropout. Validation always uses eval mode.

    State (in ``state_dict``): ``schp_net.*`` the averaged weights and statistics,
    ``schp_cycles`` the number of models averaged, ``schp_epoch`` the 1-based epoch of the last
    update (0: none yet).
    """

    def __init__(
        self,
        *args: Any,
        soft_targets: bool = True,
        eval_with: str = "schp",
        refine_mode: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if eval_with not in ("schp", "net"):
            raise ValueError(f"eval_with={eval_with!r}: expected 'schp' or 'net'")
        if refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode={refine_mode!r}: expected one of {REFINE_MODES}")
        self.refine_mode = refine_mode
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
        distributed = self._trainer is not None and self.trainer.world_size > 1
        # Under DDP every rank reads its own shard; the exact sums of all shards are merged.
        reduce = all_reduce_bn_moments if distributed else None
        seen = reestimate_bn(self.schp_net, images, reduce=reduce)
        self.schp_cycles.fill_(count + 1)
        self._cycles_seen = count + 1
        self.schp_epoch.fill_(epoch)
        log.info(
            "SCHP cycle end at epoch %d: %d model(s) averaged, BatchNorm re-estimated on %d images"
            " (this process)",
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
        mode = (
            batch_statistics_mode(self.schp_net)
            if self.refine_mode == "train"
            else contextlib.nullcontext()
        )
        with torch.no_grad(), mode:
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
        state = read_checkpoint(path).get("state_dict")
        if not isinstance(state, dict):
            return  # an official SCHP state dict: net weights only, no average yet
        keep = {k: v for k, v in state.items() if k.startswith("schp_")}
        if keep:
            missing = [k for k in self.state_dict() if k.startswith("schp_") and k not in keep]
            if missing:
                raise CheckpointError(f"{path}: incomplete SCHP state (missing {missing[:3]} ...)")
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
    written then already contain the new average, and after the module's read of the steps since
    its last read (:meth:`~lightning_modules.parsing.ParsingLitModule.read_step_state_now`), so a
    non-finite step stops the run before its weights are averaged in; ``schp_epoch`` keeps a resumed run from
    averaging the same epoch twice.

    Args:
        schp_start: epochs of ordinary training before the first average (SCHP: 100 of 150).
        cycle_epochs: length of a cycle (SCHP: 10).
        bn_batches: training batches per process used to re-estimate BatchNorm (None: one
            epoch's worth, ``trainer.num_training_batches``, i.e. the whole training set like
            SCHP). Under DDP each rank reads its own shard (:func:`bn_shard_loader`) and the
            statistics of all shards are merged exactly (:func:`all_reduce_bn_moments`).
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
        # A non-finite last step stops the run here, before its weights enter the average.
        pl_module.read_step_state_now(batch_idx)
        pl_module.schp_update(self._images(trainer, pl_module), epoch)

    def _images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Tensor]:
        """This rank's share of the training images for the BatchNorm re-estimation."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("SCHP's BatchNorm re-estimation needs a datamodule")
        loader = bn_shard_loader(
            datamodule.train_dataloader(), trainer.global_rank, trainer.world_size
        )
        # Equal shards give every rank the same number of batches and so passes of equal length
        # before the one all_reduce of the moments (the pass itself runs no collective).
        limit = min(self.bn_batches or trainer.num_training_batches, len(loader))
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            yield normalize_image(batch["image"].to(pl_module.device, non_blocking=True))

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
