"""Training driver: builds the parts from the Hydra config, runs the schedule, writes results.json.

``run.py`` calls :func:`run`. A schedule is a sequence of Lightning ``fit`` calls ("stages"):

- ``schedule=single``: one run over ``total_epochs`` epochs. When ``stage1_epochs`` is set, the first
  ``stage1_epochs`` epochs are a shared stage-1 run (see :mod:`experiments.stages`) and this run
  continues from its checkpoint with the full optimizer and loop state.
- ``schedule=rim``: stage 1 (shared) then stage 2 with the encoder frozen, the regional sampler and the
  configured loss (see :mod:`experiments.rim`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import ConfigError, require
from experiments.launch import batch_norm_sync, cluster_plugins, determinism
from experiments.stages import launcher_rank, shared_stage1
from lightning_modules import ParsingLitModule
from lightning_modules.callbacks import EpochSeed, Interruption, SlurmRequeue, StageEnd
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.loggers import finish_wandb
from lightning_modules.metrics import MPA_DEFINITIONS, format_scores_table, scores_to_json
from losses.modules import MAIN_NORMALIZERS, SIDE_TARGETS
from samplers.regional import CPA_READINGS, NRBS_COUNTS, check_eta

log = logging.getLogger(__name__)


# schedule.name -> "module:function" of the driver that runs it (schedule=single: run_single).
DRIVERS = {
    "rim": "experiments.rim:run_rim",
    "cascade": "experiments.pose:run_pose",  # DeepPose cascades (validate_cascade)
    "deepmac": "experiments.deepmac:run_deepmac",  # Deep-MAC mask heads (validate_deepmac)
}
# Schedules of tasks other than parsing, whose drivers validate their own configs.
OWN_VALIDATION = ("cascade", "deepmac")


# ---------------------------------------------------------------------- validation


#: What ``save_predictions`` PNGs hold (see :func:`enable_prediction_pngs`).
PREDICTION_FORMATS = ("class_ids", "dataset_ids")


def validate_config(cfg: DictConfig) -> None:
    """Checks the composed config for mistakes that would otherwise surface hours into a run.

    Raises:
        ConfigError: naming the offending key.
    """
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation to a missing key, a bad resolver, ...
        raise ConfigError(f"the config does not resolve: {err}") from err
    schedule = cfg.get("schedule") or {}
    name = schedule.get("name")
    if name != "single" and name not in DRIVERS:
        raise ConfigError(
            f"schedule.name={name!r}: expected one of {', '.join(['single', *DRIVERS])}"
        )
    total = int(schedule.get("total_epochs", 0))
    if total < 1:
        raise ConfigError(f"schedule.total_epochs={total}: must be >= 1")
    if name in OWN_VALIDATION:
        return  # no classes or sampler: the driver checks its own keys
    fmt = cfg.get("prediction_format")
    if fmt is not None and fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"prediction_format={fmt}: use {' or '.join(PREDICTION_FORMATS)}")
    s1 = schedule.get("stage1_epochs")
    if s1 is not None and not 0 < int(s1) <= total:
        raise ConfigError(f"schedule.stage1_epochs={s1}: must be in 1..total_epochs ({total})")
    if name == "rim" and s1 is None:
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
    _check_choices(cfg)
    sampler = sampler_config(cfg)
    if sampler is not None:
        source = sampler.get("source")
        if source not in ("arbs", "nrbs"):
            raise ConfigError(f"sampler.source={source!r}: expected 'arbs' or 'nrbs'")
        try:
            check_eta(sampler.get("eta", "min"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if source == "arbs" and name != "rim" and not cfg.get("init_from"):
            raise ConfigError(
                "sampler=arbs has no CPA source: ARBS draws its probabilities from the CPA of an "
                "early stage-1 epoch, so use it with schedule=rim (stage 2) or give init_from=<a "
                "stage-1 checkpoint>"
            )
        cpa_epoch = schedule.get("cpa_epoch", 0)
        if cpa_epoch == "stage_end":
            cpa_epoch = s1 if s1 is not None else total
        if source == "arbs" and s1 is not None and not 0 < int(cpa_epoch) <= int(s1):
            raise ConfigError(
                f"schedule.cpa_epoch={cpa_epoch} must lie within stage 1 (1..{s1}) for sampler=arbs"
            )


# key -> allowed values of the RIM switches (checked before anything is built)
_CHOICES = {
    "metrics.mpa": MPA_DEFINITIONS,
    "module.mpa": MPA_DEFINITIONS,
    "sampler.cpa": CPA_READINGS,
    "sampler.nrbs_count": NRBS_COUNTS,
    "loss.main_normalizer": MAIN_NORMALIZERS,
    "loss.side_target": SIDE_TARGETS,
}


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def sampler_config(cfg: DictConfig) -> DictConfig | None:
    """The sampler config, or None for ``sampler=none``."""
    sampler = cfg.get("sampler")
    if sampler is None or not sampler.get("_target_"):
        return None
    return sampler


# ---------------------------------------------------------------------- building


def build_module(
    cfg: DictConfig, stage_overrides: dict[str, Any] | None = None
) -> ParsingLitModule:
    """The LightningModule of ``cfg``; ``stage_overrides`` patch ``module``/``loss``/``sampler`` keys.

    Args:
        cfg: the run's config.
        stage_overrides: e.g. ``{"module.freeze_encoder": True, "sampler": None}``.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in (stage_overrides or {}).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    net = hydra.utils.instantiate(cfg.model)
    loss = hydra.utils.instantiate(cfg.loss)
    sampler_cfg = sampler_config(cfg)
    sampler = hydra.utils.instantiate(sampler_cfg) if sampler_cfg is not None else None
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    inference = hydra.utils.instantiate(cfg.eval) if cfg.get("eval") else None
    # _convert_="all": checkpoints then hold plain lists, loadable with torch.load(weights_only=True).
    module = hydra.utils.instantiate(
        cfg.module,
        net=net,
        loss=loss,
        sampler=sampler,
        optimizer=optimizer,
        _convert_="all",
    )
    # Set afterwards: passed through instantiate, Hydra would turn the dataclass into a dict.
    module.inference = inference
    # Saved in every checkpoint (ParsingLitModule.on_save_checkpoint): predict/export rebuild the net.
    module.build_config = checkpoint_build_config(cfg)
    return module


