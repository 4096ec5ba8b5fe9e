"""mmsegmentation checkpoints (``pspnet_r50-d8_512x1024_40k_cityscapes_*.pth`` ...) onto rimlab's nets.

An mmsegmentation checkpoint is ``{"meta": {...}, "state_dict": {...}}`` (0.x and 1.x alike, the
optimizer state stripped from the published files) holding the ``EncoderDecoder``'s parameters:
``backbone.*`` (``ResNetV1c``), ``decode_head.*`` and ``auxiliary_head.*``. Three decode heads map
onto rimlab's nets, tensor by tensor:

- ``PSPHead`` -> :class:`~lightning_modules.nets.pspnet.PSPNet`;
- ``DepthwiseSeparableASPPHead`` -> :class:`~lightning_modules.nets.deeplabv3plus.DeepLabV3Plus`
  with ``separable=true``, ``aspp_project_kernel_size=3``, ``dropout_position=classifier``;
- ``DAHead`` -> :class:`~lightning_modules.nets.danet.DANet`;

each with ``FCNHead`` (one conv) as ``aux_head`` and ``backbone=resnet50_v1c`` (or 101). The
backbone names are the same on both sides; mmcv's ``ConvModule`` (``conv``, ``bn``, ``activate``)
is rimlab's ``ConvBNReLU`` (``conv``, ``bn``, ``relu``). One tensor changes, not only its name:
mmsegmentation's ASPP concatenates the image-pooling branch first and rimlab's last, so the input
channels of the ASPP projection (``decode_head.bottleneck.conv.weight``) are rotated by one branch;
mmcv's ``Scale`` (DANet's ``gamma``) is 0-d, rimlab's ``gamma`` has shape `(1,)`.

Anything missing, unexpected or of another shape is refused with the tensor's name and the file
(a missing ``num_batches_tracked`` counter is filled with 0: only BatchNorm with
``momentum=None`` reads it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.nets.danet import DANet
from lightning_modules.nets.deeplabv3plus import DeepLabV3Plus
from lightning_modules.nets.pspnet import PSPNet

__all__ = [
    "MMSEG_MODELS",
    "MMSegCheckpointError",
    "load_mmseg_state",
    "map_mmseg_state",
    "mmseg_architecture",
    "mmseg_model_config",
    "mmseg_num_classes",
    "mmseg_state_dict",
    "to_mmseg_state",
]

# decode-head architecture -> rimlab model config stem (conf/model/<stem>_r<depth>_mmseg.yaml)
MMSEG_MODELS = {"psp": "pspnet", "aspp": "deeplabv3plus", "da": "danet"}
# a key only each decode head has
_HEAD_MARKERS = {
    "psp": "decode_head.psp_modules.0.1.conv.weight",
    "aspp": "decode_head.sep_bottleneck.0.depthwise_conv.conv.weight",
    "da": "decode_head.pam.gamma.scale",
}
_RESNET_DEPTHS = {6: 50, 23: 101}  # blocks in layer3 -> depth

Rename = tuple[str, str]
# rimlab name -> mmseg name, first match wins; every net shares the backbone and auxiliary head.
_COMMON: tuple[Rename, ...] = (
    (r"^backbone\.", "backbone."),
    (r"^aux_head\.conv\.", "auxiliary_head.convs.0."),
    (r"^aux_head\.classifier\.", "auxiliary_head.conv_seg."),
    (r"^classifier\.", "decode_head.conv_seg."),
)
_HEADS: dict[type[nn.Module], tuple[Rename, ...]] = {
    PSPNet: (
        (r"^ppm\.stages\.(\d+)\.1\.", r"decode_head.psp_modules.\1.1."),
        (r"^bottleneck\.", "decode_head.bottleneck."),
    ),
    DeepLabV3Plus: (
        (r"^aspp\.branches\.(\d+)\.depthwise\.", r"decode_head.aspp_modules.\1.depthwise_conv."),
        (r"^aspp\.branches\.(\d+)\.pointwise\.", r"decode_head.aspp_modules.\1.pointwise_conv."),
        (r"^aspp\.branches\.(\d+)\.(conv|bn)\.", r"decode_head.aspp_modules.\1.\2."),
        (r"^aspp\.image_pool\.1\.", "decode_head.image_pool.1."),
        (r"^aspp\.project\.0\.", "decode_head.bottleneck."),
        (r"^low_level_reduce\.", "decode_head.c1_bottleneck."),
        (r"^decoder\.(\d+)\.depthwise\.", r"decode_head.sep_bottleneck.\1.depthwise_conv."),
        (r"^decoder\.(\d+)\.pointwise\.", r"decode_head.sep_bottleneck.\1.pointwise_conv."),
    ),
    DANet: (
        (r"^pam_in\.", "decode_head.pam_in_conv."),
        (r"^pam\.query_conv\.", "decode_head.pam.query_project."),
        (r"^pam\.key_conv\.", "decode_head.pam.key_project."),
        (r"^pam\.value_conv\.", "decode_head.pam.value_project."),
        (r"^pam\.gamma$", "decode_head.pam.gamma.scale"),
        (r"^pam_out\.", "decode_head.pam_out_conv."),
        (r"^pam_head\.classifier\.", "decode_head.pam_conv_seg."),
        (r"^cam_in\.", "decode_head.cam_in_conv."),
        (r"^cam\.gamma$", "decode_head.cam.gamma.scale"),
        (r"^cam_out\.", "decode_head.cam_out_conv."),
        (r"^cam_head\.classifier\.", "decode_head.cam_conv_seg."),
    ),
}


def _rotate_pool_last(weight: Tensor) -> Tensor:
    """mmseg's ASPP projection weight `(ch, 5 ch, k, k)`, inputs [pool, 1x1, rates...] ->
    rimlab's order [1x1, rates..., pool]: the first `ch` input channels move to the end."""
    return torch.roll(weight, shifts=-weight.shape[0], dims=1)


