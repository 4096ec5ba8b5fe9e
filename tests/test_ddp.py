"""DDP on CPU: 2 gloo processes (ddp_spawn) compute the same metrics as 1 process."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning.pytorch as pl
import pytest
import torch
from cfg_utils import SINGLE, TINY, compose_cfg

from experiments.train import build_module


class DumpConfusion(pl.Callback):
    """Saves the (DDP-summed) validation confusion matrix from rank 0."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.last_scores["val"]["confusion"], self.path)


def _validate(cfg, devices: int, path: Path) -> torch.Tensor:
    torch.manual_seed(0)
    module = build_module(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DumpConfusion(str(path))],
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return torch.load(path)


@pytest.mark.slow
def test_ddp_spawn_confusion_equals_single_process(tmp_path):
    cfg = compose_cfg(["experiment=quickstart", *TINY, *SINGLE, "data.eval_batch_size=1"], tmp_path)
    single = _validate(cfg, 1, tmp_path / "one.pt")
    double = _validate(cfg, 2, tmp_path / "two.pt")
    assert single.sum() > 0
    assert torch.equal(single, double)
