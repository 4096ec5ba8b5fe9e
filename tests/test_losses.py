"""Tests for ``losses``: ILM against a naive loop, gradient structure, focal/CE, ParsingLoss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from losses import (
    CrossEntropyLoss,
    FocalLoss,
    InterClassLoss,
    ParsingLoss,
    cross_entropy,
    focal_loss,
    inter_class_loss,
)

IGNORE = 255
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _inputs(
    seed: int = 0, b: int = 2, c: int = 4, h: int = 3, w: int = 5, ignore_frac: float = 0.3
):
    """Random logits ``(B, C, H, W)`` and a target ``(B, H, W)`` with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


def _naive_ilm(logits, target, margin=1.0, valid_mask=None):
    """Eqs. 6-7 with explicit loops over pixels and classes, averaged over counted pixels."""
    b, c, h, w = logits.shape
    total, count = 0.0, 0
    for n in range(b):
        for i in range(h):
            for k in range(w):
                y = int(target[n, i, k])
                if y == IGNORE or (valid_mask is not None and not bool(valid_mask[n, i, k])):
                    continue
                count += 1
                v_y = float(logits[n, y, i, k])
                for j in range(c):
                    if j != y:
                        total += max(0.0, float(logits[n, j, i, k]) + margin - v_y)
    return total / count if count else 0.0


# --------------------------------------------------------------------------- inter-class loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.0, 2.5, -0.5])
def test_ilm_matches_naive_loop(seed, margin):
    logits, target = _inputs(seed)
    got = inter_class_loss(logits, target, margin=margin, ignore_index=IGNORE)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_naive_ilm(logits, target, margin), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 3])
def test_ilm_valid_mask_matches_naive_loop(seed):
    logits, target = _inputs(seed, h=4, w=4)
    valid_mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed + 10)) < 0.5
    got = inter_class_loss(logits, target, margin=1.0, valid_mask=valid_mask)
    expected = _naive_ilm(logits, target, 1.0, valid_mask)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The mask must change the result here, or the test would not test it.
    assert got.item() != pytest.approx(_naive_ilm(logits, target, 1.0), rel=1e-3)


