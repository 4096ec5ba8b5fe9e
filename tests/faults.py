"""Fault injection for the resume tests: a callback that SIGKILLs its own process at a chosen point.

Used from a subprocess as ``+callbacks.kill._target_=faults.KillAt`` (with ``tests`` on PYTHONPATH);
SIGKILL gives the process no chance to clean up, like a pre-empted cluster job.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch


def _die(sig: str = "SIGKILL") -> None:
    os.kill(os.getpid(), getattr(signal, sig))


class KillAt(pl.Callback):
    """Kills the process in ``stage`` (1, or 2 = encoder frozen) at ``epoch`` (0-based).

    Args:
        where: ``train`` (before training batch ``batch``), ``val`` (before validation batch
            ``batch``) or ``save`` (halfway through writing the epoch's first checkpoint).
        signal: ``SIGKILL`` (pre-emption), ``SIGINT`` (Ctrl-C) or ``SIGUSR1`` (SLURM's warning
            before the time limit); other than ``SIGKILL``, ``train`` and ``val`` only.
    """

    def __init__(
        self, stage: int, epoch: int, where: str, batch: int = 0, signal: str = "SIGKILL"
    ) -> None:
        if where not in ("train", "val", "save"):
            raise ValueError(where)
        self.stage, self.epoch, self.where, self.batch = int(stage), int(epoch), where, int(batch)
        self.signal = signal

    def _hit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, where: str) -> bool:
        stage = 2 if pl_module.hparams.get("freeze_encoder") else 1
        return (
            where == self.where
            and stage == self.stage
            and trainer.current_epoch == self.epoch
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
        )

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._hit(trainer, pl_module, "train") and batch_idx == self.batch:
            _die(self.signal)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._hit(trainer, pl_module, "val") and batch_idx == self.batch:
            _die(self.signal)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self._hit(trainer, pl_module, "save"):
            return
        real_save = torch.save

        def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = half_then_die
