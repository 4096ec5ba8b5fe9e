"""Tests for the DeepLabv3+ and DANet nets: shapes, ASPP rates, attention maths, split, freezing."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lightning_modules.nets import (
    ChannelAttentionModule,
    DANet,
    DeepLabV3Plus,
    EncoderDecoderNet,
    PositionAttentionModule,
)

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
H, W = 65, 81  # odd sizes: every stride rounds up (c1 17x21, c4 9x11 at 8, 5x6 at 16)
NETS = {"deeplabv3plus": DeepLabV3Plus, "danet": DANet}
# Small decoders on the lite encoder keep every test fast.
SMALL = {
    "deeplabv3plus": {
        "aspp_channels": 16,
        "low_level_channels": 8,
        "decoder_channels": 16,
        "aux_channels": 8,
    },
    "danet": {"inter_channels": 16, "aux_channels": 8},
}


def make_net(name: str, backbone: str | int = "lite", **kwargs) -> EncoderDecoderNet:
    torch.manual_seed(0)
    return NETS[name](num_classes=5, backbone=backbone, **{**SMALL[name], **kwargs})


def train_keys(name: str) -> set[str]:
    return {"out", "aux", "pam", "cam"} if name == "danet" else {"out", "aux"}


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", sorted(NETS))
def test_output_shapes_at_odd_sizes(name: str, output_stride: int) -> None:
    net = make_net(name, output_stride=output_stride).train()
    feats = net.backbone(torch.zeros(1, 3, H, W))
    c4_size = (math.ceil(H / output_stride), math.ceil(W / output_stride))
    assert feats["c4"].shape[-2:] == c4_size and feats["c1"].shape[-2:] == (17, 21)
    out = net(torch.randn(2, 3, H, W))
    assert set(out) == train_keys(name)
    for key, logits in out.items():
        assert logits.shape == (2, 5, H, W), key
        assert torch.isfinite(logits).all(), key


@pytest.mark.parametrize("name", sorted(NETS))
def test_resnet18_backbone_at_stride_16(name: str) -> None:
    """The dilated ResNets plug in as the lite encoder does (R50/R101: see the config tests)."""
    net = make_net(name, backbone=18, output_stride=16).train()
    out = net(torch.randn(2, 3, 33, 41))
    assert set(out) == train_keys(name)
    assert all(logits.shape == (2, 5, 33, 41) for logits in out.values())


@pytest.mark.parametrize(("output_stride", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_aspp_rates_follow_output_stride(output_stride: int, rates: tuple[int, ...]) -> None:
    net = make_net("deeplabv3plus", output_stride=output_stride)
    branches = net.aspp.branches
    assert branches[0].conv.kernel_size == (1, 1)
    dilations = tuple(b.conv.dilation for b in branches[1:])
    assert dilations == tuple((r, r) for r in rates)
    assert tuple(b.conv.padding for b in branches[1:]) == dilations  # size-preserving
    assert all(b.conv.kernel_size == (3, 3) for b in branches[1:])
    assert net.aspp.atrous_rates == rates
    # image pooling branch + projection of 1 + 3 + 1 branches
    assert isinstance(net.aspp.image_pool[0], nn.AdaptiveAvgPool2d)
    assert net.aspp.project[0].conv.in_channels == 5 * 16
    custom = make_net("deeplabv3plus", output_stride=output_stride, atrous_rates=[2, 3, 5])
    assert tuple(b.conv.dilation[0] for b in custom.aspp.branches[1:]) == (2, 3, 5)


@pytest.mark.parametrize("name", sorted(NETS))
def test_auxiliary_outputs_only_in_training(name: str) -> None:
    net = make_net(name)
    x = torch.randn(2, 3, 33, 33)
    assert set(net.train()(x)) == train_keys(name)
    net.use_aux = False
    assert set(net(x)) == {"out"}
    net.use_aux = True
    with torch.no_grad():
        assert set(net.eval()(x)) == {"out"}
    no_aux = make_net(name, aux=False).train()
    assert no_aux.aux_head is None
    assert set(no_aux(x)) == train_keys(name) - {"aux"}


@pytest.mark.parametrize("name", sorted(NETS))
def test_encoder_decoder_split_partitions_parameters(name: str) -> None:
    net = make_net(name)
    enc = {id(p) for p in net.encoder_parameters()}
    dec = {id(p) for p in net.decoder_parameters()}
    assert enc and dec and enc.isdisjoint(dec)
    assert enc | dec == {id(p) for p in net.parameters()}
    assert enc == {id(p) for p in net.backbone.parameters()}
    assert net.encoder_modules() == [net.backbone]
    assert {id(p) for p in net.aux_head.parameters()} <= dec
    if name == "danet":
        assert {id(net.pam.gamma), id(net.cam.gamma)} <= dec


@pytest.mark.parametrize("name", sorted(NETS))
def test_new_layers_initialised(name: str) -> None:
    net = make_net(name)
    classifiers = [net.classifier, net.aux_head.classifier]
    if name == "danet":
        classifiers += [net.pam_head.classifier, net.cam_head.classifier]
        assert net.pam.gamma.item() == 0 and net.cam.gamma.item() == 0
    for conv in classifiers:
        assert conv.weight.std() < 0.05 and conv.bias.abs().max() == 0


@pytest.mark.parametrize("name", sorted(NETS))
def test_freeze_encoder_through_a_training_step(name: str) -> None:
    net = make_net(name)
    if name == "danet":
        # With gamma = 0 the query/key convs get zero gradient; a nonzero gamma lets every
        # decoder parameter move, so "all of them changed" is a strict check.
        with torch.no_grad():
            net.pam.gamma.fill_(0.5)
            net.cam.gamma.fill_(0.5)
    net.freeze_encoder()
    net.train()  # what Lightning does at the start of every training epoch
    assert net.frozen_encoder and net.training
    assert not any(m.training for m in net.backbone.modules())
    encoder_state = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    decoder_params = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    decoder_bns = {
        n: m.running_mean.clone()
        for n, m in net.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not n.startswith("backbone.")
    }
    assert len(decoder_params) == len(net.decoder_parameters()) and decoder_bns

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    target = torch.randint(0, 5, (2, 33, 41))
    outputs = net(torch.randn(2, 3, 33, 41))
    assert set(outputs) == train_keys(name)
    loss = sum(F.cross_entropy(logits, target) for logits in outputs.values())
    loss.backward()
    optimizer.step()

    for key, value in net.backbone.state_dict().items():
        torch.testing.assert_close(value, encoder_state[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for p in net.encoder_parameters())
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), decoder_params[n]), f"{n} did not change"
    for n, m in net.named_modules():
        if n in decoder_bns:
            assert not torch.equal(m.running_mean, decoder_bns[n]), f"{n} statistics frozen"


# ------------------------------------------------------------------ attention modules


def reference_pam(module: PositionAttentionModule, x: torch.Tensor) -> torch.Tensor:
    """PAM as written in the authors' code (view / permute / bmm)."""
    b, c, h, w = x.shape
    proj_query = module.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)  # (B, N, C')
    proj_key = module.key_conv(x).view(b, -1, w * h)  # (B, C', N)
    energy = torch.bmm(proj_query, proj_key)  # (B, N, N)
    attention = torch.softmax(energy, dim=-1)
    proj_value = module.value_conv(x).view(b, -1, w * h)  # (B, C, N)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, h, w)
    return module.gamma * out + x


