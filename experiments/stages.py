"""Shared stage-1 runs: the first ``stage1_epochs`` epochs of the baseline, trained once per config.

The RIM paper starts every stage-2 variant, and the baseline's last 30 epochs, from the baseline's
epoch-70 checkpoint. A sweep over samplers and losses therefore trains stage 1 once: its directory is
keyed by a hash of everything that influences stage 1 (data, model, module, main loss, optimizer,
schedule length, seed, trainer numerics), and later runs find it there. A stage 1 that was killed
resumes from its ``last.ckpt``; a file lock keeps parallel sweep jobs from training it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Stage 1 trains the whole network on the natural distribution with the main loss only.
STAGE1_OVERRIDES: dict[str, Any] = {
    "sampler": None,
    "loss.ilm": None,
    "module.freeze_encoder": False,
    "module.scheduler.start_epoch": 0,
}
# Keys that do not change what stage 1 computes.
_DATA_IGNORED = ("num_workers", "pin_memory", "persistent_workers", "eval_batch_size", "skip_bad")
_TRAINER_KEPT = (
    "precision",
    "devices",
    "num_nodes",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "deterministic",
    "limit_train_batches",
    "limit_val_batches",
    "check_val_every_n_epoch",
    "overfit_batches",
    "fast_dev_run",
    "max_steps",
    "sync_batchnorm",
)
# Module keys that change what stage 1 computes (speed switches and guards do not).
_MODULE_KEPT = ("num_classes", "ignore_index", "scheduler")


@dataclass
class Stage1:
    """A finished shared run (stage 1, or the baseline continued from it)."""

    directory: Path
    checkpoint: Path
    val: dict[str, Any] | None


def stage1_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of ``cfg`` that determines stage 1, with the stage-1 overrides applied."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in STAGE1_OVERRIDES.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    data = {
        k: v
        for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
        if k not in _DATA_IGNORED
    }
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {
        "data": data,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "module": {
            k: v
            for k, v in OmegaConf.to_container(cfg.module, resolve=True).items()
            if k in _MODULE_KEPT
        },
        # ARBS needs the CPA snapshot: a stage 1 trained without it cannot serve an ARBS stage 2.
        "cpa_snapshot": OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True).get(
            "cpa_snapshot"
        ),
        # ILM knobs only act in stage 2: variants that differ in them share stage 1.
        "loss": {
            k: v
            for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items()
            if k not in ("ilm", "ilm_weight", "ilm_region")
        },
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "seed": cfg.seed,
        "trainer": {k: trainer.get(k) for k in _TRAINER_KEPT},
        "schedule": {
            k: cfg.schedule.get(k) for k in ("total_epochs", "stage1_epochs", "cpa_epoch")
        },
    }


def stage1_key(cfg: DictConfig) -> str:
    """A short stable hash of :func:`stage1_config`."""
    blob = json.dumps(stage1_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _launcher_rank() -> int:
    """Global rank of this process as launched (0 for the process a user started).

    Under the ``ddp`` subprocess launcher, torchrun or SLURM every rank runs this driver; only rank
    0 takes the file lock, or the others would wait on it while rank 0 waits for them to join.
    """
    from lightning.fabric.utilities.rank_zero import _get_rank

    return int(_get_rank() or 0)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if _launcher_rank() != 0:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_shared(
    cfg: DictConfig, directory: Path, epochs: int, resume: str | None, final: Path, seed: int
) -> dict[str, Any] | None:
    """Fits the stage-1 model of ``cfg`` to ``epochs`` in ``directory``; returns its val scores.

    ``final`` (a full checkpoint) and ``directory/scores.json`` are written at the end of fit from
    inside the training processes, so spawn launchers work too.
    """
    from experiments.train import build_datamodule, build_module, build_trainer

    pl.seed_everything(seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, STAGE1_OVERRIDES)
    trainer = build_trainer(cfg, directory, max_epochs=epochs, final_checkpoint=final, seed=seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    trainer.strategy.barrier()
    scores = directory / "scores.json"
    return json.loads(scores.read_text()).get("val") if scores.exists() else None


def shared_stage1(cfg: DictConfig) -> Stage1:
    """Finds the finished stage 1 of ``cfg`` or trains (or resumes) it.

    Returns:
        The stage-1 run; ``checkpoint`` is a full Lightning checkpoint at the end of stage 1.
    """
    from experiments.train import write_results

    key = stage1_key(cfg)
    directory = Path(cfg.schedule.stage1_dir) / key
    done = directory / "done.json"
    final = directory / "checkpoints" / "stage1.ckpt"
    with _locked(directory.with_suffix(".lock")):
        if done.exists() and final.exists():
            log.info("reusing shared stage 1 %s", directory)
            return Stage1(directory, final, json.loads(done.read_text()).get("val"))
        epochs = int(cfg.schedule.stage1_epochs)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "stage1_config.yaml").write_text(
            OmegaConf.to_yaml(OmegaConf.create(stage1_config(cfg)))
        )
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else None
        log.info(
            "training shared stage 1 (%d epochs) in %s%s",
            epochs,
            directory,
            f", resuming {last}" if resume else "",
        )
        val = _train_shared(cfg, directory, epochs, resume, final, cfg.seed)
        if _launcher_rank() == 0:
            write_results(done, {"key": key, "epochs": epochs, "val": val})
        return Stage1(directory, final, val)


def shared_baseline(cfg: DictConfig, stage1: Stage1) -> Stage1:
    """The baseline continued from the end of stage 1 to ``total_epochs``, trained once per stage 1.

    Same model, loss and optimizer as stage 1, resumed with its full optimizer, scheduler and loop
    state: exactly the uninterrupted ``total_epochs`` baseline. Lives in ``<stage-1 dir>/baseline``.
    """
    from experiments.train import write_results

    directory = stage1.directory / "baseline"
    done = directory / "done.json"
    final = directory / "checkpoints" / "final.ckpt"
    with _locked(directory.with_suffix(".lock")):
        if done.exists():
            log.info("reusing the shared baseline %s", directory)
            return Stage1(directory, final, json.loads(done.read_text()).get("val"))
        total = int(cfg.schedule.total_epochs)
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else str(stage1.checkpoint)
        log.info("training the baseline to epoch %d in %s from %s", total, directory, resume)
        # Every epoch is seeded from (seed, epoch): the continuation is the uninterrupted baseline.
        val = _train_shared(cfg, directory, total, resume, final, cfg.seed)
        if _launcher_rank() == 0:
            write_results(done, {"epochs": total, "val": val})
        return Stage1(directory, final, val)
