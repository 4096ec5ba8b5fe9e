"""SCHP: weight averaging, BatchNorm re-estimation, the cyclical schedule, refined labels, resume."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from cfg_utils import ROOT, TINY, compose_cfg
from torch import nn
from torch.utils.data import DistributedSampler

from lightning_modules.schp import (
    SCHPCycle,
    average_into,
    bn_shard_loader,
    collect_bn_moments,
    load_bn_moments,
    merge_bn_moments,
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


def _bn_inputs(net, x):
    """By hand: the inputs of the two BatchNorms of ``_tiny_net`` in train mode (each batch
    normalised with its own statistics)."""
    h1 = net[0](x)
    mean = h1.mean((0, 2, 3))
    var = h1.var((0, 2, 3), unbiased=False)
    normed = (h1 - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    h2 = net[3](
        F.relu(normed * net[1].weight[None, :, None, None] + net[1].bias[None, :, None, None])
    )
    return h1, h2


def _whole_set_stats(net, batches):
    """Mean and unbiased variance of each BN input over every pixel of every batch."""
    with torch.no_grad():
        inputs = [_bn_inputs(net, x) for x in batches]
    stats = {}
    for k, idx in enumerate((1, 4)):
        # (B, C, H, W) per batch -> (C, all pixels)
        pixels = torch.cat([h[k].transpose(0, 1).reshape(h[k].shape[1], -1) for h in inputs], 1)
        stats[idx] = (pixels.mean(1), pixels.var(1, unbiased=True))
    return stats


def _shard_batches():
    """Four batches whose means differ a lot: even ones (one shard) around +3, odd ones around -2."""
    gen = torch.Generator().manual_seed(5)
    return [
        torch.randn(3, 2, 4, 5, generator=gen) * (1 + k) + (3.0 if k % 2 == 0 else -2.0)
        for k in range(4)
    ]


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
    for idx, (mean, var) in _whole_set_stats(net, batches).items():
        torch.testing.assert_close(net[idx].running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[idx].running_var, var, rtol=1e-5, atol=1e-6)


def test_bn_statistics_of_two_shards_merge_exactly():
    """Shards merged by their sums equal one process reading everything; averaging the shards'
    variances (the former DDP rule) does not: it drops the spread between the shard means."""
    torch.manual_seed(2)
    net = _tiny_net()
    batches = _shard_batches()
    single = copy.deepcopy(net)
    reestimate_bn(single, batches)
    parts, shard_nets = [], []
    for rank in range(2):
        shard_net = copy.deepcopy(net)
        moments, seen = collect_bn_moments(shard_net, batches[rank::2])
        assert seen == 6
        reestimate_bn(shard_net, batches[rank::2])  # this shard's own statistics
        parts.append(moments)
        shard_nets.append(shard_net)
    merged = copy.deepcopy(net)
    load_bn_moments(merged, merge_bn_moments(parts))
    expected = _whole_set_stats(net, batches)
    for idx, (mean, var) in expected.items():
        for model in (single, merged):
            torch.testing.assert_close(model[idx].running_mean, mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model[idx].running_var, var, rtol=1e-5, atol=1e-5)
    # The former rule: the mean of the two shards' variances, far below the true variance.
    averaged_var = (shard_nets[0][1].running_var + shard_nets[1][1].running_var) / 2
    assert (expected[1][1] - averaged_var).max() > 0.5


def test_bn_reestimation_normalises_per_process_with_sync_batchnorm(monkeypatch):
    """``trainer=ddp`` converts the averaged net to SyncBatchNorm; in train mode under DDP those
    layers would normalise with every rank's batches (on CPU they refuse). The re-estimation runs
    them as plain BatchNorm: each shard's sums, and their merge, equal the per-process hand
    computation, and the layers are SyncBatchNorms again afterwards."""
    torch.manual_seed(3)
    net = _tiny_net()
    batches = _shard_batches()
    expected = _whole_set_stats(net, batches)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    # What a SyncBatchNorm sees inside a DDP run: an initialised process group.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        sync.train()(batches[0])  # it would synchronise with the other ranks
    parts = []
    for rank in range(2):
        moments, seen = collect_bn_moments(copy.deepcopy(sync), batches[rank::2])
        assert seen == 6
        parts.append(moments)
    merged = copy.deepcopy(sync)
    load_bn_moments(merged, merge_bn_moments(parts))
    assert reestimate_bn(sync, batches) == 12
    for idx, (mean, var) in expected.items():
        for model in (sync, merged):
            assert type(model[idx]) is nn.SyncBatchNorm and "forward" not in vars(model[idx])
            torch.testing.assert_close(model[idx].running_mean, mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model[idx].running_var, var, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="SyncBatchNorm expected"):
        sync.train()(batches[0])  # restored: training still synchronises


def test_bn_shard_loader_splits_like_distributed_sampler():
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=2, drop_last=False)
    shards = [
        [int(v) for (batch,) in bn_shard_loader(loader, rank, 2) for v in batch]
        for rank in range(2)
    ]
    assert shards == [[0, 2, 4], [1, 3, 0]]  # equal sizes: index 0 repeated on rank 1
    assert bn_shard_loader(loader, 0, 1) is loader
    sharded = DataLoader(
        loader.dataset, batch_size=2, sampler=DistributedSampler(loader.dataset, 2, 1)
    )
    assert bn_shard_loader(sharded, 1, 2) is sharded  # already split over the ranks


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
    from run import run

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


class _FixedAverage(nn.Module):
    """Stands in for the averaged model: fixed class and edge probabilities, any input."""

    def __init__(self, probs: torch.Tensor, edge_prob: torch.Tensor) -> None:
        super().__init__()
        self.probs, self.edge_prob = probs, edge_prob

    def forward(self, image: torch.Tensor, side_outputs: bool = False) -> dict:
        edge = torch.stack([torch.zeros_like(self.edge_prob), torch.logit(self.edge_prob)], 1)
        return {"out": self.probs.log(), "edge": edge}  # softmax(log p) = p


def test_refined_labels_are_mixed_in_probability_space_by_hand(tmp_path):
    """soft_target = (1 - a) p_schp + a one_hot(y) and soft_edge = (1 - a) q_schp + a edge(y),
    a = 1 / (n + 1), on a 1 x 5 image with 3 classes, n = 3 models averaged (a = 1/4)."""
    from experiments.build import build_module

    module = build_module(compose_cfg([*SCHP_TINY, "schedule.total_epochs=2"], tmp_path))
    # Per pixel (columns): the averaged model's class probabilities and edge probability.
    probs = torch.tensor(
        [[0.7, 0.1, 0.2, 0.5, 0.3], [0.2, 0.6, 0.2, 0.4, 0.3], [0.1, 0.3, 0.6, 0.1, 0.4]]
    ).reshape(1, 3, 1, 5)
    edge_prob = torch.tensor([[[0.9, 0.2, 0.4, 0.6, 0.5]]])
    module.schp_net = _FixedAverage(probs, edge_prob)
    module.schp_cycles.fill_(3)
    module._cycles_seen = 3
    label = torch.tensor([[[0, 2, 1, 1, 255]]])
    batch = {"image": torch.zeros(1, 3, 1, 5), "mask": label}
    extra = module.extra_loss_inputs(batch, {"edge": None})
    # 3/4 p + 1/4 one_hot, column by column (the ignored column 4 is masked by the loss).
    expected = torch.tensor(
        [
            [0.775, 0.075, 0.15, 0.375],
            [0.15, 0.45, 0.40, 0.55],
            [0.075, 0.475, 0.45, 0.075],
        ]
    )
    torch.testing.assert_close(extra["soft_target"][0, :, 0, :4], expected)
    # Edges of [0, 2, 1, 1, ignored]: seeds at columns 0 and 1 (their right neighbours
    # differ; pairs with the ignored pixel do not count), dilated by 3: columns 0-2.
    # 3/4 q + 1/4 edge: [0.675 + 0.25, 0.15 + 0.25, 0.3 + 0.25, 0.45, 0.375].
    torch.testing.assert_close(
        extra["soft_edge"], torch.tensor([[[0.925, 0.40, 0.55, 0.45, 0.375]]])
    )
    # SCHP's code mixes the logits instead, softmax((1 - a) z + a one_hot(y)): another target.
    logit_space = 0.75 * probs.log() + 0.25 * F.one_hot(label.clamp(max=2), 3).permute(0, 3, 1, 2)
    assert (logit_space.softmax(1)[0, :, 0, :4] - expected).abs().max() > 0.05


def test_refined_labels_upsample_the_average_without_align_corners(tmp_path):
    """The averaged model's scores reach the label size by bilinear interpolation with
    align_corners=False (SCHP: True), before the softmax: 2 columns -> 4 columns by hand."""
    from experiments.build import build_module

    module = build_module(compose_cfg([*SCHP_TINY, "schedule.total_epochs=2"], tmp_path))
    probs = torch.tensor([[0.8, 0.1], [0.1, 0.3], [0.1, 0.6]]).reshape(1, 3, 1, 2)
    edge_prob = torch.tensor([[[0.2, 0.7]]])
    module.schp_net = _FixedAverage(probs, edge_prob)
    module.schp_cycles.fill_(1)
    module._cycles_seen = 1  # a = 1/2
    label = torch.tensor([[[0, 0, 2, 2]]])
    batch = {"image": torch.zeros(1, 3, 1, 4), "mask": label}
    extra = module.extra_loss_inputs(batch, {"edge": None})
    # Output column j samples input position (j + 0.5) / 2 - 0.5, clamped to [0, 1]:
    # weights of column 1 of the input: 0, 1/4, 3/4, 1.
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    z = probs.log()[0, :, 0]  # (3, 2)
    logits = z[:, :1] * (1 - w) + z[:, 1:] * w  # (3, 4)
    one_hot = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    torch.testing.assert_close(
        extra["soft_target"][0, :, 0], 0.5 * logits.softmax(0) + 0.5 * one_hot
    )
    e = torch.logit(edge_prob)[0, 0]  # (2,) edge logits
    edges = torch.tensor([1.0, 1, 1, 0])  # seed at column 1 (0 | 2), dilated by 3
    torch.testing.assert_close(
        extra["soft_edge"][0, 0], 0.5 * torch.sigmoid(e[0] * (1 - w) + e[1] * w) + 0.5 * edges
    )


def test_soft_cross_entropy_uses_the_refined_labels_as_probabilities():
    """-sum_c q_c log p_c with q as given (SCHP's KL applies a second softmax to q); ignored
    pixels do not count whatever their q (SCHP's to_one_hot turns them into background)."""
    from losses.ce2p import soft_cross_entropy

    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1).repeat(1, 1, 1, 2)
    q = torch.tensor([[0.2, 0.9], [0.8, 0.1]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 255]]])
    # p = softmax([0, ln 3]) = [1/4, 3/4]: -(0.2 ln 1/4 + 0.8 ln 3/4) = 0.507405...
    expected = -(0.2 * math.log(0.25) + 0.8 * math.log(0.75))
    assert float(soft_cross_entropy(logits, q, target)) == pytest.approx(expected, rel=1e-6)
    # SCHP's target softmax(q) = [0.354, 0.646] gives another value.
    schp_q = torch.tensor([0.2, 0.8]).softmax(0)
    schp = -(schp_q[0] * math.log(0.25) + schp_q[1] * math.log(0.75))
    assert abs(float(schp) - expected) > 0.05


