"""The W&B dashboard logs validation examples as segmentation masks; class colours follow the
dataset's palette (data.palette)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lightning_modules.dashboard import WandbDashboard, palette

NAMES = ["background", "hat", "face"]
# Configured RGB triples, none of them the VOC colours of their class ids.
CONFIGURED = [[10, 20, 30], [200, 100, 50], [0, 255, 128]]


class _FakeImage:
    def __init__(self, data, caption=None, masks=None):
        self.data, self.caption, self.masks = np.asarray(data), caption, masks


class _FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


class _FakeRun:
    def __init__(self):
        self.logged: list[dict] = []

    def log(self, payload, commit=True):
        self.logged.append(payload)


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.Image, module.Table = _FakeImage, _FakeTable
    module.plot = SimpleNamespace(bar=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "wandb", module)
    run = _FakeRun()
    monkeypatch.setattr("lightning_modules.dashboard._wandb_run", lambda trainer: run)
    return run


def _fake_trainer(datamodule):
    return SimpleNamespace(
        is_global_zero=True, sanity_checking=False, current_epoch=0, datamodule=datamodule
    )


def _fake_module(build_config=None):
    return SimpleNamespace(
        class_names=NAMES,
        ignore_index=255,
        last_scores={},
        sampler=None,
        build_config=build_config,
    )


def test_examples_are_wandb_masks_with_class_names(fake_wandb):
    """One image with gt and prediction holding every class and an ignored pixel: the image goes
    out untouched, both label maps as masks with the class names (ignore included)."""
    gt = np.array([[0, 1, 2, 255]], dtype=np.int64)
    pred = np.array([[2, 1, 0, 1]], dtype=np.int64)
    image = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
    dashboard = WandbDashboard(num_images=1)
    dashboard._images = [(image, gt, pred)]
    dashboard.on_validation_end(_fake_trainer(SimpleNamespace()), _fake_module())
    (payload,) = fake_wandb.logged
    (example,) = payload["val/examples"]
    assert example.data.tolist() == image.tolist()  # not blended
    labels = {0: "background", 1: "hat", 2: "face", 255: "ignore"}
    assert example.masks["ground_truth"]["class_labels"] == labels
    assert example.masks["prediction"]["class_labels"] == labels
    assert example.masks["ground_truth"]["mask_data"].tolist() == [[0, 1, 2, 255]]
    assert example.masks["prediction"]["mask_data"].tolist() == [[2, 1, 0, 1]]
    assert example.masks["prediction"]["mask_data"].dtype == np.uint8


def test_class_colours_use_the_datamodule_then_checkpoint_palette():
    from lightning_modules.dashboard import class_colours

    datamodule = SimpleNamespace(palette=np.array(CONFIGURED, dtype=np.uint8))
    assert class_colours(_fake_trainer(datamodule), _fake_module(), 3).tolist() == CONFIGURED
    build = {"data": {"palette": CONFIGURED}}
    assert class_colours(_fake_trainer(None), _fake_module(build), 3).tolist() == CONFIGURED
    voc = class_colours(_fake_trainer(SimpleNamespace()), _fake_module(), 3)
    assert voc.tolist() == palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_palette_of_the_wrong_length_is_a_clear_error():
    from lightning_modules.dashboard import class_colours

    datamodule = SimpleNamespace(palette=np.array(CONFIGURED[:2], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"palette must be 3 RGB triples in 0\.\.255.*\(2, 3\)"):
        class_colours(_fake_trainer(datamodule), _fake_module(), 3)
    datamodule = SimpleNamespace(palette=[[0, 0, 0], [1, 2, 3], [256, 0, 0]])
    with pytest.raises(ValueError, match="palette must be 3 RGB triples"):
        class_colours(_fake_trainer(datamodule), _fake_module(), 3)


def test_lip_config_palette_reaches_the_dashboard(tmp_path):
    """conf/data/lip.yaml instantiated as a run does: the dashboard colours are its palette, and a
    palette given on the command line (data.palette=...) replaces them."""
    import hydra
    from omegaconf import OmegaConf

    from datamodules.base import ParsingDataModule
    from lightning_modules.dashboard import class_colours

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "lip.yaml")
    cfg.root = str(tmp_path)
    configured = OmegaConf.to_container(cfg.palette)
    assert len(configured) == 20 and configured[2] == [255, 0, 0]
    datamodule = hydra.utils.instantiate(cfg, _convert_="all")
    module = SimpleNamespace(class_names=datamodule.class_names, build_config=None)
    colours = class_colours(_fake_trainer(datamodule), module, 20)
    assert colours.dtype == np.uint8 and colours.tolist() == configured
    assert colours.tolist() != palette(20).tolist()
    cfg.palette = [[i, 2 * i, 3 * i] for i in range(20)]
    datamodule = hydra.utils.instantiate(cfg, _convert_="all")
    colours = class_colours(_fake_trainer(datamodule), module, 20)
    assert colours.tolist() == [[i, 2 * i, 3 * i] for i in range(20)]
    assert isinstance(datamodule, ParsingDataModule)
