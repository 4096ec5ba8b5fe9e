"""The DeepPose cascade driver (``schedule=cascade``): trains stage after stage, evaluating the
whole cascade after each.

Stage 1 regresses all joints from the person crop. Stage s >= 2 refines every joint from a crop of
side ``sigma * diam`` around the stage s-1 estimate. Its training data follow the paper: the
estimate is simulated as ground truth plus a displacement drawn from the per-joint mean and
covariance of stage s-1's errors, which the driver measures by running the cascade so far on
(a subset of) the training persons. Each stage is its own Lightning fit in ``out_dir/stage<s>/``
(checkpoints, logs, ``final.ckpt``, ``errors.json``, ``overlays/``).

Config (``conf/cascade/deeppose.yaml``)::

    cascade.num_stages=3                 # how many stages
    cascade.sigma=1.0                    # crop side / diam for every refinement stage
    cascade.stages.2.epochs=10           # per-stage knobs: epochs, sigma, init_from
    +cascade.stages.2.optimizer.lr=1e-4  # any other key is merged into that stage's config

``run_pose`` returns the results entry (per-stage PCKh tables, ``val`` = the full cascade) that
:func:`experiments.train.run` writes to ``results.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from datamodules.mpii import find_annotation
from datamodules.pose_transforms import error_statistics
from experiments.train import (
    ConfigError,
    build_loggers,
    build_trainer,
    checkpoint_paths,
    load_module_weights,
    resume_checkpoint,
)
from lightning_modules.pose import PoseRegressionLitModule, draw_skeleton
from lightning_modules.pose_metrics import evaluate_official, evaluate_pose, format_pose_table

log = logging.getLogger(__name__)

#: Keys of ``cascade.stages.<s>`` that are not config overrides.
STAGE_KEYS = ("epochs", "sigma", "init_from")


# ---------------------------------------------------------------------- configuration


def validate_cascade(cfg: DictConfig) -> int:
    """Checks the cascade keys; returns the number of stages.

    Raises:
        ConfigError: naming the offending key.
    """
    casc = cfg.get("cascade")
    if casc is None:
        raise ConfigError("schedule=cascade needs a cascade config (e.g. cascade=deeppose)")
    n = int(casc.get("num_stages", 0))
    if n < 1:
        raise ConfigError(f"cascade.num_stages={n}: must be >= 1")
    if not float(casc.get("sigma", 0)) > 0:
        raise ConfigError(f"cascade.sigma={casc.get('sigma')}: must be > 0")
    if "input_size" not in cfg.model:
        raise ConfigError("the pose model config needs model.input_size (the crop side)")
    for s in range(1, n + 1):
        _, epochs, sigma, _ = stage_config(cfg, s)
        if epochs < 1:
            raise ConfigError(f"cascade.stages.{s}.epochs={epochs}: must be >= 1")
        if not sigma > 0:
            raise ConfigError(f"cascade.stages.{s}.sigma={sigma}: must be > 0")
    return n


def stage_config(cfg: DictConfig, stage: int) -> tuple[DictConfig, int, float, str | None]:
    """The config of cascade stage ``stage``: ``cfg`` with ``cascade.stages.<stage>`` merged in.

    Returns:
        ``(config, epochs, sigma, init_from)``; epochs default to ``schedule.total_epochs`` and
        sigma to ``cascade.sigma``.
    """
    stages = cfg.cascade.get("stages") or {}
    over = stages.get(str(stage)) or {}
    scfg = cfg.copy()
    with open_dict(scfg):
        for key, value in over.items():
            if key in STAGE_KEYS:
                continue
            OmegaConf.update(scfg, str(key), value, merge=True, force_add=True)
    epochs = over.get("epochs")
    epochs = int(cfg.schedule.total_epochs if epochs is None else epochs)
    sigma = over.get("sigma")
    sigma = float(cfg.cascade.sigma if sigma is None else sigma)
    with open_dict(scfg):
        # The learning-rate curve spans this stage's epochs.
        sched = scfg.get("module", {}).get("scheduler")
        if sched is not None and "total_epochs" in sched:
            scfg.module.scheduler.total_epochs = epochs
    return scfg, epochs, sigma, over.get("init_from")


def build_pose_module(cfg: DictConfig, stage: int) -> PoseRegressionLitModule:
    """The LightningModule of one stage (fresh parameters)."""
    net = hydra.utils.instantiate(cfg.model)
    loss = hydra.utils.instantiate(cfg.loss)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    return hydra.utils.instantiate(
        cfg.module, net=net, loss=loss, optimizer=optimizer, stage=stage, _convert_="all"
    )


# ---------------------------------------------------------------------- running the cascade


def _device(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda"):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def predict(
    module: PoseRegressionLitModule, loader: DataLoader, num: int, device: torch.device
) -> np.ndarray:
    """Image-pixel predictions of ``module`` on every item of ``loader``.

    Returns:
        (num, K, 2) float64, row = the item's ``index`` (NaN where no item came).
    """
    module = module.to(device).eval()
    out = np.full((num, module.num_joints, 2), np.nan)
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out[batch["index"].cpu().numpy()] = module.predict_image(batch).cpu().numpy()
    module.cpu()
    return out


def write_overlays(
    dataset: Any, pred: np.ndarray, folder: Path, count: int
) -> list[tuple[str, np.ndarray]]:
    """PNGs of the first ``count`` persons: ground truth in green, the cascade's estimate in red."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(min(count, len(dataset))):
        item = dataset.load(i)
        kp = item["keypoints"]
        img = draw_skeleton(item["image"], kp[:, :2], kp[:, 2], colour=(40, 220, 40), thickness=1)
        img = draw_skeleton(img, pred[i], None, colour=(255, 50, 50), thickness=1)
        name = f"{i:04d}_{Path(item['name']).stem}.png"
        Image.fromarray(img).save(folder / name)
        images.append((name, img))
    return images