def checkpoint_build_config(cfg: DictConfig) -> dict[str, Any]:
    """Plain, resolved ``{"model": ..., "eval": ..., "data": {...}}`` to rebuild a net for inference.

    Only plain values (no partials), so the checkpoint still loads with ``weights_only=True``.
    """
    data_keys = (
        "num_classes",
        "class_names",
        "flip_pairs",
        "palette",
        "eval_size",
        "eval_keep_ratio",
        "crop_size",
        "base_size",
        "base_side",
    )
    data = {k: cfg.data.get(k) for k in data_keys if k in cfg.data}
    # eval_size null means "the crop size" for most datasets but "each image at its own size" for
    # those scored at full resolution (Cityscapes, NYUDv2): predict must know which.
    target = cfg.data.get("_target_")
    if target:
        cls = hydra.utils.get_class(str(target))
        data["full_resolution_eval"] = bool(getattr(cls, "full_resolution_eval", False))
        # predict's prediction_format=dataset_ids asks the datamodule class for its own ids
        data["datamodule"] = str(target)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None,
        "data": OmegaConf.to_container(OmegaConf.create(data), resolve=True),
    }


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The configured datamodule (config containers converted to plain Python values)."""
    return hydra.utils.instantiate(cfg.data, _convert_="all")


def build_callbacks(cfg: DictConfig, out_dir: Path) -> list[pl.Callback]:
    """The configured callbacks, with checkpoints written to ``out_dir/checkpoints``."""
    callbacks: list[pl.Callback] = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if not isinstance(cb_cfg, DictConfig) or "_target_" not in cb_cfg:
            continue
        if str(cb_cfg._target_).endswith("ModelCheckpoint"):
            cb_cfg = cb_cfg.copy()
            cb_cfg.dirpath = str(out_dir / "checkpoints")
        callbacks.append(hydra.utils.instantiate(cb_cfg))
    return callbacks


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

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
    from experiments.variants import describe

    variant = describe(cfg, role)
    loggers: list[Logger] = []
    for _, lg_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(lg_cfg, DictConfig) or "_target_" not in lg_cfg:
            continue
        lg_cfg = lg_cfg.copy()
        is_wandb = str(lg_cfg._target_).endswith("WandbLogger")
        if str(lg_cfg._target_).endswith("TensorBoardLogger"):
            require("tensorboard", "logger=tensorboard")
        with open_dict(lg_cfg):
            if "save_dir" in lg_cfg:
                sub = Path(str(lg_cfg.save_dir)).name
                lg_cfg.save_dir = str(
                    out_dir if sub == Path(str(cfg.paths.output_dir)).name else out_dir / sub
                )
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


# ---------------------------------------------------------------------- evaluation, results


def final_scores(
    trainer: pl.Trainer, module: ParsingLitModule, datamodule: pl.LightningDataModule, stage: str
) -> dict[str, Any] | None:
    """Scores of the final weights on ``stage`` ("val" or "test"), validating again if needed."""
    scores = module.last_scores.get(stage)
    if stage == "val" and scores is not None and scores["global_step"] == trainer.global_step:
        return scores
    if stage == "val":
        trainer.validate(module, datamodule=datamodule, verbose=False)
    else:
        trainer.test(module, datamodule=datamodule, verbose=False)
    return module.last_scores.get(stage)


def enable_prediction_pngs(
    cfg: DictConfig, module: ParsingLitModule, datamodule: pl.LightningDataModule, out_dir: Path
) -> None:
    """With ``save_predictions=true``, evaluation writes ``out_dir/predictions/<stage>/*.png``.

    ``prediction_format=class_ids`` (default) writes the training class ids with the data
    palette; ``dataset_ids`` writes the dataset's own ids where it has them (Cityscapes: labelIds,
    the format cityscapesscripts' evaluation reads).

    Raises:
        ConfigError: an unknown ``prediction_format``, or ``dataset_ids`` for a dataset without
            its own ids.
    """
    if not cfg.get("save_predictions"):
        return
    from datamodules.batch import save_label_png

    folder, palette = out_dir / "predictions", getattr(datamodule, "palette", None)
    fmt = str(cfg.get("prediction_format") or "class_ids")
    convert = None
    if fmt == "dataset_ids":
        convert = getattr(datamodule, "to_dataset_ids", None)
        if convert is None:
            raise ConfigError(
                f"prediction_format=dataset_ids: {type(datamodule).__name__} has no ids of its "
                "own beyond the class ids (use prediction_format=class_ids)"
            )
    elif fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"prediction_format={fmt}: use {' or '.join(PREDICTION_FORMATS)}")

    def write(stage: str, name: str, ids: Any) -> None:
        if convert is not None:
            ids, colours = convert(ids)
            save_label_png(folder / stage / f"{name}.png", ids, colours)
        else:
            save_label_png(folder / stage / f"{name}.png", ids, palette)

    module.prediction_writer = write
    log.info("writing predicted %s PNGs to %s", fmt.replace("_", " "), folder)


def checkpoint_paths(trainer: pl.Trainer) -> dict[str, str]:
    """``{"best": ..., "last": ...}`` of the trainer's checkpoint callbacks (empty when none)."""
    paths = {}
    for cb in trainer.checkpoint_callbacks:
        key = "last" if cb.monitor is None else "best"
        if cb.best_model_path:
            paths[key] = cb.best_model_path
    return paths


def resume_checkpoint(cfg: DictConfig, stage_dir: Path) -> str | None:
    """``stage_dir/checkpoints/last.ckpt`` when ``resume=true`` and it exists, else None."""
    if not cfg.get("resume"):
        return None
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    log.info("resume=true but %s does not exist yet: starting this stage afresh", last)
    return None


def trainer_device(cfg: DictConfig) -> torch.device:
    """The device ``cfg.trainer`` trains on, for the drivers' own evaluation passes."""
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda"):
        return torch.device("cuda")
    return torch.device("cpu")


def load_module_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Loads a checkpoint's ``state_dict`` (or a bare state dict) into ``module``, strictly.

    ``weights_only=True``: a checkpoint from elsewhere cannot run code.
    """
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    module.load_state_dict(state.get("state_dict", state))


def read_scores(stage_dir: Path, split: str = "val") -> dict[str, Any] | None:
    """The ``split`` entry that :class:`StageEnd` wrote in ``stage_dir`` at the end of a fit,
    validate or test (spawn launchers evaluate in child processes)."""
    path = stage_dir / "scores.json"
    return json.loads(path.read_text()).get(split) if path.exists() else None


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Writes ``results`` as JSON atomically (NaN becomes null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(results), indent=2))
    os.replace(tmp, path)


#: Data keys that decide the evaluation input's geometry (recorded with the protocol).
_EVAL_INPUT_KEYS = ("eval_size", "eval_keep_ratio", "base_size", "base_side", "eval_affine")


def eval_protocol(cfg: DictConfig) -> dict[str, Any] | None:
    """The resolved ``eval`` config (conf/eval/*.yaml: scales, flip, mode, ...) the scores were
    computed under, with the data keys that decide the input geometry under ``input`` (base-size
    fit, letterbox, SCHP's affine) and ``align_corners: true`` for a net that resizes its logits
    so; None when there is no ``eval`` (the plain forward pass)."""
    if not cfg.get("eval"):
        return None
    protocol = OmegaConf.to_container(cfg.eval, resolve=True)
    data = cfg.get("data") or {}
    protocol["input"] = {
        k: OmegaConf.to_container(data[k], resolve=True)
        if OmegaConf.is_config(data[k])
        else data[k]
        for k in _EVAL_INPUT_KEYS
        if k in data
    }
    # The net's resizes of its logits (model.align_corners, mmseg's 769x769 models); recorded
    # only when set, so records of the other nets stay comparable with earlier ones.
    if (cfg.get("model") or {}).get("align_corners"):
        protocol["align_corners"] = True
    return protocol


def evaluated_checkpoint(cfg: DictConfig, ckpt_path: str | None) -> dict[str, Any]:
    """The results.json record of the checkpoint a ``train=false`` run scores.

    ``{"checkpoint": path, "source": "ckpt_path" | "init_from" | "resume", "epoch": ...,
    "global_step": ...}``, epoch and global_step when the checkpoint holds them.

    Raises:
        ConfigError: neither ``ckpt_path`` nor ``init_from`` is given (the run would score an
            untrained network), or the file does not exist.
    """
    if ckpt_path:
        path, source = str(ckpt_path), "ckpt_path" if cfg.get("ckpt_path") else "resume"
    elif cfg.get("init_from"):
        path, source = str(cfg.init_from), "init_from"
    else:
        raise ConfigError(
            "train=false needs ckpt_path=<checkpoint to evaluate> (or init_from=<checkpoint>): "
            "without one it would score an untrained network"
        )
    if not Path(path).is_file():
        raise ConfigError(f"{source}={path}: no such checkpoint")
    record: dict[str, Any] = {"checkpoint": path, "source": source}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - only metadata: the weights are loaded (and checked) later
        log.debug("%s: epoch and step not read (%s)", path, e)
        ckpt = None
    if isinstance(ckpt, dict):
        for key in ("epoch", "global_step"):
            if isinstance(ckpt.get(key), int):
                record[key] = ckpt[key]
    return record


def refuse_weights_only_resume(path: str) -> None:
    """Training resumes from ``ckpt_path``: a published weights file (mmsegmentation, SCHP) has
    no training state to resume.

    Raises:
        ConfigError: ``path`` is such a file; the message gives ``init_from=`` instead.
    """
    from lightning_modules import mmseg_weights, official_weights

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - Lightning reports unreadable files itself
        return
    kind = None
    if mmseg_weights.mmseg_state_dict(ckpt) is not None:
        kind = "an mmsegmentation checkpoint"
    elif official_weights.official_state_dict(ckpt) is not None:
        kind = "an official SCHP checkpoint"
    if kind is not None:
        raise ConfigError(
            f"ckpt_path={path} is {kind}: weights only, no training state to resume. Fine-tune "
            f"from it with init_from={path}, or evaluate it with train=false ckpt_path={path}"
        )


def summarise(
    module: ParsingLitModule, scores: dict[str, Any] | None, title: str
) -> dict[str, Any] | None:
    """Prints the per-class table and returns the results.json entry of ``scores``."""
    if scores is None:
        return None
    print(f"\n{title}")
    print(format_scores_table(scores, module.class_names))
    return scores_to_json(scores, module.class_names)


# ---------------------------------------------------------------------- schedules


def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains and/or evaluates as configured; returns the results written to results.json."""
    validate_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)

    schedule = cfg.schedule
    try:
        if schedule.name in DRIVERS:
            module_name, _, function = DRIVERS[schedule.name].partition(":")
            results = getattr(importlib.import_module(module_name), function)(cfg, out_dir)
        else:
            results = run_single(cfg, out_dir)
    finally:
        # Multirun jobs share a process: each must close its own W&B run.
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
    # Under DDP every rank runs the driver; rank 0 alone writes (the ranks' temporary files would
    # race on the same name).
    if launcher_rank() == 0:
        write_results(out_dir / "results.json", results)
        log.info("results written to %s", out_dir / "results.json")
    return results


def run_single(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The plain schedule: one run of ``total_epochs`` epochs (optionally via a shared stage 1)."""
    schedule = cfg.schedule
    total = int(schedule.total_epochs)
    ckpt_path = cfg.get("ckpt_path") or resume_checkpoint(cfg, out_dir)
    if cfg.train and cfg.get("ckpt_path"):
        refuse_weights_only_resume(str(cfg.ckpt_path))
    # train=false scores these weights: ckpt_path (loaded last) wins over init_from.
    evaluated = None if cfg.train else evaluated_checkpoint(cfg, ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    if cfg.get("init_from"):
        module.load_init_weights(cfg.init_from)
    results: dict[str, Any] = {"task_name": cfg.task_name, "schedule": "single"}
    if evaluated is not None:
        results["evaluated"] = evaluated
    results["eval_protocol"] = eval_protocol(cfg)
    if cfg.train:
        s1 = schedule.get("stage1_epochs")
        # Stage 1 is shared only when this run trains exactly what stage 1 trains.
        plain = sampler_config(cfg) is None and cfg.loss.get("ilm") is None
        if (
            ckpt_path is None
            and not cfg.get("init_from")
            and plain
            and s1 is not None
            and int(s1) < total
        ):
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
        enable_prediction_pngs(cfg, module, datamodule, out_dir)
    results["val"] = summarise(
        module, final_scores(trainer, module, datamodule, "val"), "validation (final weights)"
    ) or read_scores(out_dir)
    if cfg.get("test"):
        if getattr(datamodule, "has_test_labels", False):
            results["test"] = summarise(
                module, final_scores(trainer, module, datamodule, "test"), "test (final weights)"
            ) or read_scores(out_dir, "test")
        else:
            log.warning("test=true but the test split has no labels: nothing to score")
    if cfg.train:
        results["checkpoints"] = checkpoint_paths(trainer)
    finish_wandb(trainer.loggers, results["val"])
    return results