def _rotate_pool_first(weight: Tensor) -> Tensor:
    """The inverse of :func:`_rotate_pool_last` (rimlab -> mmseg order)."""
    return torch.roll(weight, shifts=weight.shape[0], dims=1)


def _flat(scale: Tensor) -> Tensor:
    """mmcv's ``Scale`` holds a 0-d parameter, rimlab's attention ``gamma`` a `(1,)` one."""
    return scale.reshape(-1)


def _scalar(gamma: Tensor) -> Tensor:
    return gamma.reshape(())


# rimlab name -> (mmseg -> rimlab, rimlab -> mmseg) for the tensors that change, not only rename
_CONVERT: dict[type[nn.Module], dict[str, tuple[Callable[[Tensor], Tensor], ...]]] = {
    DeepLabV3Plus: {"aspp.project.0.conv.weight": (_rotate_pool_last, _rotate_pool_first)},
    DANet: {"pam.gamma": (_flat, _scalar), "cam.gamma": (_flat, _scalar)},
}


class MMSegCheckpointError(CheckpointError):
    """An mmsegmentation checkpoint that does not fit the configured network (names the tensor)."""


def mmseg_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """The state dict of an mmsegmentation checkpoint, or None if ``obj`` is not one.

    Args:
        obj: what ``torch.load`` returned: ``{"meta": ..., "state_dict": {...}}``, recognised by
            ``backbone.*`` and ``decode_head.conv_seg.weight`` keys (a rimlab Lightning
            checkpoint has ``net.*`` keys instead).
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return None
    state = obj["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        return None
    if "decode_head.conv_seg.weight" not in state:
        return None
    if not any(k.startswith("backbone.") for k in state):
        return None
    return dict(state)


def mmseg_architecture(state: Mapping[str, Tensor]) -> str | None:
    """``"psp"``, ``"aspp"`` or ``"da"``: the decode head of an mmseg state dict (None: other)."""
    for name, marker in _HEAD_MARKERS.items():
        if marker in state:
            return name
    return None


def mmseg_num_classes(state: Mapping[str, Tensor]) -> int:
    """C of an mmseg state dict: the rows of ``decode_head.conv_seg.weight``."""
    return int(state["decode_head.conv_seg.weight"].shape[0])


def mmseg_model_config(state: Mapping[str, Tensor]) -> str | None:
    """The conf/model name that rebuilds the checkpoint's network (``pspnet_r50_mmseg`` ...).

    None when the decode head is not one of the three, or the backbone's depth is not 50 or 101.
    """
    arch = mmseg_architecture(state)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    depth = _RESNET_DEPTHS.get(max(blocks) + 1) if blocks else None
    if arch is None or depth is None:
        return None
    return f"{MMSEG_MODELS[arch]}_r{depth}_mmseg"


def _table(net: nn.Module) -> tuple[tuple[Rename, ...], dict[str, tuple]]:
    for cls in type(net).__mro__:
        if cls in _HEADS:
            return _HEADS[cls] + _COMMON, _CONVERT.get(cls, {})
    raise MMSegCheckpointError(
        f"{type(net).__name__} has no mmsegmentation counterpart: mmsegmentation checkpoints load "
        f"into {', '.join(c.__name__ for c in _HEADS)} (model=<pspnet|deeplabv3plus|danet>_r50_mmseg)"
    )


def _mmseg_name(key: str, table: tuple[Rename, ...]) -> str | None:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def _hint(state: Mapping[str, Tensor]) -> str:
    """What would fit the file: the model config its decode head and depth name."""
    config = mmseg_model_config(state)
    if config is None:
        return (
            " (the file's decode head or backbone is none of pspnet/deeplabv3plus/danet R50/R101)"
        )
    return f" (the file is mmsegmentation's {config.removesuffix('_mmseg')}: use model={config})"


def map_mmseg_state(
    state: Mapping[str, Tensor], net: nn.Module, source: str | os.PathLike = "<state dict>"
) -> dict[str, Tensor]:
    """An mmsegmentation state dict as a ``net.load_state_dict(..., strict=True)`` argument.

    Args:
        state: mmseg names -> tensors (:func:`mmseg_state_dict`).
        net: a :class:`PSPNet`, :class:`DeepLabV3Plus` or :class:`DANet` built as the
            ``*_mmseg`` model configs build them.
        source: the file, for messages.

    Returns:
        Every tensor of ``net.state_dict()``, in the net's dtype.

    Raises:
        MMSegCheckpointError: a tensor the net needs is missing from the file, one in the file has
            no place in the net, or one has another shape; the message names the tensor (both
            names when they differ), the file and the model config that fits the file.
    """
    table, convert = _table(net)
    own = net.state_dict()
    wanted: dict[str, str] = {}  # mmseg name -> rimlab name
    for key in own:
        name = _mmseg_name(key, table)
        if name is None:
            raise MMSegCheckpointError(
                f"{source}: the configured model's tensor {key!r} has no mmsegmentation "
                f"counterpart{_hint(state)}"
            )
        wanted[name] = key
    for name, value in state.items():
        if name not in wanted:
            raise MMSegCheckpointError(
                f"{source}: unexpected tensor {name!r} {tuple(value.shape)} in the mmsegmentation "
                f"checkpoint (no place for it in the configured {type(net).__name__}){_hint(state)}"
            )
    mapped: dict[str, Tensor] = {}
    for name, key in wanted.items():
        if name not in state:
            if key.endswith("num_batches_tracked"):
                mapped[key] = torch.zeros_like(own[key])
                continue
            raise MMSegCheckpointError(
                f"{source}: tensor {name!r} is missing from the mmsegmentation checkpoint "
                f"(rimlab's {key!r}){_hint(state)}"
            )
        value = state[name]
        if key in convert:
            value = convert[key][0](value)
        if tuple(value.shape) != tuple(own[key].shape):
            hint = _hint(state)
            if name.endswith("conv_seg.weight") or name.endswith("conv_seg.bias"):
                hint = f" (the file has {int(value.shape[0])} classes: set data= to match)"
            raise MMSegCheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} in the "
                f"mmsegmentation checkpoint but rimlab's {key!r} has {tuple(own[key].shape)} in "
                f"the configured model{hint}"
            )
        mapped[key] = value.detach().to(own[key].dtype)
    return mapped


def to_mmseg_state(net: nn.Module) -> dict[str, Tensor]:
    """The net's weights under mmsegmentation's names (the inverse of :func:`map_mmseg_state`).

    For comparisons with mmsegmentation's own modules (``bench/mmseg_equivalence.py``).
    """
    table, convert = _table(net)
    out: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        name = _mmseg_name(key, table)
        if name is None:
            raise MMSegCheckpointError(f"{key!r} has no mmsegmentation counterpart")
        out[name] = convert[key][1](value) if key in convert else value
    return out


def load_mmseg_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads an mmsegmentation ``.pth`` (``weights_only``: a file cannot run code).

    Raises:
        CheckpointError: the file is missing or unreadable.
        MMSegCheckpointError: the file is not an mmsegmentation checkpoint.
    """
    state = mmseg_state_dict(read_checkpoint(path))
    if state is None:
        raise MMSegCheckpointError(f"{path}: not an mmsegmentation checkpoint")
    return state
