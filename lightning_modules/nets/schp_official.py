"""SCHP's network as the official code defines it (``networks/AugmentCE2P.py: resnet101``).

CE2P on SCHP's own ResNet-101, which differs from torchvision's (rimlab's ``model=ce2p_r101``):

- a deep stem: three 3x3 convolutions (3 -> 64 stride 2, 64 -> 64, 64 -> 128), each followed by
  BatchNorm + ReLU, then the 3x3 stride-2 max-pool; layer1 therefore starts from 128 channels;
- layer4 dilated at 2 in every block, its first one included (torchvision's
  ``replace_stride_with_dilation`` keeps dilation 1 in the first block); output stride 16;
- the heads (PSP context, edge, decoder, fusion) normalise with InPlace-ABN, i.e. BatchNorm then
  LeakyReLU(0.01): here ``nn.BatchNorm2d`` + ``nn.LeakyReLU(0.01)`` (InPlace-ABN's CUDA extension
  is what keeps the official code off CPUs); the backbone's own BatchNorms have no activation
  inside (``activation='none'``) and are followed by ReLU, as there;
- every resize is bilinear with ``align_corners=True``, including the final one to the input size
  (SCHP's criterion and ``evaluate.py`` upsample with ``align_corners=True``).

Sub-module names below the five top-level parts keep the official definition's (``conv1``,
``layer3.4.bn2``, ``stages.0.1`` ...) so that a published checkpoint maps onto this net by
renaming a few prefixes (``lightning_modules.official_weights``).

The input convention is part of the model config: SCHP's ImageNet weights expect BGR images in
``[0, 1]`` normalised with ``mean=(0.406, 0.456, 0.485)``, ``std=(0.225, 0.224, 0.229)`` (BGR
order). rimlab's data pipeline normalises RGB with ImageNet's RGB statistics (``data_mean``,
``data_std``); the net undoes that and applies its own convention in one per-channel affine map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from lightning_modules.nets.heads import EncoderDecoderNet

__all__ = ["DeepStemResNet", "SCHPCE2P", "SCHP_BGR_MEAN", "SCHP_BGR_STD"]

SCHP_BGR_MEAN = (0.406, 0.456, 0.485)
SCHP_BGR_STD = (0.225, 0.224, 0.229)
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)
LEAKY_SLOPE = 0.01  # InPlace-ABN's default slope


def _up(x: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)``, bilinear with corners aligned (SCHP's resize)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def conv_abn(cin: int, cout: int, kernel_size: int = 1) -> nn.Sequential:
    """``Conv (no bias) -> BN -> LeakyReLU(0.01)``: a conv followed by SCHP's ``InPlaceABNSync``.

    The Sequential indices (``0`` conv, ``1`` norm) are the official ones.
    """
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class DeepStemResNet(nn.Module):
    """SCHP's ResNet: deep stem, Bottleneck stages, layer4 dilated at 2 (output stride 16).

    Args:
        layers: blocks per stage; ``(3, 4, 23, 3)`` is ResNet-101 (tests use fewer).
        pretrained: path of SCHP's ImageNet file (``resnet101-imagenet.pth``, the official
            ``models/`` download, same parameter names, ``fc.*`` ignored) or None / False.

    Attributes:
        channels: ``{"c1": 256, "c2": 512, "c3": 1024, "c4": 2048}``.
        output_stride: 16.
    """

    def __init__(
        self, layers: Sequence[int] = (3, 4, 23, 3), pretrained: str | bool | None = None
    ) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers={list(layers)}: expected 4 positive block counts")
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 128
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        # Dilation 2 in every block, the first included: SCHP's multi_grid (1, 1, 1).
        self.layer4 = self._make_layer(512, layers[3], dilation=2)
        self.channels = {"c1": 256, "c2": 512, "c3": 1024, "c4": 2048}
        self.output_stride = 16
        self.depth = 101 if layers == (3, 4, 23, 3) else sum(layers) * 3 + 2
        if pretrained:
            state = torch.load(str(pretrained), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = self.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(
                    f"{pretrained}: not SCHP's ImageNet ResNet (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]})"
                )

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        # torchvision's Bottleneck has SCHP's layout: stride on the 3x3 conv, padding = dilation.
        stage = [Bottleneck(self.inplanes, planes, stride, downsample, dilation=dilation)]
        self.inplanes = planes * 4
        stage += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: ``(B, 3, H, W)``. Returns ``c1`` ``(B, 256, H/4, W/4)``, ``c2`` (stride 8),
        ``c3`` and ``c4`` ``(B, 2048, H/16, W/16)`` (stride 16)."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))  # (B, 128, H/2, W/2)
        c1 = self.layer1(self.maxpool(x))  # (B, 256, H/4, W/4)
        c2 = self.layer2(c1)  # (B, 512, H/8, W/8)
        c3 = self.layer3(c2)  # (B, 1024, H/16, W/16)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": self.layer4(c3)}


class SCHPContext(nn.Module):
    """SCHP's ``PSPModule``: pooled 1x1 ABN branches + the features -> 3x3 ABN bottleneck."""

    def __init__(self, features: int = 2048, out_features: int = 512, sizes=(1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d((s, s)),
                nn.Conv2d(features, out_features, 1, bias=False),
                nn.BatchNorm2d(out_features),
                nn.LeakyReLU(LEAKY_SLOPE),
            )
            for s in sizes
        )
        self.bottleneck = conv_abn(features + len(sizes) * out_features, out_features, 3)

    def forward(self, feats: Tensor) -> Tensor:
        """Args: feats ``(B, 2048, h, w)``. Returns ``(B, 512, h, w)``."""
        size = feats.shape[-2:]
        # each branch: (B, 512, s, s) -> (B, 512, h, w); then (B, 2048 + 4 * 512, h, w)
        priors = [_up(stage(feats), size) for stage in self.stages] + [feats]
        return self.bottleneck(torch.cat(priors, 1))


