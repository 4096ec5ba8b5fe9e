"""Published mmpose DeepPose checkpoints onto rimlab's :class:`DeepPoseResNet`.

mmpose's DeepPose (``td-reg_res50_8xb64-210e_mpii-256x256``; its weights
``deeppose_res50_mpii_256x256-c63cd0b6_20210203.pth`` were trained with mmpose 0.x, whose
``DeepposeRegressionHead`` saved as ``keypoint_head.fc``, 1.x's ``RegressionHead`` as ``head.fc``)
is ``ResNet -> GlobalAveragePooling -> Linear(C, 2K)``. Its ResNet names every tensor as
torchvision does (``conv1``, ``bn1``, ``layer<i>.<b>.conv<j>``/``bn<j>``/``downsample.{0,1}``, the
stride on the 3x3 conv), below ``backbone.``; the head's ``fc`` is rimlab's ``net.fc``.

Output convention: mmpose regresses ``r = u / S``, the joint's pixel coordinate ``u`` in the
S x S input divided by S (``RegressionLabel``; pixel centres on integers). rimlab regresses the
joint in the crop's normalised frame, whose pixel grid is ``u = S n + (S - 1) / 2``
(:mod:`datamodules.pose_transforms`), so ``n = r - (S - 1) / (2 S)``: the same weights with the
fc bias lowered by ``(S - 1) / (2 S)`` (S = ``net.input_size``) give rimlab's output exactly.

Anything missing, unexpected or of another shape is refused, naming the tensors and the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.checkpoint_io import CheckpointError

#: Head prefixes of mmpose 1.x and 0.x.
HEAD_PREFIXES = ("head.fc.", "keypoint_head.fc.")
#: Buffers of mmpose 1.x's data preprocessor (its own mean/std; mmpose drops them on load too).
IGNORED = ("data_preprocessor.mean", "data_preprocessor.std")
#: ResNet depth by (blocks of layer3, bottleneck?): the torchvision / mmpose layouts.
DEPTHS = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101, (36, True): 152}


class MMPoseCheckpointError(CheckpointError):
    """An mmpose DeepPose checkpoint that does not fit the configured network."""


def mmpose_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """The state dict of an mmpose top-down regression checkpoint; None if ``obj`` is not one.

    Args:
        obj: what ``torch.load`` returned (mmengine/mmcv files hold it under ``"state_dict"``).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or "backbone.conv1.weight" not in obj:
        return None
    if not any(f"{p}weight" in obj for p in HEAD_PREFIXES):
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return None
    return dict(obj)


def checkpoint_layout(state: Mapping[str, Tensor]) -> str:
    """``ResNet-<depth>, <K> joints`` of an mmpose state dict, for messages."""
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.layer3.")}
    bottleneck = any(k.endswith(".conv3.weight") for k in state if k.startswith("backbone.layer"))
    depth = DEPTHS.get((len(blocks), bottleneck), "?")
    fc = next((state[f"{p}weight"] for p in HEAD_PREFIXES if f"{p}weight" in state), None)
    joints = "?" if fc is None else int(fc.shape[0]) // 2
    return f"ResNet-{depth}, {joints} joints"


def _target(key: str) -> str | None:
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    for prefix in HEAD_PREFIXES:
        if key.startswith(prefix):
            return "fc." + key[len(prefix) :]
    return None


def map_mmpose_state(
    state: Mapping[str, Tensor], net: nn.Module, source: str | os.PathLike = "<state dict>"
) -> dict[str, Tensor]:
    """An mmpose state dict as a ``net.net.load_state_dict(..., strict=True)`` argument.

    Args:
        state: mmpose names -> tensors (:func:`mmpose_state_dict`).
        net: a :class:`~lightning_modules.nets.deeppose.DeepPoseResNet` (its torchvision ResNet is
            ``net.net``, its crop side ``net.input_size``).
        source: the file, for messages.

    Returns:
        Every tensor of ``net.net.state_dict()``; the fc bias converted to the normalised frame.

    Raises:
        MMPoseCheckpointError: naming the missing, unexpected and mis-shaped tensors.
    """
    resnet = getattr(net, "net", None)
    if resnet is None or not hasattr(net, "input_size"):
        raise MMPoseCheckpointError(
            f"{source}: an mmpose DeepPose checkpoint ({checkpoint_layout(state)}) loads only "
            f"into model=deeppose_r50 (lightning_modules.nets.deeppose.DeepPoseResNet), not "
            f"{type(net).__name__}"
        )
    own = resnet.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected, wrong = [], []
    shaped: set[str] = set()  # present, of another shape: reported as that, not as missing
    for key, value in state.items():
        if key in IGNORED:
            continue
        target = _target(key)
        if target is None or target not in own:
            unexpected.append(f"{key} {tuple(value.shape)}")
            continue
        if tuple(value.shape) != tuple(own[target].shape):
            wrong.append(f"{key} {tuple(value.shape)} (model: {tuple(own[target].shape)})")
            shaped.add(target)
            continue
        mapped[target] = value.detach().to(own[target].dtype)
    missing = []
    for key, value in own.items():
        if key in mapped or key in shaped:
            continue
        if key.endswith("num_batches_tracked"):
            mapped[key] = torch.zeros_like(value)  # only read by BatchNorm with momentum=None
            continue
        missing.append(("backbone." if not key.startswith("fc.") else "head.") + key)
    if missing or unexpected or wrong:

        def listed(what: str, items: list[str]) -> str:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            return f"{len(items)} {what}: {', '.join(items[:5])}{more}" if items else ""

        parts = [
            listed("missing", missing),
            listed("unexpected", unexpected),
            listed("of another shape", wrong),
        ]
        depth = getattr(net, "depth", None)
        raise MMPoseCheckpointError(
            f"{source}: the mmpose checkpoint ({checkpoint_layout(state)}) does not fit the "
            f"configured model (ResNet-{depth}, {net.num_joints} joints); tensors "
            + "; ".join(p for p in parts if p)
            + ". Set model.depth / data.num_joints to the checkpoint's"
        )
    s = float(net.input_size)
    # r = u / S (mmpose) -> n = (u - (S - 1) / 2) / S (rimlab): a shift of the output, in the bias
    mapped["fc.bias"] = mapped["fc.bias"] - (s - 1.0) / (2.0 * s)
    return mapped
