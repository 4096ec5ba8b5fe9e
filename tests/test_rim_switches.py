"""RIM's open protocol choices as switches: the stage-1 confusion matrix and the CPA reading chosen
in stage 2, old stage-1 checkpoints refused with a message, the side-output target in stage 2, and
the stage-1 key that ignores every stage-2 switch."""

from __future__ import annotations

import pytest
import torch
from cfg_utils import TINY, compose_cfg

from datamodules.errors import ConfigError
from experiments.build import build_module
from experiments.keys import stage1_key
from experiments.rim import stage2_overrides
from run import check_config as validate_config

RIM = [*TINY, "schedule=rim", "sampler=arbs", "loss=ce_ilm"]


def _stage2(tmp_path, *overrides: str, counts=None):
    """The stage-2 module of RIM with ``overrides``; ``counts(C)`` gives the training set's
    ``(pixel counts, region counts)`` the sampler reads."""
    cfg = compose_cfg([*RIM, *overrides], tmp_path)
    c = int(cfg.data.num_classes)
    class_counts = None if counts is None else (lambda: tuple(map(torch.tensor, counts(c))))
    return cfg, build_module(cfg, stage2_overrides(cfg), class_counts=class_counts)


# (reading, keep probabilities of classes 0-2 by hand, expected kept share by hand). Recall: 0.8,
# 1.0, 0.25 -> eta 0.25; precision (column sums 80, 80, 10): 1.0, 0.375, 1.0 -> eta 0.375. The
# other classes have no statistic and are kept with probability 1 but have no pixels.
HAND = [
    ("recall", [0.25 / 0.8, 0.25, 1.0], (0.3125 * 1000 + 0.25 * 100 + 1.0 * 10) / 1110),
    ("precision", [0.375, 1.0, 0.375], (0.375 * 1000 + 1.0 * 100 + 0.375 * 10) / 1110),
]


@pytest.mark.parametrize("reading,probs,share", HAND)
def test_stage2_chooses_the_cpa_reading_from_the_stored_matrix(tmp_path, reading, probs, share):
    _, module = _stage2(
        tmp_path,
        f"sampler.cpa={reading}",
        counts=lambda c: ([1000, 100, 10] + [0] * (c - 3), [5] * c),
    )
    c = module.num_classes
    confusion = torch.zeros(c, c, dtype=torch.int64)
    # rows = ground truth: class 0 [80, 20, 0] (recall 0.8), class 1 [0, 30, 0] (1.0), class 2
    # [0, 30, 10] (0.25); columns 80, 80, 10 pixels predicted (precision 1.0, 0.375, 1.0)
    confusion[0, 0], confusion[0, 1] = 80, 20
    confusion[1, 1] = 30
    confusion[2, 1], confusion[2, 2] = 30, 10
    module.early_confusion.copy_(confusion)
    module.early_cpa_epoch.fill_(3)
    module._init_sampler()
    got = module.sampler.probs.double()
    torch.testing.assert_close(got[:3], torch.tensor(probs, dtype=torch.float64))
    assert bool((got[3:] == 1.0).all())
    report = module.sampling_report()
    assert report["cpa"] == reading
    assert report["expected_kept_share"] == pytest.approx(share, rel=1e-6)


@pytest.mark.parametrize(
    "override",
    [
        "sampler.cpa=precision",
        "sampler.eta=0.5",
        "sampler.nrbs_count=pixels",
        "sampler=nrbs",
        "sampler=none",
        "loss=ce",
        "loss.main_normalizer=kept",
        "loss.side_target=off",
        "metrics.mpa=precision",
        "eval=flip",
    ],
)
def test_stage2_only_switches_share_stage1(tmp_path, override):
    assert stage1_key(compose_cfg([*RIM, override], tmp_path)) == stage1_key(
        compose_cfg(RIM, tmp_path)
    )


