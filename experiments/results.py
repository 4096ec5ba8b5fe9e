"""What a parsing run reports: final scores, results.json, the evaluation protocol, prediction PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamodules.base import ParsingDataModule
from datamodules.batch import save_label_png
from datamodules.errors import ConfigError
from datamodules.files import write_json
from experiments.keys import eval_input
from lightning_modules.metrics import format_scores_table, scores_to_json

log = logging.getLogger(__name__)

#: What ``save_predictions`` PNGs hold (see :func:`prediction_writer`).
PREDICTION_FORMATS = ("class_ids", "dataset_ids")


def final_scores(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule, stage: str
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


def summarise(
    module: pl.LightningModule, scores: dict[str, Any] | None, title: str
) -> dict[str, Any] | None:
    """Prints the per-class table and returns the results.json entry of ``scores``."""
    if scores is None:
        return None
    print(f"\n{title}")
    print(format_scores_table(scores, module.class_names))
    return scores_to_json(scores, module.class_names)


def scored(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    stage: str,
    title: str,
    stage_dir: Path | None = None,
) -> dict[str, Any] | None:
    """The results.json entry of the final weights on ``stage``, printed as a table; with
    ``stage_dir``, read from its ``scores.json`` when the evaluation ran in child processes."""
    entry = summarise(module, final_scores(trainer, module, datamodule, stage), title)
    if entry is None and stage_dir is not None:
        return read_scores(stage_dir, stage)
    return entry


def read_scores(stage_dir: Path, split: str = "val") -> dict[str, Any] | None:
    """The ``split`` entry that :class:`~lightning_modules.callbacks.StageEnd` wrote in
    ``stage_dir`` at the end of a fit, validate or test (spawn launchers evaluate in child
    processes)."""
    path = stage_dir / "scores.json"
    return json.loads(path.read_text()).get(split) if path.exists() else None


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Writes ``results`` as JSON atomically (NaN becomes null)."""
    write_json(path, results, indent=2)


def eval_protocol(cfg: DictConfig) -> dict[str, Any] | None:
    """The resolved ``eval`` config (conf/eval/*.yaml: scales, flip, mode, ...) the scores were
    computed under, with the data keys that decide the input geometry under ``input`` (base-size
    fit, letterbox, SCHP's affine) and ``align_corners: true`` for a net that resizes its logits
    so; None when there is no ``eval`` (the plain forward pass)."""
    if not cfg.get("eval"):
        return None
    protocol = OmegaConf.to_container(cfg.eval, resolve=True)
    protocol["input"] = eval_input(cfg)
    # The net's resizes of its logits (model.align_corners, mmseg's 769x769 models); recorded
    # only when set, so records of the other nets stay comparable with earlier ones.
    if (cfg.get("model") or {}).get("align_corners"):
        protocol["align_corners"] = True
    return protocol


def checkpoint_paths(trainer: pl.Trainer) -> dict[str, str]:
    """``{"best": ..., "last": ...}`` of the trainer's checkpoint callbacks (empty when none)."""
    paths = {}
    for cb in trainer.checkpoint_callbacks:
        key = "last" if cb.monitor is None else "best"
        if cb.best_model_path:
            paths[key] = cb.best_model_path
    return paths


@runtime_checkable
class OwnIds(Protocol):
    """A datamodule whose dataset has label ids of its own besides the class ids (Cityscapes)."""

    def to_dataset_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W)`` class ids -> ``(H, W)`` dataset ids and their ``(N, 3)`` colours."""


def prediction_writer(
    cfg: DictConfig, datamodule: ParsingDataModule, out_dir: Path
) -> Callable[[str, str, Any], None] | None:
    """With ``save_predictions=true``, the writer of ``out_dir/predictions/<stage>/<name>.png``
    that the module hands every evaluated image's ids; None otherwise.

    ``prediction_format=class_ids`` (default) writes the training class ids with the data
    palette; ``dataset_ids`` writes the dataset's own ids where it has them (Cityscapes: labelIds,
    the format cityscapesscripts' evaluation reads).

    Raises:
        ConfigError: an unknown ``prediction_format``, or ``dataset_ids`` for a dataset without
            its own ids.
    """
    if not cfg.get("save_predictions"):
        return None
    folder, palette = out_dir / "predictions", datamodule.palette
    fmt = str(cfg.get("prediction_format") or "class_ids")
    convert = None
    if fmt == "dataset_ids":
        if not isinstance(datamodule, OwnIds):
            raise ConfigError(
                f"prediction_format=dataset_ids: {type(datamodule).__name__} has no ids of its "
                "own beyond the class ids (use prediction_format=class_ids)"
            )
        convert = datamodule.to_dataset_ids
    elif fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"prediction_format={fmt}: use {' or '.join(PREDICTION_FORMATS)}")

    def write(stage: str, name: str, ids: Any) -> None:
        if convert is not None:
            ids, colours = convert(ids)
            save_label_png(folder / stage / f"{name}.png", ids, colours)
        else:
            save_label_png(folder / stage / f"{name}.png", ids, palette)

    log.info("writing predicted %s PNGs to %s", fmt.replace("_", " "), folder)
    return write