def reference_cam(module: ChannelAttentionModule, x: torch.Tensor) -> torch.Tensor:
    """CAM as written in the authors' code, including the `max - energy` trick."""
    b, c, h, w = x.shape
    proj_query = x.view(b, c, -1)  # (B, C, N)
    proj_key = x.view(b, c, -1).permute(0, 2, 1)  # (B, N, C)
    energy = torch.bmm(proj_query, proj_key)  # (B, C, C)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, x.view(b, c, -1)).view(b, c, h, w)
    return module.gamma * out + x


def test_attention_with_zero_gamma_is_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 5)
    pam, cam = PositionAttentionModule(16), ChannelAttentionModule()
    assert pam.query_conv.out_channels == pam.key_conv.out_channels == 2
    assert pam.gamma.item() == 0 and cam.gamma.item() == 0
    torch.testing.assert_close(pam(x), x, rtol=0, atol=0)
    torch.testing.assert_close(cam(x), x, rtol=0, atol=0)


def test_attention_matches_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    pam = PositionAttentionModule(16).double()
    cam = ChannelAttentionModule().double()
    with torch.no_grad():
        pam.gamma.fill_(0.7)
        cam.gamma.fill_(-1.3)
        torch.testing.assert_close(pam(x), reference_pam(pam, x))
        torch.testing.assert_close(cam(x), reference_cam(cam, x))
        # The trick is a per-row shift of -energy: CAM's weights are softmax(-X X^T).
        flat = x.flatten(2)
        weights = torch.softmax(-flat @ flat.transpose(1, 2), dim=-1)
        manual = x + cam.gamma * (weights @ flat).view_as(x)
        torch.testing.assert_close(cam(x), manual)
        # PAM mixes positions: moving one pixel changes the output elsewhere.
        y = x.clone()
        y[:, :, 0, 0] += 1.0
        assert not torch.allclose(pam(x)[:, :, 2, 4], pam(y)[:, :, 2, 4])