def test_ilm_margin_is_respected():
    # One pixel, V = [3, 1, 2.5], y = 0: gaps V_y - V_j are 2 and 0.5.
    logits = torch.tensor([3.0, 1.0, 2.5]).view(1, 3, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert inter_class_loss(logits, target, margin=0.0).item() == 0.0
    assert inter_class_loss(logits, target, margin=1.0).item() == pytest.approx(0.5)
    assert inter_class_loss(logits, target, margin=3.0).item() == pytest.approx(1.0 + 2.5)
    assert InterClassLoss(margin=3.0)(logits, target).item() == pytest.approx(3.5)


def test_ilm_zero_when_every_margin_is_met():
    logits, target = _inputs(4)
    margin = 1.5
    # Push the true class score above every other class score by at least the margin.
    index = target.clamp(max=logits.shape[1] - 1).unsqueeze(1)
    others_max = logits.amax(dim=1, keepdim=True)
    logits = logits.scatter(1, index, others_max + margin)
    logits.requires_grad_(True)
    loss = inter_class_loss(logits, target, margin=margin)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_ilm_gradient_structure():
    # Integer scores and margin keep the hinge arguments exact, so "satisfied" is unambiguous.
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 2, 5, 4, 4
    margin = 1.0
    logits = torch.randint(-3, 4, (b, c, h, w), generator=g).float().requires_grad_(True)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[:, 0, :] = IGNORE
    inter_class_loss(logits, target, margin=margin).backward()
    grad = logits.grad

    valid = target != IGNORE
    assert torch.count_nonzero(grad.permute(0, 2, 3, 1)[~valid]) == 0  # ignored pixels: all zero

    violated_any = False
    for n in range(b):
        for i in range(h):
            for k in range(w):
                y = int(target[n, i, k])
                if y == IGNORE:
                    continue
                v = logits[n, :, i, k].detach()
                active = [j for j in range(c) if j != y and v[j] + margin - v[y] > 0]
                count = int(valid.sum())
                for j in range(c):
                    if j == y:
                        expected = -len(active) / count
                    else:
                        expected = 1.0 / count if j in active else 0.0
                    assert grad[n, j, i, k].item() == pytest.approx(expected, abs=1e-7)
                violated_any |= bool(active)
    assert violated_any  # the random scores must produce some active hinges


def test_ilm_no_labelled_pixels_gives_zero_with_graph():
    logits, target = _inputs(6)
    target.fill_(IGNORE)
    logits.requires_grad_(True)
    loss = inter_class_loss(logits, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0

    target = torch.zeros_like(target)
    empty = torch.zeros_like(target, dtype=torch.bool)
    assert inter_class_loss(logits, target, valid_mask=empty).item() == 0.0


def test_ilm_ignores_nonfinite_scores_on_ignored_pixels():
    logits, target = _inputs(7)
    reference = inter_class_loss(logits, target)
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    logits = logits.masked_fill(ignored, float("nan")).requires_grad_(True)
    loss = inter_class_loss(logits, target)
    assert loss.item() == pytest.approx(reference.item())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_ilm_bf16_input():
    logits, target = _inputs(8)
    low = logits.to(torch.bfloat16).requires_grad_(True)
    loss = inter_class_loss(low, target)
    assert loss.dtype == torch.float32
    expected = _naive_ilm(low.detach().float(), target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert low.grad.dtype == torch.bfloat16


def test_ilm_has_no_pairwise_intermediate():
    # Autograd keeps every saved tensor; none may be larger than one (B, C, H, W) tensor.
    logits, target = _inputs(9, b=2, c=16, h=8, w=8)
    logits.requires_grad_(True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inter_class_loss(logits, target)
    assert sizes and max(sizes) <= logits.numel()


# --------------------------------------------------------------------------- CE and focal


def test_cross_entropy_matches_torch():
    logits, target = _inputs(10)
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=smoothing)
        got = CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=smoothing)(logits, target)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits, target = _inputs(11)
    target.fill_(IGNORE)
    logits.requires_grad_(True)
    loss = cross_entropy(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_focal_gamma_zero_is_cross_entropy():
    logits, target = _inputs(12)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_matches_formula_with_alpha():
    logits, target = _inputs(13)
    alpha = [0.5, 1.0, 2.0, 0.25]
    gamma = 2.0
    valid = target != IGNORE
    prob = logits.softmax(1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)[valid]
    weights = torch.tensor(alpha)[target[valid]]
    expected = (-weights * (1 - prob) ** gamma * prob.log()).mean()
    assert focal_loss(logits, target, gamma, alpha).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    module = FocalLoss(gamma=gamma, alpha=alpha)
    assert module(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert "class_weights" not in module.state_dict()
    # A scalar alpha only scales.
    plain = focal_loss(logits, target, gamma)
    assert focal_loss(logits, target, gamma, 0.25).item() == pytest.approx(0.25 * plain.item())


def test_focal_down_weights_easy_pixels():
    logits, target = _inputs(14)
    assert focal_loss(logits, target, gamma=2.0) < focal_loss(logits, target, gamma=0.0)


# --------------------------------------------------------------------------- ParsingLoss


def _outputs(seed: int = 20, aux: bool = True):
    logits, target = _inputs(seed, c=5, h=6, w=6, ignore_frac=0.1)
    outputs = {"out": logits}
    if aux:
        outputs["aux"] = torch.randn(
            logits.shape, generator=torch.Generator().manual_seed(seed + 1)
        )
    return outputs, target


def test_parsing_loss_terms_and_weights_add_up():
    outputs, target = _outputs()
    loss = ParsingLoss(CrossEntropyLoss(), aux_weight=0.4, ilm=InterClassLoss(2.0), ilm_weight=0.7)
    terms = loss(outputs, target)
    ce = F.cross_entropy(outputs["out"], target, ignore_index=IGNORE)
    aux = F.cross_entropy(outputs["aux"], target, ignore_index=IGNORE)
    ilm = _naive_ilm(outputs["out"], target, margin=2.0)
    assert set(terms) == {"loss", "loss/main", "loss/ce", "loss/aux", "loss/ilm"}
    assert terms["loss/main"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["loss/ce"] is terms["loss/main"]
    assert terms["loss/aux"].item() == pytest.approx(aux.item(), rel=1e-6)
    assert terms["loss/ilm"].item() == pytest.approx(ilm, rel=1e-5)
    total = ce.item() + 0.4 * aux.item() + 0.7 * ilm
    assert terms["loss"].item() == pytest.approx(total, rel=1e-5)


def test_parsing_loss_optional_terms():
    outputs, target = _outputs(aux=False)
    terms = ParsingLoss(FocalLoss())(outputs, target)
    assert set(terms) == {"loss", "loss/main", "loss/focal"}
    assert terms["loss"] is terms["loss/main"]

    outputs, target = _outputs(aux=True)
    terms = ParsingLoss(CrossEntropyLoss(), aux_weight=0.0)(outputs, target)
    assert "loss/aux" not in terms
    assert terms["loss"].item() == pytest.approx(terms["loss/ce"].item())


def test_parsing_loss_sample_mask_makes_main_target_ignore():
    outputs, target = _outputs()
    mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    loss = ParsingLoss(CrossEntropyLoss(), aux_weight=0.4, main_normalizer="kept")
    terms = loss(outputs, target, sample_mask=mask)

    masked = target.clone()
    masked[~mask] = IGNORE
    expected_main = F.cross_entropy(outputs["out"], masked, ignore_index=IGNORE)
    expected_aux = F.cross_entropy(outputs["aux"], target, ignore_index=IGNORE)  # full target
    assert terms["loss/main"].item() == pytest.approx(expected_main.item(), rel=1e-6)
    assert terms["loss/aux"].item() == pytest.approx(expected_aux.item(), rel=1e-6)
    assert terms["loss/main"].item() != pytest.approx(loss(outputs, target)["loss/main"].item())

    # Gradient of the main term only reaches sampled pixels.
    logits = outputs["out"].clone().requires_grad_(True)
    loss({"out": logits}, target, sample_mask=mask)["loss"].backward()
    assert torch.count_nonzero(logits.grad.permute(0, 2, 3, 1)[~mask]) == 0


def test_main_normalizer_labelled_divides_by_every_labelled_pixel_by_hand():
    # One image, 2 classes, 4 pixels: labels [0, 1, 1, ignore]; the sampler keeps class 1 only.
    # Logits favour the label by 1 at the first two pixels and the wrong class by 1 at the third,
    # so per-pixel CE = log(1 + e^-1) at pixels 0, 1 and log(1 + e^1) at pixel 2.
    out = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0, 0.0]]]])  # (1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 1, IGNORE]]])  # (1, 1, 4)
    mask = torch.tensor([[[False, True, True, False]]])
    good, bad = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    labelled = ParsingLoss(CrossEntropyLoss(), aux_weight=0.0)  # the default normaliser
    kept = ParsingLoss(CrossEntropyLoss(), aux_weight=0.0, main_normalizer="kept")
    # kept pixels 1 and 2: sum good + bad; labelled pixels 0, 1, 2 -> divide by 3, kept -> by 2
    value = labelled({"out": out}, target, sample_mask=mask)["loss/main"].item()
    assert value == pytest.approx((good + bad) / 3, rel=1e-6)
    assert kept({"out": out}, target, sample_mask=mask)["loss/main"].item() == pytest.approx(
        (good + bad) / 2, rel=1e-6
    )
    # without a sampler the two agree (mean over the 3 labelled pixels)
    assert labelled({"out": out}, target)["loss/main"].item() == pytest.approx(
        (2 * good + bad) / 3, rel=1e-6
    )
    # dropped pixels keep zero gradient; the kept ones get 1/3 of the per-pixel gradient
    logits = out.clone().requires_grad_(True)
    labelled({"out": logits}, target, sample_mask=mask)["loss"].backward()
    assert torch.count_nonzero(logits.grad[..., 0]) == 0
    p = torch.softmax(out[0, :, 0, 2], dim=0)  # pixel 2, label 1
    expected = (p - torch.tensor([0.0, 1.0])) / 3
    torch.testing.assert_close(logits.grad[0, :, 0, 2], expected)
    with pytest.raises(ValueError, match="main_normalizer"):
        ParsingLoss(CrossEntropyLoss(), main_normalizer="pixels")


