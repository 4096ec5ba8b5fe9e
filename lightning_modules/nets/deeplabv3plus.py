"""DeepLabv3+ (Chen et al., ECCV 2018) on a dilated ResNet, with an auxiliary FCN head on layer3.

ASPP on the last features (`c4`), then a light decoder that fuses the upsampled ASPP output with
the stride-4 low-level features (`c1`) before the classifier. `separable=True` turns the atrous
ASPP branches and the two decoder convs into depthwise-separable convs (the paper's "atrous
separable convolution", as mmsegmentation's `DepthwiseSeparableASPPHead`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nets.backbones import build_backbone
from lightning_modules.nets.heads import (
    ConvBNReLU,
    EncoderDecoderNet,
    FCNHead,
    init_decoder_weights,
)

DROPOUT_POSITIONS = ("aspp", "classifier")


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise-separable conv: depthwise kxk conv -> BN -> ReLU, then 1x1 conv -> BN -> ReLU.

    Maps `(B, in_channels, H, W)` to `(B, out_channels, H, W)` ("same" padding for odd kernels,
    growing with the dilation). Parameters: `in*k*k + 2*in` (depthwise conv, BN) plus
    `in*out + 2*out` (pointwise conv, BN); no conv biases (BN follows).

    Args:
        in_channels: input channels (also the depthwise conv's groups).
        out_channels: output channels of the pointwise conv.
        kernel_size: square kernel of the depthwise conv (odd).
        dilation: dilation of the depthwise conv.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.add_module(
            "depthwise",
            nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(
                        in_channels,
                        in_channels,
                        kernel_size,
                        padding=padding,
                        dilation=dilation,
                        groups=in_channels,
                        bias=False,
                    ),
                    bn=nn.BatchNorm2d(in_channels),
                    relu=nn.ReLU(inplace=True),
                )
            ),
        )
        self.add_module("pointwise", ConvBNReLU(in_channels, out_channels, kernel_size=1))


def _conv3x3(in_channels: int, out_channels: int, dilation: int, separable: bool) -> nn.Module:
    if separable:
        return SeparableConvBNReLU(in_channels, out_channels, kernel_size=3, dilation=dilation)
    return ConvBNReLU(in_channels, out_channels, kernel_size=3, dilation=dilation)


def default_atrous_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates of the paper scaled to the output stride: (6, 12, 18) at 16, (12, 24, 36) at 8.

    The rates are chosen for stride 16; at stride 8 the same receptive field on the image needs
    twice the dilation on the twice-as-large feature map.

    Raises:
        ValueError: if `output_stride` is not 8 or 16.
    """
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    scale = 16 // output_stride
    return (6 * scale, 12 * scale, 18 * scale)


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP: parallel 1x1, atrous 3x3 and image-pooling branches, concatenated and projected.

    Branches: 1x1 ConvBNReLU; one 3x3 ConvBNReLU per atrous rate (dilation = rate, padding keeps
    the size), or a `SeparableConvBNReLU` when `separable` (a rate of 1 stays a plain conv); global
    average pool -> 1x1 ConvBNReLU -> upsample back. The concatenation is projected by a
    `project_kernel_size` ConvBNReLU (1 in the paper, 3 in mmsegmentation) followed by Dropout2d.

    Args:
        in_channels: channels of the input feature map (2048 for layer4 of ResNet-50).
        channels: output channels of every branch and of the projection.
        atrous_rates: dilation rates of the 3x3 branches.
        dropout: Dropout2d probability after the projection.
        separable: depthwise-separable atrous branches.
        project_kernel_size: kernel of the projection conv (odd).
        align_corners: `align_corners` of the image pool's upsampling (a broadcast from one
            pixel either way; the switch is mmsegmentation's).

    Attributes:
        atrous_rates: the rates as a tuple of ints.
        out_channels: `channels`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        atrous_rates: Sequence[int],
        dropout: float = 0.1,
        separable: bool = False,
        project_kernel_size: int = 1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = bool(align_corners)
        self.atrous_rates = tuple(int(r) for r in atrous_rates)  # Hydra passes a ListConfig
        if not self.atrous_rates:
            raise ValueError("ASPP needs at least one atrous rate")
        self.branches = nn.ModuleList(
            [
                ConvBNReLU(in_channels, channels, kernel_size=1),
                *(
                    _conv3x3(in_channels, channels, rate, separable and rate > 1)
                    for rate in self.atrous_rates
                ),
            ]
        )
        # BatchNorm after the global pool sees one value per channel and image: training needs
        # batch > 1 (as in PSPNet's 1x1 bin).
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, kernel_size=1)
        )
        num_branches = len(self.branches) + 1
        self.project = nn.Sequential(
            ConvBNReLU(num_branches * channels, channels, kernel_size=int(project_kernel_size)),
            nn.Dropout2d(dropout),
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: `(B, in_channels, h, w)`. Returns `(B, channels, h, w)`."""
        size = x.shape[-2:]
        outs = [branch(x) for branch in self.branches]  # each (B, ch, h, w)
        pooled = self.image_pool(x)  # (B, ch, 1, 1)
        # (B, ch, 1, 1) -> (B, ch, h, w); bilinear from a single pixel is a broadcast
        outs.append(
            F.interpolate(pooled, size=size, mode="bilinear", align_corners=self.align_corners)
        )
        return self.project(
            torch.cat(outs, dim=1)
        )  # (B, (n_rates + 2) * ch, h, w) -> (B, ch, h, w)


class DeepLabV3Plus(EncoderDecoderNet):
    """DeepLabv3+: dilated ResNet -> ASPP on c4 -> decoder with the stride-4 features -> classifier.

    Decoder: `c1` (stride 4) is reduced by a 1x1 ConvBNReLU to `low_level_channels`, the ASPP
    output is upsampled to the `c1` size and concatenated with it, two 3x3 ConvBNReLU refine the
    result, a 1x1 classifier gives the logits at stride 4, which are upsampled to the input size.
    An auxiliary FCN head on layer3 (`c3`) adds deep supervision during training.

    Args:
        num_classes: number of output classes.
        backbone: ResNet depth (18, 50, 101), a name such as `"resnet50"`, or `"lite"` (the small
            CPU encoder, see `LiteResNet`).
        pretrained: initialise the backbone with ImageNet weights from the torch hub cache.
        output_stride: 8 or 16, stride of `c4`.
        aspp_channels: channels of every ASPP branch and of its projection.
        atrous_rates: rates of the three 3x3 ASPP branches; default `default_atrous_rates`
            (12, 24, 36 at stride 8; 6, 12, 18 at stride 16).
        low_level_channels: channels the stride-4 features are reduced to (48 in the paper, so
            they do not outweigh the ASPP features).
        decoder_channels: channels of the two 3x3 decoder convs.
        dropout: Dropout2d probability in the decoder (where `dropout_position` says) and in the
            auxiliary head.
        aux: build the auxiliary head on layer3.
        aux_channels: hidden channels of the auxiliary head.
        separable: depthwise-separable 3x3 convs (`SeparableConvBNReLU`) in the atrous ASPP
            branches and the two decoder convs, as in the paper and mmsegmentation's
            `DepthwiseSeparableASPPHead`; the 1x1 and image-pooling branches, the ASPP projection
            and the low-level 1x1 reduction stay plain ConvBNReLU.
        aspp_project_kernel_size: kernel of the conv projecting the ASPP concatenation (1 in the
            paper; mmsegmentation's "bottleneck" is 3x3).
        dropout_position: `"aspp"`: Dropout2d after the ASPP projection; `"classifier"`:
            Dropout2d right before the 1x1 classifier (mmsegmentation's decode heads).
        align_corners: `align_corners` of every bilinear resize (ASPP's image pool, the ASPP
            output to the stride-4 features, the logits to the input) and of evaluation's
            resizes of the logits (see `EncoderDecoderNet`); mmsegmentation's 769x769 Cityscapes
            models use True.

    Attributes:
        use_aux: runtime switch for the auxiliary output (see `EncoderDecoderNet`).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | int = 50,
        pretrained: bool = False,
        output_stride: int = 8,
        aspp_channels: int = 256,
        atrous_rates: Sequence[int] | None = None,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
        aux: bool = True,
        aux_channels: int = 256,
        separable: bool = False,
        aspp_project_kernel_size: int = 1,
        dropout_position: str = "aspp",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = bool(align_corners)
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"dropout_position must be one of {DROPOUT_POSITIONS}, got {dropout_position!r}"
            )
        self.num_classes = num_classes
        self.separable = bool(separable)
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        channels = self.backbone.channels
        if atrous_rates is None:
            atrous_rates = default_atrous_rates(output_stride)

        # Dropout2d(0) is the identity: the module tree (and checkpoint keys) is the same either way.
        at_classifier = dropout_position == "classifier"
        self.aspp = AtrousSpatialPyramidPooling(
            channels["c4"],
            aspp_channels,
            atrous_rates,
            0.0 if at_classifier else dropout,
            separable=self.separable,
            project_kernel_size=aspp_project_kernel_size,
            align_corners=self.align_corners,
        )
        self.low_level_reduce = ConvBNReLU(channels["c1"], low_level_channels, kernel_size=1)
        self.decoder = nn.Sequential(
            _conv3x3(aspp_channels + low_level_channels, decoder_channels, 1, self.separable),
            _conv3x3(decoder_channels, decoder_channels, 1, self.separable),
        )
        self.classifier_dropout = nn.Dropout2d(dropout if at_classifier else 0.0)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)

        self.aux = aux
        self.aux_head = FCNHead(channels["c3"], aux_channels, num_classes, dropout) if aux else None
        # Only the new layers are initialised; the backbone keeps torchvision's (or ImageNet) init.
        init_decoder_weights(self, exclude=self.encoder_modules())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Segment a batch of images.

        Args:
            x: `(B, 3, H, W)` normalised images.

        Returns:
            `{"out": (B, num_classes, H, W) logits}`, plus `"aux"` of the same shape (from
            layer3) when training with the auxiliary head enabled.
        """
        size = x.shape[-2:]
        feats = self.backbone(x)
        low = self.low_level_reduce(feats["c1"])  # (B, low_level, H/4, W/4)
        high = self.aspp(feats["c4"])  # (B, aspp, H/os, W/os)
        # (B, aspp, H/os, W/os) -> (B, aspp, H/4, W/4)
        high = F.interpolate(
            high, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )
        out = self.decoder(torch.cat([high, low], dim=1))  # (B, decoder, H/4, W/4)
        out = self.classifier(self.classifier_dropout(out))  # (B, num_classes, H/4, W/4)
        # (B, num_classes, H/4, W/4) -> (B, num_classes, H, W)
        outputs = {"out": self.upsample_logits(out, size)}
        self.add_aux_output(outputs, feats["c3"], size)
        return outputs