# ------------------------------------------------------------------ configs

ZOO_CONFIGS = sorted(
    p for p in CONF_MODEL.glob("*.yaml") if p.stem.startswith(("deeplabv3plus", "danet"))
)


def test_zoo_configs_exist() -> None:
    stems = {p.stem for p in ZOO_CONFIGS}
    for net in ("deeplabv3plus", "danet"):
        assert {f"{net}_r50", f"{net}_r101", f"{net}_lite"} <= stems


@pytest.mark.parametrize("path", ZOO_CONFIGS, ids=lambda p: p.stem)
def test_zoo_config_instantiates(path: Path) -> None:
    cfg = OmegaConf.load(path)
    cfg.num_classes = 4
    cfg.pretrained = False
    # The ResNet-50/101 nets are built on the meta device: the same modules and shape checks
    # (a wrong channel count still fails) without initialising ~60 M parameters on a CPU. Their
    # numerics are covered by the lite and ResNet-18 tests above.
    device = "cpu" if cfg.backbone == "lite" else "meta"
    with torch.device(device):
        net = hydra.utils.instantiate(cfg)
        assert isinstance(net, (DeepLabV3Plus, DANet))
        c1, c4 = net.backbone.channels["c1"], net.backbone.channels["c4"]
        if isinstance(net, DANet):
            inter = cfg.inter_channels or c4 // 4  # 512 for the ResNets
            assert net.pam_in.conv.out_channels == inter == net.classifier.in_channels
            assert net.pam.query_conv.out_channels == inter // 8
        else:
            assert net.low_level_reduce.conv.in_channels == c1  # stride-4 features
            first = net.decoder[0]  # ConvBNReLU, or a separable one (the mmseg recipe)
            conv = first.depthwise.conv if hasattr(first, "depthwise") else first.conv
            assert conv.in_channels == cfg.aspp_channels + cfg.low_level_channels
        # Tiny input: c1 5x6, c4 3x3; enough for the shapes.
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, 3, 17, 21))
    assert set(out) == {"out"} and out["out"].shape == (1, 4, 17, 21)
    assert out["out"].device.type == device


