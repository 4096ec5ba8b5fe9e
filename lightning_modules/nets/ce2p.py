"""CE2P (Ruan et al., AAAI 2019) as used by SCHP (Li et al., TPAMI 2020): context + edges + fusion.

Three branches on a dilated ResNet (standard BatchNorm, no compiled extensions):

- context: the PSP module on ``c4`` (pyramid pooling + 3x3 bottleneck);
- parsing decoder: the context upsampled to stride 4 and fused with ``c1`` (high-resolution
  features) -> parsing logits and a 256-channel parsing feature;
- edge branch: 1x1 projections of ``c1``, ``c2``, ``c3``, a shared 3x3 edge classifier on each,
  the three edge maps fused by a 1x1 conv; the projected features are the edge feature;
- fusion: parsing and edge features concatenated -> 1x1 ConvBNReLU -> dropout -> classifier:
  the final prediction ``out``.

Layout follows SCHP's ``networks/AugmentCE2P.py`` (``PSPModule``, ``Decoder_Module``,
``Edge_Module``, ``fushion``), with its InPlace-ABN (BN + leaky ReLU) replaced by BN + ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nets.backbones import build_backbone
from lightning_modules.nets.heads import ConvBNReLU, EncoderDecoderNet, init_decoder_weights
from lightning_modules.nets.pspnet import PyramidPoolingModule


def _up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``(B, C, *size)`` (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CE2PDecoder(nn.Module):
    """High-resolution parsing decoder: context at stride 16/8 + ``c1`` at stride 4.

    Args:
        context_channels: channels of the context feature.
        low_channels: channels of ``c1``.
        num_classes: C.
        channels: width of the decoder (SCHP: 256).
        low_proj: channels ``c1`` is projected to (SCHP: 48).
    """

    def __init__(
        self,
        context_channels: int,
        low_channels: int,
        num_classes: int,
        channels: int = 256,
        low_proj: int = 48,
    ) -> None:
        super().__init__()
        self.context_proj = ConvBNReLU(context_channels, channels, kernel_size=1)
        self.low_proj = ConvBNReLU(low_channels, low_proj, kernel_size=1)
        self.fuse = nn.Sequential(
            ConvBNReLU(channels + low_proj, channels, kernel_size=1),
            ConvBNReLU(channels, channels, kernel_size=1),
        )
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.out_channels = channels

    def forward(
        self, context: torch.Tensor, low: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: context ``(B, Cc, h, w)``, low ``(B, C1, H/4, W/4)``.

        Returns parsing logits ``(B, C, H/4, W/4)`` and the feature ``(B, channels, H/4, W/4)``.
        """
        # (B, channels, h, w) -> (B, channels, H/4, W/4)
        ctx = _up(self.context_proj(context), low.shape[-2:])
        feat = self.fuse(torch.cat([ctx, self.low_proj(low)], dim=1))
        return self.classifier(feat), feat


