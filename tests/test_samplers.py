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
    keep_probabilities,
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
    cpa = class_pixel_accuracy(confusion)
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
    assert set(state) == {"probs", "stats", "ready"}

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
