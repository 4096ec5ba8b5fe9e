"""Dilated ResNet backbones (output stride 8 or 16) built from torchvision ResNets.

Two stems: torchvision's (one 7x7 stride-2 conv) and mmsegmentation's ``ResNetV1c`` deep stem
(three 3x3 convs 32-32-64, the first with stride 2, each followed by BN + ReLU), selected by the
backbone name (``50`` / ``resnet50`` vs ``resnet50_v1c``). The residual stages are torchvision's in
both: with output stride 8, torchvision's ``replace_stride_with_dilation`` gives the first block of
a dilated stage the previous dilation and the others the new one (layer3: 1, 2, 2, ...; layer4: 2,
4, 4), which is mmsegmentation's ``contract_dilation=True`` with dilations 1-1-2-4 and strides
1-2-1-1; their Bottlenecks ("pytorch" style: the stride on the 3x3 conv) and parameter names
(``layer1.0.conv1.weight`` ...) are the same too.

Pretrained ImageNet weights are read from the torch hub cache only; nothing is ever downloaded
(training machines and tests may have no internet access).
"""

from __future__ import annotations

import os
import re

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

# depth -> (torchvision builder, weights enum, channels of layer1..layer4)
_RESNETS: dict[int, tuple] = {
    18: (torchvision.models.resnet18, torchvision.models.ResNet18_Weights, (64, 128, 256, 512)),
    50: (torchvision.models.resnet50, torchvision.models.ResNet50_Weights, (256, 512, 1024, 2048)),
    101: (
        torchvision.models.resnet101,
        torchvision.models.ResNet101_Weights,
        (256, 512, 1024, 2048),
    ),
}


# depth -> file name of the ImageNet weights of mmsegmentation's ResNetV1c (mmengine's
# hub/openmmlab.json: open-mmlab://resnet50_v1c, https://download.openmmlab.com/pretrain/
# third_party/<name>); mmengine caches them under <torch hub dir>/checkpoints as well.
V1C_IMAGENET_FILES: dict[int, str] = {
    50: "resnet50_v1c-2cccc1ad.pth",
    101: "resnet101_v1c-e67eebb6.pth",
}
_V1C_NAME = re.compile(r"^(?:r|resnet)?(\d+)[-_]?v1c$")
STEMS = ("torchvision", "deep")


def parse_backbone(backbone: str | int) -> tuple[int, str]:
    """``50`` / ``"resnet50"`` -> ``(50, "torchvision")``; ``"resnet50_v1c"`` -> ``(50, "deep")``.

    Raises:
        ValueError: unknown depth, or a ``_v1c`` name of a depth other than 50 or 101.
    """
    match = _V1C_NAME.match(str(backbone).lower())
    if match is None:
        return parse_depth(backbone), "torchvision"
    depth = int(match.group(1))
    if depth not in V1C_IMAGENET_FILES:
        raise ValueError(
            f"unsupported ResNetV1c backbone {backbone!r}; choose resnet50_v1c or resnet101_v1c"
        )
    return depth, "deep"


def parse_depth(backbone: str | int) -> int:
    """Turn `50`, `"50"`, `"r50"` or `"resnet50"` into the ResNet depth 50.

    Raises:
        ValueError: if the depth is not one of 18, 50, 101.
    """
    digits = "".join(ch for ch in str(backbone) if ch.isdigit())
    depth = int(digits) if digits else -1
    if depth not in _RESNETS:
        raise ValueError(
            f"unsupported ResNet backbone {backbone!r}; choose one of {list(_RESNETS)}"
        )
    return depth


