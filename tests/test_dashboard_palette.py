"""The W&B dashboard colours its overlays with the dataset's palette (data.palette)."""

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
    def __init__(self, data, caption=None):
        self.data, self.caption = np.asarray(data), caption


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


def _logged_overlays(trainer, module, fake_wandb):
    """Logs one black image with gt and prediction masks holding every class and an ignored
    pixel; returns the (ground truth, prediction) overlays, (H, W, 3) uint8 each."""
    gt = np.array([[0, 1, 2, 255]], dtype=np.int64)
    pred = np.array([[2, 1, 0, 1]], dtype=np.int64)
    image = np.zeros((1, 4, 3), dtype=np.uint8)
    dashboard = WandbDashboard(num_images=1)
    dashboard._images = [(image, gt, pred)]
    dashboard.on_validation_end(trainer, module)
    (payload,) = fake_wandb.logged
    (example,) = payload["val/examples"]
    return example.data[:, :4], example.data[:, 4:]


def _blend(colour) -> list[int]:
    # overlay(): alpha 0.5 of the class colour over a black image.
    return [int(0.5 * c) for c in colour]


def test_overlays_use_the_datamodule_palette(fake_wandb):
    datamodule = SimpleNamespace(palette=np.array(CONFIGURED, dtype=np.uint8))
    gt_overlay, pred_overlay = _logged_overlays(
        _fake_trainer(datamodule), _fake_module(), fake_wandb
    )
    assert gt_overlay[0, :3].tolist() == [_blend(CONFIGURED[c]) for c in (0, 1, 2)]
    assert gt_overlay[0, 3].tolist() == [0, 0, 0]  # ignored pixel left as it is
    assert pred_overlay[0].tolist() == [_blend(CONFIGURED[c]) for c in (2, 1, 0, 1)]


def test_overlays_use_the_checkpoint_palette_without_a_datamodule(fake_wandb):
    build = {"data": {"palette": CONFIGURED}}
    gt_overlay, _ = _logged_overlays(_fake_trainer(None), _fake_module(build), fake_wandb)
    assert gt_overlay[0, :3].tolist() == [_blend(CONFIGURED[c]) for c in (0, 1, 2)]


def test_overlays_fall_back_to_the_generated_palette(fake_wandb):
    datamodule = SimpleNamespace()  # no palette attribute
    gt_overlay, _ = _logged_overlays(_fake_trainer(datamodule), _fake_module(), fake_wandb)
    voc = palette(3)
    assert voc.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert gt_overlay[0, :3].tolist() == [_blend(voc[c]) for c in (0, 1, 2)]


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
