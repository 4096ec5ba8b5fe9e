"""Which weights a run starts from or scores: resume points, init weights, evaluated checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from datamodules.errors import ConfigError
from lightning_modules import mmseg_weights, official_weights

log = logging.getLogger(__name__)


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


def load_module_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Loads a checkpoint's ``state_dict`` (or a bare state dict) into ``module``, strictly.

    ``weights_only=True``: a checkpoint from elsewhere cannot run code.
    """
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    module.load_state_dict(state.get("state_dict", state))


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
