"""The RIM two-stage schedule (Li & Han 2023).

Stage 1: the first ``stage1_epochs`` epochs of the ``total_epochs`` baseline (shared between runs, see
:mod:`experiments.stages`). Stage 2: the remaining epochs from the stage-1 weights with the encoder
frozen (BatchNorm in eval), the regional sampler on the main loss, the configured loss (ILM with
``loss=ce_ilm``), no auxiliary FCN head, and the learning rate continuing the same cosine curve.
Side outputs on the decoder (DANet's ``pam``/``cam``) keep their ``loss.side_weight``, as in the
baseline.
With ``schedule.baseline=true`` the baseline's remaining epochs are trained from the same checkpoint
too (once per stage 1, shared like it), and the run ends with a comparison table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from datamodules.errors import ConfigError
from experiments.build import build_datamodule, build_module, build_trainer
from experiments.checkpoints import evaluated_checkpoint, resume_checkpoint
from experiments.keys import stage1_key
from experiments.results import checkpoint_paths, eval_protocol, prediction_writer, scored
from experiments.stages import Stage1, shared_baseline, shared_stage1
from lightning_modules.loggers import finish_wandb

log = logging.getLogger(__name__)


def stage2_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Config patches that turn the run's config into RIM's stage 2."""
    schedule = cfg.schedule
    s1, total = int(schedule.stage1_epochs), int(schedule.total_epochs)
    restart = bool(schedule.get("lr_restart", False))
    return {
        "module.freeze_encoder": True,
        # Continue the baseline's cosine curve at epoch s1 (or restart it over stage 2).
        "module.scheduler.total_epochs": total - s1 if restart else total,
        "module.scheduler.start_epoch": 0 if restart else s1,
        # The auxiliary head sits on the frozen encoder: it has nothing left to teach. (The side
        # outputs, DANet's pam/cam, sit on the decoder: loss.side_weight stays as in the baseline.)
        "loss.aux_weight": 0.0,
    }


def _stage1_for_stage2(cfg: DictConfig) -> tuple[Path, Stage1 | None]:
    init_from = cfg.get("init_from")
    if init_from:
        if not Path(init_from).is_file():
            raise ConfigError(f"init_from={init_from}: no such checkpoint")
        return Path(init_from), None
    if cfg.schedule.get("stage") == 2:
        done = Path(cfg.schedule.stage1_dir) / stage1_key(cfg) / "checkpoints" / "stage1.ckpt"
        if not done.is_file():
            raise ConfigError(
                "schedule.stage=2 needs init_from=<stage-1 checkpoint> or a finished shared stage 1 "
                f"of this config (looked for {done})"
            )
        return done, None
    stage1 = shared_stage1(cfg)
    return stage1.checkpoint, stage1


