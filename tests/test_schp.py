"""SCHP: weight averaging, BatchNorm re-estimation, the cyclical schedule, refined labels, resume."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from cfg_utils import TINY, compose_cfg
from torch import nn

from lightning_modules.schp import (
    SCHPCycle,
    average_into,
    reestimate_bn,
    schp_lr_factor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 1, bias=True),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 1),
        nn.BatchNorm2d(2),
    )


def test_average_into_is_the_running_mean_of_cycle_weights():
    torch.manual_seed(0)
    states = [_tiny_net() for _ in range(3)]
    average = _tiny_net()
    stats_before = average[1].running_mean.clone()
    for n, model in enumerate(states):
        average_into(average, model, n)
    for name, param in average.named_parameters():
        expected = sum(dict(m.named_parameters())[name] for m in states) / 3
        torch.testing.assert_close(param, expected)
    # Buffers are not averaged: BatchNorm is re-estimated instead.
    assert torch.equal(average[1].running_mean, stats_before)
    # n = 0 copies the model.
    fresh = _tiny_net()
    average_into(fresh, states[2], 0)
    for a, b in zip(fresh.parameters(), states[2].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_reestimate_bn_matches_hand_computation():
    torch.manual_seed(1)
    net = _tiny_net()
    with torch.no_grad():  # stale statistics and momentum that must not matter
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(9.0)
    net[1].momentum = 0.3
    batches = [torch.randn(3, 2, 4, 5), torch.randn(1, 2, 4, 5) * 2 + 1]
    seen = reestimate_bn(net, batches)
    assert seen == 4 and not net.training and net[1].momentum == 0.3

    # By hand: per-batch mean and unbiased variance of each BN input, weighted by batch size.
    def bn_inputs(x):
        h1 = net[0](x)
        mean = h1.mean((0, 2, 3))
        var = h1.var((0, 2, 3), unbiased=False)
        normed = (h1 - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
        h2 = net[3](
            F.relu(normed * net[1].weight[None, :, None, None] + net[1].bias[None, :, None, None])
        )
        return h1, h2

    means = {1: [], 4: []}
    variances = {1: [], 4: []}
    with torch.no_grad():
        for x in batches:
            for idx, h in zip((1, 4), bn_inputs(x), strict=True):
                means[idx].append(h.mean((0, 2, 3)))
                variances[idx].append(h.var((0, 2, 3), unbiased=True))
    for idx in (1, 4):
        expected_mean = (3 * means[idx][0] + 1 * means[idx][1]) / 4
        expected_var = (3 * variances[idx][0] + 1 * variances[idx][1]) / 4
        torch.testing.assert_close(net[idx].running_mean, expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[idx].running_var, expected_var, rtol=1e-5, atol=1e-6)


def test_schp_learning_rate_schedule():
    spe, start, cycle = 10, 6, 2
    kw = {"warmup_epochs": 1, "min_lr_ratio": 0.01, "cycle_lr_ratio": 0.5}
    f = [schp_lr_factor(s, spe, start, cycle, **kw) for s in range(spe * 12)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # warm-up
    assert f[10] == pytest.approx(1.0)  # cosine starts at the peak
    assert f[start * spe - 1] < 0.02  # annealed to ~lr/100 before the cycles
    assert f[start * spe] == pytest.approx(0.5)  # each cycle restarts at lr/2
    assert f[(start + cycle) * spe] == pytest.approx(0.5)
    mid = (start * spe) + cycle * spe // 2
    assert f[mid] == pytest.approx(0.01 + 0.49 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f[start * spe + 3] == pytest.approx(f[(start + cycle) * spe + 3])  # periodic


def test_cycle_ends():
    cb = SCHPCycle(schp_start=4, cycle_epochs=2)
    assert [e for e in range(1, 11) if cb.is_cycle_end(e)] == [4, 6, 8, 10]


def _soft_ce_rows(path):
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    soft = [r for r in rows if r.get("train/loss/soft_ce_step")]
    hard = [r for r in rows if r.get("train/loss/ce_step")]
    return soft, hard


SCHP_TINY = [
    "experiment=schp_synthetic",
    *TINY,
    "model=ce2p_lite",
    "schedule.schp_start=1",
    "schedule.cycle_epochs=1",
    "trainer.deterministic=true",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=2",
    "data.crop_size=[48,48]",
    "data.eval_size=[48,48]",
]


def test_schp_cycles_switch_to_soft_targets_and_survive_resume(tmp_path):
    from experiments.predict import load_parser
    from experiments.train import run

    data = tmp_path / "data"
    # Uninterrupted: 3 epochs, averages at the ends of epochs 1, 2 and 3.
    results = run(compose_cfg([*SCHP_TINY, "schedule.total_epochs=3"], tmp_path / "a", data))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    full = torch.load(last, weights_only=False)
    assert int(full["state_dict"]["schp_cycles"]) == 3
    assert int(full["state_dict"]["schp_epoch"]) == 3
    # Epoch 1 trains on the labels, epochs 2-3 on the refined (soft) labels.
    soft, hard = _soft_ce_rows(next((tmp_path / "a" / "run").rglob("metrics.csv")))
    assert {int(r["epoch"]) for r in hard} == {0} and {int(r["epoch"]) for r in soft} == {1, 2}

    # Interrupted after 2 epochs, then resumed in the same folder up to 3.
    run(compose_cfg([*SCHP_TINY, "schedule.total_epochs=2"], tmp_path / "b", data))
    part = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(part["state_dict"]["schp_cycles"]) == 2
    run(compose_cfg([*SCHP_TINY, "schedule.total_epochs=3", "resume=true"], tmp_path / "b", data))
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(resumed["state_dict"]["schp_cycles"]) == 3
    for key, value in full["state_dict"].items():
        if key.startswith("schp_net.") and value.is_floating_point():
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6)

    # train=false ckpt_path=... rescores the averaged model, not the last cycle's weights.
    again = run(
        compose_cfg(
            [*SCHP_TINY, "schedule.total_epochs=3", "train=false", f"ckpt_path={last}"],
            tmp_path / "c",
            data,
        )
    )
    assert again["val"]["mIoU"] == pytest.approx(results["val"]["mIoU"], abs=1e-9)

    # predict picks the averaged weights from the checkpoint.
    parser = load_parser(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", "cpu")
    for name, value in parser.net.state_dict().items():
        assert torch.equal(value, full["state_dict"][f"schp_net.{name}"])


def test_refined_labels_mix_average_predictions_with_ground_truth(tmp_path):
    """soft_target = (1 - a) softmax(schp(x)) + a one_hot(y), a = 1 / (n + 1); edges likewise."""
    from experiments.train import build_module
    from losses.edge import edge_targets

    cfg = compose_cfg([*SCHP_TINY, "schedule.total_epochs=2"], tmp_path)
    torch.manual_seed(0)
    module = build_module(cfg)
    batch = {"image": torch.randn(2, 3, 24, 24), "mask": torch.randint(0, 59, (2, 24, 24))}
    batch["mask"][0, :3] = 255
    assert module.extra_loss_inputs(batch, {"edge": None}) == {}  # no average yet
    module.schp_update([torch.randn(2, 3, 24, 24) for _ in range(2)], epoch=1)
    module.schp_update([torch.randn(2, 3, 24, 24) for _ in range(2)], epoch=2)
    assert int(module.schp_cycles) == 2 and int(module.schp_epoch) == 2
    module.train()
    assert not module.schp_net.training  # the average never trains
    extra = module.extra_loss_inputs(batch, {"edge": None})
    with torch.no_grad():
        out = module.schp_net(batch["image"], side_outputs=True)
    a = 1.0 / 3.0
    valid = batch["mask"] != 255
    one_hot = F.one_hot(batch["mask"].clamp(max=58), 59).permute(0, 3, 1, 2).float()
    expected = (1 - a) * out["out"].softmax(1) + a * one_hot
    torch.testing.assert_close(
        extra["soft_target"].permute(0, 2, 3, 1)[valid], expected.permute(0, 2, 3, 1)[valid]
    )
    edge_prob = out["edge"].softmax(1)[:, 1]
    hard = (edge_targets(batch["mask"]) == 1).float()
    torch.testing.assert_close(extra["soft_edge"], (1 - a) * edge_prob + a * hard)
    # Validation uses the average once it exists.
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.predict_logits(batch["image"]), out["out"])


@pytest.mark.slow
def test_schp_cycle_under_ddp_spawn(tmp_path):
    """2 gloo processes: the cycle end (average, BatchNorm re-estimation, statistics all-reduced)
    runs on every rank and the checkpoint holds the averaged model."""
    from experiments.train import run

    cfg = compose_cfg(
        [*SCHP_TINY, "trainer=ddp_cpu", "trainer.deterministic=false", "schedule.total_epochs=2"],
        tmp_path,
    )
    run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(ckpt["state_dict"]["schp_cycles"]) == 2
    stats = [v for k, v in ckpt["state_dict"].items() if k.endswith("running_var")]
    assert stats and all(torch.isfinite(v).all() for v in stats)
