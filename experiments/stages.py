"""Shared stage-1 runs: the first ``stage1_epochs`` epochs of the baseline, trained once per config.

The RIM paper starts every stage-2 variant, and the baseline's last 30 epochs, from the baseline's
epoch-70 checkpoint. A sweep over samplers and losses therefore trains stage 1 once: its directory is
keyed by a hash of everything that influences stage 1 (data, model, module, main loss, optimizer,
schedule length, seed, trainer numerics: :func:`experiments.keys.stage1_key`), and later runs find
it there. A stage 1 that was killed resumes from its ``last.ckpt``; a file lock keeps parallel sweep
jobs from training it twice, and every rank of one launch follows rank 0's decision
(:func:`experiments.ranks.coordinated`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from datamodules.files import atomic_write
from experiments.build import build_datamodule, build_module, build_trainer
from experiments.keys import stage1_config, stage1_key, stage1_overrides
from experiments.ranks import coordinated, launcher_rank
from experiments.results import eval_protocol, read_scores, write_results
from lightning_modules.loggers import finish_wandb

log = logging.getLogger(__name__)


@dataclass
class Stage1:
    """A finished shared run (stage 1, or the baseline continued from it)."""

    directory: Path
    checkpoint: Path
    val: dict[str, Any] | None


def _train_shared(
    cfg: DictConfig,
    directory: Path,
    epochs: int,
    resume: str | None,
    final: Path,
    seed: int,
    role: str,
) -> dict[str, Any] | None:
    """Fits the stage-1 model of ``cfg`` to ``epochs`` in ``directory``; returns its val scores.

    ``final`` (a full checkpoint) and ``directory/scores.json`` are written at the end of fit from
    inside the training processes, so spawn launchers work too. ``role`` ("stage1" or
    "baseline") is the fit's W&B job type; its W&B run ends here, before the job's next fit.
    """
    pl.seed_everything(seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, stage1_overrides(cfg))
    trainer = build_trainer(
        cfg, directory, max_epochs=epochs, final_checkpoint=final, seed=seed, role=role
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    trainer.strategy.barrier()
    val = read_scores(directory)
    finish_wandb(trainer.loggers, val)
    return val


def shared_stage1(cfg: DictConfig) -> Stage1:
    """Finds the finished stage 1 of ``cfg`` or trains (or resumes) it.

    Returns:
        The stage-1 run; ``checkpoint`` is a full Lightning checkpoint at the end of stage 1.
    """
    key = stage1_key(cfg)
    directory = Path(cfg.schedule.stage1_dir) / key
    done = directory / "done.json"
    final = directory / "checkpoints" / "stage1.ckpt"
    lock = directory.with_suffix(".lock")
    with coordinated(lock, lambda: done.exists() and final.exists()) as reuse:
        if reuse:
            log.info("reusing shared stage 1 %s", directory)
            return Stage1(directory, final, json.loads(done.read_text()).get("val"))
        epochs = int(cfg.schedule.stage1_epochs)
        directory.mkdir(parents=True, exist_ok=True)
        if launcher_rank() == 0:
            atomic_write(
                directory / "stage1_config.yaml",
                OmegaConf.to_yaml(OmegaConf.create(stage1_config(cfg))),
            )
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else None
        log.info(
            "training shared stage 1 (%d epochs) in %s%s",
            epochs,
            directory,
            f", resuming {last}" if resume else "",
        )
        val = _train_shared(cfg, directory, epochs, resume, final, cfg.seed, "stage1")
        if launcher_rank() == 0:
            write_results(done, {"key": key, "epochs": epochs, "val": val})
        return Stage1(directory, final, val)


def shared_baseline(cfg: DictConfig, stage1: Stage1) -> Stage1:
    """The baseline continued from the end of stage 1 to ``total_epochs``, trained once per stage 1.

    Same model, loss and optimizer as stage 1, resumed with its full optimizer, scheduler and loop
    state: exactly the uninterrupted ``total_epochs`` baseline. Lives in ``<stage-1 dir>/baseline``.
    """
    directory = stage1.directory / "baseline"
    done = directory / "done.json"
    final = directory / "checkpoints" / "final.ckpt"
    protocol = eval_protocol(cfg)
    with coordinated(directory.with_suffix(".lock"), done.exists) as reuse:
        if reuse:
            log.info("reusing the shared baseline %s", directory)
            record = json.loads(done.read_text())
            # The evaluation protocol is not part of the stage-1 key (it does not change training),
            # so a job scored under another protocol may have written these scores.
            if record.get("eval_protocol", protocol) != protocol:
                log.warning(
                    "the shared baseline %s was scored under another evaluation protocol (%s) than "
                    "this job's (%s): its scores are not comparable with this job's; rescore its "
                    "checkpoint %s with train=false ckpt_path=<it> under this protocol",
                    directory,
                    record.get("eval_protocol"),
                    protocol,
                    final,
                )
            return Stage1(directory, final, record.get("val"))
        total = int(cfg.schedule.total_epochs)
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else str(stage1.checkpoint)
        log.info("training the baseline to epoch %d in %s from %s", total, directory, resume)
        # Every epoch is seeded from (seed, epoch): the continuation is the uninterrupted baseline.
        val = _train_shared(cfg, directory, total, resume, final, cfg.seed, "baseline")
        if launcher_rank() == 0:
            write_results(done, {"epochs": total, "val": val, "eval_protocol": protocol})
        return Stage1(directory, final, val)
