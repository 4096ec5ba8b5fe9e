"""CE2P: Lovasz-softmax, edge targets and losses, consistency, the network and its configs."""

from __future__ import annotations

import itertools

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfg_utils import SINGLE, TINY, compose_cfg

from losses.ce2p import CE2PLoss, soft_cross_entropy
from losses.edge import (
    balanced_edge_loss,
    edge_targets,
    parsing_edge_consistency,
    soft_parsing_edges,
)
from losses.lovasz import lovasz_softmax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- Lovasz-softmax


def _jaccard_set_loss(fg: np.ndarray, mismatch: np.ndarray) -> float:
    """Berman's Delta_J(M) = |M| / |fg ∪ M| evaluated on sets."""
    if not mismatch.any():
        return 0.0
    return mismatch.sum() / (fg | mismatch).sum()


def _lovasz_extension_by_integral(errors: np.ndarray, fg: np.ndarray) -> float:
    """f(x) = integral over t of Delta_J({i: x_i >= t}): the Lovasz extension from its definition."""
    levels = np.unique(np.concatenate([[0.0], errors]))
    total = 0.0
    for lo, hi in itertools.pairwise(levels):
        total += (hi - lo) * _jaccard_set_loss(fg, errors >= hi)
    return total


def _brute_force_lovasz(probs: np.ndarray, labels: np.ndarray, present_only=True) -> float:
    """Lovasz-softmax of (P, C) probabilities and (P,) labels, class by class, set by set."""
    losses = []
    for c in range(probs.shape[1]):
        fg = labels == c
        if present_only and not fg.any():
            continue
        losses.append(_lovasz_extension_by_integral(np.abs(fg - probs[:, c]), fg))
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_softmax_matches_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 2, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (2, 3, 2), generator=gen)
    target[0, 0, 0] = 255  # an ignored pixel
    if seed % 2:
        target[target == 3] = 1  # an absent class
    got = lovasz_softmax(logits, target)
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    labels = target.reshape(-1).numpy()
    keep = labels != 255
    expected = _brute_force_lovasz(probs[keep], labels[keep])
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    got_all = lovasz_softmax(logits, target, classes="all")
    assert float(got_all) == pytest.approx(
        _brute_force_lovasz(probs[keep], labels[keep], present_only=False), rel=1e-5, abs=1e-6
    )


def test_lovasz_softmax_limits_and_gradient():
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).double() * 50.0
    assert float(lovasz_softmax(perfect, target)) == pytest.approx(0.0, abs=1e-12)
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    loss = lovasz_softmax(logits, torch.full((1, 2, 2), 255))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # Per image: the mean of the two single-image losses.
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    tgt = torch.randint(0, 3, (2, 4, 4))
    per_image = lovasz_softmax(logits, tgt, per_image=True)
    singles = [lovasz_softmax(logits[i : i + 1], tgt[i : i + 1]) for i in range(2)]
    assert float(per_image) == pytest.approx(float(sum(singles) / 2))


