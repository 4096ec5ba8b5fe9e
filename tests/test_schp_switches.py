"""The switches between SCHP's released training code and rimlab (docs/schp.md, issue 16 part 1).

Each test derives the official behaviour independently (PyTorch's ``F.kl_div``, SCHP's
per-epoch SGDR formula, a hand-written batch-statistics forward) and would fail on rimlab's
behaviour before the switch existed.
"""

from __future__ import annotations

import dataclasses
import math

import hydra
import pytest
import torch
import torch.nn.functional as F
from cfg_utils import compose_cfg
from torch import nn

from lightning_modules.inference import flip_logits
from lightning_modules.schp import SCHPLitModule, batch_statistics_mode, schp_schedule
from losses.ce2p import CE2PLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- soft-label loss scale


def _soft_case(num_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(2, num_classes, 3, 4, requires_grad=True)
    soft = torch.rand(2, num_classes, 3, 4).softmax(1)
    target = torch.randint(0, num_classes, (2, 3, 4))
    target[0, 0, :2] = 255  # two ignored pixels
    return logits, soft, target


def test_official_soft_reduction_has_the_gradient_of_kl_div_mean():
    """SCHP's soft term is ``F.kl_div(log p, q)`` with ``reduction='mean'`` over the labelled
    pixels x C entries; with soft_reduction=official rimlab's soft CE has that gradient (C = 5),
    per_pixel has C times more (today's behaviour)."""
    logits, soft, target = _soft_case()
    valid = target != 255
    # (B, C, H, W) -> (P, C): the labelled pixels, as SCHP's flatten_probas
    log_p = F.log_softmax(logits, 1).permute(0, 2, 3, 1)[valid]
    # reduction="mean" is the default SCHP relies on (spelt out: it warns when left implicit)
    official = F.kl_div(log_p, soft.permute(0, 2, 3, 1)[valid], reduction="mean")
    (grad_official,) = torch.autograd.grad(official, logits)

    def grad_of(reduction: str) -> torch.Tensor:
        loss = CE2PLoss(
            ce_weight=1.0,
            lovasz_weight=0.0,
            edge_weight=0.0,
            consistency_weight=0.0,
            parsing_keys=("out",),
            soft_reduction=reduction,
        )
        terms = loss({"out": logits}, target, soft_target=soft)
        return torch.autograd.grad(terms["loss"], logits)[0]

    torch.testing.assert_close(grad_of("official"), grad_official)
    torch.testing.assert_close(grad_of("per_pixel"), 5 * grad_official)


def test_official_soft_reduction_halves_the_soft_edge_term_only():
    """The edge KL of SCHP averages over 2 classes: the soft edge term is halved, the hard-label
    terms (before the first average) are the same under both reductions."""
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 6, 6)
    edge = torch.randn(1, 2, 6, 6)
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :, 3:] = 1
    soft_edge = torch.rand(1, 6, 6)
    kwargs = {"lovasz_weight": 0.0, "consistency_weight": 0.0, "parsing_keys": ("out",)}
    official = CE2PLoss(soft_reduction="official", **kwargs)
    per_pixel = CE2PLoss(soft_reduction="per_pixel", **kwargs)
    outputs = {"out": logits, "edge": edge}
    soft = logits.softmax(1)
    a = official(outputs, target, soft_target=soft, soft_edge=soft_edge)
    b = per_pixel(outputs, target, soft_target=soft, soft_edge=soft_edge)
    torch.testing.assert_close(a["loss/edge"], b["loss/edge"] / 2)
    torch.testing.assert_close(a["loss/soft_ce"], b["loss/soft_ce"] / 3)
    hard_a, hard_b = official(outputs, target), per_pixel(outputs, target)
    torch.testing.assert_close(hard_a["loss"], hard_b["loss"])
    with pytest.raises(ValueError, match="soft_reduction"):
        CE2PLoss(soft_reduction="sum")


# ---------------------------------------------------------------------- averaged model's mode