class EdgeBranch(nn.Module):
    """CE2P's edge module on three backbone stages.

    Args:
        in_channels: channels of ``c1``, ``c2``, ``c3``.
        channels: width of each projection (SCHP: 256).
        edge_classes: 2 (SCHP's two-class softmax) or 1 (sigmoid).
    """

    def __init__(
        self, in_channels: Sequence[int], channels: int = 256, edge_classes: int = 2
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleList(ConvBNReLU(c, channels, kernel_size=1) for c in in_channels)
        # One 3x3 classifier shared by the stages, as in SCHP.
        self.classifier = nn.Conv2d(channels, edge_classes, kernel_size=3, padding=1)
        self.fuse = nn.Conv2d(edge_classes * len(in_channels), edge_classes, kernel_size=1)
        self.out_channels = channels * len(in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: feats: ``c1`` ``(B, ., H/4, W/4)``, ``c2``, ``c3`` (lower resolutions).

        Returns edge scores ``(B, edge_classes, H/4, W/4)`` and the edge feature
        ``(B, 3 * channels, H/4, W/4)``.
        """
        size = feats[0].shape[-2:]
        projected = [proj(f) for proj, f in zip(self.proj, feats, strict=True)]
        # each stage: (B, channels, h_i, w_i) -> (B, channels, H/4, W/4)
        edges = [_up(self.classifier(p), size) for p in projected]
        feat = torch.cat([_up(p, size) for p in projected], dim=1)
        return self.fuse(torch.cat(edges, dim=1)), feat


class CE2P(EncoderDecoderNet):
    """CE2P: dilated ResNet -> PSP context -> high-resolution decoder + edge branch -> fusion.

    Args:
        num_classes: number of parsing classes.
        backbone: ResNet depth (18, 50, 101) or ``"lite"``.
        pretrained: ImageNet weights for the backbone (from the torch hub cache).
        output_stride: 8 or 16 (SCHP: 16).
        bins: pyramid pooling grid sizes.
        ppm_channels: channels per pooling branch (SCHP: 512).
        context_channels: output of the PSP bottleneck (SCHP: 512).
        decoder_channels: parsing decoder width (SCHP: 256).
        low_proj: channels of the projected ``c1`` (SCHP: 48).
        edge_channels: width of each edge projection (SCHP: 256).
        edge_classes: 2 (softmax, SCHP) or 1 (sigmoid).
        fusion_channels: width of the fusion conv (SCHP: 256).
        dropout: Dropout2d before the fusion classifier.

    ``forward(x)`` returns ``{"out": fusion logits}`` in eval mode and adds ``"parsing"`` (decoder
    logits) and ``"edge"`` (edge scores), all at the input size, when training or when called with
    ``side_outputs=True`` (SCHP's refined labels need the average model's edges).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | int = 101,
        pretrained: bool = False,
        output_stride: int = 16,
        bins: Sequence[int] = (1, 2, 3, 6),
        ppm_channels: int = 512,
        context_channels: int = 512,
        decoder_channels: int = 256,
        low_proj: int = 48,
        edge_channels: int = 256,
        edge_classes: int = 2,
        fusion_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if edge_classes not in (1, 2):
            raise ValueError(f"edge_classes must be 1 or 2, got {edge_classes}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        ch = self.backbone.channels
        bins = tuple(int(b) for b in bins)  # Hydra passes a ListConfig
        self.ppm = PyramidPoolingModule(ch["c4"], ppm_channels, bins)
        self.context = ConvBNReLU(self.ppm.out_channels, context_channels, kernel_size=3)
        self.decoder = CE2PDecoder(
            context_channels, ch["c1"], num_classes, decoder_channels, low_proj
        )
        self.edge = EdgeBranch((ch["c1"], ch["c2"], ch["c3"]), edge_channels, edge_classes)
        self.fusion = ConvBNReLU(
            self.decoder.out_channels + self.edge.out_channels, fusion_channels, kernel_size=1
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(fusion_channels, num_classes, kernel_size=1)
        init_decoder_weights(self, exclude=self.encoder_modules())

    def forward(self, x: torch.Tensor, side_outputs: bool | None = None) -> dict[str, torch.Tensor]:
        """Parse a batch of images.

        Args:
            x: ``(B, 3, H, W)`` normalised images.
            side_outputs: also return ``parsing`` and ``edge``; default: when training.

        Returns:
            ``{"out": (B, C, H, W)}`` fusion logits, plus ``"parsing"`` ``(B, C, H, W)`` and
            ``"edge"`` ``(B, edge_classes, H, W)`` with side outputs.
        """
        size = x.shape[-2:]
        feats = self.backbone(x)
        context = self.context(self.ppm(feats["c4"]))  # (B, context, H/os, W/os)
        parsing, parsing_feat = self.decoder(context, feats["c1"])  # (B, C | 256, H/4, W/4)
        edge, edge_feat = self.edge([feats["c1"], feats["c2"], feats["c3"]])  # (B, 2 | 768, ...)
        fused = self.fusion(torch.cat([parsing_feat, edge_feat], dim=1))  # (B, fusion, H/4, W/4)
        out = self.classifier(self.dropout(fused))  # (B, C, H/4, W/4)
        # (B, C, H/4, W/4) -> (B, C, H, W)
        outputs = {"out": self.upsample_logits(out, size, align_corners=False)}
        if self.training if side_outputs is None else side_outputs:
            outputs["parsing"] = _up(parsing, size)  # (B, C, H, W)
            outputs["edge"] = _up(edge, size)  # (B, edge_classes, H, W)
        return outputs
