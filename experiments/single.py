"""The plain parsing schedule (``schedule=single``): one run over ``total_epochs`` epochs.

When ``stage1_epochs`` is set, the first ``stage1_epochs`` epochs are a shared stage-1 run (see
:mod:`experiments.stages`) and this run continues from its checkpoint with the full optimizer and
loop state. :func:`check_parsing_config` is the config check of every parsing schedule (single and
rim).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import ConfigError
from experiments.build import build_datamodule, build_module, build_trainer, sampler_config
from experiments.checkpoints import (
    evaluated_checkpoint,
    refuse_weights_only_resume,
    resume_checkpoint,
)
from experiments.keys import CHOICES
from experiments.results import (
    PREDICTION_FORMATS,
    checkpoint_paths,
    eval_protocol,
    prediction_writer,
    scored,
)
from experiments.stages import shared_stage1
from lightning_modules.loggers import finish_wandb
from samplers.regional import check_eta

log = logging.getLogger(__name__)


def check_parsing_config(cfg: DictConfig) -> None:
    """Checks a parsing config for mistakes that would otherwise surface hours into a run.

    Raises:
        ConfigError: naming the offending key.
    """
    schedule = cfg.schedule
    total = int(schedule.total_epochs)
    fmt = cfg.get("prediction_format")
    if fmt is not None and fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"prediction_format={fmt}: use {' or '.join(PREDICTION_FORMATS)}")
    s1 = schedule.get("stage1_epochs")
    if s1 is not None and not 0 < int(s1) <= total:
        raise ConfigError(f"schedule.stage1_epochs={s1}: must be in 1..total_epochs ({total})")
    if schedule.name == "rim" and s1 is None:
        raise ConfigError("schedule=rim needs schedule.stage1_epochs (the length of stage 1)")
    data_classes = cfg.data.get("num_classes")
    model_classes = cfg.model.get("num_classes")
    if data_classes is not None and model_classes is not None and data_classes != model_classes:
        raise ConfigError(
            f"model.num_classes={model_classes} disagrees with data.num_classes={data_classes}"
        )
    names = cfg.data.get("class_names")
    if names is not None and data_classes is not None and len(names) != data_classes:
        raise ConfigError(
            f"data.class_names has {len(names)} names but data.num_classes={data_classes}"
        )
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    _check_sampler(cfg)


def _check_sampler(cfg: DictConfig) -> None:
    sampler = sampler_config(cfg)
    if sampler is None:
        return
    schedule = cfg.schedule
    s1 = schedule.get("stage1_epochs")
    source = sampler.get("source")
    if source not in ("arbs", "nrbs"):
        raise ConfigError(f"sampler.source={source!r}: expected 'arbs' or 'nrbs'")
    try:
        check_eta(sampler.get("eta", "min"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if source == "arbs" and schedule.name != "rim" and not cfg.get("init_from"):
        raise ConfigError(
            "sampler=arbs has no CPA source: ARBS draws its probabilities from the CPA of an "
            "early stage-1 epoch, so use it with schedule=rim (stage 2) or give init_from=<a "
            "stage-1 checkpoint>"
        )
    cpa_epoch = schedule.get("cpa_epoch", 0)
    if cpa_epoch == "stage_end":
        cpa_epoch = s1 if s1 is not None else schedule.total_epochs
    if source == "arbs" and s1 is not None and not 0 < int(cpa_epoch) <= int(s1):
        raise ConfigError(
            f"schedule.cpa_epoch={cpa_epoch} must lie within stage 1 (1..{s1}) for sampler=arbs"
        )


def _shares_stage1(cfg: DictConfig, ckpt_path: str | None) -> bool:
    """Whether this run starts from the shared stage 1: only when it trains exactly what stage 1
    trains, from scratch, and stage 1 is shorter than the run."""
    s1 = cfg.schedule.get("stage1_epochs")
    plain = sampler_config(cfg) is None and cfg.loss.get("ilm") is None
    return (
        ckpt_path is None
        and not cfg.get("init_from")
        and plain
        and s1 is not None
        and int(s1) < int(cfg.schedule.total_epochs)
    )


def run_single(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The plain schedule: one run of ``total_epochs`` epochs (optionally via a shared stage 1)."""
    total = int(cfg.schedule.total_epochs)
    ckpt_path = cfg.get("ckpt_path") or resume_checkpoint(cfg, out_dir)
    if cfg.train and cfg.get("ckpt_path"):
        refuse_weights_only_resume(str(cfg.ckpt_path))
    # train=false scores these weights: ckpt_path (loaded last) wins over init_from.
    evaluated = None if cfg.train else evaluated_checkpoint(cfg, ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    writer = None if cfg.train else prediction_writer(cfg, datamodule, out_dir)
    module = build_module(cfg, prediction_writer=writer, class_counts=datamodule.train_class_counts)
    if cfg.get("init_from"):
        module.load_init_weights(cfg.init_from)
    results: dict[str, Any] = {"task_name": cfg.task_name, "schedule": "single"}
    if evaluated is not None:
        results["evaluated"] = evaluated
    results["eval_protocol"] = eval_protocol(cfg)
    if cfg.train:
        if _shares_stage1(cfg, ckpt_path):
            stage1 = shared_stage1(cfg)
            ckpt_path = str(stage1.checkpoint)
            results["stage1"] = {"dir": str(stage1.directory), "val": stage1.val}
            # Epochs are seeded from (seed, epoch) (EpochSeed): the continuation equals an
            # uninterrupted run.
            pl.seed_everything(cfg.seed, workers=True)
        trainer = build_trainer(cfg, out_dir, max_epochs=total)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    else:
        trainer = build_trainer(cfg, out_dir, max_epochs=total)
        if ckpt_path:
            module.load_init_weights(ckpt_path)
    results["val"] = scored(
        trainer, module, datamodule, "val", "validation (final weights)", out_dir
    )
    if cfg.get("test"):
        if datamodule.has_test_labels:
            results["test"] = scored(
                trainer, module, datamodule, "test", "test (final weights)", out_dir
            )
        else:
            log.warning("test=true but the test split has no labels: nothing to score")
    if cfg.train:
        results["checkpoints"] = checkpoint_paths(trainer)
    finish_wandb(trainer.loggers, results["val"])
    return results
