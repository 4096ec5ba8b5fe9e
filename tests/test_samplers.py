"""Tests for ``samplers``: keep probabilities, CPA, and the regionally balanced sampler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from samplers import (
    RegionalBalancedSampler,
    class_pixel_accuracy,
    class_region_counts,
    expected_kept_share,
    keep_probabilities,
    sampling_statistics,
)

IGNORE = 255
NAN = float("nan")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _target(seed: int = 0, b: int = 4, c: int = 5, h: int = 8, w: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    return target


def _ready_sampler(x, **kwargs) -> RegionalBalancedSampler:
    sampler = RegionalBalancedSampler(len(x), **kwargs)
    sampler.set_statistics(torch.tensor(x, dtype=torch.float64))
    return sampler


# --------------------------------------------------------------------------- pure functions


def test_keep_probabilities_hand_computed():
    x = torch.tensor([0.5, 0.25, 0.0, NAN, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 1.0, 1.0, 1.0, 0.25], dtype=torch.float64)
    probs = keep_probabilities(x)
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs, expected)
    # Scale-free: counts give the same probabilities as frequencies.
    torch.testing.assert_close(keep_probabilities(x * 40), expected)
    assert keep_probabilities(x.float()).dtype == torch.float32
    assert keep_probabilities(torch.tensor([4, 2, 1])).tolist() == [0.25, 0.5, 1.0]


def test_keep_probabilities_min_prob_floor_and_degenerate_inputs():
    x = torch.tensor([0.5, 0.25, 0.0, NAN, 1.0], dtype=torch.float64)
    probs = keep_probabilities(x, min_prob=0.4)
    torch.testing.assert_close(probs, torch.tensor([0.5, 1, 1, 1, 0.4], dtype=torch.float64))
    assert keep_probabilities(torch.tensor([0.0, NAN, -1.0])).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="min_prob"):
        keep_probabilities(x, min_prob=1.5)


def test_class_pixel_accuracy_known_confusion():
    # Rows = ground truth, columns = prediction. Column sums: 6, 4, 0.
    confusion = torch.tensor([[5, 1, 0], [1, 3, 0], [0, 0, 0]])
    cpa = class_pixel_accuracy(confusion, "precision")
    assert cpa.dtype == torch.float64
    assert cpa[0].item() == pytest.approx(5 / 6)
    assert cpa[1].item() == pytest.approx(3 / 4)
    assert math.isnan(cpa[2].item())
    # ARBS end to end: the least accurate class is always kept.
    torch.testing.assert_close(
        keep_probabilities(cpa), torch.tensor([0.9, 1.0, 1.0], dtype=torch.float64)
    )


def test_class_region_counts():
    target = torch.tensor([[[0, 0], [2, IGNORE]], [[2, 2], [2, 2]], [[IGNORE] * 2] * 2])
    assert class_region_counts(target, num_classes=4).tolist() == [1, 0, 2, 0]


# --------------------------------------------------------------------------- sampler


def test_sampler_initial_state_and_error_before_statistics():
    sampler = RegionalBalancedSampler(5)
    assert sampler.probs.dtype == torch.float32 and sampler.probs.tolist() == [1.0] * 5
    assert sampler.stats.dtype == torch.float64 and torch.isnan(sampler.stats).all()
    assert not sampler.ready.item() and not sampler.is_ready
    with pytest.raises(RuntimeError, match="set_statistics"):
        sampler(_target())
    with pytest.raises(ValueError, match="source"):
        RegionalBalancedSampler(5, source="uniform")
    with pytest.raises(ValueError, match="shape"):
        sampler.set_statistics(torch.ones(4))


def test_sampler_set_statistics():
    sampler = _ready_sampler([0.5, 0.25, 0.0, NAN, 1.0], min_prob=0.3)
    torch.testing.assert_close(sampler.probs, torch.tensor([0.5, 1.0, 1.0, 1.0, 0.3]))
    assert sampler.ready.item() and sampler.is_ready
    assert torch.isnan(sampler.stats[3]) and sampler.stats[4].item() == 1.0


def _loop_mask(target, probs, generator):
    """Reference: draw (B, C) uniforms like the sampler, then build the mask pixel by pixel."""
    b = target.shape[0]
    uniform = torch.rand(b, len(probs), generator=generator)
    mask = torch.zeros_like(target, dtype=torch.bool)
    for n in range(b):
        kept = {c for c in range(len(probs)) if uniform[n, c] < probs[c]}
        for i in range(target.shape[1]):
            for k in range(target.shape[2]):
                mask[n, i, k] = int(target[n, i, k]) in kept
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_mask_is_ground_truth_in_kept_set(seed):
    sampler = _ready_sampler([0.5, 0.25, 0.1, NAN, 1.0])
    target = _target(seed)
    got = sampler(target, generator=torch.Generator().manual_seed(seed))
    expected = _loop_mask(target, sampler.probs, torch.Generator().manual_seed(seed))
    assert got.dtype == torch.bool and got.shape == target.shape
    assert torch.equal(got, expected)
    assert not got[target == IGNORE].any()
    # Each class region is all in or all out of an image's mask.
    for n in range(target.shape[0]):
        for c in target[n].unique().tolist():
            if c != IGNORE:
                region = got[n][target[n] == c]
                assert region.all() or not region.any()


def test_sampler_keep_frequencies_match_probabilities():
    probs_expected = [0.5, 1.0, 0.2, 0.05, 0.8]
    sampler = _ready_sampler([1 / p for p in probs_expected])
    torch.testing.assert_close(sampler.probs, torch.tensor(probs_expected))
    # Every image holds every class once (one pixel each) plus an ignored pixel.
    n_images = 4000
    target = torch.tensor([0, 1, 2, 3, 4, IGNORE]).repeat(n_images, 1).view(n_images, 1, 6)
    mask = sampler(target, generator=torch.Generator().manual_seed(0))
    kept = mask[:, 0, :5].sum(dim=0).double()  # (C,) number of images that kept each class
    for c, p in enumerate(probs_expected):
        sigma = math.sqrt(n_images * p * (1 - p))
        assert abs(kept[c].item() - n_images * p) <= 5 * sigma + 1e-9, (c, kept[c].item())
    assert not mask[..., 5].any()


def test_sampler_independent_draws_per_image():
    sampler = _ready_sampler([2.0, 1.0])  # probs [0.5, 1]
    target = torch.zeros(64, 2, 2, dtype=torch.long)
    mask = sampler(target, generator=torch.Generator().manual_seed(1))
    per_image = mask.flatten(1).all(dim=1)
    assert per_image.any() and not per_image.all()


def test_sampler_state_dict_round_trip():
    source = _ready_sampler([0.5, 0.25, 0.0, NAN, 1.0], min_prob=0.1)
    state = source.state_dict()
    assert set(state) == {"probs", "stats", "ready", "pixel_counts"}

    fresh = RegionalBalancedSampler(5)
    fresh.load_state_dict(state)
    assert fresh.is_ready
    torch.testing.assert_close(fresh.probs, source.probs)
    torch.testing.assert_close(fresh.stats, source.stats, equal_nan=True)
    target = _target()
    assert torch.equal(
        fresh(target, torch.Generator().manual_seed(3)),
        source(target, torch.Generator().manual_seed(3)),
    )

    # Also when the sampler is a submodule (as in a LightningModule checkpoint).
    parent = nn.ModuleDict({"sampler": RegionalBalancedSampler(5)})
    parent.load_state_dict({f"sampler.{k}": v for k, v in state.items()})
    assert parent["sampler"].is_ready

    # And an unready state keeps a sampler unready.
    ready = _ready_sampler([1.0, 2.0])
    ready.load_state_dict(RegionalBalancedSampler(2).state_dict())
    assert not ready.is_ready


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,source", [("nrbs", "nrbs"), ("arbs", "arbs")])
def test_sampler_configs_instantiate(name, source):
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    root = OmegaConf.create({"data": {"num_classes": 7}})
    root.sampler = OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml")
    sampler = hydra_utils.instantiate(root.sampler)
    assert isinstance(sampler, RegionalBalancedSampler)
    assert sampler.num_classes == 7 and sampler.source == source


def test_sampler_none_config_gives_no_sampler(tmp_path):
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    (tmp_path / "config.yaml").write_text("defaults:\n  - sampler: arbs\n  - _self_\n")
    (tmp_path / "sampler").mkdir()
    for name in ("none", "arbs"):
        text = (CONF_DIR / "sampler" / f"{name}.yaml").read_text()
        (tmp_path / "sampler" / f"{name}.yaml").write_text(text)
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("config", overrides=["sampler=none", "+data.num_classes=3"])
    assert cfg.sampler is None
    assert instantiate(cfg.sampler) is None


# --------------------------------------------------------------------------- the paper's readings


def test_cpa_readings_hand_computed():
    # Rows = ground truth, columns = prediction, 4 classes. Row sums (ground truth) 10, 20, 3, 0;
    # column sums (predicted) 14, 16, 3, 0; diagonal 8, 14, 3, 0. Class 3 is in no ground truth
    # and never predicted: NaN under both readings.
    confusion = torch.tensor([[8, 2, 0, 0], [6, 14, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    recall = class_pixel_accuracy(confusion, "recall")
    precision = class_pixel_accuracy(confusion, "precision")
    torch.testing.assert_close(
        recall[:3], torch.tensor([8 / 10, 14 / 20, 3 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        precision[:3], torch.tensor([8 / 14, 14 / 16, 3 / 3], dtype=torch.float64)
    )
    assert math.isnan(recall[3]) and math.isnan(precision[3])
    # recall is the default; a class predicted by no pixel has precision NaN but recall 0
    torch.testing.assert_close(class_pixel_accuracy(confusion), recall, equal_nan=True)
    only_missed = torch.tensor([[4, 0], [3, 0]])  # class 1 never predicted
    assert class_pixel_accuracy(only_missed, "recall")[1] == 0.0
    assert math.isnan(class_pixel_accuracy(only_missed, "precision")[1])
    with pytest.raises(ValueError, match="sampler.cpa"):
        class_pixel_accuracy(confusion, "accuracy")


def test_arbs_keep_probabilities_both_readings_and_both_etas_by_hand():
    confusion = torch.tensor([[8, 2, 0], [6, 14, 0], [0, 0, 3]])
    # recall 0.8, 0.7, 1.0 -> eta=min=0.7: 0.875, 1, 0.7
    x = sampling_statistics("arbs", confusion=confusion, cpa="recall")
    torch.testing.assert_close(
        keep_probabilities(x), torch.tensor([0.7 / 0.8, 1.0, 0.7], dtype=torch.float64)
    )
    # precision 8/14, 14/16, 1.0 -> eta=min=8/14: 1, (8/14)/(14/16), 8/14
    x = sampling_statistics("arbs", confusion=confusion, cpa="precision")
    expected = torch.tensor([1.0, (8 / 14) / (14 / 16), 8 / 14], dtype=torch.float64)
    torch.testing.assert_close(keep_probabilities(x), expected)
    # a fixed eta = 0.75 on the recall reading: min(1, 0.75 / x)
    x = sampling_statistics("arbs", confusion=confusion, cpa="recall")
    torch.testing.assert_close(
        keep_probabilities(x, eta=0.75), torch.tensor([0.75 / 0.8, 1.0, 0.75], dtype=torch.float64)
    )
    assert keep_probabilities(x, eta="0.75").tolist() == keep_probabilities(x, eta=0.75).tolist()
    for bad in (0.0, -1.0, "max", float("inf")):
        with pytest.raises(ValueError, match="sampler.eta"):
            keep_probabilities(x, eta=bad)


def test_nrbs_counts_and_kept_shares_by_hand():
    # 3 classes over a training set: pixels 900, 90, 10 (labelled 1000 in all); class regions
    # (images containing the class) 10, 5, 2.
    pixels = torch.tensor([900.0, 90.0, 10.0])
    regions = torch.tensor([10.0, 5.0, 2.0])
    x_pix = sampling_statistics("nrbs", pixel_counts=pixels, nrbs_count="pixels")
    x_reg = sampling_statistics("nrbs", region_counts=regions, nrbs_count="regions")
    torch.testing.assert_close(x_pix, torch.tensor([0.9, 0.09, 0.01], dtype=torch.float64))
    torch.testing.assert_close(x_reg, torch.tensor([10 / 17, 5 / 17, 2 / 17], dtype=torch.float64))
    # eta=min: pixels -> s = 0.01 / x = 1/90, 1/9, 1; regions -> 2/10, 2/5, 1
    s_pix, s_reg = keep_probabilities(x_pix), keep_probabilities(x_reg)
    torch.testing.assert_close(s_pix, torch.tensor([1 / 90, 1 / 9, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s_reg, torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64))
    # expected kept pixels: pixels 10 + 10 + 10 = 30 of 1000; regions 180 + 36 + 10 = 226
    overall, per_class, dist = expected_kept_share(s_pix, pixels)
    assert overall == pytest.approx(0.03)
    torch.testing.assert_close(per_class, s_pix)
    torch.testing.assert_close(dist, torch.full((3,), 1 / 3, dtype=torch.float64))
    overall, _, dist = expected_kept_share(s_reg, pixels)
    assert overall == pytest.approx(0.226)
    torch.testing.assert_close(dist, torch.tensor([180, 36, 10], dtype=torch.float64) / 226)
    # a fixed eta = 0.3 (in units of the share): regions -> min(1, 0.3 / x)
    torch.testing.assert_close(
        keep_probabilities(x_reg, eta=0.3),
        torch.tensor([0.3 * 17 / 10, 1.0, 1.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="nrbs_count"):
        sampling_statistics("nrbs", pixel_counts=pixels, nrbs_count="images")


def test_sampler_kept_share_travels_in_the_state_dict_and_old_states_load():
    sampler = RegionalBalancedSampler(3, source="nrbs", nrbs_count="pixels", eta=0.05)
    pixels = torch.tensor([900.0, 90.0, 10.0])
    sampler.set_statistics(
        sampling_statistics("nrbs", pixel_counts=pixels, nrbs_count="pixels"), pixel_counts=pixels
    )
    # s = min(1, 0.05 / [0.9, 0.09, 0.01]) = 1/18, 5/9, 1 -> kept 50 + 50 + 10 = 110 of 1000
    overall, per_class, _ = sampler.kept_share()
    assert overall == pytest.approx(0.11, rel=1e-6)
    copy = RegionalBalancedSampler(3, source="nrbs")
    copy.load_state_dict(sampler.state_dict())
    assert copy.kept_share()[0] == pytest.approx(0.11, rel=1e-6)
    # a state dict of a sampler that had no pixel counts (older rimlab) loads: share unknown
    old = {k: v for k, v in sampler.state_dict().items() if k != "pixel_counts"}
    fresh = RegionalBalancedSampler(3, source="nrbs")
    fresh.load_state_dict(old)
    assert fresh.is_ready and fresh.kept_share() is None
    with pytest.raises(ValueError, match="sampler.cpa"):
        RegionalBalancedSampler(3, cpa="iou")