def run_rim(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Runs the configured stages; returns the results.json content."""
    schedule = cfg.schedule
    results: dict[str, Any] = {"task_name": cfg.task_name, "schedule": "rim"}
    if schedule.get("stage") == 1:
        stage1 = shared_stage1(cfg)
        results["stage1"] = {"dir": str(stage1.directory), "checkpoint": str(stage1.checkpoint)}
        results["val"] = stage1.val
        return results
    if not cfg.train:
        return evaluate_stage2(cfg, out_dir, results)

    init, stage1 = _stage1_for_stage2(cfg)
    results["stage1"] = {"checkpoint": str(init)}
    if stage1 is not None:
        results["stage1"].update(dir=str(stage1.directory), val=stage1.val)

    if schedule.get("baseline") and stage1 is not None and cfg.train:
        baseline = shared_baseline(cfg, stage1)
        results["baseline"] = {"dir": str(baseline.directory), "val": baseline.val}

    stage2_seed = cfg.seed + int(schedule.stage1_epochs)
    pl.seed_everything(stage2_seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, stage2_overrides(cfg), class_counts=datamodule.train_class_counts)
    module.load_init_weights(str(init))
    stage_dir = out_dir / "stage2"
    trainer = build_trainer(
        cfg,
        stage_dir,
        max_epochs=int(schedule.total_epochs) - int(schedule.stage1_epochs),
        seed=stage2_seed,
        role="stage2",
    )
    ckpt_path = cfg.get("ckpt_path") or resume_checkpoint(cfg, stage_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results["val"] = scored(
        trainer, module, datamodule, "val", "RIM stage 2 (final weights)", stage_dir
    )
    if cfg.get("test"):
        if datamodule.has_test_labels:
            results["test"] = scored(trainer, module, datamodule, "test", "RIM stage 2 on test")
        else:
            log.warning("test=true but the test split has no labels: nothing to score")
    results.update(stage2_statistics(module, datamodule, results["stage1"]))
    results["checkpoints"] = checkpoint_paths(trainer)
    # Stage 2's own W&B run ends with its evaluation (stage 1 and the baseline ended theirs).
    finish_wandb(trainer.loggers, results["val"])
    print_comparison(results)
    return results


def evaluate_stage2(cfg: DictConfig, out_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """``train=false``: scores the given stage-2 (or any rimlab) checkpoint, trains nothing."""
    evaluated = evaluated_checkpoint(cfg, cfg.get("ckpt_path"))
    ckpt = evaluated["checkpoint"]
    datamodule = build_datamodule(cfg)
    writer = prediction_writer(cfg, datamodule, out_dir)
    module = build_module(cfg, stage2_overrides(cfg), prediction_writer=writer)
    module.load_init_weights(str(ckpt))
    trainer = build_trainer(cfg, out_dir / "eval", max_epochs=1)
    results["checkpoint"] = str(ckpt)
    results["evaluated"] = evaluated
    results["eval_protocol"] = eval_protocol(cfg)
    results["val"] = scored(trainer, module, datamodule, "val", f"evaluation of {ckpt}")
    if cfg.get("test") and datamodule.has_test_labels:
        results["test"] = scored(trainer, module, datamodule, "test", f"test evaluation of {ckpt}")
    return results


def stage2_statistics(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, stage1: dict[str, Any]
) -> dict[str, Any]:
    """The results.json entries that say what stage 2 sampled from: the sampler's report, the
    stage-1 confusion matrix it read (into ``stage1``), the class pixel and region counts."""
    out: dict[str, Any] = {}
    sampling = module.sampling_report()
    if sampling is not None:
        out["sampling"] = sampling
    names = module.class_names
    stage1["early_cpa_epoch"] = int(module.early_cpa_epoch)
    # The matrix itself: both CPA readings (and any later one) can be derived from it.
    stage1["early_confusion"] = module.early_confusion.cpu().tolist()
    counts, regions = datamodule.train_class_counts()
    out["class_pixel_counts"] = dict(zip(names, (int(c) for c in counts), strict=True))
    out["class_region_counts"] = dict(zip(names, (int(c) for c in regions), strict=True))
    return out


def print_comparison(results: dict[str, Any]) -> None:
    """The headline metrics of stage 1, the baseline and RIM side by side on the terminal."""
    rows = [
        ("stage 1 (end)", (results.get("stage1") or {}).get("val")),
        ("baseline", (results.get("baseline") or {}).get("val")),
        ("RIM", results.get("val")),
    ]
    # Both readings of the paper's MPA, each named: mRecall (= mAcc) and mPrecision.
    columns = {
        "PA": "PA",
        "MPA (mean recall)": "mRecall",
        "MPA (mean precision)": "mPrecision",
        "mIoU": "mIoU",
    }
    table = Table(title="baseline vs RIM (validation, %)")
    table.add_column("variant", justify="left")
    for col in columns:
        table.add_column(col, justify="right")
    for name, val in rows:
        if not val:
            continue
        table.add_row(
            name,
            *(f"{val[k]:.2f}" if val.get(k) is not None else "-" for k in columns.values()),
        )
    Console().print(table)
