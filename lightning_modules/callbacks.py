"""Callbacks with saved state that implement parts of a training schedule."""

from __future__ import annotations

import logging
import os
import random
import signal as signal_module
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar

from datamodules.files import json_safe, write_json
from lightning_modules.metrics import scores_to_json
from lightning_modules.step_state import is_last_train_batch
from samplers.regional import class_pixel_accuracy
from samplers.seeding import mix_seed

log = logging.getLogger(__name__)


@runtime_checkable
class Reseeded(Protocol):
    """A module with random draws of its own generator (the regional sampler's)."""

    def reseed(self, seed: int) -> None: ...


@runtime_checkable
class Scored(Protocol):
    """A module that keeps its last evaluation's scores per split (``"val"``, ``"test"``)."""

    last_scores: dict[str, Any]
    class_names: list[str]


class EarlyConfusion(Protocol):
    """A module that records the confusion matrix of an early epoch's training batches (ARBS)."""

    #: the 1-based epoch recorded (0: none yet)
    early_cpa_epoch: torch.Tensor

    def measure_train_confusion(self, on: bool) -> None:
        """Accumulates the training confusion matrix in this epoch (``on``) or as configured."""

    def record_early_confusion(self, epoch: int) -> torch.Tensor:
        """Stores this epoch's training confusion matrix as that of ``epoch``; returns it
        ``(C, C)``."""


@runtime_checkable
class StepMetrics(Protocol):
    """A module whose step values reach the host every few steps, not through ``self.log``."""

    def progress_metrics(self) -> dict[str, float]:
        """``{name: value}`` of the last step the host has read (empty before the first read)."""


class StepMetricsProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, also showing a :class:`StepMetrics` module's last read step
    values (``train/loss_step``).

    A value logged with ``self.log(..., prog_bar=True)`` stays in Lightning's results and is
    converted to a number (``.item()``: a device sync on an accelerator) every time the bar or a
    callback asks for the metrics, at every step; these values are host floats already.

    The training bar is redrawn at most every ``min_interval`` seconds (and always at an epoch's
    last batch): Lightning's bar redraws and gathers its metrics after every batch, which costs
    about 0.2 ms of host time per step, more than a display at 10 redraws per second needs.
    """

    def __init__(self, min_interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_interval = float(min_interval)
        self._last_draw = float("-inf")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(pl_module, StepMetrics) and pl_module.training:
            items.update(pl_module.progress_metrics())
        return items

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        started = self.train_progress_bar_id is not None
        due = now - self._last_draw >= self.min_interval
        if started and not due and not is_last_train_batch(trainer, batch_idx):
            return
        self._last_draw = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class EpochSeed(pl.Callback):
    """Re-seeds torch, numpy and ``random`` at the start of every training epoch.

    The seed is a function of ``(seed, epoch, rank)`` only, so dropout, the regional sampler's
    draws and anything else random in epoch ``e`` come out the same whether the run got there in
    one go or was resumed from the checkpoint of epoch ``e - 1`` (the training order and the
    augmentations are fixed the same way by :class:`~datamodules.base.EpochShuffleSampler`).
    This is what makes ``resume=true`` exact, and what lets a run continue a shared stage 1 as if
    it had trained those epochs itself.

    Args:
        seed: the run's (or stage's) seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = mix_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        torch.manual_seed(s)  # all devices
        np.random.seed(s % 2**32)
        random.seed(s)
        if isinstance(pl_module, Reseeded):
            pl_module.reseed(mix_seed(s, 1))


