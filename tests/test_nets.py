"""Tests for lightning_modules.nets: dilated backbones, PSPNet outputs and encoder freezing."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from lightning_modules.nets import DilatedResNet, PSPNet, pretrained_checkpoint_path

H, W = 65, 81


@pytest.fixture(scope="module")
def r18() -> PSPNet:
    torch.manual_seed(0)
    return PSPNet(num_classes=7, backbone=18, bottleneck_channels=32, aux_channels=16)


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_features_output_stride_8(depth: int) -> None:
    net = DilatedResNet(depth).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, H, W))
    strides = {"c1": 4, "c2": 8, "c3": 8, "c4": 8}
    for key, stride in strides.items():
        assert feats[key].shape == (
            1,
            net.channels[key],
            math.ceil(H / stride),
            math.ceil(W / stride),
        )
    assert net.channels["c4"] == (512 if depth == 18 else 2048)


def test_backbone_output_stride_16() -> None:
    net = DilatedResNet(18, output_stride=16).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 64))
    assert feats["c3"].shape[-2:] == (4, 4) and feats["c4"].shape[-2:] == (4, 4)


@pytest.mark.parametrize("depth", [18, 50])
def test_dilation_reproduces_strided_resnet(depth: int) -> None:
    """A dilated net subsampled by 2 (layer3) / 4 (layer4) equals the strided torchvision net.

    This checks that the strides really moved into dilations with the right rates (a wrong rate
    or padding changes the values, not only the shapes).
    """
    torch.manual_seed(0)
    dilated = DilatedResNet(depth).eval()
    strided = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    missing, unexpected = strided.load_state_dict(dilated.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {"fc.weight", "fc.bias"}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = dilated(x)
        y = strided.maxpool(strided.relu(strided.bn1(strided.conv1(x))))
        c3 = strided.layer3(strided.layer2(strided.layer1(y)))  # (1, ., 4, 6), stride 16
        c4 = strided.layer4(c3)  # (1, ., 2, 3), stride 32
    assert feats["c4"].shape[-2:] == (8, 12)
    # Different conv algorithms sum in a different order: allow float32 round-off.
    torch.testing.assert_close(feats["c3"][..., ::2, ::2], c3, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(feats["c4"][..., ::4, ::4], c4, atol=1e-3, rtol=1e-3)
    if depth == 18:
        assert dilated.layer3[1].conv2.dilation == (2, 2)
        assert dilated.layer4[0].conv1.dilation == (2, 2)
        assert dilated.layer4[1].conv1.dilation == (4, 4)


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_missing_pretrained_weights_raise_with_path(
    depth: int, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = pretrained_checkpoint_path(depth)
    assert expected.startswith(str(tmp_path)) and expected.endswith(".pth")
    with pytest.raises(FileNotFoundError) as info:
        PSPNet(num_classes=3, backbone=depth, pretrained=True)
    message = str(info.value)
    assert expected in message and f"resnet{depth}(weights='IMAGENET1K_V1')" in message


def test_pretrained_weights_load_from_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = pretrained_checkpoint_path(18)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    net = DilatedResNet(18, pretrained=True)
    torch.testing.assert_close(net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.testing.assert_close(net.bn1.running_var, reference.bn1.running_var)


def test_pspnet_r18_outputs(r18: PSPNet) -> None:
    x = torch.randn(2, 3, H, W)
    r18.train()
    out = r18(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 7, H, W)
    r18.use_aux = False
    assert set(r18(x)) == {"out"}
    r18.use_aux = True
    r18.eval()
    with torch.no_grad():
        assert set(r18(x)) == {"out"}


def test_pspnet_r50_outputs() -> None:
    net = PSPNet(num_classes=5, backbone="resnet50").eval()
    assert net.ppm.out_channels == 2048 + 4 * 512
    with torch.no_grad():
        out = net(torch.randn(1, 3, 33, 41))
    assert set(out) == {"out"} and out["out"].shape == (1, 5, 33, 41)
    no_aux = PSPNet(num_classes=5, backbone=18, aux=False).train()
    assert no_aux.aux_head is None and set(no_aux(torch.randn(2, 3, 33, 33))) == {"out"}


def test_encoder_decoder_split_partitions_parameters(r18: PSPNet) -> None:
    enc = {id(p) for p in r18.encoder_parameters()}
    dec = {id(p) for p in r18.decoder_parameters()}
    everything = {id(p) for p in r18.parameters()}
    assert enc and dec and not enc & dec and enc | dec == everything
    assert enc == {id(p) for p in r18.backbone.parameters()}
    assert {id(p) for p in r18.aux_head.parameters()} <= dec
    assert r18.encoder_modules() == [r18.backbone]


def test_new_layers_initialised(r18: PSPNet) -> None:
    assert r18.classifier.weight.std() < 0.05 and r18.classifier.bias.abs().max() == 0
    bn = r18.bottleneck.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_freeze_encoder() -> None:
    torch.manual_seed(0)
    net = PSPNet(num_classes=4, backbone=18, bottleneck_channels=32, aux_channels=16)
    assert not net.frozen_encoder
    net.freeze_encoder()
    net.train()  # what Lightning does at the start of every training epoch
    assert net.frozen_encoder and net.training
    encoder_bns = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert encoder_bns and not any(m.training for m in encoder_bns)
    assert net.bottleneck.bn.training  # the decoder still trains its BN
    stats = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    decoder_stats = net.bottleneck.bn.running_mean.clone()

    out = net(torch.randn(2, 3, 33, 33))
    (out["out"].mean() + out["aux"].mean()).backward()

    for key, value in net.backbone.state_dict().items():
        torch.testing.assert_close(value, stats[key], msg=key)
    assert not torch.equal(net.bottleneck.bn.running_mean, decoder_stats)
    assert all(p.grad is None and not p.requires_grad for p in net.encoder_parameters())
    assert all(p.grad is not None for p in net.decoder_parameters())

    net.unfreeze_encoder()
    assert not net.frozen_encoder and all(m.training for m in encoder_bns)
    assert all(p.requires_grad for p in net.encoder_parameters())


def test_lite_backbone_strides_and_split():
    """The 'lite' encoder keeps the feature contract: c1 at stride 4, c2..c4 at stride 8."""
    from lightning_modules.nets.backbones import LiteResNet

    net = PSPNet(5, backbone="lite", pretrained=False, bottleneck_channels=32, aux_channels=16)
    assert isinstance(net.backbone, LiteResNet)
    feats = net.backbone(torch.zeros(2, 3, 65, 81))
    assert feats["c1"].shape[-2:] == (17, 21)
    for key in ("c2", "c3", "c4"):
        assert feats[key].shape[-2:] == (9, 11), key
    assert [feats[k].shape[1] for k in ("c1", "c2", "c3", "c4")] == [32, 64, 128, 256]
    net.train()
    out = net(torch.zeros(2, 3, 65, 81))
    assert out["out"].shape == out["aux"].shape == (2, 5, 65, 81)
    enc = {id(p) for p in net.encoder_parameters()}
    dec = {id(p) for p in net.decoder_parameters()}
    assert enc.isdisjoint(dec) and enc | dec == {id(p) for p in net.parameters()}
    with pytest.raises(ValueError, match="no pretrained weights"):
        PSPNet(5, backbone="lite", pretrained=True)
