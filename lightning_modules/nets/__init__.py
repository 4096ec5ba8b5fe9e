"""Plain `nn.Module` networks (no Lightning): backbones, heads and parsing nets.

Every parsing net returns `{"out": logits, "aux": logits (training only)}` at input resolution and
exposes `encoder_modules()` / `encoder_parameters()` / `decoder_parameters()` / `freeze_encoder()`.
"""

from __future__ import annotations

from lightning_modules.nets.backbones import (
    DilatedResNet,
    load_pretrained_state_dict,
    parse_depth,
    pretrained_checkpoint_path,
)
from lightning_modules.nets.ce2p import CE2P, CE2PDecoder, EdgeBranch
from lightning_modules.nets.danet import ChannelAttentionModule, DANet, PositionAttentionModule
from lightning_modules.nets.deeplabv3plus import (
    AtrousSpatialPyramidPooling,
    DeepLabV3Plus,
    default_atrous_rates,
)
from lightning_modules.nets.heads import (
    ConvBNReLU,
    EncoderDecoderNet,
    FCNHead,
    init_decoder_weights,
    logits_align_corners,
)
from lightning_modules.nets.pspnet import PSPNet, PyramidPoolingModule

__all__ = [
    "AtrousSpatialPyramidPooling",
    "CE2P",
    "CE2PDecoder",
    "ChannelAttentionModule",
    "ConvBNReLU",
    "DANet",
    "DeepLabV3Plus",
    "DilatedResNet",
    "EdgeBranch",
    "EncoderDecoderNet",
    "FCNHead",
    "PSPNet",
    "PositionAttentionModule",
    "PyramidPoolingModule",
    "default_atrous_rates",
    "init_decoder_weights",
    "load_pretrained_state_dict",
    "logits_align_corners",
    "parse_depth",
    "pretrained_checkpoint_path",
]