class _BNNet(nn.Module):
    """conv -> BN -> conv: a net whose output depends on which BN statistics are used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.bn(self.conv(x)))}


def _module(refine_mode: str) -> SCHPLitModule:
    torch.manual_seed(2)
    module = SCHPLitModule(
        net=_BNNet(),
        loss=CE2PLoss(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        num_classes=3,
        refine_mode=refine_mode,
    )
    with torch.no_grad():
        # statistics far from any batch's: eval and train mode give clearly different labels
        module.schp_net.bn.running_mean.fill_(3.0)
        module.schp_net.bn.running_var.fill_(9.0)
    module.schp_cycles.fill_(1)
    module._cycles_seen = 1  # a = 1/2
    return module


def test_refined_labels_use_batch_statistics_in_official_train_mode():
    """refine_mode=train: p_schp comes from the batch's own mean and biased variance (a
    hand-written forward), the running statistics are left unchanged and the averaged model
    returns to eval mode; refine_mode=eval (today's behaviour) uses the running statistics."""
    torch.manual_seed(3)
    image = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    one_hot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    for mode in ("train", "eval"):
        module = _module(mode)
        net = module.schp_net
        feat = net.conv(image)
        if mode == "train":
            mean = feat.mean((0, 2, 3), keepdim=True)
            var = feat.var((0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean = net.bn.running_mean.view(1, -1, 1, 1)
            var = net.bn.running_var.view(1, -1, 1, 1)
        w, b = net.bn.weight.view(1, -1, 1, 1), net.bn.bias.view(1, -1, 1, 1)
        normed = (feat - mean) / torch.sqrt(var + net.bn.eps) * w + b
        expected = 0.5 * net.head(normed).softmax(1) + 0.5 * one_hot
        extra = module.extra_loss_inputs({"image": image, "mask": target}, {})
        torch.testing.assert_close(extra["soft_target"], expected.detach())
        assert float(net.bn.running_mean[0]) == 3.0 and float(net.bn.running_var[0]) == 9.0
        assert not net.training and net.bn.track_running_stats
    with pytest.raises(ValueError, match="refine_mode"):
        _module("batch")


def test_batch_statistics_mode_restores_train_flags_after_an_error():
    net = _BNNet().eval()
    with pytest.raises(RuntimeError), batch_statistics_mode(net):
        assert net.training and not net.bn.track_running_stats
        raise RuntimeError("boom")
    assert not net.training and net.bn.track_running_stats


# ---------------------------------------------------------------------- learning rate per epoch


def _official_sgdr(epoch: int, lr: float = 7e-3) -> float:
    """SCHP's SGDRScheduler after warm-up, written from its definition: cosine from lr to
    eta_min = lr / 100 over epochs [10, 100), then 10-epoch cycles from lr / 2."""
    eta_min, warmup, start, cycle = lr / 100, 10, 100, 10
    if epoch < start:
        t = (epoch - warmup) / (start - warmup)
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t)) / 2
    t = ((epoch - start) % cycle) / cycle
    return eta_min + (lr / 2 - eta_min) * (1 + math.cos(math.pi * t)) / 2


def test_lr_interval_epoch_holds_sgdr_per_epoch_values():
    """lr_interval=epoch: every step of epoch e has SCHP's epoch-e learning rate (epochs past
    the warm-up, whose formula differs, see docs/schp.md); lr_interval=step moves within the
    epoch (today's behaviour)."""
    spe = 4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=7e-3)
    kwargs = {"steps_per_epoch": spe, "schp_start": 100, "cycle_epochs": 10}
    per_epoch = schp_schedule(opt, lr_interval="epoch", **kwargs).lr_lambdas[0]
    per_step = schp_schedule(opt, lr_interval="step", **kwargs).lr_lambdas[0]
    for epoch in (10, 37, 99, 100, 104, 129, 149):
        for k in range(spe):
            assert 7e-3 * per_epoch(epoch * spe + k) == pytest.approx(_official_sgdr(epoch))
    assert per_step(37 * spe + 3) != pytest.approx(per_step(37 * spe))
    with pytest.raises(ValueError, match="lr_interval"):
        schp_schedule(opt, lr_interval="batch", **kwargs)


# ---------------------------------------------------------------------- flip averaging


def test_schp_official_eval_averages_flipped_logits(tmp_path):
    """eval=schp_official (the default of experiment=schp_lip): 0.5 (z + unflip(z of the mirror)),
    logits, as SCHP's multi_scale_testing; the flip config averages probabilities."""
    cfg = compose_cfg(["experiment=schp_lip"], tmp_path)
    assert cfg.loss.soft_reduction == "official" and cfg.module.refine_mode == "train"
    assert cfg.schedule.lr_interval == "epoch" and cfg.module.scheduler.lr_interval == "epoch"
    protocol = hydra.utils.instantiate(cfg.eval)
    torch.manual_seed(4)
    weight = torch.randn(20, 3, 1, 1)

    def net_forward(x: torch.Tensor) -> torch.Tensor:
        # a position-dependent net: its mirrored run differs from the plain one
        return F.conv2d(x, weight) * torch.linspace(0.5, 2.0, x.shape[-1])

    image = torch.randn(1, 3, 5, 7)
    z, z_mirror = net_forward(image), net_forward(image.flip(-1))
    expected = 0.5 * (z + flip_logits(z_mirror, cfg.data.flip_pairs))
    torch.testing.assert_close(protocol(net_forward, image), expected)
    probs = dataclasses.replace(protocol, average="prob")
    assert (probs(net_forward, image) - expected).abs().max() > 0.1