def test_parsing_loss_nothing_sampled_is_finite():
    outputs, target = _outputs(aux=False)
    nothing = torch.zeros_like(target, dtype=torch.bool)
    terms = ParsingLoss(CrossEntropyLoss(), ilm=InterClassLoss())(outputs, target, nothing)
    assert terms["loss/main"].item() == 0.0
    assert torch.isfinite(terms["loss"])


def test_parsing_loss_ilm_region():
    outputs, target = _outputs(aux=False)
    mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    everywhere = ParsingLoss(CrossEntropyLoss(), ilm=InterClassLoss(), ilm_region="all")
    sampled = ParsingLoss(CrossEntropyLoss(), ilm=InterClassLoss(), ilm_region="sampled")
    logits = outputs["out"]
    assert everywhere(outputs, target, mask)["loss/ilm"].item() == pytest.approx(
        _naive_ilm(logits, target), rel=1e-5
    )
    assert sampled(outputs, target, mask)["loss/ilm"].item() == pytest.approx(
        _naive_ilm(logits, target, valid_mask=mask), rel=1e-5
    )
    # Without a sampler, "sampled" falls back to every labelled pixel.
    assert sampled(outputs, target)["loss/ilm"].item() == pytest.approx(
        _naive_ilm(logits, target), rel=1e-5
    )


