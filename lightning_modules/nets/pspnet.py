"""PSPNet (Zhao et al., CVPR 2017) on a dilated ResNet, with an auxiliary FCN head on layer3."""

from __future__ import annotations

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


class PyramidPoolingModule(nn.Module):
    """Pool the feature map to several grid sizes, project, upsample and concatenate.

    Each bin `b`: adaptive average pool to `b x b` -> 1x1 ConvBNReLU -> bilinear upsample back.
    The input is concatenated with all branches.

    Args:
        in_channels: channels of the input feature map.
        channels: output channels of each pooling branch.
        bins: grid sizes of the branches.
        align_corners: `align_corners` of the upsampling (mmsegmentation's 769x769 models: True).

    Attributes:
        out_channels: `in_channels + len(bins) * channels`.
    """

    def __init__(
        self, in_channels: int, channels: int, bins: Sequence[int], align_corners: bool = False
    ) -> None:
        super().__init__()
        self.align_corners = bool(align_corners)
        # BatchNorm on the 1x1 bin sees one value per channel and image: training needs batch > 1.
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, channels, kernel_size=1))
            for b in bins
        )
        self.out_channels = in_channels + len(bins) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: `(B, in_channels, h, w)`. Returns `(B, out_channels, h, w)`."""
        size = x.shape[-2:]
        # each branch: (B, in, h, w) -> (B, ch, b, b) -> (B, ch, h, w)
        pooled = [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=self.align_corners)
            for stage in self.stages
        ]
        return torch.cat([x, *pooled], dim=1)  # (B, in + len(bins) * ch, h, w)


class PSPNet(EncoderDecoderNet):
    """PSPNet: dilated ResNet -> pyramid pooling -> 3x3 bottleneck -> dropout -> 1x1 classifier.

    An auxiliary FCN head on layer3 adds deep supervision during training.

    Args:
        num_classes: number of output classes.
        backbone: ResNet depth (18, 50, 101), a name such as `"resnet50"`, or `"lite"` (a small
            encoder for CPU quickstarts, see `LiteResNet`).
        pretrained: initialise the backbone with ImageNet weights from the torch hub cache.
        bins: pyramid pooling grid sizes.
        ppm_channels: channels per pooling branch; default `in_channels // 4` (512 for R50).
        bottleneck_channels: output channels of the 3x3 bottleneck conv.
        dropout: Dropout2d probability before both classifiers.
        aux: build the auxiliary head on layer3.
        aux_channels: hidden channels of the auxiliary head.
        output_stride: 8 or 16.
        align_corners: `align_corners` of every bilinear resize (the pyramid's upsampling, the
            logits to the input) and of evaluation's resizes of the logits (see
            `EncoderDecoderNet`); mmsegmentation's 769x769 Cityscapes models use True.

    Attributes:
        use_aux: runtime switch for the auxiliary output (see `EncoderDecoderNet`).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | int = 50,
        pretrained: bool = False,
        bins: Sequence[int] = (1, 2, 3, 6),
        ppm_channels: int | None = None,
        bottleneck_channels: int = 512,
        dropout: float = 0.1,
        aux: bool = True,
        aux_channels: int = 256,
        output_stride: int = 8,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.align_corners = bool(align_corners)
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        in_channels = self.backbone.channels["c4"]
        ppm_channels = ppm_channels or in_channels // 4
        bins = tuple(int(b) for b in bins)  # Hydra passes a ListConfig

        self.ppm = PyramidPoolingModule(in_channels, ppm_channels, bins, self.align_corners)
        self.bottleneck = ConvBNReLU(self.ppm.out_channels, bottleneck_channels, kernel_size=3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(bottleneck_channels, num_classes, kernel_size=1)

        self.aux = aux
        self.aux_head = (
            FCNHead(self.backbone.channels["c3"], aux_channels, num_classes, dropout)
            if aux
            else None
        )
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
        out = self.ppm(feats["c4"])  # (B, C4 + n_bins * ppm, H/8, W/8)
        out = self.bottleneck(out)  # (B, bottleneck, H/8, W/8)
        out = self.classifier(self.dropout(out))  # (B, num_classes, H/8, W/8)
        # (B, num_classes, H/8, W/8) -> (B, num_classes, H, W)
        outputs = {"out": self.upsample_logits(out, size)}
        self.add_aux_output(outputs, feats["c3"], size)
        return outputs
