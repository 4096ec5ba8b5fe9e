"""Deep-MAC as a LightningModule: ground-truth boxes in, class-agnostic masks out.

Batches follow :mod:`datamodules.instances`: ``image`` (B, 3, S, S) in the network frame, per image
``boxes`` (N_i, 4) xyxy and ``masks`` (N_i, S, S) in that frame, ``labels`` (N_i,), and for
evaluation ``orig_boxes`` / ``orig_masks`` (N_i, H, W) in the original image. Validation pastes the
predicted masks into the original image and scores mask AP with ground-truth boxes
(:mod:`lightning_modules.deepmac_metrics`), separately for seen and unseen classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from datamodules.instances import network_images
from lightning_modules.checkpoint_io import nonfinite_weights_message
from lightning_modules.deepmac_metrics import MaskAPAccumulator, flat_scores, gather_accumulator
from lightning_modules.nets.deepmac import crop_instance_masks, paste_masks
from lightning_modules.parsing import NonFiniteWeightsError
from lightning_modules.schedulers import per_step_optimization
from lightning_modules.step_state import (
    StepLog,
    log_epoch_means,
    read_points,
    read_step_log,
    stack_terms,
)
from losses.mask import resolve_classes

log = logging.getLogger(__name__)


class DeepMACLitModule(pl.LightningModule):
    """Trains a :class:`~lightning_modules.nets.deepmac.DeepMAC` net on box crops.

    Args:
        net: ``(images, boxes) -> {"mask_logits": (N, M, M), "boxes": boxes used}``.
        loss: ``loss(logits, targets, labels) -> {"loss", ...}`` (holds ``allowed_mask_classes``).
        optimizer: partial optimizer taking ``params``.
        scheduler: partial ``(optimizer, steps_per_epoch) -> LRScheduler`` stepped every step.
        seen_classes: class ids (or a preset name) reported as "seen"; None: the loss's allowed
            classes.
        unseen_classes: ids (or preset) reported as "unseen"; None: every other class.
        mask_threshold: probability above which a pasted pixel belongs to the mask.
        centre_loss: optional all-class centre-heatmap loss
            (:class:`~losses.centernet.CentreHeatmapLoss`) on the net's ``centre_heatmap``: the
            backbone then also learns every class's boxes, as in Deep-MAC's partially supervised
            setting; added to the mask loss.
        val_prefix: log prefix of the scores of the validation loop run by ``fit`` (``"holdout"``
            when the datamodule validates on images held out of the training split, so that the
            checkpoint monitor never reads the reported split).
        val_groups: the class groups scored by that loop (None: seen, unseen and all; ``[seen]``
            keeps the masks of unseen classes out of model selection altogether).
        build_config: plain ``{"model", "data": {"image_size"}}`` saved in every checkpoint
            (``build_config``), from which the box-prompt command rebuilds the net.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        seen_classes: str | Sequence[int] | None = None,
        unseen_classes: str | Sequence[int] | None = None,
        mask_threshold: float = 0.5,
        centre_loss: nn.Module | None = None,
        val_prefix: str = "val",
        val_groups: Sequence[str] | None = None,
        build_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            logger=False,
            ignore=["net", "loss", "optimizer", "scheduler", "centre_loss", "build_config"],
        )
        self.build_config = build_config
        self.net, self.loss, self.centre_loss = net, loss, centre_loss
        self.val_prefix = str(val_prefix)
        self.val_groups = None if val_groups is None else [str(g) for g in val_groups]
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seen = resolve_classes(seen_classes)
        if self.seen is None:
            self.seen = getattr(loss, "allowed", None)
        self.unseen = resolve_classes(unseen_classes)
        self.mask_threshold = float(mask_threshold)
        self.accumulator = MaskAPAccumulator()
        self.val_scores: dict[str, Any] | None = None
        # Read by the shared StageEnd callback, whose table format is the parsing one: the
        # Deep-MAC driver writes its own scores, so this stays empty.
        self.last_scores: dict[str, Any] = {}
        self.class_names: list[str] = []
        # Each step's loss terms, kept on the device and read every trainer.log_every_n_steps
        # steps (_check_finite): a check in the step would make the host wait for it each step,
        # and a self.log would add Lightning's bookkeeping (kernels, Python) to every step.
        self._step_log = StepLog()

    def groups(self, present: Sequence[int]) -> dict[str, list[int] | None]:
        """``{"seen", "unseen", "all"}`` class lists for evaluation given the classes present."""
        if self.seen is None:
            return {"all": None}
        unseen = self.unseen
        if unseen is None:
            unseen = [c for c in present if c not in set(self.seen)]
        return {"seen": list(self.seen), "unseen": list(unseen), "all": None}

    # ------------------------------------------------------------------ forward

    def forward(self, image: Tensor, boxes: list[Tensor]) -> dict[str, Any]:
        """``image`` (B, 3, S, S) normalised float (:func:`~datamodules.instances.network_images`)."""
        if not image.is_floating_point():
            # Loader batches are uint8 with a padding that only their "size" locates.
            raise TypeError(
                "DeepMACLitModule takes normalised float images: pass a loader batch through "
                "datamodules.instances.network_images(batch['image'], batch['size']) first"
            )
        return self.net(image, boxes)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
            batch = {**batch, "image": network_images(batch["image"], batch.get("size"))}
        return batch

    @torch.no_grad()
    def predict_masks(
        self,
        image: Tensor,
        boxes: list[Tensor],
        orig_boxes: list[Tensor],
        orig_sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Mask probabilities pasted into each original image.

        Args:
            image: ``(B, 3, S, S)`` network input, normalised (:meth:`forward`).
            boxes: B ``(N_i, 4)`` boxes in the network frame.
            orig_boxes: the same boxes in the original images' pixels.
            orig_sizes: ``(H, W)`` of each original image.

        Returns:
            B tensors ``(N_i, H, W)`` float probabilities.
        """
        return self._paste(self(image, boxes)["mask_logits"], orig_boxes, orig_sizes)

    @staticmethod
    def _paste(
        logits: Tensor, orig_boxes: list[Tensor], orig_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """``(sum N_i, M, M)`` mask logits -> B ``(N_i, H_i, W_i)`` probabilities in the images."""
        out, start = [], 0
        for ob, size in zip(orig_boxes, orig_sizes, strict=True):
            n = len(ob)
            # Boxes keep their own float dtype (paste_masks works in fp32): cast to bf16
            # logits they would move by up to 2 px at 800 px.
            out.append(paste_masks(logits[start : start + n], ob.to(logits.device), size))
            start += n
        return out

    # ------------------------------------------------------------------ steps

    def _loss(
        self, batch: dict[str, Any], out: dict[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], int]:
        """The mask loss of ``batch`` and its instance count; ``out``: the net's output, if known."""
        if out is None:
            out = self(batch["image"], batch["boxes"])
        m = out["mask_logits"].shape[-1]
        # Targets are cropped with the boxes the head saw (jittered ones in training).
        targets = torch.cat(
            [
                crop_instance_masks(mk, b, m)
                for mk, b in zip(batch["masks"], out["boxes"], strict=True)
            ]
        )  # (sum N_i, M, M)
        labels = torch.cat(batch["labels"])
        losses = dict(self.loss(out["mask_logits"], targets, labels))
        if self.centre_loss is not None:
            if "centre_heatmap" not in out:
                raise ValueError("module.centre_loss needs a net with num_centre_classes > 0")
            # Centres of every instance, from the ground-truth boxes (never the jittered ones).
            centre = self.centre_loss(
                out["centre_heatmap"], batch["boxes"], batch["labels"], self.net.stride
            )
            losses["loss/mask"] = losses["loss"]
            losses["loss/centre"] = centre["loss/centre"]
            losses["loss"] = losses["loss"] + centre["loss"]
        return losses, int(labels.numel())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses, n = self._loss(batch)
        # Weighted by the instances (the loss is a mean over them); a batch without any counts 1.
        self._step_log.add_terms(self.global_step, tuple(losses), stack_terms(losses), max(n, 1))
        return losses["loss"]

    def on_fit_start(self) -> None:
        self._step_log = StepLog()  # nothing of an interrupted earlier fit

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        read, log_now = read_points(self.trainer, batch_idx)
        if read:
            self._check_finite(log=log_now)

    def on_train_epoch_end(self) -> None:
        self._check_finite()
        log_epoch_means(self, self._step_log)

    def _check_finite(self, log: bool = False) -> None:
        """Reads the loss terms kept since the last read (one host transfer), raises on the
        first non-finite one, and with ``log`` writes the last step's terms as
        ``train/<term>_step``. Under DDP the findings of every rank are gathered (they read at
        the same steps), so that every rank stops together.

        Raises:
            FloatingPointError: naming the step and its loss terms.
        """
        found = read_step_log(self, self._step_log, log=log)
        if found is not None:
            event, terms = found
            raise FloatingPointError(f"non-finite mask loss at step {event.step}: {terms}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # One forward pass serves the loss and the pasted masks (eval mode: boxes not jittered).
        out = self(batch["image"], batch["boxes"])
        losses, n = self._loss(batch, out)
        self.log(
            f"{self.val_prefix}/loss",
            losses["loss"],
            on_epoch=True,
            batch_size=max(n, 1),
            sync_dist=True,
        )
        sizes = [tuple(m.shape[-2:]) for m in batch["orig_masks"]]
        probs = self._paste(out["mask_logits"], batch["orig_boxes"], sizes)
        self.accumulate(self.accumulator, batch, probs)

    def accumulate(
        self, acc: MaskAPAccumulator, batch: dict[str, Any], probs: list[Tensor]
    ) -> None:
        """Adds an evaluation batch to ``acc``.

        Args:
            acc: the accumulator.
            batch: an evaluation batch (``orig_masks``, ``labels``, optional ``orig_crowd_masks``
                / ``crowd_labels`` and ``index``).
            probs: B tensors ``(N_i, H, W)`` from :meth:`predict_masks`.
        """
        crowds = batch.get("orig_crowd_masks") or [None] * len(probs)
        crowd_labels = batch.get("crowd_labels") or [None] * len(probs)
        index = batch.get("index")
        for i, (p, gt, lab) in enumerate(
            zip(probs, batch["orig_masks"], batch["labels"], strict=True)
        ):
            acc.update(
                gt.cpu().numpy(),
                (p >= self.mask_threshold).cpu().numpy(),
                lab.cpu().tolist(),
                None if crowds[i] is None else crowds[i].cpu().numpy(),
                None if crowd_labels[i] is None else crowd_labels[i].cpu().tolist(),
                key=None if index is None else int(index[i]),
            )

    def on_validation_epoch_start(self) -> None:
        self.accumulator.reset()

    def on_validation_epoch_end(self) -> None:
        # Under DDP every rank gathers all shards and scores the whole set: the logged values (and
        # the checkpoint monitor reading them) are the same on every rank.
        acc = gather_accumulator(self.accumulator)
        groups = self.groups(acc.present_classes())
        if self.val_groups is not None:
            groups = {k: v for k, v in groups.items() if k in self.val_groups}
        scores = acc.compute(groups)
        self.accumulator.reset()
        self.val_scores = scores
        # NaN (a group without instances) is logged too: checkpoint monitors then find their key.
        for key, value in flat_scores(scores).items():
            self.log(f"{self.val_prefix}/{key}", value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before anything is written, on every rank: no checkpoint file holds non-finite weights,
        # nor those of a non-finite step not read yet (a save between two reads).
        self._check_finite()
        message = nonfinite_weights_message(self)
        if message is not None:
            raise NonFiniteWeightsError(message)
        # Plain values only: the box-prompt command rebuilds the net from them.
        if self.build_config is not None:
            checkpoint["build_config"] = self.build_config

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return per_step_optimization(
            self.trainer, self.optimizer_factory, self.scheduler_factory, params
        )
