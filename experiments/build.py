"""The parts of one fit, built from the Hydra config: module, datamodule, callbacks, loggers, trainer.

Every driver builds through these functions, in the order it seeds: building a net draws its
initial weights from the global generator, so a driver seeds (``pl.seed_everything``) and then
builds the datamodule and the module, always in that order.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import require
from experiments.keys import inference_config
from experiments.launch import batch_norm_sync, cluster_plugins, determinism
from experiments.variants import describe
from lightning_modules.callbacks import EpochSeed, Interruption, SlurmRequeue, StageEnd
from lightning_modules.checkpoint_io import AtomicCheckpointIO


def sampler_config(cfg: DictConfig) -> DictConfig | None:
    """The sampler config, or None for ``sampler=none``."""
    sampler = cfg.get("sampler")
    if sampler is None or not sampler.get("_target_"):
        return None
    return sampler


def with_overrides(cfg: DictConfig, overrides: dict[str, Any] | None) -> DictConfig:
    """A copy of ``cfg`` with dotted ``overrides`` set (keys created where missing)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in (overrides or {}).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def build_module(
    cfg: DictConfig,
    stage_overrides: dict[str, Any] | None = None,
    prediction_writer: Callable[[str, str, Any], None] | None = None,
    class_counts: Callable[[], tuple[Any, Any]] | None = None,
) -> pl.LightningModule:
    """The parsing LightningModule of ``cfg``; ``stage_overrides`` patch ``module``/``loss``/
    ``sampler`` keys.

    Args:
        cfg: the run's config.
        stage_overrides: e.g. ``{"module.freeze_encoder": True, "sampler": None}``.
        prediction_writer: receives every evaluated image's predicted ids (see
            :func:`experiments.results.prediction_writer`).
        class_counts: the training set's ``() -> (pixel counts, region counts)`` for the
            regional sampler (``datamodule.train_class_counts``); None without a sampler.
    """
    cfg = with_overrides(cfg, stage_overrides)
    net = hydra.utils.instantiate(cfg.model)
    loss = hydra.utils.instantiate(cfg.loss)
    sampler_cfg = sampler_config(cfg)
    sampler = hydra.utils.instantiate(sampler_cfg) if sampler_cfg is not None else None
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    inference = hydra.utils.instantiate(cfg.eval) if cfg.get("eval") else None
    # _convert_="all": checkpoints then hold plain lists, loadable with torch.load(weights_only=True).
    # The objects are passed to the partial, not through instantiate: Hydra would turn the
    # inference dataclass into a dict.
    factory = hydra.utils.instantiate(cfg.module, _partial_=True, _convert_="all")
    return factory(
        net=net,
        loss=loss,
        sampler=sampler,
        optimizer=optimizer,
        inference=inference,
        # Saved in every checkpoint: predict/export rebuild the net from it.
        build_config=inference_config(cfg),
        prediction_writer=prediction_writer,
        class_counts=class_counts,
    )


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The configured datamodule (config containers converted to plain Python values)."""
    return hydra.utils.instantiate(cfg.data, _convert_="all")


def build_callbacks(cfg: DictConfig, out_dir: Path) -> list[pl.Callback]:
    """The configured callbacks; those that write files (a ``dirpath``) write to
    ``out_dir/checkpoints``."""
    callbacks: list[pl.Callback] = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if not isinstance(cb_cfg, DictConfig) or "_target_" not in cb_cfg:
            continue
        if "dirpath" in cb_cfg:
            cb_cfg = cb_cfg.copy()
            cb_cfg.dirpath = str(out_dir / "checkpoints")
        callbacks.append(hydra.utils.instantiate(cb_cfg))
    return callbacks


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # no Hydra job (a library call)
        return []


def resume_command(cfg: DictConfig) -> str:
    """The command line that continues this run in its own folder (``resume=true``)."""
    keep = [
        shlex.quote(o) for o in job_overrides() if not o.startswith(("resume=", "hydra.run.dir="))
    ]
    return " ".join(
        [
            "python run.py",
            *keep,
            shlex.quote(f"hydra.run.dir={cfg.paths.output_dir}"),
            "resume=true",
        ]
    )


def _below(save_dir: str, output_dir: str, out_dir: Path) -> str:
    """``save_dir`` (configured below the run's ``paths.output_dir``) moved below ``out_dir``."""
    try:
        return str(out_dir / Path(save_dir).relative_to(output_dir))
    except ValueError:  # configured elsewhere: its last folder below out_dir
        return str(out_dir / Path(save_dir).name)


def build_loggers(
    cfg: DictConfig, out_dir: Path, name_suffix: str = "", role: str = "train"
) -> list[Logger]:
    """The configured loggers of one fit, writing below ``out_dir``.

    Each fit gets its own W&B run: named ``<variant> seed=<seed><name_suffix>`` (the variant as
    :func:`experiments.variants.describe` reads it from the config, after the configured
    ``logger.wandb.name`` if one is set), grouped by the configured group (the task name), typed by
    ``role`` (``job_type`` stage1, baseline, stage2, or the configured one for ``train``), with the
    variant's switches as config columns and the whole resolved config under ``cfg``. The caller
    ends the run after the fit's own evaluation (:func:`lightning_modules.loggers.finish_wandb`):
    Lightning's WandbLogger would otherwise log the next fit into it.

    Args:
        role: which fit of the job (:data:`experiments.variants.ROLES`).
    """
    variant = describe(cfg, role)
    loggers: list[Logger] = []
    for lg_cfg in (cfg.get("logger") or {}).values():
        if not isinstance(lg_cfg, DictConfig) or "_target_" not in lg_cfg:
            continue
        lg_cfg = lg_cfg.copy()
        cls = hydra.utils.get_class(str(lg_cfg._target_))
        is_wandb = issubclass(cls, WandbLogger)
        if issubclass(cls, TensorBoardLogger):
            require("tensorboard", "logger=tensorboard")
        with open_dict(lg_cfg):
            if "save_dir" in lg_cfg:
                lg_cfg.save_dir = _below(str(lg_cfg.save_dir), str(cfg.paths.output_dir), out_dir)
            if is_wandb:
                name = f"{variant.name()} seed={variant.seed}"
                lg_cfg.name = f"{lg_cfg.name}: {name}" if lg_cfg.get("name") else name
                if role != "train":
                    lg_cfg.job_type = role
            if name_suffix and lg_cfg.get("name"):
                lg_cfg.name = f"{lg_cfg.name}{name_suffix}"
        logger = hydra.utils.instantiate(lg_cfg)
        if is_wandb:
            logger.log_hyperparams(
                {**variant.columns(), "cfg": OmegaConf.to_container(cfg, resolve=True)}
            )
        loggers.append(logger)
    return loggers


def build_trainer(
    cfg: DictConfig,
    out_dir: Path,
    max_epochs: int,
    loggers: list[Logger] | None = None,
    final_checkpoint: Path | None = None,
    seed: int | None = None,
    role: str = "train",
) -> pl.Trainer:
    """A Trainer for one stage: configured trainer keys, this stage's epochs and output folder.

    ``role`` (stage1, baseline, stage2, train) types the fit's own W&B run (:func:`build_loggers`).

    Every training epoch is seeded from ``(seed, epoch, rank)`` (default seed: ``cfg.seed``; see
    :class:`~lightning_modules.callbacks.EpochSeed`), which makes resumes exact.

    Every stage writes ``out_dir/scores.json`` (and ``final_checkpoint`` if given) at the end of
    fit from inside the training processes (see :class:`~lightning_modules.callbacks.StageEnd`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_end = StageEnd(
        str(out_dir / "scores.json"), str(final_checkpoint) if final_checkpoint else None
    )
    return hydra.utils.instantiate(
        cfg.trainer,
        # deterministic=true runs as Lightning's "warn" (experiments.launch.determinism)
        **determinism(cfg.trainer),
        **batch_norm_sync(cfg.trainer, cfg.data.batch_size),
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(out_dir),
        max_epochs=max_epochs,
        callbacks=[
            *build_callbacks(cfg, out_dir),
            EpochSeed(cfg.seed if seed is None else seed),
            Interruption(str(out_dir), resume_command(cfg)),
            SlurmRequeue(str(cfg.get("requeue_signal") or "SIGUSR1")),
            stage_end,
        ],
        logger=loggers if loggers is not None else build_loggers(cfg, out_dir, role=role),
    )


def trainer_device(cfg: DictConfig) -> torch.device:
    """The device ``cfg.trainer`` trains on, for the drivers' own evaluation passes."""
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda"):
        return torch.device("cuda")
    return torch.device("cpu")
