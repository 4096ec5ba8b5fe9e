"""Building blocks shared by the parsing nets (PSPNet now, DeepLabv3+ / DANet later).

- `ConvBNReLU`: the conv -> BatchNorm -> ReLU unit every decoder is made of.
- `FCNHead`: the auxiliary FCN head (3x3 ConvBNReLU, dropout, 1x1 classifier) put on layer3.
- `EncoderDecoderNet`: base class giving every net the explicit encoder/decoder parameter split and
  the encoder freezing that stage 2 of RIM relies on.
- `init_decoder_weights`: the initialisation used for all newly added (non-pretrained) layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias: BN follows) -> BatchNorm2d -> ReLU, "same" padding for odd kernels.

    Maps `(B, in_channels, H, W)` to `(B, out_channels, H/stride, W/stride)`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd).
        stride: convolution stride.
        dilation: convolution dilation; the padding grows with it so the size is kept.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.add_module(
            "conv",
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        self.add_module("relu", nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """Auxiliary FCN head: 3x3 ConvBNReLU -> Dropout2d -> 1x1 classifier.

    Used on layer3 features as deep supervision (PSPNet's auxiliary loss). The logits stay at the
    feature resolution; the owning net upsamples them to the input size.

    Args:
        in_channels: channels of the input feature map (1024 for layer3 of ResNet-50).
        channels: hidden channels of the 3x3 conv (256 in PSPNet).
        num_classes: number of output classes.
        dropout: Dropout2d probability before the classifier.
    """

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, kernel_size=3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        init_decoder_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: `(B, in_channels, h, w)`. Returns logits `(B, num_classes, h, w)`."""
        return self.classifier(self.dropout(self.conv(x)))


def init_decoder_weights(
    module: nn.Module, classifier_std: float = 0.01, exclude: Sequence[nn.Module] = ()
) -> None:
    """Initialise newly added layers in place.

    Convs get Kaiming-normal weights (fan_out, ReLU gain, as torchvision initialises ResNets),
    BatchNorm weight 1 / bias 0. Every 1x1 conv named `classifier` instead gets N(0, std^2)
    weights and zero bias, so the initial logits are near zero and the first loss is ~log(C).

    Args:
        module: the module whose sub-modules are initialised.
        classifier_std: standard deviation of the classifier weights.
        exclude: sub-modules left untouched with everything inside them (the pretrained encoder).
    """
    skip = {id(m) for sub in exclude for m in sub.modules()}
    for name, m in module.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Conv2d):
            if name.split(".")[-1] == "classifier":
                nn.init.normal_(m.weight, std=classifier_std)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EncoderDecoderNet(nn.Module):
    """Base class of the parsing nets: explicit encoder/decoder split and encoder freezing.

    Subclasses implement `forward` and, where the encoder (the pretrained feature extractor) is
    more than `self.backbone`, `encoder_modules()`.
    Everything that is not in the encoder (pyramid pooling, bottleneck, classifiers, auxiliary
    heads) is the decoder. Stage 2 of RIM fine-tunes only the decoder: `freeze_encoder()` stops
    gradients into the encoder and keeps it in eval mode even when the trainer calls `.train()`.

    Training-only outputs come in two kinds, each with its own runtime switch, so the training
    system can turn them off (e.g. in stage 2) without rebuilding the net:

    - the auxiliary FCN head `aux` on layer3 (weighted by the loss's `aux_weight`), computed only
      when `self.training and self.use_aux` (and the head exists);
    - side outputs of the decoder (DANet's per-branch `pam`/`cam` logits, weighted by the loss's
      `side_weight`), computed only when `self.training and self.side_enabled`.

    `output_heads()` names the head behind each of these outputs: a head whose output is switched
    off gets no gradient, so its parameters must be frozen (under DDP without
    `find_unused_parameters` a trainable parameter without a gradient is an error).

    Attributes:
        use_aux: switch for the auxiliary output `aux`.
        use_side: switch for the side outputs; `None` (the default) follows `use_aux`, the
            behaviour of nets built before the two were separated.
        align_corners: how the net's bilinear resizes of features and logits align the two
            grids (`F.interpolate`'s `align_corners`), and so how its logits are resized further
            at evaluation (to the image, `logits_align_corners`). False unless a subclass takes
            it as an argument (mmsegmentation's 769x769 Cityscapes models: True).
    """

    def __init__(self) -> None:
        super().__init__()
        self.align_corners = False
        self.use_aux = True
        self.use_side: bool | None = None
        # The auxiliary FCN head on layer3; subclasses that have one replace the None.
        self.aux_head: nn.Module | None = None
        self._frozen_encoder = False

    @property
    def side_enabled(self) -> bool:
        """Whether the side outputs are on: `use_side`, or `use_aux` while `use_side` is None."""
        return self.use_aux if self.use_side is None else self.use_side

    def side_heads(self) -> dict[str, nn.Module]:
        """The heads of the side outputs by output name (none here; DANet: `pam`, `cam`)."""
        return {}

    def output_heads(self) -> dict[str, nn.Module]:
        """The head behind every switchable training-only output, by output name.

        `"aux"` (when the net has an auxiliary head) plus `side_heads()`. The parameters of each
        head are used only for its output, so they get a gradient only when the loss scores it.
        """
        heads: dict[str, nn.Module] = {}
        if self.aux_head is not None:
            heads["aux"] = self.aux_head
        heads.update(self.side_heads())
        return heads

    def score_outputs(self, scored: set[str]) -> list[str]:
        """Keeps the training-only outputs named in ``scored`` on and switches the others off.

        `use_aux` and `use_side` follow ``scored``; the head of every output not in it gets
        `requires_grad=False`, whether the output is switched off or still computed (the side
        outputs are switched together).

        Returns:
            The names of the outputs whose heads were frozen, in `output_heads()` order.
        """
        heads = self.output_heads()
        self.use_aux = "aux" in scored
        self.use_side = bool((set(heads) - {"aux"}) & scored)
        frozen = [name for name in heads if name not in scored]
        for name in frozen:
            heads[name].requires_grad_(False)
        return frozen

    def encoder_modules(self) -> list[nn.Module]:
        """The modules that make up the encoder: ``self.backbone`` (the ImageNet-initialised
        feature extractor) unless a subclass says otherwise."""
        return [self.backbone]

    def upsample_logits(
        self, logits: torch.Tensor, size: Sequence[int], align_corners: bool | None = None
    ) -> torch.Tensor:
        """`(B, C, h, w)` logits -> `(B, C, H, W)`, bilinear with the net's `align_corners`.

        Outside training the result is float32 whatever the logits' dtype: under bf16 autocast
        a bf16 resize rounds the differences between classes that the arg-max of validation and
        predict decides between (bf16 keeps 8 bits). In training it keeps the logits' dtype: the
        loss upcasts anyway, and this resize and its backward are a training step's largest
        memory traffic.
        """
        corners = self.align_corners if align_corners is None else align_corners
        if not self.training:
            logits = logits.float()
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=corners)

    def add_aux_output(
        self, outputs: dict[str, torch.Tensor], c3: torch.Tensor, size: Sequence[int]
    ) -> None:
        """Put `"aux"` into ``outputs`` when training with the auxiliary head built and on.

        Args:
            outputs: the net's outputs, completed in place.
            c3: `(B, C3, h, w)` layer3 features, the head's input.
            size: `(H, W)` of the input image; the `(B, num_classes, h, w)` logits are resized
                to it bilinearly with the net's `align_corners`.
        """
        if self.training and self.aux_head is not None and self.use_aux:
            outputs["aux"] = F.interpolate(
                self.aux_head(c3), size=size, mode="bilinear", align_corners=self.align_corners
            )

    def encoder_parameters(self) -> list[nn.Parameter]:
        """All parameters of the encoder modules, each once."""
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for module in self.encoder_modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def decoder_parameters(self) -> list[nn.Parameter]:
        """All parameters not in the encoder (auxiliary heads included), each once."""
        encoder_ids = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]

    @property
    def frozen_encoder(self) -> bool:
        """Whether `freeze_encoder()` is in effect."""
        return self._frozen_encoder

    def freeze_encoder(self) -> None:
        """Stop gradients into the encoder and keep it in eval mode (BatchNorm statistics fixed).

        The flag is not part of the state dict: a run that restores a checkpoint for stage 2
        calls this again after loading.
        """
        for p in self.encoder_parameters():
            p.requires_grad_(False)
        self._frozen_encoder = True
        self._set_encoder_eval()

    def unfreeze_encoder(self) -> None:
        """Undo `freeze_encoder()`: gradients flow again and the encoder follows `.train()`."""
        for p in self.encoder_parameters():
            p.requires_grad_(True)
        self._frozen_encoder = False
        for module in self.encoder_modules():
            module.train(self.training)

    def train(self, mode: bool = True) -> EncoderDecoderNet:
        """Set train/eval mode; a frozen encoder stays in eval mode regardless of `mode`."""
        super().train(mode)
        if self._frozen_encoder:
            self._set_encoder_eval()
        return self

    def _set_encoder_eval(self) -> None:
        # BN stays in eval while frozen: its running statistics came from stage 1 (or ImageNet) and
        # batch statistics would both update them and change the features the decoder sees.
        for module in self.encoder_modules():
            module.eval()


def logits_align_corners(net: nn.Module) -> bool:
    """The `align_corners` with which evaluation resizes `net`'s logits (to the image's size,
    window logits to the window): the net's own (`EncoderDecoderNet.align_corners`), False for a
    module that is not an `EncoderDecoderNet`."""
    return isinstance(net, EncoderDecoderNet) and bool(net.align_corners)
