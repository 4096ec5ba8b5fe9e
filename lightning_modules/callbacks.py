"""Callbacks with saved state that implement parts of a training schedule."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class CPASnapshot(pl.Callback):
    """Records the class pixel accuracy (CPA) of the training batches of one epoch.

    ARBS (accuracy-based regionally balanced sampling) draws its keep probabilities from the CPA of
    the model early in training: the paper's Fig. 2 uses the third epoch. The confusion matrix of that
    epoch's training batches (summed over DDP ranks by the metric) is turned into CPA and stored in
    the module's ``early_cpa`` buffer, so it travels with every later checkpoint.

    Args:
        epoch: 1-based epoch whose training batches are measured.
    """

    def __init__(self, epoch: int = 3) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The confusion matrix costs an argmax and a bincount per step: only pay for it when needed.
        if trainer.current_epoch + 1 == self.epoch:
            pl_module.force_train_confusion = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 != self.epoch:
            return
        from samplers.regional import class_pixel_accuracy

        confusion = pl_module.train_confmat.compute()
        cpa = class_pixel_accuracy(confusion.double())
        pl_module.early_cpa.copy_(cpa.to(pl_module.early_cpa))
        pl_module.early_cpa_epoch.fill_(self.epoch)
        pl_module.force_train_confusion = False
        valid = torch.isfinite(cpa)
        log.info(
            "CPA snapshot of epoch %d: %d classes predicted, mean CPA %.4f",
            self.epoch,
            int(valid.sum()),
            float(cpa[valid].mean()) if valid.any() else float("nan"),
        )