def _vectorised_lovasz(logits, target, ignore_index=255, classes="present"):
    """The former all-classes-at-once implementation (several (P, C) temporaries), kept as an
    independent reference for the class-by-class one."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    probs, labels = probs[labels != ignore_index], labels[labels != ignore_index]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    fg = (labels[:, None] == torch.arange(num_classes)).float()  # (P, C)
    errors_sorted, order = torch.sort((fg - probs).abs(), dim=0, descending=True)
    fg_sorted = fg.gather(0, order)
    gts = fg_sorted.sum(0, keepdim=True)
    jaccard = 1.0 - (gts - fg_sorted.cumsum(0)) / (gts + (1.0 - fg_sorted).cumsum(0))
    weights = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    per_class = (errors_sorted * weights).sum(0)  # (C,)
    if classes == "all":
        return per_class.mean()
    present = fg.sum(0) > 0
    return (per_class * present).sum() / present.sum().clamp(min=1)


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("chunk_elements", [1, 200, None])  # 1 or 2 classes per sort, or all
def test_lovasz_softmax_class_loop_equals_vectorised_values_and_gradients(classes, chunk_elements):
    from losses.lovasz import _lovasz_flat

    gen = torch.Generator().manual_seed(3)
    for trial in range(4):
        logits = (torch.randn(2, 5, 7, 6, generator=gen) * 2).requires_grad_()
        target = torch.randint(0, 5, (2, 7, 6), generator=gen)
        target[0, 0, :3] = 255  # 81 labelled pixels
        if trial % 2:
            target[target == 3] = 1  # an absent class
        if chunk_elements is None:
            got = lovasz_softmax(logits, target, classes=classes)
        else:
            got = _lovasz_flat(logits.softmax(1), target, 255, classes, chunk_elements)
        (grad,) = torch.autograd.grad(got, logits)
        expected = _vectorised_lovasz(logits, target, classes=classes)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        assert float(got.detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
        assert grad.abs().sum() > 0


def test_lovasz_softmax_gradient_matches_finite_differences_of_definition():
    """d loss / d p from the class loop against central differences of the set-by-set
    definition (the loss is piecewise linear in p, so a small step is exact)."""
    from losses.lovasz import _lovasz_flat

    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(1, 3, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 3, (1, 3, 4), generator=gen)
    target[0, 0, 0] = 255
    target[target == 2] = 0  # class 2 absent
    labels = target.reshape(-1).numpy()
    keep = labels != 255
    base = probs.detach().numpy()
    for classes in ("present", "all"):
        (grad,) = torch.autograd.grad(_lovasz_flat(probs, target, 255, classes), probs)

        def definition(p, classes=classes):
            flat = p.transpose(0, 2, 3, 1).reshape(-1, 3)  # (1, C, H, W) -> (HW, C)
            return _brute_force_lovasz(flat[keep], labels[keep], classes == "present")

        numeric = np.zeros_like(base)
        eps = 1e-7
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            numeric[idx] = (definition(up) - definition(down)) / (2 * eps)
        np.testing.assert_allclose(grad.numpy(), numeric, atol=1e-6)
        # The absent class 2 counts (its largest false positive) only with classes="all".
        assert (np.abs(numeric[0, 2]).sum() > 0) == (classes == "all")


# ---------------------------------------------------------------------- edges


def test_edge_targets_of_a_known_label_map():
    label = torch.zeros(1, 6, 6, dtype=torch.long)
    label[:, :, 3:] = 1  # vertical boundary between columns 2 and 3
    # Seeds: the left pixel of each differing row pair (column 2), the upper-left of diagonal
    # pairs (column 2, rows 0-4) and the upper-right of anti-diagonal pairs (column 3, rows 0-4).
    seeds = torch.zeros(6, 6, dtype=torch.long)
    seeds[:, 2] = 1
    seeds[:5, 3] = 1
    assert torch.equal(edge_targets(label, width=1)[0], seeds)
    # A 3x3 dilation of those seeds covers columns 1-4 entirely.
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[:, 1:5] = 1
    assert torch.equal(edge_targets(label, width=3)[0], expected)
    # A horizontal boundary marks the lower pixel of each column pair (row 2 -> rows 2 and 1
    # for the diagonals' upper pixels).
    label = torch.zeros(1, 4, 3, dtype=torch.long)
    label[:, 2:] = 5
    expected = torch.zeros(4, 3, dtype=torch.long)
    expected[2] = 1  # vertical pairs: the lower pixel
    expected[1] = 1  # diagonal / anti-diagonal pairs: the upper pixel
    assert torch.equal(edge_targets(label, width=1)[0], expected)
    # Boundaries with ignored pixels are no edges; ignored pixels stay ignored.
    label = torch.zeros(1, 3, 3, dtype=torch.long)
    label[:, :, 2] = 255
    edges = edge_targets(label, width=3)[0]
    assert torch.equal(edges[:, :2], torch.zeros(3, 2, dtype=torch.long))
    assert torch.equal(edges[:, 2], torch.full((3,), 255))


def test_soft_parsing_edges_equal_edge_targets_on_one_hot():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 9, 7), generator=gen)
    label[0, :2, :3] = 255
    valid = label != 255
    one_hot = F.one_hot(label.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    soft = soft_parsing_edges(one_hot, valid, width=3)
    hard = edge_targets(label, width=3)
    assert torch.equal(soft[valid], hard[valid].float())


def test_balanced_edge_loss_equals_weighted_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    edge = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 5, 6, generator=gen) > 0.8).long()
    pos, neg = float((target == 1).sum()), float((target == 0).sum())
    # SCHP: weights [w_neg, w_pos] = [pos, neg] / (pos + neg) in F.cross_entropy.
    weights = torch.tensor([pos, neg], dtype=torch.float64) / (pos + neg)
    expected = F.cross_entropy(edge, target, weight=weights)
    assert float(balanced_edge_loss(edge, target)) == pytest.approx(float(expected), rel=1e-6)
    # With an ignored pixel and a soft target of exactly the hard one: the same value.
    target[0, 0, 0] = 255
    hard = balanced_edge_loss(edge, target)
    soft = balanced_edge_loss(edge, target, soft_target=(target == 1).double())
    assert float(hard) == pytest.approx(float(soft))
    assert float(balanced_edge_loss(edge, torch.zeros_like(target))) == 0.0  # no edge pixel


def test_consistency_is_zero_when_branches_agree_and_has_gradient():
    label = torch.zeros(1, 6, 6, dtype=torch.long)
    label[:, :, 3:] = 1
    parsing = F.one_hot(label, 2).permute(0, 3, 1, 2).float() * 40.0
    edges = edge_targets(label).float()
    edge = torch.stack([torch.zeros_like(edges), (edges * 2 - 1) * 40.0], dim=1)
    assert float(parsing_edge_consistency(parsing, edge, label)) < 1e-12
    parsing = torch.randn(1, 2, 6, 6, requires_grad=True)
    edge = torch.randn(1, 2, 6, 6, requires_grad=True)
    parsing_edge_consistency(parsing, edge, label).backward()
    assert parsing.grad.abs().sum() > 0 and edge.grad.abs().sum() > 0


def test_soft_cross_entropy_on_one_hot_equals_cross_entropy():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = 255
    q = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).double()
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert float(soft_cross_entropy(logits, q, target)) == pytest.approx(float(expected))


def test_ce2p_loss_terms():
    gen = torch.Generator().manual_seed(2)
    outputs = {
        "out": torch.randn(2, 4, 8, 8, generator=gen),
        "parsing": torch.randn(2, 4, 8, 8, generator=gen),
        "edge": torch.randn(2, 2, 8, 8, generator=gen),
    }
    target = torch.randint(0, 4, (2, 8, 8), generator=gen)
    loss = CE2PLoss()
    terms = loss(outputs, target)
    assert set(terms) == {
        "loss",
        "loss/main",
        "loss/ce",
        "loss/lovasz",
        "loss/edge",
        "loss/consistency",
    }
    ce = sum(F.cross_entropy(outputs[k], target) for k in ("out", "parsing"))
    lov = sum(lovasz_softmax(outputs[k], target) for k in ("out", "parsing"))
    edge = balanced_edge_loss(outputs["edge"], edge_targets(target))
    cons = sum(
        parsing_edge_consistency(outputs[k], outputs["edge"], target) for k in ("out", "parsing")
    )
    expected = 0.5 * ce + 0.5 * lov + edge + 0.1 * cons
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["loss/main"]) == pytest.approx(
        float(
            0.5 * F.cross_entropy(outputs["out"], target)
            + 0.5 * lovasz_softmax(outputs["out"], target)
        ),
        rel=1e-5,
    )
    soft = loss(
        outputs,
        target,
        soft_target=torch.full((2, 4, 8, 8), 0.25),
        soft_edge=torch.full((2, 8, 8), 0.5),
    )
    assert "loss/soft_ce" in soft and "loss/ce" not in soft


# ---------------------------------------------------------------------- the network


def test_ce2p_lite_shapes_and_side_outputs():
    from lightning_modules.nets import CE2P

    torch.manual_seed(0)
    net = CE2P(
        num_classes=5,
        backbone="lite",
        output_stride=8,
        ppm_channels=8,
        context_channels=16,
        decoder_channels=16,
        low_proj=8,
        edge_channels=8,
        fusion_channels=16,
    )
    x = torch.randn(2, 3, 50, 66)
    out = net(x)
    assert set(out) == {"out", "parsing", "edge"}
    assert out["out"].shape == (2, 5, 50, 66) and out["parsing"].shape == (2, 5, 50, 66)
    assert out["edge"].shape == (2, 2, 50, 66)
    net.eval()
    with torch.no_grad():
        assert set(net(x)) == {"out"}
        side = net(x, side_outputs=True)
    assert set(side) == {"out", "parsing", "edge"}
    # Every parameter receives a gradient from the CE2P loss.
    net.train()
    target = torch.randint(0, 5, (2, 50, 66))
    CE2PLoss()(net(x), target)["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_ce2p_encoder_decoder_split_and_freezing():
    from lightning_modules.nets import CE2P

    net = CE2P(
        num_classes=3,
        backbone="lite",
        ppm_channels=8,
        context_channels=8,
        decoder_channels=8,
        low_proj=4,
        edge_channels=4,
        fusion_channels=8,
    )
    enc = {id(p) for p in net.encoder_parameters()}
    assert enc == {id(p) for p in net.backbone.parameters()}
    dec = {id(p) for p in net.decoder_parameters()}
    assert not enc & dec and len(enc) + len(dec) == len(list(net.parameters()))
    for part in (net.ppm, net.context, net.decoder, net.edge, net.fusion, net.classifier):
        assert {id(p) for p in part.parameters()} <= dec
    net.freeze_encoder()
    net.train()
    assert not net.backbone.training and net.decoder.training
    assert all(not p.requires_grad for p in net.backbone.parameters())


def test_ce2p_r101_config_builds_schp_shapes(tmp_path):
    """The R101 config (pretrained off: no weight files here) at SCHP's stride 16."""
    cfg = compose_cfg(["model=ce2p_r101", "model.pretrained=false", "data=lip"], tmp_path)
    net = hydra.utils.instantiate(cfg.model)
    assert net.backbone.depth == 101 and net.backbone.output_stride == 16
    assert net.edge.out_channels == 768 and net.decoder.out_channels == 256
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 65, 49), side_outputs=True)
    assert out["out"].shape == (1, 20, 65, 49) and out["edge"].shape == (1, 2, 65, 49)


def test_ce2p_lite_training_steps_through_parsing_module(tmp_path):
    """model=ce2p_lite loss=ce2p: the named terms reach the LightningModule and training runs."""
    from experiments.build import build_module

    cfg = compose_cfg(
        ["experiment=quickstart", *TINY, *SINGLE, "model=ce2p_lite", "loss=ce2p"], tmp_path
    )
    module = build_module(cfg)
    assert module.build_config["model"]["_target_"] == "lightning_modules.nets.CE2P"
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 59, (2, 32, 32))}
    module.train()
    outputs = module(batch["image"])
    terms = module.loss(outputs, batch["mask"])
    assert {"loss/ce", "loss/lovasz", "loss/edge", "loss/consistency"} <= set(terms)
    terms["loss"].backward()
    module.eval()
    with torch.no_grad():
        assert module.predict_logits(batch["image"]).shape == (2, 59, 32, 32)
