"""Composes rimlab configs in tests the way run.py does, with every path inside a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("RIMLAB_ROOT", str(ROOT))

# Tiny synthetic set and CPU settings shared by the end-to-end tests.
TINY = [
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=6",
    "data.synthetic.num_test=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.pin_memory=false",
    "model=pspnet_lite",
    "optimizer=sgd",
    "optimizer.lr=0.02",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "~callbacks.model_summary",
]

# Smaller images and crops (64 px images, 48 px crops, the base fit at 64) for the end-to-end runs
# whose checks compare two runs or test the control flow, where the image size plays no part.
SMALL_IMAGES = [
    "data.synthetic.image_size=[64,64]",
    "data.synthetic.size_jitter=8",
    "data.crop_size=[48,48]",
    "data.base_size=64",
]

# The plain one-piece schedule (the quickstart itself runs RIM's two stages).
SINGLE = ["schedule=single", "schedule.stage1_epochs=null", "sampler=none", "loss=ce"]


def compose_cfg(overrides: list[str], tmp_path: Path, data_dir: Path | None = None) -> DictConfig:
    """The run config for ``overrides`` with logs, outputs and data below ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("run", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(data_dir or tmp_path / "data")
        del cfg.hydra
    return cfg