class Interruption(pl.Callback):
    """On Ctrl-C or a crash during fit: keep the state and say how to resume.

    Saves ``<dir>/checkpoints/interrupted.ckpt`` (single-process runs; under DDP the other ranks
    may be blocked in a collective, so nothing is saved that would need them) and logs the epoch,
    step, cause, the last end-of-epoch checkpoint and the command that resumes exactly from it.
    ``interrupted.ckpt`` holds the mid-epoch state for inspection or ``ckpt_path=``; ``resume=true``
    continues from ``last.ckpt``, so the interrupted epoch is replayed identically.

    Args:
        directory: the stage's output folder.
        resume_hint: the command that resumes the run.
    """

    def __init__(self, directory: str, resume_hint: str = "") -> None:
        self.directory = Path(directory)
        self.resume_hint = resume_hint

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        from lightning_modules.parsing import NonFiniteLossError

        if trainer.state.fn != "fit" or isinstance(exception, NonFiniteLossError):
            return  # not training, or the NaN guard already said everything
        cause = (
            "Ctrl-C"
            if isinstance(exception, KeyboardInterrupt)
            else f"{type(exception).__name__}: {exception}"
        )
        saved = "not saved (multi-process run)"
        if trainer.world_size == 1:
            path = self.directory / "checkpoints" / "interrupted.ckpt"
            try:
                trainer.save_checkpoint(path)
                saved = str(path)
            except Exception as err:  # the original exception matters more
                saved = f"not saved ({err})"
        last = self.directory / "checkpoints" / "last.ckpt"
        log.error(
            "run interrupted in epoch %d at global step %d by %s. State at the interruption: %s. "
            "Last end-of-epoch checkpoint: %s.%s",
            trainer.current_epoch,
            trainer.global_step,
            cause,
            saved,
            last if last.is_file() else "none yet",
            f" Resume exactly with: {self.resume_hint}" if self.resume_hint else "",
        )


class CPASnapshot(pl.Callback):
    """Records the confusion matrix of the training batches of one early epoch, for ARBS.

    ARBS (accuracy-based regionally balanced sampling) draws its keep probabilities from the class
    pixel accuracy (CPA) of the model early in training: the paper's Fig. 2 uses the third epoch.
    The ``(C, C)`` confusion matrix of that epoch's training batches (summed over DDP ranks by the
    metric) is stored in the module's ``early_confusion`` buffer, so it travels with every later
    checkpoint and stage 2 derives the CPA under the reading it is configured with
    (``sampler.cpa``) without retraining stage 1.

    Args:
        epoch: 1-based epoch whose training batches are measured, or ``"stage_end"`` for the last
            epoch of the run (the end of stage 1).
    """

    def __init__(self, epoch: int | str = 3) -> None:
        if epoch != "stage_end" and int(epoch) < 1:
            raise ValueError(f"CPASnapshot epoch must be >= 1 or 'stage_end', got {epoch!r}")
        self.epoch = epoch if epoch == "stage_end" else int(epoch)

    def _is_target(self, trainer: pl.Trainer, pl_module: EarlyConfusion) -> bool:
        # A later fit (stage 2, the baseline continued) counts epochs from 0 again and must not
        # overwrite the stage-1 snapshot its weights came with.
        if int(pl_module.early_cpa_epoch) > 0:
            return False
        target = trainer.max_epochs if self.epoch == "stage_end" else self.epoch
        return trainer.current_epoch + 1 == target

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: EarlyConfusion) -> None:
        # The confusion matrix costs an argmax and a bincount per step: only pay for it when needed.
        if self._is_target(trainer, pl_module):
            pl_module.measure_train_confusion(True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: EarlyConfusion) -> None:
        # The end-of-epoch validation precedes on_train_epoch_end and writes last.ckpt: take the
        # snapshot before it, or a run resumed from that checkpoint would have lost it.
        end_of_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.state.fn != "fit" or trainer.sanity_checking or not end_of_epoch:
            return
        self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: EarlyConfusion) -> None:
        if not self._is_target(trainer, pl_module):
            return
        confusion = pl_module.record_early_confusion(trainer.current_epoch + 1)
        recall = class_pixel_accuracy(confusion, "recall")
        precision = class_pixel_accuracy(confusion, "precision")
        log.info(
            "confusion matrix of epoch %d's training batches recorded for ARBS: %d classes in the "
            "ground truth, %d predicted; mean CPA %.4f (recall), %.4f (precision)",
            trainer.current_epoch + 1,
            int(torch.isfinite(recall).sum()),
            int(torch.isfinite(precision).sum()),
            float(torch.nanmean(recall)),
            float(torch.nanmean(precision)),
        )


