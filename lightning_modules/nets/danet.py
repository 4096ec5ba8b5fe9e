"""DANet (Fu et al., CVPR 2019): position and channel self-attention on a dilated ResNet.

Two branches on the last features (`c4`), one with a position attention module (PAM) and one with
a channel attention module (CAM), are summed and classified. As in the paper, each branch also has
its own classifier for deep supervision, and an auxiliary FCN head sits on layer3.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

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


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` ``(B, C, h, w)`` is laid out channels-last (and not also NCHW-contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _scaled_residual(gamma: torch.Tensor, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gamma * context + x`` in the activations' dtype: the float32 ``gamma`` would otherwise
    promote bf16 activations under autocast to float32 from here on."""
    return gamma.to(context.dtype) * context + x


class PositionAttentionModule(nn.Module):
    """Self-attention over spatial positions (DANet's PAM), added to the input with a learnt scale.

    `out_j = gamma * sum_i softmax_i(q_j . k_i) v_i + x_j` for every position `j`, with 1x1 conv
    projections `q`, `k` (to `in_channels // 8`) and `v` (to `in_channels`). `gamma` starts at 0,
    so the module is the identity at initialisation and learns how much context to add.

    Args:
        in_channels: channels `C` of the input (and output) feature map.
        reduction: channel reduction of the query/key projections.

    Attributes:
        gamma: `(1,)` learnable scale of the attention output, initialised to 0.
    """

    def __init__(self, in_channels: int, reduction: int = 8) -> None:
        super().__init__()
        key_channels = max(in_channels // reduction, 1)
        self.query_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, key_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: `(B, C, h, w)`. Returns `(B, C, h, w)`."""
        b, c, h, w = x.shape
        query = self.query_conv(x).flatten(2).transpose(1, 2)  # (B, C/8, h, w) -> (B, N, C/8)
        key = self.key_conv(x).flatten(2)  # (B, C/8, h, w) -> (B, C/8, N), N = h * w
        value = self.value_conv(x).flatten(2)  # (B, C, h, w) -> (B, C, N)
        energy = torch.bmm(query, key)  # (B, N, N): energy[j, i] = q_j . k_i
        attention = energy.softmax(dim=-1)  # normalised over the attended positions i
        if _is_channels_last(x):
            # (B, N, N) @ (B, N, C) = (B, N, C), whose (B, C, h, w) view is channels-last
            context = torch.bmm(attention, value.transpose(1, 2)).transpose(1, 2)
        else:
            context = torch.bmm(value, attention.transpose(1, 2))  # (B, C, N)
        context = context.reshape(b, c, h, w)  # (B, C, N) -> (B, C, h, w), a view
        return _scaled_residual(self.gamma, context, x)


class ChannelAttentionModule(nn.Module):
    """Self-attention over channels (DANet's CAM), added to the input with a learnt scale.

    The channel affinity `E = X X^T` `(C, C)` of the flattened input `X` `(C, N)` is turned into
    attention weights `A = softmax_k(max_k E_jk - E_jk)`, as in the authors' code. The paper's
    equation reads `softmax(E)`; since softmax ignores a per-row shift, the code's variant equals
    `softmax(-E)`: dissimilar channels weigh more. `out = gamma * A X + x`, with `gamma` starting
    at 0 so the module is the identity at initialisation. There are no projections: the input
    itself is query, key and value.

    Attributes:
        gamma: `(1,)` learnable scale of the attention output, initialised to 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: `(B, C, h, w)`. Returns `(B, C, h, w)`."""
        b, c, h, w = x.shape
        flat = x.flatten(2)  # (B, C, h, w) -> (B, C, N)
        # The affinity and its softmax in float32 whatever the autocast: E sums N products (N =
        # 8192 at 1/8 of 512x1024), so its entries reach thousands, where bf16 steps by 16-32
        # while the softmax weighs differences of a few units (bf16 here moved the module's
        # output by 40%). Its cost is one (C, N) x (N, C) product.
        exact = (
            torch.autocast(x.device.type, enabled=False)
            if x.device.type in ("cpu", "cuda")
            else contextlib.nullcontext()  # e.g. meta tensors
        )
        with exact:
            flat32 = flat.to(torch.promote_types(flat.dtype, torch.float32))
            energy = torch.bmm(flat32, flat32.transpose(1, 2))  # (B, C, C)
            energy = energy.amax(dim=-1, keepdim=True) - energy  # (B, C, C), the authors' trick
            attention = energy.softmax(dim=-1).to(flat.dtype)  # over the attended channels k
        if _is_channels_last(x):
            # (B, N, C) @ (B, C, C)^T = (B, N, C), whose (B, C, h, w) view is channels-last
            context = torch.bmm(flat.transpose(1, 2), attention.transpose(1, 2)).transpose(1, 2)
        else:
            context = torch.bmm(attention, flat)  # (B, C, N)
        context = context.reshape(b, c, h, w)  # (B, C, N) -> (B, C, h, w), a view
        return _scaled_residual(self.gamma, context, x)


def _dropout_classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d -> 1x1 conv; the conv is named `classifier` so `init_decoder_weights` finds it."""
    return nn.Sequential(
        OrderedDict(
            dropout=nn.Dropout2d(dropout),
            classifier=nn.Conv2d(channels, num_classes, kernel_size=1),
        )
    )


class DANet(EncoderDecoderNet):
    """DANet: dilated ResNet -> (PAM branch + CAM branch) on c4 -> summed -> classifier.

    Each branch is 3x3 ConvBNReLU (c4 -> `inter_channels`) -> attention module -> 3x3 ConvBNReLU.
    The sum of the two branches is classified (`out`). The paper also supervises each branch
    through its own classifier: during training, with the side outputs on (`use_side`), the
    position-only and channel-only logits come back as `"pam"` and `"cam"`. An auxiliary FCN head
    on layer3 gives `"aux"` as in the other nets (switched by `use_aux`).

    `ParsingLoss` scores `pam` and `cam` as side terms (`side_outputs`, `side_weight`).
    `ParsingLitModule` turns each switch on only when the loss weights its outputs and freezes the
    heads of the outputs it turns off, so every trainable parameter gets a gradient (as DDP
    without `find_unused_parameters` requires). RIM's stage 2 drops `aux` (its head sits on the
    frozen encoder) but keeps `pam`/`cam`: their heads sit on the decoder, which still trains.

    Args:
        num_classes: number of output classes.
        backbone: ResNet depth (18, 50, 101), a name such as `"resnet50"`, or `"lite"` (the small
            CPU encoder, see `LiteResNet`).
        pretrained: initialise the backbone with ImageNet weights from the torch hub cache.
        output_stride: 8 or 16, stride of `c4`.
        inter_channels: channels inside both attention branches; default `c4 channels // 4`
            (512 for ResNet-50).
        dropout: Dropout2d probability before every classifier.
        aux: build the auxiliary FCN head on layer3.
        aux_channels: hidden channels of the auxiliary head.
        align_corners: `align_corners` of the resizes of every output to the input and of
            evaluation's resizes of the logits (see `EncoderDecoderNet`); mmsegmentation's
            769x769 Cityscapes models use True.

    Attributes:
        use_aux: runtime switch for the auxiliary output `aux`.
        use_side: runtime switch for the side outputs `pam` and `cam`; `None` follows `use_aux`
            (see `EncoderDecoderNet`).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | int = 50,
        pretrained: bool = False,
        output_stride: int = 8,
        inter_channels: int | None = None,
        dropout: float = 0.1,
        aux: bool = True,
        aux_channels: int = 256,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = bool(align_corners)
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        channels = self.backbone.channels
        inter = inter_channels or channels["c4"] // 4

        self.pam_in = ConvBNReLU(channels["c4"], inter, kernel_size=3)
        self.pam = PositionAttentionModule(inter)
        self.pam_out = ConvBNReLU(inter, inter, kernel_size=3)
        self.cam_in = ConvBNReLU(channels["c4"], inter, kernel_size=3)
        self.cam = ChannelAttentionModule()
        self.cam_out = ConvBNReLU(inter, inter, kernel_size=3)

        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(inter, num_classes, kernel_size=1)
        # Per-branch classifiers of the paper (deep supervision of each attention branch).
        self.pam_head = _dropout_classifier(inter, num_classes, dropout)
        self.cam_head = _dropout_classifier(inter, num_classes, dropout)

        self.aux = aux
        self.aux_head = FCNHead(channels["c3"], aux_channels, num_classes, dropout) if aux else None
        # Only the new layers are initialised (gamma stays 0); the backbone keeps its weights.
        init_decoder_weights(self, exclude=self.encoder_modules())

    def side_heads(self) -> dict[str, nn.Module]:
        """The per-branch classifiers behind the side outputs `pam` and `cam`."""
        return {"pam": self.pam_head, "cam": self.cam_head}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Segment a batch of images.

        Args:
            x: `(B, 3, H, W)` normalised images.

        Returns:
            `{"out": (B, num_classes, H, W) logits}`; when training, also `"pam"` and `"cam"`
            (per-branch logits) with the side outputs on, and `"aux"` (from layer3) with `use_aux`
            if the head exists, all of the same shape.
        """
        size = x.shape[-2:]
        feats = self.backbone(x)
        c4 = feats["c4"]
        pam = self.pam_out(self.pam(self.pam_in(c4)))  # (B, inter, H/os, W/os)
        cam = self.cam_out(self.cam(self.cam_in(c4)))  # (B, inter, H/os, W/os)
        out = self.classifier(self.dropout(pam + cam))  # (B, num_classes, H/os, W/os)
        # (B, num_classes, H/os, W/os) -> (B, num_classes, H, W)
        outputs = {"out": self.upsample_logits(out, size)}
        if self.training and self.side_enabled:
            for name, feat, head in (("pam", pam, self.pam_head), ("cam", cam, self.cam_head)):
                logits = head(feat)  # (B, num_classes, H/os, W/os)
                # (B, num_classes, H/os, W/os) -> (B, num_classes, H, W)
                outputs[name] = F.interpolate(
                    logits, size=size, mode="bilinear", align_corners=self.align_corners
                )
        self.add_aux_output(outputs, feats["c3"], size)
        return outputs