class SCHPEdge(nn.Module):
    """SCHP's ``Edge_Module``: ABN projections of c1..c3, a shared 3x3 edge conv, 1x1 fusion."""

    def __init__(self, in_fea: Sequence[int] = (256, 512, 1024), mid_fea: int = 256) -> None:
        super().__init__()
        self.conv1 = conv_abn(in_fea[0], mid_fea)
        self.conv2 = conv_abn(in_fea[1], mid_fea)
        self.conv3 = conv_abn(in_fea[2], mid_fea)
        self.conv4 = nn.Conv2d(mid_fea, 2, 3, padding=1, bias=True)
        self.conv5 = nn.Conv2d(2 * 3, 2, 1, bias=True)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> tuple[Tensor, Tensor]:
        """Returns edge logits ``(B, 2, H/4, W/4)`` and the feature ``(B, 768, H/4, W/4)``."""
        size = x1.shape[-2:]
        feats = [self.conv1(x1), self.conv2(x2), self.conv3(x3)]
        # per stage: (B, 2, h_i, w_i) -> (B, 2, H/4, W/4)
        edges = [_up(self.conv4(f), size) for f in feats]
        feat = torch.cat([_up(f, size) for f in feats], 1)  # (B, 3 * 256, H/4, W/4)
        return self.conv5(torch.cat(edges, 1)), feat