@pytest.mark.parametrize("name", sorted(NETS))
def test_default_loss_reaches_every_parameter(name: str) -> None:
    """With the default loss every trainable parameter gets a gradient (DDP needs no
    find_unused_parameters): DANet's pam/cam classifiers are scored as side terms."""
    from losses import CrossEntropyLoss, ParsingLoss

    net = make_net(name).train()
    target = torch.randint(0, 5, (2, H, W))
    loss = ParsingLoss(CrossEntropyLoss())(net(torch.randn(2, 3, H, W)), target)
    loss["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


# ------------------------------------------------------------------ DeepLabv3+ options


def _conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
    """Parameters of a bias-free kxk conv followed by BatchNorm (weight and bias)."""
    return cout * (cin // groups) * k * k + 2 * cout


def _sep(cin: int, cout: int) -> int:
    """Depthwise 3x3 conv + BN, then pointwise 1x1 conv + BN."""
    return _conv_bn(cin, cin, 3, groups=cin) + _conv_bn(cin, cout)


def _head_params(net: DeepLabV3Plus) -> int:
    parts = (net.aspp, net.low_level_reduce, net.decoder, net.classifier)
    return sum(p.numel() for m in parts for p in m.parameters())


@pytest.mark.parametrize("project_kernel", [1, 3])
def test_separable_parameter_count_by_hand(project_kernel: int) -> None:
    a, low, d, k = 16, 8, 16, 5  # SMALL's channels, 5 classes
    sep = make_net("deeplabv3plus", separable=True, aspp_project_kernel_size=project_kernel)
    plain = make_net("deeplabv3plus", aspp_project_kernel_size=project_kernel)
    c1, c4 = sep.backbone.channels["c1"], sep.backbone.channels["c4"]
    assert (c1, c4) == (32, 256)  # the lite encoder's widths
    shared = (
        _conv_bn(c4, a)  # 1x1 branch
        + _conv_bn(c4, a)  # image pooling branch
        + _conv_bn(5 * a, a, project_kernel)  # projection of the 5 branches
        + _conv_bn(c1, low)  # stride-4 reduction
        + d * k
        + k  # classifier (with bias)
    )
    separable = shared + 3 * _sep(c4, a) + _sep(a + low, d) + _sep(d, d)
    dense = shared + 3 * _conv_bn(c4, a, 3) + _conv_bn(a + low, d, 3) + _conv_bn(d, d, 3)
    assert _head_params(sep) == separable
    assert _head_params(plain) == dense
    # The 1x1 branch, the projection and the reduction stay plain convs; rate-1 "atrous" branches
    # stay plain too.
    assert sep.aspp.branches[0].conv.kernel_size == (1, 1)
    assert sep.aspp.project[0].conv.kernel_size == (project_kernel,) * 2
    rates = [b.depthwise.conv.dilation for b in sep.aspp.branches[1:]]
    assert rates == [(12, 12), (24, 24), (36, 36)]
    assert all(b.depthwise.conv.groups == c4 for b in sep.aspp.branches[1:])
    ones = make_net("deeplabv3plus", separable=True, atrous_rates=[1, 2])
    assert ones.aspp.branches[1].conv.kernel_size == (3, 3)  # rate 1: plain ConvBNReLU
    assert ones.aspp.branches[2].depthwise.conv.dilation == (2, 2)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_separable_output_shapes(output_stride: int) -> None:
    net = make_net(
        "deeplabv3plus",
        output_stride=output_stride,
        separable=True,
        aspp_project_kernel_size=3,
        dropout_position="classifier",
    )
    out = net.train()(torch.randn(2, 3, H, W))
    assert set(out) == {"out", "aux"}
    assert all(v.shape == (2, 5, H, W) and torch.isfinite(v).all() for v in out.values())
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, H, W))["out"].shape == (1, 5, H, W)


def test_dropout_position() -> None:
    default = make_net("deeplabv3plus")
    assert default.aspp.project[1].p == 0.1 and default.classifier_dropout.p == 0.0
    mmseg = make_net("deeplabv3plus", dropout_position="classifier")
    assert mmseg.aspp.project[1].p == 0.0 and mmseg.classifier_dropout.p == 0.1
    assert mmseg.aux_head.dropout.p == 0.1
    # Same module tree, so checkpoints load across the option.
    assert default.state_dict().keys() == mmseg.state_dict().keys()
    with pytest.raises(ValueError, match="dropout_position"):
        make_net("deeplabv3plus", dropout_position="head")


@pytest.mark.parametrize("separable", [False, True])
def test_output_depends_on_the_stride4_features(separable: bool) -> None:
    """Perturbing only c1 (the backbone's layer1 output as the decoder sees it) moves the logits;
    an unperturbed pass through the same hook leaves them bit-identical."""
    net = make_net("deeplabv3plus", separable=separable).eval()
    x = torch.randn(1, 3, H, W)
    delta = {"c1": 0.0}
    seen = {}

    def perturb_c1(module, inputs, feats):
        # Only the c1 entry changes: c2..c4 were already computed from the clean layer1 output.
        seen["c4"] = feats["c4"]
        return {**feats, "c1": feats["c1"] + delta["c1"]}

    with torch.no_grad():
        base = net(x)["out"]
        handle = net.backbone.register_forward_hook(perturb_c1)
        try:
            same = net(x)["out"]
            clean_c4 = seen["c4"].clone()
            delta["c1"] = torch.randn(1, net.backbone.channels["c1"], 17, 21)
            moved = net(x)["out"]
            torch.testing.assert_close(seen["c4"], clean_c4, rtol=0, atol=0)
        finally:
            handle.remove()
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert (moved - base).abs().max() > 1e-3
    # A perturbation in one corner of c1 moves that corner of the logits more than the far one.
    with torch.no_grad():
        corner = torch.zeros(1, net.backbone.channels["c1"], 17, 21)
        corner[..., :3, :3] = 5.0
        delta["c1"] = corner
        handle = net.backbone.register_forward_hook(perturb_c1)
        try:
            local = (net(x)["out"] - base).abs()
        finally:
            handle.remove()
    assert local[..., :8, :8].mean() > 10 * local[..., -8:, -8:].mean()