@pytest.mark.parametrize(
    "override",
    [
        "data.base_size=96",
        "data.flip_prob=0",
        "data.augmentation=paper",
        "schedule.cpa_epoch=2",
        "loss=focal",
        "seed=1",
    ],
)
def test_what_changes_stage1_changes_its_key(tmp_path, override):
    assert stage1_key(compose_cfg([*RIM, override], tmp_path)) != stage1_key(
        compose_cfg(RIM, tmp_path)
    )


def test_old_stage1_checkpoint_with_only_a_cpa_vector_is_refused(tmp_path):
    _, module = _stage2(tmp_path)
    c = module.num_classes
    state = {k: v for k, v in module.state_dict().items() if k != "early_confusion"}
    state["early_cpa"] = torch.linspace(0.1, 0.9, c, dtype=torch.float64)
    path = tmp_path / "old_stage1.ckpt"
    torch.save({"state_dict": state}, path)
    _, fresh = _stage2(tmp_path, counts=lambda c: ([1] * c, [1] * c))
    fresh.load_init_weights(str(path))  # the weights still load
    with pytest.raises(RuntimeError, match="older rimlab .* Retrain stage 1"):
        fresh._init_sampler()
    # resuming such a checkpoint through Lightning's strict load works too
    fresh.on_load_checkpoint({"state_dict": state})
    fresh.load_state_dict(state)
    assert int(fresh.early_confusion.sum()) == 0


def test_low_expected_kept_share_warns_loudly(tmp_path, caplog):
    # one huge class: eta = 1 pixel keeps ~nothing of it
    _, module = _stage2(
        tmp_path,
        "sampler=nrbs",
        "sampler.nrbs_count=pixels",
        counts=lambda c: ([10_000_000] + [1] * (c - 1), [1] * c),
    )
    with caplog.at_level("WARNING"):
        module._init_sampler()
    assert module.sampling_report()["expected_kept_share"] < 0.01
    assert "below 1%" in caplog.text


def test_side_target_off_freezes_danet_side_heads_and_full_keeps_them(tmp_path):
    for target, frozen in (("off", {"aux", "pam", "cam"}), ("sampled", {"aux"}), ("full", {"aux"})):
        _, module = _stage2(tmp_path, "model=danet_lite", f"loss.side_target={target}")
        assert set(module.frozen_heads) == frozen, target
    # stage 1 and the baseline always train the side heads on the full target
    cfg = compose_cfg([*RIM, "model=danet_lite", "loss.side_target=off"], tmp_path)
    base = compose_cfg([*RIM, "model=danet_lite"], tmp_path)
    assert stage1_key(cfg) == stage1_key(base)


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampler.cpa=iou", "sampler.cpa"),
        ("sampler.eta=-1", "sampler.eta"),
        ("sampler.nrbs_count=images", "sampler.nrbs_count"),
        ("loss.main_normalizer=all", "loss.main_normalizer"),
        ("loss.side_target=none", "loss.side_target"),
        ("metrics.mpa=iou", "metrics.mpa"),
    ],
)
def test_bad_switch_values_name_the_key(tmp_path, override, key):
    cfg = compose_cfg([*RIM, override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_a_sampler_that_keeps_everything_warns(tmp_path, caplog):
    # an early model that recalls only the background: every class is kept with probability 1
    _, module = _stage2(tmp_path, counts=lambda c: ([10] * c, [1] * c))
    c = module.num_classes
    confusion = torch.zeros(c, c, dtype=torch.int64)
    confusion[:, 0] = 10
    module.early_confusion.copy_(confusion)
    with caplog.at_level("WARNING"):
        module._init_sampler()
    assert float(module.sampler.probs.min()) == 1.0
    assert "rebalances nothing" in caplog.text


def test_nrbs_without_the_training_counts_refuses_with_the_fix(tmp_path):
    _, module = _stage2(tmp_path, "sampler=nrbs")
    with pytest.raises(RuntimeError, match="class_counts=datamodule.train_class_counts"):
        module._init_sampler()
    assert not module.sampler.is_ready