def test_parsing_loss_argument_checks():
    with pytest.raises(ValueError, match="ilm_region"):
        ParsingLoss(CrossEntropyLoss(), ilm_region="everywhere")
    with pytest.raises(ValueError, match="ignore_index"):
        ParsingLoss(CrossEntropyLoss(ignore_index=-1), ignore_index=255)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["ce", "ce_ilm", "focal", "focal_ilm"])
def test_loss_configs_instantiate(name):
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml")
    loss = hydra_utils.instantiate(cfg)
    assert isinstance(loss, ParsingLoss)
    assert (loss.ilm is not None) == name.endswith("_ilm")
    assert loss.main_name == name.split("_")[0]
    outputs, target = _outputs()
    terms = loss(outputs, target)
    assert torch.isfinite(terms["loss"])
    assert f"loss/{loss.main_name}" in terms


def test_parsing_loss_scores_side_outputs_against_the_full_target():
    """DANet's "pam"/"cam" heads: side_weight x the main criterion each, unsampled target."""
    outputs, target = _outputs()
    g = torch.Generator().manual_seed(5)
    outputs = {
        **outputs,
        **{k: torch.randn(outputs["out"].shape, generator=g) for k in ("pam", "cam")},
    }
    mask = torch.rand(target.shape, generator=g) < 0.5
    terms = ParsingLoss(
        CrossEntropyLoss(),
        aux_weight=0.4,
        side_weight=0.5,
        main_normalizer="kept",
        side_target="full",
    )(outputs, target, sample_mask=mask)
    ce = {k: F.cross_entropy(outputs[k], target, ignore_index=IGNORE).item() for k in outputs}
    main = F.cross_entropy(outputs["out"], target.masked_fill(~mask, IGNORE), ignore_index=IGNORE)
    assert terms["loss/pam"].item() == pytest.approx(ce["pam"], rel=1e-6)
    assert terms["loss/cam"].item() == pytest.approx(ce["cam"], rel=1e-6)
    total = main.item() + 0.4 * ce["aux"] + 0.5 * (ce["pam"] + ce["cam"])
    assert terms["loss"].item() == pytest.approx(total, rel=1e-5)
    off = ParsingLoss(CrossEntropyLoss(), side_weight=0.0)(outputs, target)
    assert "loss/pam" not in off
    off = ParsingLoss(CrossEntropyLoss(), side_target="off")(outputs, target, sample_mask=mask)
    assert "loss/pam" not in off and "loss/cam" not in off


def test_side_target_sampled_scores_side_outputs_like_the_main_term():
    """Eq. 8 in stage 2: the side outputs learn from the sampled regions, same normaliser."""
    outputs, target = _outputs(aux=False)
    g = torch.Generator().manual_seed(6)
    outputs = {**outputs, "pam": torch.randn(outputs["out"].shape, generator=g)}
    mask = torch.rand(target.shape, generator=g) < 0.3
    terms = ParsingLoss(CrossEntropyLoss(), side_outputs=("pam",))(
        outputs, target, sample_mask=mask
    )
    masked = target.masked_fill(~mask, IGNORE)
    n_labelled = int((target != IGNORE).sum())
    for key in ("out", "pam"):
        summed = F.cross_entropy(outputs[key], masked, ignore_index=IGNORE, reduction="sum")
        expected = summed.item() / n_labelled
        name = "loss/main" if key == "out" else "loss/pam"
        assert terms[name].item() == pytest.approx(expected, rel=1e-5)
    # no sampler: sampled and full are the same
    plain = ParsingLoss(CrossEntropyLoss(), side_outputs=("pam",))(outputs, target)
    full = ParsingLoss(CrossEntropyLoss(), side_outputs=("pam",), side_target="full")(
        outputs, target
    )
    assert plain["loss/pam"].item() == pytest.approx(full["loss/pam"].item(), rel=1e-7)


@pytest.mark.parametrize(
    "kwargs,scored",
    [
        ({}, {"aux", "pam", "cam"}),
        ({"aux_weight": 0.0}, {"pam", "cam"}),
        ({"side_target": "off"}, {"aux"}),
        ({"side_weight": 0.0, "aux_weight": 0.0}, set()),
        ({"side_outputs": ("pam",), "side_target": "full"}, {"aux", "pam"}),
    ],
)
def test_parsing_loss_names_the_outputs_it_weights(kwargs, scored):
    from losses import CE2PLoss

    assert ParsingLoss(CrossEntropyLoss(), **kwargs).scored_outputs() == scored
    assert CE2PLoss().scored_outputs() == set()
    assert CE2PLoss(aux_weight=0.4).scored_outputs() == {"aux"}
