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
    +cascade.stages.2.data.rotate=0      # data keys: experiments.keys.STAGE_DATA_KEYS only

Every stage records the hash of its config (:func:`stage_record`) in ``stage<s>/stage.json``
before it trains, and ``errors.json`` the hash of the errors it holds. ``resume=true`` reuses a
finished stage (``final.ckpt``) and its ``errors.json`` only when the hashes match the current
config; a finished or interrupted stage trained with another config stops the run with a
ConfigError (nothing is retrained or overwritten behind the user's back).

Under a DDP launcher every rank runs this driver (Lightning's ``ddp`` re-executes the script,
torchrun starts them all). Every rank enters every stage's ``fit``; only launcher rank 0 runs the
cascade between stages and writes files (predictions, overlays, ``errors.json``, W&B). It then
publishes the stage's outcome (scores, error statistics) in ``stage<s>/handoff.json`` with an id
of the launch, and the other ranks wait for that file and read the val estimates and error
statistics from it: every rank builds the next stage's data from the same numbers.

``run_pose`` returns the results entry (per-stage PCKh tables, ``val`` = the full cascade) that
``run.py`` writes to ``results.json``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.errors import ConfigError
from datamodules.files import atomic_path, write_json
from datamodules.mpii import find_annotation
from datamodules.pose_transforms import error_statistics
from experiments.build import build_datamodule, build_loggers, build_trainer, trainer_device
from experiments.checkpoints import load_module_weights, resume_checkpoint
from experiments.keys import CASCADE_STAGE_KNOBS, STAGE_DATA_KEYS, cascade_config, config_hash
from experiments.ranks import await_handoff, launch_id, launcher_rank, publish_handoff, read_json
from experiments.results import checkpoint_paths
from lightning_modules.pose import PoseRegressionLitModule, draw_skeleton
from lightning_modules.pose_metrics import evaluate_official, evaluate_pose, format_pose_table

log = logging.getLogger(__name__)


@runtime_checkable
class PoseDataModule(Protocol):
    """What the cascade asks of its datamodule (:class:`datamodules.mpii.MPIIDataModule`)."""

    root: Path
    enlarge: float

    def prepare_data(self) -> None: ...

    def dataset(self, split: str) -> Any: ...

    def set_stage_options(self, **options: Any) -> None: ...

    def configure_stage(self, stage: int, **kwargs: Any) -> None: ...

    def predict_loader(self, split: str, **kwargs: Any) -> DataLoader: ...


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` atomically: a rank never loads half an array."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


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
        _check_data_overrides(cfg, s)
        _, epochs, sigma, _ = stage_config(cfg, s)
        if epochs < 1:
            raise ConfigError(f"cascade.stages.{s}.epochs={epochs}: must be >= 1")
        if not sigma > 0:
            raise ConfigError(f"cascade.stages.{s}.sigma={sigma}: must be > 0")
    return n


def _check_data_overrides(cfg: DictConfig, stage: int) -> None:
    """Rejects ``cascade.stages.<stage>.data.<key>`` for keys outside :data:`STAGE_DATA_KEYS`."""
    over = (cfg.cascade.get("stages") or {}).get(str(stage)) or {}

    def leaves(prefix: str, value: Any) -> list[str]:
        if isinstance(value, DictConfig) and len(value):
            return [k for sub, v in value.items() for k in leaves(f"{prefix}.{sub}", v)]
        return [prefix]

    keys: list[str] = []
    for key, value in over.items():
        key = str(key)
        if key == "data" and not isinstance(value, DictConfig):
            raise ConfigError(f"cascade.stages.{stage}.data: give single keys (data.<key>)")
        if key == "data" or key.startswith("data."):
            keys += [k[len("data.") :] for k in leaves(key, value)]
    for key in keys:
        if key.split(".")[0] not in STAGE_DATA_KEYS:
            raise ConfigError(
                f"cascade.stages.{stage}.data.{key}: a stage may override only data."
                f"{{{', '.join(STAGE_DATA_KEYS)}}}; data.{key} is shared by every stage of the "
                f"cascade (set it as data.{key})"
            )


def stage_data_options(scfg: DictConfig) -> dict[str, Any]:
    """The :data:`STAGE_DATA_KEYS` values of a stage config (``cfg.data`` with its overrides)."""
    return {k: scfg.data[k] for k in STAGE_DATA_KEYS if k in scfg.data}


def stage_record(
    scfg: DictConfig,
    stage: int,
    epochs: int,
    sigma: float,
    init_from: str | None,
    previous: str | None,
    start_from: str | None = None,
) -> dict[str, Any]:
    """What determines the weights of stage ``stage``: its resolved config without the keys that
    only name run directories or reporting, its cascade knobs, the hash of the error statistics it
    was trained on (``previous``; None for stage 1) and, for ``init_from``, the checkpoint's
    content (:func:`file_digest`): a file replaced at the same path makes a new hash, so errors
    measured with the old weights are not reused."""
    record = cascade_config(scfg)
    record["stage"] = {
        "stage": stage,
        "epochs": epochs,
        "sigma": sigma if stage >= 2 else None,
        "init_from": init_from,
        "previous_errors": previous,
    }
    if init_from:
        # Only with init_from: stages without one keep the hash they had before this key existed.
        record["stage"]["init_weights"] = file_digest(Path(init_from), f"cascade.stages.{stage}")
    if start_from:
        # The weights stage 1 trains from (top-level init_from=): part of what it becomes.
        record["stage"]["start_weights"] = file_digest(Path(start_from))
    return record


def file_digest(path: Path, key: str = "") -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks: checkpoints can be large).

    Raises:
        ConfigError: no such file; the message names ``<key>.init_from``.
    """
    if not path.is_file():
        raise ConfigError(f"{key + '.' if key else ''}init_from={path}: no such checkpoint")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_stage_record(stage_dir: Path, stage: int, digest: str, what: Path) -> None:
    """Resuming ``what`` (final.ckpt or last.ckpt) needs ``stage.json`` of the same config.

    Raises:
        ConfigError: naming the stage, both hashes and what to do.
    """
    saved = read_json(stage_dir / "stage.json")
    if saved is not None and saved.get("hash") == digest:
        return
    why = (
        f"has no readable {stage_dir / 'stage.json'}, so its config is unknown"
        if saved is None
        else f"was made with another config (hash {saved.get('hash')}, this run {digest}; "
        f"the old one is in {stage_dir / 'stage.json'})"
    )
    raise ConfigError(
        f"resume=true: stage {stage}'s {what.name} {why}. Resume with the config it was trained "
        f"with, or choose a new run directory (or delete {stage_dir}) to train the stage again"
    )


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
            if key in CASCADE_STAGE_KNOBS:
                continue
            OmegaConf.update(scfg, str(key), value, merge=True, force_add=True)
    epochs = over.get("epochs")
    epochs = int(cfg.schedule.total_epochs if epochs is None else epochs)
    sigma = over.get("sigma")
    sigma = float(cfg.cascade.sigma if sigma is None else sigma)
    span_schedule(scfg, epochs)
    return scfg, epochs, sigma, over.get("init_from")


def span_schedule(scfg: DictConfig, epochs: int) -> None:
    """Makes the learning-rate curve of ``scfg`` span ``epochs`` epochs (in place)."""
    with open_dict(scfg):
        sched = scfg.get("module", {}).get("scheduler")
        if sched is not None and "total_epochs" in sched:
            scfg.module.scheduler.total_epochs = epochs


def stage1_weights(
    cfg: DictConfig, stage: int, init_from: str | None
) -> tuple[str | None, str | None]:
    """``(init_from, start_from)`` of a stage: the weights used instead of training, and those
    stage 1 trains from.

    The top-level keys act on stage 1 as on a single run: ``train=false ckpt_path=X`` (or
    ``init_from=X``) evaluates X as stage 1; ``init_from=X`` with training starts stage 1 from X
    (a rimlab checkpoint, or mmpose's DeepPose weights). ``cascade.stages.1.init_from`` wins.
    """
    if stage != 1 or init_from:
        return init_from, None
    key = "ckpt_path" if cfg.get("ckpt_path") and not cfg.train else "init_from"
    given = cfg.get(key)
    if given and not Path(str(given)).is_file():
        raise ConfigError(f"{key}={given}: no such checkpoint")
    if not cfg.train:
        return (str(given) if given else None), None
    return None, (str(given) if given else None)


def build_pose_module(cfg: DictConfig, stage: int) -> PoseRegressionLitModule:
    """The LightningModule of one stage (fresh parameters)."""
    net = hydra.utils.instantiate(cfg.model)
    loss = hydra.utils.instantiate(cfg.loss)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    return hydra.utils.instantiate(
        cfg.module, net=net, loss=loss, optimizer=optimizer, stage=stage, _convert_="all"
    )


# ---------------------------------------------------------------------- running the cascade


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
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(min(count, len(dataset))):
        item = dataset.load(i)
        kp = item["keypoints"]
        img = draw_skeleton(item["image"], kp[:, :2], kp[:, 2], colour=(40, 220, 40), thickness=1)
        img = draw_skeleton(img, pred[i], None, colour=(255, 50, 50), thickness=1)
        name = f"{i:04d}_{Path(item['name']).stem}.png"
        with atomic_path(folder / name) as tmp:
            Image.fromarray(img).save(tmp)
        images.append((name, img))
    return images


def _wandb_loggers(loggers: list[Any]) -> list[Any]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _log_to_wandb(loggers: list[Any], stage: int, scores: dict[str, Any], overlays: list) -> None:
    for lg in _wandb_loggers(loggers):
        import wandb

        flat = {f"cascade/{k}": v for k, v in scores.items() if isinstance(v, float)}
        flat["cascade/stage"] = stage
        flat["cascade/overlays"] = [wandb.Image(img, caption=name) for name, img in overlays]
        lg.experiment.log(flat)


@dataclass
class CascadeData:
    """What every stage of one cascade reads: the datamodule, the val and training persons and the
    training persons on which stage errors are measured."""

    datamodule: PoseDataModule
    val_set: Any
    val: dict[str, np.ndarray]
    train: dict[str, np.ndarray]
    #: indices of the training persons whose errors drive the next stage (sorted)
    err_idx: np.ndarray
    #: (len(err_idx),) person-box sides in pixels, the unit of the error statistics
    box_side: np.ndarray
    #: the official val annotations (``mpii_gt_val.mat``) and the val persons' rows in it, or None
    gt_val_mat: Any
    val_rows: list[int]
    #: training persons on which errors are measured (``cascade.error_persons``), None: all
    error_persons: int | None


@dataclass
class Estimates:
    """What stage s hands to stage s+1: the cascade's estimates so far and the error statistics."""

    val_pred: np.ndarray | None = None
    train_pred: np.ndarray | None = None
    displacement: tuple[np.ndarray, np.ndarray] | None = None
    errors_hash: str | None = None


def cascade_data(cfg: DictConfig) -> CascadeData:
    """Builds and reads the pose datamodule of ``cfg`` (call after seeding)."""
    datamodule = build_datamodule(cfg)
    if not isinstance(datamodule, PoseDataModule):
        raise ConfigError(f"data={cfg.data._target_} is not a pose datamodule (configure_stage)")
    datamodule.prepare_data()
    val_set = datamodule.dataset("val")
    train_set = datamodule.dataset("train")
    train = train_set.arrays()
    # The training persons on which stage errors are measured (the paper uses the training set).
    limit = cfg.cascade.get("error_persons")
    n_train = len(train_set)
    rng = np.random.default_rng(int(cfg.seed))
    err_idx = (
        np.sort(rng.choice(n_train, int(limit), replace=False))
        if limit is not None and int(limit) < n_train
        else np.arange(n_train)
    )
    return CascadeData(
        datamodule=datamodule,
        val_set=val_set,
        val=val_set.arrays(),
        train=train,
        err_idx=err_idx,
        box_side=200.0 * train["scale"][err_idx] * datamodule.enlarge,
        gt_val_mat=find_annotation(datamodule.root, ("mpii_gt_val.mat", "gt_valid.mat")),
        # The gt-mat rows of the val persons (persons without a usable box were skipped).
        val_rows=[int(r.get("source_index", i)) for i, r in enumerate(val_set.records)],
        error_persons=limit,
    )


def run_pose(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Trains and evaluates the cascade of ``cfg``; returns the results.json entry.

    Returns:
        ``{"task_name", "schedule": "cascade", "stages": {"stage1": {"val": scores, ...}, ...},
        "PCKh_per_stage": [...], "val": scores of the whole cascade}`` with scores as in
        :func:`lightning_modules.pose_metrics.pose_scores` (the same on every rank).
    """
    num_stages = validate_cascade(cfg)
    rank = launcher_rank()
    launch = launch_id(rank)
    pl.seed_everything(cfg.seed, workers=True)
    data = cascade_data(cfg)
    device = trainer_device(cfg)
    results: dict[str, Any] = {
        "task_name": cfg.task_name,
        "schedule": "cascade",
        "num_stages": num_stages,
        "stages": {},
    }
    state = Estimates()
    for s in range(1, num_stages + 1):
        stage = run_stage(cfg, out_dir, s, num_stages, data, state, device, rank, launch)
        results["stages"][f"stage{s}"] = stage
    results["PCKh_per_stage"] = [
        results["stages"][f"stage{s}"]["val"]["PCKh"] for s in range(1, num_stages + 1)
    ]
    results["val"] = results["stages"][f"stage{num_stages}"]["val"]
    if cfg.cascade.get("control"):
        control = run_control(cfg, out_dir, data.datamodule, num_stages, device, rank)
        if control is not None:
            results["control"] = control
            results["cascade_minus_control_PCKh"] = results["val"]["PCKh"] - control["val"]["PCKh"]
            print(
                f"\ncascade of {num_stages} stage(s): PCKh {results['val']['PCKh']:.2f}; stage 1 "
                f"alone for the same compute ({control['epochs']} epochs): "
                f"{control['val']['PCKh']:.2f}"
            )
    return results


def run_stage(
    cfg: DictConfig,
    out_dir: Path,
    s: int,
    num_stages: int,
    data: CascadeData,
    state: Estimates,
    device: torch.device,
    rank: int,
    launch: str | None,
) -> dict[str, Any]:
    """Stage ``s``: its weights (trained, resumed or loaded), then on rank 0 the cascade so far on
    val and the errors for stage s+1, handed to the other ranks; updates ``state``.

    Returns:
        The stage's results entry (the same on every rank).
    """
    scfg, epochs, sigma, init_from = stage_config(cfg, s)
    init_from, start_from = stage1_weights(cfg, s, init_from)
    stage_dir = out_dir / f"stage{s}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = stage_record(scfg, s, epochs, sigma, init_from, state.errors_hash, start_from)
    digest = config_hash(record)
    # The errors of stage s also depend on which training persons measure them.
    state.errors_hash = config_hash(
        {"weights": digest, "error_persons": data.error_persons, "seed": int(cfg.seed)}
    )
    input_size = int(scfg.model.input_size)
    data.datamodule.set_stage_options(**stage_data_options(scfg))
    data.datamodule.configure_stage(
        s,
        input_size=input_size,
        sigma=sigma,
        displacement=state.displacement,
        val_centers=state.val_pred,
    )
    pl.seed_everything(int(cfg.seed) + s - 1, workers=True)
    module = build_pose_module(scfg, s)
    entry: dict[str, Any] = {"epochs": epochs, "input_size": input_size, "config_hash": digest}
    if s >= 2:
        entry["sigma"] = sigma
    loggers = build_loggers(scfg, stage_dir, name_suffix=f"-stage{s}")
    weights = StageWeights(scfg, data.datamodule, stage_dir, s, epochs, digest, record, rank)
    reused = weights.obtain(cfg, module, loggers, init_from, start_from, entry)
    if rank != 0:
        return follow_rank0(stage_dir, digest, launch, state)
    try:
        evaluate_stage(cfg, stage_dir, s, sigma, data, state, module, loggers, entry, device)
        displacement = None
        if s < num_stages:
            stats = _stage_errors(
                stage_dir, state.errors_hash, reused, module, data, state.train_pred, input_size,
                sigma, device
            )  # fmt: skip
            state.train_pred = stats["train_pred"]
            state.displacement = (stats["mean"], stats["cov"])
            entry["train_error_rms"] = stats["rms"]
            displacement = {"mean": stats["mean"].tolist(), "cov": stats["cov"].tolist()}
        publish_handoff(stage_dir, digest, launch, entry=entry, displacement=displacement)
    except BaseException as error:
        # The other ranks wait for this handoff: tell them rank 0 failed instead of leaving
        # them polling forever (Lightning's ddp launcher does not stop them).
        publish_handoff(stage_dir, digest, launch, error=f"{type(error).__name__}: {error}")
        raise
    # One W&B run per stage (their steps restart), grouped by task_name.
    if _wandb_loggers(loggers) and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()
    return entry


def follow_rank0(
    stage_dir: Path, digest: str, launch: str | None, state: Estimates
) -> dict[str, Any]:
    """A rank other than 0: takes rank 0's val estimates and error statistics of the stage (so
    that every rank builds the next stage's data from the same numbers); returns its entry."""
    handoff = await_handoff(stage_dir, digest, launch)
    state.val_pred = np.load(stage_dir / "val_predictions.npy")
    if handoff.get("displacement") is not None:
        d = handoff["displacement"]
        state.displacement = (np.asarray(d["mean"]), np.asarray(d["cov"]))
    return handoff["entry"]


@dataclass
class StageWeights:
    """Where the weights of one cascade stage come from: ``init_from``, a fit (fresh or resumed),
    or the ``final.ckpt`` of an earlier run of the same config."""

    scfg: DictConfig
    datamodule: Any
    stage_dir: Path
    stage: int
    epochs: int
    digest: str
    record: dict[str, Any]
    rank: int

    def obtain(
        self,
        cfg: DictConfig,
        module: PoseRegressionLitModule,
        loggers: list[Any],
        init_from: str | None,
        start_from: str | None,
        entry: dict[str, Any],
    ) -> bool:
        """Puts the stage's weights into ``module`` and records where they came from in
        ``entry``; returns False when the stage trained in this run (its errors are then measured
        afresh, never read from an ``errors.json`` of earlier weights)."""
        final = self.stage_dir / "final.ckpt"
        if init_from:
            self.load_init(module, init_from)
            entry["init_from"] = str(init_from)
            return True
        if cfg.train and not (cfg.get("resume") and final.is_file()):
            self.fit(cfg, module, loggers, start_from, entry)
            return False
        if not final.is_file():
            raise ConfigError(
                f"stage {self.stage} has no weights: train=false needs {final} or "
                f"cascade.stages.{self.stage}.init_from"
            )
        self.check_final(cfg, final)
        log.info("stage %d: using the trained weights of %s", self.stage, final)
        load_module_weights(module, final)
        entry["checkpoints"] = {"final": str(final)}
        return True

    def load_init(self, module: PoseRegressionLitModule, init_from: str) -> None:
        key = f"cascade.stages.{self.stage}"
        module.load_init_weights(init_from)
        # The hash was taken from an earlier read: the weights must be those bytes.
        if file_digest(Path(init_from), key) != self.record["stage"]["init_weights"]:
            raise ConfigError(f"{key}.init_from={init_from} changed while this run read it")

    def fit(
        self,
        cfg: DictConfig,
        module: PoseRegressionLitModule,
        loggers: list[Any],
        start_from: str | None,
        entry: dict[str, Any],
    ) -> None:
        stage_dir, final = self.stage_dir, self.stage_dir / "final.ckpt"
        ckpt_path = resume_checkpoint(cfg, stage_dir)
        if ckpt_path is not None:
            check_stage_record(stage_dir, self.stage, self.digest, Path(ckpt_path))
        if self.rank == 0:
            # Before the fit (which starts the other ranks of Lightning's ddp launcher): they
            # must not find a handoff of an earlier run of this stage.
            (stage_dir / "handoff.json").unlink(missing_ok=True)
            # Errors measured on earlier weights of this stage must never be paired with
            # the weights trained now (same config hash, other run).
            (stage_dir / "errors.json").unlink(missing_ok=True)
            (stage_dir / "train_predictions.npy").unlink(missing_ok=True)
            write_json(
                stage_dir / "stage.json",
                {"hash": self.digest, "config": self.record},
                keep_nan=True,
            )
        trainer = build_trainer(
            self.scfg,
            stage_dir,
            max_epochs=self.epochs,
            loggers=loggers,
            final_checkpoint=final,
            seed=int(cfg.seed) + self.stage - 1,
        )
        if start_from and ckpt_path is None:
            module.load_init_weights(start_from)
            entry["start_from"] = str(start_from)
        trainer.fit(module, datamodule=self.datamodule, ckpt_path=ckpt_path)
        # Spawn launchers train in child processes: the weights come back through final.ckpt.
        load_module_weights(module, final)
        entry["checkpoints"] = {**checkpoint_paths(trainer), "final": str(final)}

    def check_final(self, cfg: DictConfig, final: Path) -> None:
        if cfg.train:
            check_stage_record(self.stage_dir, self.stage, self.digest, final)
            return
        saved = read_json(self.stage_dir / "stage.json") or {}
        if saved.get("hash") != self.digest:
            log.warning(
                "train=false: stage %d's %s was trained with another config (hash %s, "
                "this config %s); evaluating it anyway",
                self.stage,
                final,
                saved.get("hash"),
                self.digest,
            )


def evaluate_stage(
    cfg: DictConfig,
    stage_dir: Path,
    s: int,
    sigma: float,
    data: CascadeData,
    state: Estimates,
    module: PoseRegressionLitModule,
    loggers: list[Any],
    entry: dict[str, Any],
    device: torch.device,
) -> None:
    """Rank 0: the whole cascade so far on val (stage s refines the stage s-1 estimates), its
    scores into ``entry``, predictions and overlays into ``stage_dir``."""
    input_size = entry["input_size"]
    loader = data.datamodule.predict_loader(
        "val", centers=state.val_pred, input_size=input_size, sigma=sigma
    )
    state.val_pred = predict(module, loader, len(data.val_set), device)
    val = data.val
    scores = evaluate_pose(
        state.val_pred, val["keypoints"][..., :2], val["keypoints"][..., 2], val["head_size"]
    )
    entry["val"] = scores
    if data.gt_val_mat is not None:
        official = evaluate_official(state.val_pred, data.gt_val_mat, data.val_rows)
        entry["val_official_PCKh"] = official["PCKh"]
    save_npy(stage_dir / "val_predictions.npy", state.val_pred)
    print(format_pose_table(scores, f"\nMPII val, cascade of {s} stage(s) (PCKh@0.5 / PCP, %)"))
    overlays = write_overlays(
        data.val_set,
        state.val_pred,
        stage_dir / "overlays",
        int(cfg.cascade.get("num_overlays", 4)),
    )
    _log_to_wandb(loggers, s, scores, overlays)


def crop_passes(cfg: DictConfig, num_stages: int) -> int:
    """Training crops per training person over the whole cascade: ``sum_s epochs_s * crops_s``
    with 1 person crop per stage-1 item and K joint crops per stage s >= 2 item.

    With every stage's network the same (the default), this is the cascade's training compute in
    stage-1 epochs; the error-measuring and evaluation passes (forward only) are not counted.
    """
    k = int(cfg.data.num_joints)
    return sum(stage_config(cfg, s)[1] * (1 if s == 1 else k) for s in range(1, num_stages + 1))


def run_control(
    cfg: DictConfig,
    out_dir: Path,
    datamodule: Any,
    num_stages: int,
    device: torch.device,
    rank: int,
) -> dict[str, Any] | None:
    """The equal-compute control (``cascade.control=equal_compute``): stage 1 alone, trained for
    as many crops as the whole cascade (:func:`crop_passes`, or ``cascade.control_epochs``), in
    ``out_dir/control/``, scored on val like the cascade.

    ``train=false`` re-evaluates ``control/final.ckpt`` (None when there is none); ``resume=true``
    reuses it when ``control/stage.json`` holds the same config hash.

    Returns:
        ``{"epochs", "cascade_crop_passes", "config_hash", "val": scores}`` on rank 0, else None.
    """
    casc = cfg.cascade
    if str(casc.control) != "equal_compute":
        raise ConfigError(f"cascade.control={casc.control}: expected equal_compute or null")
    budget = crop_passes(cfg, num_stages)
    epochs = int(casc.get("control_epochs") or budget)
    scfg, _, _, _ = stage_config(cfg, 1)
    span_schedule(scfg, epochs)
    control_dir = out_dir / "control"
    control_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(stage_record(scfg, 1, epochs, 0.0, None, None))
    final = control_dir / "final.ckpt"
    datamodule.set_stage_options(**stage_data_options(scfg))
    datamodule.configure_stage(
        1, input_size=int(scfg.model.input_size), displacement=None, val_centers=None
    )
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build_pose_module(scfg, 1)
    if cfg.train and not (cfg.get("resume") and final.is_file()):
        ckpt_path = resume_checkpoint(cfg, control_dir)
        if ckpt_path is not None:
            check_stage_record(control_dir, 1, digest, Path(ckpt_path))
        if rank == 0:
            write_json(
                control_dir / "stage.json", {"hash": digest, "epochs": epochs}, keep_nan=True
            )
        trainer = build_trainer(
            scfg,
            control_dir,
            max_epochs=epochs,
            loggers=build_loggers(scfg, control_dir, name_suffix="-control"),
            final_checkpoint=final,
            seed=int(cfg.seed),
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    elif final.is_file():
        if cfg.train:
            check_stage_record(control_dir, 1, digest, final)
    else:
        log.warning("train=false: no %s, so the equal-compute control is not evaluated", final)
        return None
    if rank != 0:
        return None
    load_module_weights(module, final)
    val_set = datamodule.dataset("val")
    val = val_set.arrays()
    loader = datamodule.predict_loader("val", input_size=int(scfg.model.input_size))
    pred = predict(module, loader, len(val_set), device)
    scores = evaluate_pose(
        pred, val["keypoints"][..., :2], val["keypoints"][..., 2], val["head_size"]
    )
    save_npy(control_dir / "val_predictions.npy", pred)
    print(format_pose_table(scores, f"\nMPII val, stage 1 alone for {epochs} epochs (control)"))
    return {"epochs": epochs, "cascade_crop_passes": budget, "config_hash": digest, "val": scores}


def _stage_errors(
    stage_dir: Path,
    errors_hash: str,
    reused: bool,
    module: PoseRegressionLitModule,
    data: CascadeData,
    train_pred: np.ndarray | None,
    input_size: int,
    sigma: float,
    device: torch.device,
) -> dict[str, Any]:
    """Stage s's errors on the training persons (rank 0): read from ``errors.json`` and
    ``train_predictions.npy`` when the stage was not trained in this run and their hash matches,
    else measured by running the cascade and written there.

    Returns:
        ``mean`` (K, 2), ``cov`` (K, 2, 2) in person-box sides, ``rms``, and ``train_pred``
        (N_train, K, 2) image pixels (NaN outside the measured persons).
    """
    errors_file = stage_dir / "errors.json"
    pred_file = stage_dir / "train_predictions.npy"
    saved = read_json(errors_file) if reused else None
    if saved is not None and saved.get("hash") == errors_hash and pred_file.is_file():
        log.info("%s: reusing the error statistics of %s", stage_dir.name, errors_file)
        return {
            "mean": np.asarray(saved["mean"], np.float64),
            "cov": np.asarray(saved["cov"], np.float64),
            "rms": saved.get("train_error_rms"),
            "train_pred": np.load(pred_file),
        }
    train, err_idx, box_side = data.train, data.err_idx, data.box_side
    # Stage s's errors on training persons drive stage s+1's simulated inputs.
    loader = data.datamodule.predict_loader(
        "train", centers=train_pred, indices=err_idx, input_size=input_size, sigma=sigma
    )
    full = predict(module, loader, len(train["scale"]), device)
    errors = (full[err_idx] - train["keypoints"][err_idx, :, :2]) / box_side[:, None, None]
    labelled = train["keypoints"][err_idx, :, 2]
    mean, cov, count = error_statistics(errors, labelled)
    rms = float(np.sqrt(np.nanmean((errors**2).sum(-1)[labelled > 0])))
    # rows outside err_idx stay NaN and are never used as centres
    save_npy(pred_file, full)
    write_json(
        errors_file,
        {
            "hash": errors_hash,
            "unit": "person-box side (200 * scale * enlarge px)",
            "persons": len(err_idx),
            "mean": mean.tolist(),
            "cov": cov.tolist(),
            "count": count.tolist(),
            "train_error_rms": rms,
        },
        keep_nan=True,
    )
    # The numbers the file holds (JSON keeps float64 exactly), as a resumed run reads them.
    return {"mean": mean, "cov": cov, "rms": rms, "train_pred": full}
