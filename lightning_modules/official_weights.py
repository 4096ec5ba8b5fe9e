"""Published SCHP checkpoints (``exp-schp-201908261155-lip.pth`` ...) onto rimlab's SCHP net.

The official files are ``torch.save``'d state dicts of ``networks/AugmentCE2P.py``'s
``resnet101``, possibly under ``"state_dict"`` and with DataParallel's ``module.`` prefixes; their
normalisation layers are InPlace-ABN. :func:`map_official_state` renames every tensor onto
:class:`lightning_modules.nets.schp_official.SCHPCE2P` and converts what InPlace-ABN means
differently:

- InPlace-ABN scales by ``|gamma| + eps`` (``eps = 1e-5``; its CPU and CUDA kernels, so that the
  activation stays invertible), ``nn.BatchNorm2d`` by ``gamma``: the mapped weight is
  ``|gamma| + 1e-5``, the same function;
- InPlace-ABN has no ``num_batches_tracked``; the mapped buffers are 0 (only read by BatchNorm
  with ``momentum=None``, which rimlab's re-estimation does not use).

Anything missing, unexpected or of another shape is refused with the tensor's name and the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint

__all__ = [
    "DATASET_BY_CLASSES",
    "INPLACE_ABN_EPS",
    "OfficialCheckpointError",
    "is_official_schp",
    "load_official_state",
    "map_official_state",
    "official_num_classes",
    "official_state_dict",
]

INPLACE_ABN_EPS = 1e-5
# The three published models: their class counts name their datasets (conf/data/<name>.yaml).
DATASET_BY_CLASSES = {20: "lip", 18: "atr", 7: "pascal_person_part"}

# official prefix -> rimlab prefix (below ``net.``), first match wins; the index remaps exist
# because rimlab's heads hold the LeakyReLU as a module of its own (nets/schp_official.py).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(conv[123]|bn[123]|layer[1-4])\.", r"backbone.\1."),
    (r"^context_encoding\.", "context."),
    (r"^decoder\.conv3\.2\.", "decoder.conv3.3."),
    (r"^decoder\.conv3\.3\.", "decoder.conv3.4."),
    (r"^decoder\.", "decoder."),
    (r"^edge\.", "edge."),
    (r"^fushion\.3\.", "fusion.4."),
    (r"^fushion\.", "fusion."),
)
# rimlab prefix -> official prefix: the inverse of _RENAMES, to name a missing tensor
_INVERSE: tuple[tuple[str, str], ...] = (
    (r"^backbone\.", ""),
    (r"^context\.", "context_encoding."),
    (r"^decoder\.conv3\.3\.", "decoder.conv3.2."),
    (r"^decoder\.conv3\.4\.", "decoder.conv3.3."),
    (r"^fusion\.4\.", "fushion.3."),
    (r"^fusion\.", "fushion."),
)
# markers of the official layout (after ``module.`` is stripped)
_MARKERS = ("fushion.0.weight", "context_encoding.bottleneck.0.weight", "conv3.weight")


class OfficialCheckpointError(CheckpointError):
    """An official SCHP checkpoint that does not fit the configured network (names the tensor)."""


def official_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """The official state dict inside a loaded file, ``module.`` stripped; None if it is not one.

    Args:
        obj: what ``torch.load`` returned (a state dict, or a dict with ``"state_dict"``).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        return None
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            return None
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state if all(m in state for m in _MARKERS) else None


def is_official_schp(obj: Any) -> bool:
    """Whether a loaded file is a state dict of SCHP's official ``AugmentCE2P`` network."""
    return official_state_dict(obj) is not None


def official_num_classes(state: Mapping[str, Tensor]) -> int:
    """C of an official state dict: the rows of the fusion classifier ``fushion.3.weight``."""
    return int(state["fushion.3.weight"].shape[0])


def _rename(key: str, table: tuple[tuple[str, str], ...] = _RENAMES) -> str:
    for pattern, repl in table:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return key  # unknown: reported as unexpected


def map_official_state(
    state: Mapping[str, Tensor], net: nn.Module, source: str | os.PathLike = "<state dict>"
) -> dict[str, Tensor]:
    """An official state dict as a ``net.load_state_dict(..., strict=True)`` argument.

    Args:
        state: official names (``module.`` stripped, :func:`official_state_dict`) -> tensors.
        net: a :class:`~lightning_modules.nets.schp_official.SCHPCE2P`.
        source: the file, for messages.

    Returns:
        Every tensor of ``net.state_dict()``: the renamed official tensors (BatchNorm weights
        as ``|gamma| + 1e-5``) and zero ``num_batches_tracked`` counters.

    Raises:
        OfficialCheckpointError: a tensor the net needs is missing, one the net has no place for
            is present, or one has another shape; the message names the tensor and the file.
    """
    own = net.state_dict()
    bn_weights = {
        f"{name}.weight"
        for name, m in net.named_modules()
        if isinstance(m, _BatchNorm) and m.weight is not None
    }
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        target = _rename(key)
        if target not in own:
            raise OfficialCheckpointError(
                f"{source}: unexpected tensor {key!r} {tuple(value.shape)} in the SCHP checkpoint "
                "(no place for it in lightning_modules.nets.schp_official.SCHPCE2P; is it the "
                "official resnet101 AugmentCE2P?)"
            )
        if tuple(value.shape) != tuple(own[target].shape):
            hint = ""
            if key.endswith(("fushion.3.weight", "fushion.3.bias", "decoder.conv4.weight")):
                n = int(value.shape[0])
                data = DATASET_BY_CLASSES.get(n)
                hint = f" (it has {n} classes{': use data=' + data if data else ''})"
            raise OfficialCheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} in the SCHP checkpoint "
                f"but {tuple(own[target].shape)} in the configured model{hint}"
            )
        value = value.detach().to(own[target].dtype)
        if target in bn_weights:
            # InPlace-ABN normalises with |gamma| + eps: the same function as BN with that weight
            value = value.abs() + INPLACE_ABN_EPS
        mapped[target] = value
    for key, value in own.items():
        if key in mapped:
            continue
        if key.endswith("num_batches_tracked"):
            mapped[key] = torch.zeros_like(value)  # InPlace-ABN does not count batches
            continue
        raise OfficialCheckpointError(
            f"{source}: tensor {_rename(key, _INVERSE)!r} is missing from the SCHP checkpoint "
            f"(rimlab's {key!r}; a truncated file, or another depth than the configured model?)"
        )
    return mapped


def load_official_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads an official SCHP ``.pth`` (``weights_only``: a file cannot run code).

    Raises:
        CheckpointError: the file is missing or unreadable.
        OfficialCheckpointError: the file is not an official SCHP state dict.
    """
    state = official_state_dict(read_checkpoint(path))
    if state is None:
        raise OfficialCheckpointError(f"{path}: not an official SCHP checkpoint")
    return state