class StageEnd(pl.Callback):
    """Writes the end-of-fit checkpoint and the last evaluation scores from inside the training
    processes.

    Spawn launchers (``ddp_spawn``) train and evaluate in child processes: the parent's module has
    neither the optimizer and loop state nor the scores afterwards, so what later stages need is
    written here, at the end of a fit and of every ``trainer.validate`` / ``trainer.test``.

    Args:
        scores_path: JSON file for ``{"val": <results.json entry>, "test": <entry, after a test>,
            "epoch": .., "global_step": ..}``.
        ckpt_path: full checkpoint to write at the end of fit (None: none).
    """

    def __init__(self, scores_path: str, ckpt_path: str | None = None) -> None:
        self.scores_path = scores_path
        self.ckpt_path = ckpt_path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ckpt_path is not None:
            trainer.save_checkpoint(self.ckpt_path)  # every rank calls; rank 0 writes
        self._write_scores(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.validate alone (train=false, or the final re-validation): during a fit the
        # scores are written once, at its end.
        if trainer.state.fn == "validate":
            self._write_scores(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_scores(trainer, pl_module)

    def _write_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        last = pl_module.last_scores if isinstance(pl_module, Scored) else {}

        def entry(split: str) -> dict | None:
            scores = last.get(split)
            return scores_to_json(scores, pl_module.class_names) if scores is not None else None

        payload = {
            "val": json_safe(entry("val")),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        if last.get("test") is not None:
            payload["test"] = json_safe(entry("test"))
        write_json(self.scores_path, payload)


class SlurmRequeue(pl.Callback):
    """Requeues a SLURM job on ``signal`` (SLURM's warning before the time limit or pre-emption).

    SLURM sends the signal ``--signal=USR1@<seconds>`` asks for; rank 0 then runs
    ``scontrol requeue <job id>``, SLURM stops every task and later starts the job again with the
    same id and command, and the requeued job resumes from the stage's ``last.ckpt``
    (:func:`experiments.launch.resume_if_requeued`): the state at the last epoch boundary, so the
    requeued run equals an uninterrupted one. Nothing is written at the signal, which leaves the
    seconds before the kill to SLURM. Sweeps submitted with ``hydra/launcher=rimlab_slurm`` are
    requeued by submitit on its own signal (USR2) the same way. Outside SLURM this does nothing.

    Args:
        signal: the signal's name, as in ``--signal`` (``SIGUSR1`` or ``USR1``).
        scontrol: the ``scontrol`` command.
    """

    def __init__(self, signal: str = "SIGUSR1", scontrol: str = "scontrol") -> None:
        name = signal.upper()
        self.signum = getattr(signal_module, name if name.startswith("SIG") else f"SIG{name}")
        self.scontrol = scontrol
        self._previous: Any = None
        self._trainer: pl.Trainer | None = None
        self.requeued: str | None = None

    @staticmethod
    def job_id() -> str | None:
        """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs)."""
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return os.environ.get("SLURM_JOB_ID")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.job_id() is None:
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer = trainer
        self._previous = signal_module.getsignal(self.signum)
        signal_module.signal(self.signum, self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._trainer is not None:
            signal_module.signal(
                self.signum,
                self._previous if self._previous is not None else signal_module.SIG_DFL,
            )
            self._trainer = None

    def _handle(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        if callable(self._previous):
            self._previous(signum, frame)
        if trainer is None or not trainer.is_global_zero or self.requeued:
            return  # SLURM stops every task of the job once rank 0 has requeued it
        job = self.job_id()
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        name = signal_module.Signals(signum).name
        try:
            done = subprocess.run(
                [self.scontrol, "requeue", str(job)], capture_output=True, text=True, timeout=60
            )
            ok, why = done.returncode == 0, (done.stderr or done.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            ok, why = False, str(err)
        if ok:
            self.requeued = str(job)
            log.warning(
                "%s received at epoch %d, step %d: requeued SLURM job %s. The requeued job "
                "resumes from %s (the last completed epoch); the epoch in progress is replayed.",
                name,
                trainer.current_epoch,
                trainer.global_step,
                job,
                last if last.is_file() else "the stage's start (no epoch completed yet)",
            )
        else:
            log.error(
                "%s received but `%s requeue %s` failed (%s): the job is not requeued. Resume it "
                "by hand with resume=true in the same run folder.",
                name,
                self.scontrol,
                job,
                why,
            )