def _wandb_loggers(loggers: list[Any]) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _log_to_wandb(loggers: list[Any], stage: int, scores: dict[str, Any], overlays: list) -> None:
    for lg in _wandb_loggers(loggers):
        import wandb

        flat = {f"cascade/{k}": v for k, v in scores.items() if isinstance(v, float)}
        flat["cascade/stage"] = stage
        flat["cascade/overlays"] = [wandb.Image(img, caption=name) for name, img in overlays]
        lg.experiment.log(flat)


def run_pose(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Trains and evaluates the cascade of ``cfg``; returns the results.json entry.

    Returns:
        ``{"task_name", "schedule": "cascade", "stages": {"stage1": {"val": scores, ...}, ...},
        "PCKh_per_stage": [...], "val": scores of the whole cascade}`` with scores as in
        :func:`lightning_modules.pose_metrics.pose_scores`.
    """
    num_stages = validate_cascade(cfg)
    casc = cfg.cascade
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    if not hasattr(datamodule, "configure_stage"):
        raise ConfigError(f"data={cfg.data._target_} is not a pose datamodule (configure_stage)")
    datamodule.prepare_data()
    val_set = datamodule.dataset("val")
    val = val_set.arrays()
    train_set = datamodule.dataset("train")
    train = train_set.arrays()
    # The training persons on which stage errors are measured (the paper uses the training set).
    limit = casc.get("error_persons")
    n_train = len(train_set)
    rng = np.random.default_rng(int(cfg.seed))
    err_idx = (
        np.sort(rng.choice(n_train, int(limit), replace=False))
        if limit is not None and int(limit) < n_train
        else np.arange(n_train)
    )
    box_side = 200.0 * train["scale"][err_idx] * datamodule.enlarge
    gt_val_mat = find_annotation(datamodule.root, ("mpii_gt_val.mat", "gt_valid.mat"))
    device = _device(cfg)

    results: dict[str, Any] = {
        "task_name": cfg.task_name,
        "schedule": "cascade",
        "num_stages": num_stages,
        "stages": {},
    }
    val_pred: np.ndarray | None = None
    train_pred: np.ndarray | None = None
    displacement: tuple[np.ndarray, np.ndarray] | None = None
    for s in range(1, num_stages + 1):
        scfg, epochs, sigma, init_from = stage_config(cfg, s)
        stage_dir = out_dir / f"stage{s}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        input_size = int(scfg.model.input_size)
        datamodule.batch_size = int(scfg.data.get("batch_size", datamodule.batch_size))
        datamodule.configure_stage(
            s, input_size=input_size, sigma=sigma, displacement=displacement, val_centers=val_pred
        )
        pl.seed_everything(int(cfg.seed) + s - 1, workers=True)
        module = build_pose_module(scfg, s)
        final = stage_dir / "final.ckpt"
        entry: dict[str, Any] = {"epochs": epochs, "input_size": input_size}
        if s >= 2:
            entry["sigma"] = sigma
        loggers = build_loggers(scfg, stage_dir, name_suffix=f"-stage{s}")
        if init_from:
            load_module_weights(module, init_from)
            entry["init_from"] = str(init_from)
        elif cfg.train and not (cfg.get("resume") and final.is_file()):
            trainer = build_trainer(
                scfg,
                stage_dir,
                max_epochs=epochs,
                loggers=loggers,
                final_checkpoint=final,
                seed=int(cfg.seed) + s - 1,
            )
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, stage_dir))
            # Spawn launchers train in child processes: the weights come back through final.ckpt.
            load_module_weights(module, final)
            entry["checkpoints"] = {**checkpoint_paths(trainer), "final": str(final)}
        elif final.is_file():
            log.info("stage %d: using the trained weights of %s", s, final)
            load_module_weights(module, final)
            entry["checkpoints"] = {"final": str(final)}
        else:
            raise ConfigError(
                f"stage {s} has no weights: train=false needs {final} or cascade.stages.{s}.init_from"
            )

        # The whole cascade so far on val: stage s refines the stage s-1 estimates.
        loader = datamodule.predict_loader(
            "val", centers=val_pred, input_size=input_size, sigma=sigma
        )
        val_pred = predict(module, loader, len(val_set), device)
        scores = evaluate_pose(
            val_pred, val["keypoints"][..., :2], val["keypoints"][..., 2], val["head_size"]
        )
        entry["val"] = scores
        if gt_val_mat is not None:
            entry["val_official_PCKh"] = evaluate_official(val_pred, gt_val_mat)["PCKh"]
        np.save(stage_dir / "val_predictions.npy", val_pred)
        print(format_pose_table(scores, f"\nMPII val, cascade of {s} stage(s) (PCKh@0.5 / PCP, %)"))
        overlays = write_overlays(
            val_set, val_pred, stage_dir / "overlays", int(casc.get("num_overlays", 4))
        )
        _log_to_wandb(loggers, s, scores, overlays)

        if s < num_stages:
            # Stage s's errors on training persons drive stage s+1's simulated inputs.
            loader = datamodule.predict_loader(
                "train", centers=train_pred, indices=err_idx, input_size=input_size, sigma=sigma
            )
            full = predict(module, loader, n_train, device)
            train_pred = full  # rows outside err_idx stay NaN and are never used as centres
            errors = (full[err_idx] - train["keypoints"][err_idx, :, :2]) / box_side[:, None, None]
            mean, cov, count = error_statistics(errors, train["keypoints"][err_idx, :, 2])
            displacement = (mean, cov)
            (stage_dir / "errors.json").write_text(
                json.dumps(
                    {
                        "unit": "person-box side (200 * scale * enlarge px)",
                        "persons": len(err_idx),
                        "mean": mean.tolist(),
                        "cov": cov.tolist(),
                        "count": count.tolist(),
                    }
                )
            )
            entry["train_error_rms"] = float(
                np.sqrt(np.nanmean((errors**2).sum(-1)[train["keypoints"][err_idx, :, 2] > 0]))
            )
        results["stages"][f"stage{s}"] = entry
        # One W&B run per stage (their steps restart), grouped by task_name.
        if (
            _wandb_loggers(loggers)
            and "wandb" in sys.modules
            and sys.modules["wandb"].run is not None
        ):
            sys.modules["wandb"].finish()
    results["PCKh_per_stage"] = [
        results["stages"][f"stage{s}"]["val"]["PCKh"] for s in range(1, num_stages + 1)
    ]
    results["val"] = results["stages"][f"stage{num_stages}"]["val"]
    return results