def test_edge_targets_width_3_and_ignored_pixels_excluded():
    """Edge width 3 (conf/loss/ce2p.yaml, SCHP's 3 x 3 kernel); ignored pixels are 255 in the
    edge targets (SCHP marks them 0, or 1 next to a boundary, and trains on them)."""
    from omegaconf import OmegaConf

    from losses.edge import edge_targets

    assert OmegaConf.load(ROOT / "conf" / "loss" / "ce2p.yaml").edge_width == 3
    label = torch.tensor([[[0, 0, 0, 1, 1, 1, 255]]])
    # Seed at column 2 (0 | 1); the 1 | 255 pair does not count; 3-wide: columns 1-3.
    expected = torch.tensor([[[0, 1, 1, 1, 0, 0, 255]]])
    assert torch.equal(edge_targets(label), expected)
    assert torch.equal(edge_targets(label, width=1), torch.tensor([[[0, 0, 1, 0, 0, 0, 255]]]))


def test_schp_update_counters_and_evaluation_with_the_average(tmp_path):
    from experiments.build import build_module

    cfg = compose_cfg([*SCHP_TINY, "schedule.total_epochs=2"], tmp_path)
    torch.manual_seed(0)
    module = build_module(cfg)
    batch = {"image": torch.randn(2, 3, 24, 24), "mask": torch.randint(0, 59, (2, 24, 24))}
    assert module.extra_loss_inputs(batch, {"edge": None}) == {}  # no average yet
    module.schp_update([torch.randn(2, 3, 24, 24) for _ in range(2)], epoch=1)
    module.schp_update([torch.randn(2, 3, 24, 24) for _ in range(2)], epoch=2)
    assert int(module.schp_cycles) == 2 and int(module.schp_epoch) == 2
    module.train()
    assert not module.schp_net.training  # the average never trains
    extra = module.extra_loss_inputs(batch, {"edge": None})
    assert extra["soft_target"].shape == (2, 59, 24, 24)
    torch.testing.assert_close(extra["soft_target"].sum(1), torch.ones(2, 24, 24))
    # Validation uses the average once it exists, not the current weights.
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            module.predict_logits(batch["image"]), module.schp_net(batch["image"])["out"]
        )
        assert not torch.allclose(
            module.predict_logits(batch["image"]), module.net(batch["image"])["out"]
        )


@pytest.mark.slow
def test_schp_cycle_under_ddp_spawn(tmp_path):
    """2 gloo processes: the cycle end (average, BatchNorm re-estimation, statistics all-reduced)
    runs on every rank and the checkpoint holds the averaged model."""
    from run import run

    cfg = compose_cfg(
        [*SCHP_TINY, "trainer=ddp_cpu", "trainer.deterministic=false", "schedule.total_epochs=2"],
        tmp_path,
    )
    run(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(ckpt["state_dict"]["schp_cycles"]) == 2
    stats = [v for k, v in ckpt["state_dict"].items() if k.endswith("running_var")]
    assert stats and all(torch.isfinite(v).all() for v in stats)