def pretrained_checkpoint_path(depth: int, weights: str = "IMAGENET1K_V1") -> str:
    """Where torchvision stores the ImageNet checkpoint of ResNet-`depth` in the torch hub cache.

    `<torch.hub.get_dir()>/checkpoints/<file name of the torchvision weights url>`; the hub dir
    follows `$TORCH_HOME` (default `~/.cache/torch/hub`).
    """
    weights_enum = _RESNETS[parse_depth(depth)][1]
    filename = os.path.basename(weights_enum[weights].url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_pretrained_state_dict(depth: int, weights: str = "IMAGENET1K_V1") -> dict:
    """Load the torchvision ImageNet state dict of ResNet-`depth` from the hub cache.

    Raises:
        FileNotFoundError: if the checkpoint is not in the cache; the message gives the exact
            path and the command that fetches it on a machine with internet access.
    """
    path = pretrained_checkpoint_path(depth, weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights for ResNet-{depth} not found at {path}. rimlab never downloads "
            "weights. On a machine with internet access run\n"
            f'    python -c "import torchvision; torchvision.models.resnet{depth}'
            f"(weights='{weights}')\"\n"
            f"and copy the file it writes (under $TORCH_HOME/hub/checkpoints, default "
            f"~/.cache/torch/hub/checkpoints) to {path}, or set TORCH_HOME so that the hub cache "
            "contains it."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def v1c_checkpoint_path(depth: int) -> str:
    """Where the ImageNet weights of ResNetV1c-`depth` are expected: the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", V1C_IMAGENET_FILES[depth])


def load_v1c_state_dict(depth: int) -> dict:
    """The ImageNet ResNetV1c-`depth` weights (mmcv's file) from the torch hub cache.

    The file is a state dict, possibly under ``"state_dict"``, with mmcv's names (``stem.0.weight``,
    ``layer1.0.conv1.weight``, ..., ``fc.weight``), which are :class:`DilatedResNet`'s.

    Raises:
        FileNotFoundError: the file is not in the cache (the message gives the path and the URL).
    """
    path = v1c_checkpoint_path(depth)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights of ResNetV1c-{depth} not found at {path}. rimlab never downloads "
            "weights. On a machine with internet access fetch "
            f"https://download.openmmlab.com/pretrain/third_party/{V1C_IMAGENET_FILES[depth]} "
            f"(mmsegmentation's open-mmlab://resnet{depth}_v1c) and copy it to {path}, or set "
            "TORCH_HOME so that the hub cache contains it."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided torchvision BasicBlock stage into a dilated one, in place.

    torchvision refuses `replace_stride_with_dilation` for BasicBlock, so we convert after
    construction with the same convention torchvision uses for Bottleneck: the first block loses
    its stride and keeps the previous dilation (`dilation // 2`), all later 3x3 convs use
    `dilation`. Subsampling the result by 2 (layer3) or 4 (layer4) then reproduces the strided
    network exactly, so pretrained weights keep their meaning.
    """
    for i, block in enumerate(layer):
        assert isinstance(block, BasicBlock)
        first_dilation = dilation // 2 if i == 0 else dilation
        for conv, d in ((block.conv1, first_dilation), (block.conv2, dilation)):
            conv.stride = (1, 1)
            conv.dilation = (d, d)
            conv.padding = (d, d)  # 3x3 kernel: padding == dilation keeps the size
        block.stride = 1
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)  # the 1x1 projection must not subsample either


class DilatedResNet(nn.Module):
    """torchvision ResNet with dilated last stages and a dict of multi-scale features.

    Output stride 8 dilates layer3 (2) and layer4 (4); output stride 16 dilates layer4 (2) only.
    The ImageNet classifier (avgpool, fc) is dropped.

    Args:
        depth: 18, 50 or 101.
        pretrained: load the ImageNet weights from the torch hub cache (never downloads; raises
            `FileNotFoundError` with the expected path if missing): torchvision's, or mmcv's
            ResNetV1c file with the deep stem.
        output_stride: 8 or 16, stride of `c3`/`c4` with respect to the input.
        weights: name of the torchvision weights enum member to load.
        stem: ``"torchvision"`` (7x7 stride-2 conv ``conv1`` + ``bn1``) or ``"deep"``
            (mmsegmentation's ResNetV1c: ``stem`` = three 3x3 convs 32-32-64, the first with
            stride 2, each with BN and ReLU; depth 50 or 101). Both end with the 3x3 stride-2
            max-pool.

    Attributes:
        channels: `{"c1": .., "c2": .., "c3": .., "c4": ..}` channel counts of the features.
        depth: the ResNet depth.
        output_stride: stride of `c4`.
    """

    def __init__(
        self,
        depth: int = 50,
        pretrained: bool = False,
        output_stride: int = 8,
        weights: str = "IMAGENET1K_V1",
        stem: str = "torchvision",
    ) -> None:
        super().__init__()
        depth = parse_depth(depth)
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        deep = stem == "deep"
        if deep and depth not in V1C_IMAGENET_FILES:
            raise ValueError(f"the deep stem (ResNetV1c) exists for depth 50 and 101, not {depth}")
        builder, _, channels = _RESNETS[depth]
        # Check the cache before building anything: a missing file should fail fast.
        state_dict = None
        if pretrained:
            state_dict = (
                load_v1c_state_dict(depth) if deep else load_pretrained_state_dict(depth, weights)
            )

        dilate = [False, output_stride == 8, True]  # layer2, layer3, layer4
        if depth == 18:
            resnet: ResNet = builder(weights=None)
        else:
            resnet = builder(weights=None, replace_stride_with_dilation=dilate)
        if depth == 18:
            if dilate[1]:
                _dilate_basic_layer(resnet.layer3, 2)
            _dilate_basic_layer(resnet.layer4, 4 if dilate[1] else 2)

        self.depth = depth
        self.output_stride = output_stride
        self.stem_type = stem
        self.channels = {f"c{i + 1}": c for i, c in enumerate(channels)}
        if deep:
            # Indices as mmsegmentation's ResNetV1c `stem` (checkpoint keys stem.0, stem.1, ...).
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
            for m in self.stem.modules():
                if isinstance(m, nn.Conv2d):  # torchvision's initialisation of its own convs
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv1 = resnet.conv1
            self.bn1 = resnet.bn1
            self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        if state_dict is not None:
            # Weights do not depend on stride/dilation, so loading after dilating is the same;
            # the ImageNet classifier has no place here.
            self.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the feature pyramid.

        Args:
            x: `(B, 3, H, W)` normalised images.

        Returns:
            `c1` `(B, channels["c1"], H/4, W/4)` (layer1), `c2` `(B, ., H/8, W/8)` (layer2),
            `c3` `(B, ., H/os3, W/os3)` (layer3), `c4` `(B, ., H/os, W/os)` (layer4) with
            `os = output_stride` and `os3 = min(os, 16)`; sizes round up (`ceil`).
        """
        if self.stem_type == "deep":
            x = self.maxpool(self.stem(x))  # (B, 3, H, W) -> (B, 64, H/4, W/4)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4}


class LiteResNet(nn.Module):
    """A small residual encoder for CPU quickstarts and tests (no pretrained weights exist).

    Same feature contract as :class:`DilatedResNet`: ``c1`` at stride 4, ``c2`` at stride 8, ``c3``
    and ``c4`` at the output stride (dilated when it is 8). Two 3x3 stride-2 stem convolutions
    replace ResNet's 7x7 conv + max-pool, which discard the few pixels small parts have at
    quickstart resolutions. One BasicBlock per stage, widths ``(w, 2w, 4w, 8w)``.

    Args:
        width: channels of the first stage (default 32: 0.7 M parameters).
        output_stride: 8 or 16.
    """

    def __init__(self, width: int = 32, output_stride: int = 8, pretrained: bool = False) -> None:
        super().__init__()
        if pretrained:
            raise ValueError("the 'lite' backbone has no pretrained weights: use pretrained=false")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        from torchvision.models.resnet import BasicBlock

        def stage(cin: int, cout: int, stride: int, dilation: int) -> nn.Module:
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )
            block = BasicBlock(cin, cout, stride=stride, downsample=down)
            if dilation > 1:
                for conv in (block.conv1, block.conv2):
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
            return block

        w = width
        self.depth = 0
        self.output_stride = output_stride
        self.channels = {"c1": w, "c2": 2 * w, "c3": 4 * w, "c4": 8 * w}
        self.stem = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        )  # stride 4
        self.layer1 = stage(w, w, 1, 1)
        self.layer2 = stage(w, 2 * w, 2, 1)  # stride 8
        os8 = output_stride == 8
        self.layer3 = stage(2 * w, 4 * w, 1 if os8 else 2, 2 if os8 else 1)
        self.layer4 = stage(4 * w, 8 * w, 1, 4 if os8 else 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x: ``(B, 3, H, W)``. Returns ``c1`` (B, w, H/4, W/4) ... ``c4`` (B, 8w, H/8, W/8)."""
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": self.layer4(c3)}


def build_backbone(
    backbone: str | int, pretrained: bool = False, output_stride: int = 8
) -> nn.Module:
    """``"lite"`` -> :class:`LiteResNet`; a ResNet depth or name -> :class:`DilatedResNet`.

    ``"resnet50_v1c"`` / ``"resnet101_v1c"`` (also ``r50_v1c``, ``50v1c``) select the deep stem
    of mmsegmentation's ResNetV1c (see :func:`parse_backbone`).
    """
    if str(backbone).lower() == "lite":
        return LiteResNet(output_stride=output_stride, pretrained=pretrained)
    depth, stem = parse_backbone(backbone)
    return DilatedResNet(depth, pretrained=pretrained, output_stride=output_stride, stem=stem)