class SCHPDecoder(nn.Module):
    """SCHP's ``Decoder_Module``: context (stride 16) + c1 (stride 4) -> parsing logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = conv_abn(512, 256)
        self.conv2 = conv_abn(256, 48)
        # (conv, BN, act, conv, BN, act): the official Sequential's 0, 1, 2, 3 are 0, 1, 3, 4
        # here, the activation being a module of its own (official_weights renames them).
        # A BatchNorm subclass with the activation inside would keep the indices but lose it
        # under SyncBatchNorm conversion.
        self.conv3 = nn.Sequential(*conv_abn(304, 256), *conv_abn(256, 256))
        self.conv4 = nn.Conv2d(256, num_classes, 1, bias=True)

    def forward(self, xt: Tensor, xl: Tensor) -> tuple[Tensor, Tensor]:
        """Returns parsing logits ``(B, C, H/4, W/4)`` and the feature ``(B, 256, H/4, W/4)``."""
        xt = _up(self.conv1(xt), xl.shape[-2:])  # (B, 256, H/16, W/16) -> (B, 256, H/4, W/4)
        x = self.conv3(torch.cat([xt, self.conv2(xl)], 1))  # (B, 256 + 48, ...) -> (B, 256, ...)
        return self.conv4(x), x


class SCHPCE2P(EncoderDecoderNet):
    """SCHP's ``AugmentCE2P`` ResNet-101 in plain PyTorch (BatchNorm + LeakyReLU for InPlace-ABN).

    Args:
        num_classes: 20 (LIP), 18 (ATR) or 7 (Pascal-Person-Part) for the published weights.
        layers: ResNet blocks per stage (ResNet-101: ``(3, 4, 23, 3)``).
        pretrained: path of SCHP's ImageNet ResNet-101 file, or None / False.
        input_space: ``"BGR"`` (SCHP's ImageNet weights) or ``"RGB"``: the channel order the
            weights expect.
        input_mean: per-channel mean the weights expect, in ``input_space`` order, on ``[0, 1]``.
        input_std: per-channel std, idem.
        data_mean: the RGB mean rimlab's data pipeline subtracted (ImageNet's).
        data_std: the RGB std it divided by.
        dropout: Dropout2d of the fusion head (SCHP: 0.1).

    ``forward(x)`` takes rimlab-normalised RGB ``(B, 3, H, W)`` and returns ``{"out"}`` (fusion
    logits) plus, when training or with ``side_outputs=True``, ``"parsing"`` (decoder) and
    ``"edge"`` ``(B, 2, H, W)``, all upsampled to ``(H, W)`` with ``align_corners=True``.
    """

    def __init__(
        self,
        num_classes: int,
        layers: Sequence[int] = (3, 4, 23, 3),
        pretrained: str | bool | None = None,
        input_space: str = "BGR",
        input_mean: Sequence[float] = SCHP_BGR_MEAN,
        input_std: Sequence[float] = SCHP_BGR_STD,
        data_mean: Sequence[float] = _RGB_MEAN,
        data_std: Sequence[float] = _RGB_STD,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if input_space not in ("BGR", "RGB"):
            raise ValueError(f"input_space={input_space!r}: expected 'BGR' or 'RGB'")
        self.num_classes = int(num_classes)
        self.input_space = input_space
        order = [2, 1, 0] if input_space == "BGR" else [0, 1, 2]
        d_mean = torch.tensor([float(v) for v in data_mean])[order]
        d_std = torch.tensor([float(v) for v in data_std])[order]
        i_mean = torch.tensor([float(v) for v in input_mean])
        i_std = torch.tensor([float(v) for v in input_std])
        # x_net = (x_data * d_std + d_mean - i_mean) / i_std, channel by channel after reordering;
        # not persistent: derived from the config, so checkpoints hold weights only
        self.register_buffer("_in_scale", (d_std / i_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "_in_shift", ((d_mean - i_mean) / i_std).view(1, 3, 1, 1), persistent=False
        )
        self._order = order
        self.backbone = DeepStemResNet(layers, pretrained)
        self.context = SCHPContext(2048, 512)
        self.edge = SCHPEdge()
        self.decoder = SCHPDecoder(self.num_classes)
        self.fusion = nn.Sequential(
            *conv_abn(1024, 256),
            nn.Dropout2d(dropout),
            nn.Conv2d(256, self.num_classes, 1, bias=True),
        )

    def to_net_input(self, x: Tensor) -> Tensor:
        """rimlab-normalised RGB ``(B, 3, H, W)`` -> the weights' convention (BGR, SCHP's
        mean / std by default)."""
        if self._order != [0, 1, 2]:
            x = x[:, self._order]  # (B, 3, H, W) RGB -> BGR
        return x * self._in_scale + self._in_shift

    def forward(self, x: Tensor, side_outputs: bool | None = None) -> dict[str, Tensor]:
        """Parse a batch: see the class docstring for the outputs."""
        size = x.shape[-2:]
        feats = self.backbone(self.to_net_input(x))
        context = self.context(feats["c4"])  # (B, 512, H/16, W/16)
        parsing, parsing_feat = self.decoder(context, feats["c1"])  # (B, C | 256, H/4, W/4)
        edge, edge_feat = self.edge(feats["c1"], feats["c2"], feats["c3"])  # (B, 2 | 768, ...)
        out = self.fusion(torch.cat([parsing_feat, edge_feat], 1))  # (B, C, H/4, W/4)
        outputs = {"out": _up(out, size)}  # (B, C, H, W)
        if self.training if side_outputs is None else side_outputs:
            outputs["parsing"] = _up(parsing, size)
            outputs["edge"] = _up(edge, size)
        return outputs
