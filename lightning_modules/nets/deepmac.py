"""Deep-MAC: class-agnostic mask heads on box crops of a stride-4 feature map.

Birodkar et al., "The surprising impact of mask-head architecture on novel class segmentation"
(ICCV 2021). Boxes (ground truth in training and in the paper's evaluation protocol) select crops of a
stride-4 feature map (ResNet + FPN-style top-down fusion); a mask head turns each crop into one mask
logit map. The head family is the variable of the paper: hourglass heads with 10/20/52/100 layers
(the stage layouts of the TF Object Detection API's ``hourglass_network.py``), a ResNet-style stack at
full crop resolution, and Mask R-CNN's 4-conv head as the baseline.

Box convention everywhere: ``(x1, y1, x2, y2)`` float in input-image pixels, continuous coordinates
(pixel ``i`` covers ``[i, i+1)``), so an integer box ``[0, 0, W, H]`` is the whole image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from lightning_modules.nets.backbones import build_backbone

# ---------------------------------------------------------------------- crops and paste-back


def crop_and_resize(
    features: torch.Tensor,
    boxes: list[torch.Tensor],
    output_size: int,
    stride: float = 1.0,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """ROI-aligned crops of ``features`` for every box of every image.

    With ``aligned=True`` a sample at continuous coordinate ``u`` reads pixel ``u - 0.5``, so an
    integer box whose side equals ``output_size * stride`` with ``sampling_ratio=1`` reads exactly
    the covered pixels (tested against direct indexing).

    Args:
        features: ``(B, C, H, W)`` map at ``stride`` pixels of the image per cell.
        boxes: B tensors ``(N_i, 4)`` xyxy in image pixels.
        output_size: side ``M`` of the crops.
        stride: image pixels per feature cell.
        sampling_ratio: bilinear samples per bin side (roi_align's).

    Returns:
        ``(sum N_i, C, M, M)``, boxes in image order.
    """
    boxes = [b.to(features.dtype) for b in boxes]
    if sum(len(b) for b in boxes) == 0:
        return features.new_zeros(0, features.shape[1], output_size, output_size)
    return roi_align(
        features,
        boxes,
        output_size=output_size,
        spatial_scale=1.0 / stride,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )


def crop_instance_masks(masks: torch.Tensor, boxes: torch.Tensor, output_size: int) -> torch.Tensor:
    """Crops each instance's own mask with its box: the mask head's targets.

    Args:
        masks: ``(N, H, W)`` binary masks, instance ``i`` in row ``i``.
        boxes: ``(N, 4)`` xyxy in the masks' pixels (the boxes the head saw, jittered or not).
        output_size: mask side ``M``.

    Returns:
        ``(N, M, M)`` float soft targets in ``[0, 1]`` (area-averaged at the crop's resolution).
    """
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros(0, output_size, output_size, dtype=torch.float32)
    idx = torch.arange(n, device=boxes.device, dtype=torch.float32)[:, None]
    rois = torch.cat([idx, boxes.float()], 1)  # (N, 5): roi i reads mask i only
    crops = roi_align(masks[:, None].float(), rois, output_size, 1.0, 2, aligned=True)
    return crops[:, 0]


def paste_masks(
    mask_logits: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    apply_sigmoid: bool = True,
) -> torch.Tensor:
    """Pastes per-box masks into the image (the inverse of :func:`crop_and_resize`).

    Every image pixel inside a box samples the box's mask bilinearly at the pixel centre; pixels
    outside get 0. An integer box whose side equals the mask side reproduces the mask exactly.

    Args:
        mask_logits: ``(N, M, M)`` box-relative logits (or probabilities with
            ``apply_sigmoid=False``).
        boxes: ``(N, 4)`` xyxy in the target image's pixels.
        image_size: ``(H, W)`` of the target image.
        apply_sigmoid: pass logits through a sigmoid before pasting.

    Returns:
        ``(N, H, W)`` float probabilities in ``[0, 1]``.
    """
    h, w = int(image_size[0]), int(image_size[1])
    n = mask_logits.shape[0]
    out = mask_logits.new_zeros(
        n, h, w, dtype=torch.float32 if mask_logits.dtype != torch.float64 else mask_logits.dtype
    )
    if n == 0:
        return out
    probs = (mask_logits.sigmoid() if apply_sigmoid else mask_logits).to(out.dtype)
    boxes = boxes.to(out.dtype)
    # Box by box over the pixels the box touches only: a full-image grid per box would need
    # N x H x W x 2 floats (gigabytes on a 1024x2048 Cityscapes frame).
    for i in range(n):
        x1, y1, x2, y2 = boxes[i].tolist()
        c0, c1 = max(0, math.floor(x1)), min(w, math.ceil(x2))
        r0, r1 = max(0, math.floor(y1)), min(h, math.ceil(y2))
        if c1 <= c0 or r1 <= r0:
            continue
        xs = torch.arange(c0, c1, device=probs.device, dtype=probs.dtype) + 0.5
        ys = torch.arange(r0, r1, device=probs.device, dtype=probs.dtype) + 0.5
        # grid_sample's align_corners=False maps -1/+1 to the outer edges of the mask: the box edges.
        gx = 2 * (xs - x1) / max(x2 - x1, 1e-6) - 1  # (w_i,)
        gy = 2 * (ys - y1) / max(y2 - y1, 1e-6) - 1  # (h_i,)
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)  # (h_i, w_i, 2)
        # Border padding: pixels in the box's outer half-cell repeat the mask's edge instead of
        # fading towards zero (the box itself bounds the mask through `inside`).
        patch = F.grid_sample(
            probs[i][None, None],
            grid[None],
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )[0, 0]  # (h_i, w_i)
        inside = (gx.abs() <= 1)[None, :] & (gy.abs() <= 1)[:, None]
        out[i, r0:r1, c0:c1] = patch * inside
    return out


def jitter_boxes(
    boxes: torch.Tensor,
    amount: float,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian box noise with a standard deviation of ``amount`` times the box side.

    Args:
        boxes: ``(N, 4)`` xyxy.
        amount: relative noise (0 returns ``boxes``).
        image_size: ``(H, W)``: jittered boxes are clipped to the image.

    Returns:
        ``(N, 4)`` boxes with ``x2 > x1`` and ``y2 > y1`` (at least one pixel).
    """
    if amount <= 0 or len(boxes) == 0:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4): w, h, w, h
    noise = torch.randn(boxes.shape, generator=generator, device="cpu").to(boxes)
    out = boxes + noise * amount * wh
    h, w = image_size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    x1 = torch.minimum(out[:, 0], out[:, 2])
    y1 = torch.minimum(out[:, 1], out[:, 3])
    x2 = torch.maximum(torch.maximum(out[:, 0], out[:, 2]), x1 + 1)
    y2 = torch.maximum(torch.maximum(out[:, 1], out[:, 3]), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


def coordinate_channels(
    num: int, size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Normalised ``(x, y)`` of the crop's cell centres in ``[-1, 1]``.

    Returns:
        ``(num, 2, size, size)``; channel 0 grows along width, channel 1 along height.
    """
    t = (torch.arange(size, device=device, dtype=dtype) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([gx, gy])[None].expand(num, 2, size, size)


# ---------------------------------------------------------------------- building blocks


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # GroupNorm: one small box in a batch still normalises (BN fails on a 1x1 map of one crop).
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm={kind!r}: expected 'bn' or 'gn'")


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a (projected) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "gn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(y)) + self.skip(x))


def _stack(cin: int, cout: int, blocks: int, stride: int = 1, norm: str = "gn") -> nn.Sequential:
    layers = [ResidualBlock(cin, cout, stride, norm)]
    layers += [ResidualBlock(cout, cout, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class _HourglassLevel(nn.Module):
    """One level of an encoder-decoder hourglass: skip branch + (down, inner, up)."""

    def __init__(self, dims: list[int], blocks: list[int], norm: str) -> None:
        super().__init__()
        self.skip = _stack(dims[0], dims[0], blocks[0], 1, norm)
        self.down = _stack(dims[0], dims[1], blocks[0], 2, norm)
        if len(dims) > 2:
            self.inner: nn.Module = _HourglassLevel(dims[1:], blocks[1:], norm)
        else:
            self.inner = _stack(dims[1], dims[1], blocks[1], 1, norm)
        self.up = _stack(dims[1], dims[0], blocks[0], 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.inner(self.down(x)))  # (N, C, ceil(h/2), ceil(w/2))
        # (N, C, h/2, w/2) -> (N, C, h, w): nearest upsampling as in the stacked hourglass
        y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        return y + self.skip(x)


# Stage layouts (blocks per stage, channel multipliers of num_channels) of Deep-MAC's hourglass heads.
HOURGLASS_LAYOUTS: dict[int, tuple[list[int], list[int]]] = {
    10: ([1, 1], [2, 2]),
    20: ([1, 2, 2], [2, 2, 3]),
    32: ([2, 2, 2, 2], [2, 2, 3, 3]),
    52: ([2, 2, 2, 2, 2, 4], [2, 2, 3, 3, 3, 4]),
    100: ([4, 4, 4, 4, 4, 8], [2, 2, 3, 3, 3, 4]),
}


class HourglassHead(nn.Module):
    """Hourglass mask head without initial downsampling (the crop is already small).

    Args:
        in_channels: channels of the head's input crop.
        depth: 10, 20, 32, 52 or 100 (:data:`HOURGLASS_LAYOUTS`).
        num_channels: base width ``nc``; the stages use ``nc * multiplier`` channels.
        norm: ``"gn"`` or ``"bn"``.
    """

    output_scale = 1

    def __init__(self, in_channels: int, depth: int = 52, num_channels: int = 64, norm: str = "gn"):
        super().__init__()
        if depth not in HOURGLASS_LAYOUTS:
            raise ValueError(
                f"hourglass depth {depth}: expected one of {sorted(HOURGLASS_LAYOUTS)}"
            )
        blocks, mult = HOURGLASS_LAYOUTS[depth]
        dims = [num_channels * m for m in mult]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], 3, 1, 1, bias=False), _norm(norm, dims[0]), nn.ReLU()
        )
        self.hourglass = _HourglassLevel(dims, blocks, norm)
        self.out = nn.Conv2d(dims[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, M, M)`` -> ``(N, 1, M, M)`` logits."""
        return self.out(self.hourglass(self.stem(x)))


class ResNetHead(nn.Module):
    """A stack of residual blocks at full crop resolution (Deep-MAC's "ResNet" heads)."""

    output_scale = 1

    def __init__(
        self, in_channels: int, num_blocks: int = 4, num_channels: int = 128, norm: str = "gn"
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, num_channels, 3, 1, 1, bias=False),
            _norm(norm, num_channels),
            nn.ReLU(),
        )
        self.blocks = _stack(num_channels, num_channels, num_blocks, 1, norm)
        self.out = nn.Conv2d(num_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, M, M)`` -> ``(N, 1, M, M)`` logits."""
        return self.out(self.blocks(self.stem(x)))


class MaskRCNNHead(nn.Module):
    """Mask R-CNN's head: four 3x3 convolutions, a 2x transposed convolution, a 1x1 predictor.

    It reads crops of half the mask side (14 for 28 in the original) and upsamples them.
    """

    output_scale = 2

    def __init__(self, in_channels: int, num_channels: int = 256, num_convs: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else num_channels, num_channels, 3, 1, 1),
                nn.ReLU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.up = nn.ConvTranspose2d(num_channels, num_channels, 2, 2)
        self.out = nn.Conv2d(num_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, M/2, M/2)`` -> ``(N, 1, M, M)`` logits."""
        return self.out(F.relu(self.up(self.convs(x))))


def build_mask_head(name: str, in_channels: int, num_channels: int, norm: str = "gn") -> nn.Module:
    """``hourglass10|20|32|52|100``, ``resnet<blocks>`` (e.g. ``resnet4``) or ``maskrcnn``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key.startswith("hourglass"):
        return HourglassHead(in_channels, int(key[len("hourglass") :]), num_channels, norm)
    if key.startswith("resnet"):
        return ResNetHead(in_channels, int(key[len("resnet") :]), num_channels, norm)
    if key == "maskrcnn":
        return MaskRCNNHead(in_channels, num_channels)
    raise ValueError(f"mask head {name!r}: expected hourglassN, resnetN or maskrcnn")


# ---------------------------------------------------------------------- the network


class Stride4FPN(nn.Module):
    """A ResNet whose four stages are fused top-down (FPN style) into one stride-4 map."""

    def __init__(self, backbone: str | int = 50, pretrained: bool = False, channels: int = 128):
        super().__init__()
        # output_stride 16 keeps c4 cheaper than a stride-8 dilated layer4; the fusion restores detail.
        self.body = build_backbone(backbone, pretrained=pretrained, output_stride=16)
        ch = self.body.channels
        self.lateral = nn.ModuleDict(
            {k: nn.Conv2d(ch[k], channels, 1) for k in ("c1", "c2", "c3", "c4")}
        )
        self.smooth = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU())
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, channels, H/4, W/4)``."""
        feats = self.body(x)
        y = self.lateral["c4"](feats["c4"])
        for k in ("c3", "c2", "c1"):
            lat = self.lateral[k](feats[k])
            # (B, C, h, w) -> (B, C, h', w') of the finer level
            y = lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        return self.smooth(y)


class DeepMAC(nn.Module):
    """Boxes in, one class-agnostic mask logit map per box out.

    Args:
        backbone: ``"lite"`` or a ResNet depth (see :func:`build_backbone`).
        pretrained: ImageNet weights from the torch hub cache.
        fpn_channels: channels of the stride-4 map.
        head: mask-head name (:func:`build_mask_head`).
        head_channels: the head's base width.
        mask_size: side ``M`` of the predicted masks.
        use_xy: append normalised crop coordinates (2 channels) to each crop.
        embedding_dim: instance-embedding channels (0 = off): a 1x1 projection of the feature map
            sampled at the box centre and tiled over the crop, telling the head which object the
            box is about when boxes overlap.
        box_jitter: relative Gaussian box noise in training (0 = off).
        sampling_ratio: roi_align samples per bin side.
        norm: normalisation of the hourglass/ResNet heads (``"gn"`` or ``"bn"``).
    """

    stride = 4

    def __init__(
        self,
        backbone: str | int = 50,
        pretrained: bool = False,
        fpn_channels: int = 128,
        head: str = "hourglass52",
        head_channels: int = 64,
        mask_size: int = 32,
        use_xy: bool = True,
        embedding_dim: int = 16,
        box_jitter: float = 0.0,
        sampling_ratio: int = 2,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        self.features = Stride4FPN(backbone, pretrained, fpn_channels)
        self.embedding = nn.Conv2d(fpn_channels, embedding_dim, 1) if embedding_dim > 0 else None
        self.use_xy, self.box_jitter, self.sampling_ratio = use_xy, box_jitter, sampling_ratio
        in_ch = fpn_channels + (2 if use_xy else 0) + max(embedding_dim, 0)
        self.head = build_mask_head(head, in_ch, head_channels, norm)
        self.mask_size = mask_size
        if mask_size % self.head.output_scale:
            raise ValueError(f"mask_size={mask_size} must be divisible by {self.head.output_scale}")
        self.crop_size = mask_size // self.head.output_scale

    def forward(
        self, images: torch.Tensor, boxes: list[torch.Tensor]
    ) -> dict[str, torch.Tensor | list]:
        """Args:
            images: ``(B, 3, H, W)`` normalised.
            boxes: B tensors ``(N_i, 4)`` xyxy in ``images`` pixels.

        Returns:
            ``mask_logits`` ``(sum N_i, M, M)``; ``boxes``: the boxes used (jittered in training),
            a list like the input, to crop targets consistently.
        """
        if self.training and self.box_jitter > 0:
            size = images.shape[-2:]
            boxes = [jitter_boxes(b, self.box_jitter, size) for b in boxes]
        feats = self.features(images)  # (B, C, H/4, W/4)
        crops = crop_and_resize(feats, boxes, self.crop_size, self.stride, self.sampling_ratio)
        parts = [crops]  # (N, C, m, m)
        n = crops.shape[0]
        if n == 0:  # no box in the whole batch: nothing for the head to do
            empty = feats.new_zeros(0, self.mask_size, self.mask_size) + 0 * feats.sum()
            return {"mask_logits": empty, "boxes": boxes}
        if self.embedding is not None:
            emb = self.embedding(feats)  # (B, E, H/4, W/4)
            # One stride-cell box at each centre, 1 bin, 1 sample: bilinear read at the centre.
            centres = [
                torch.cat(
                    [
                        (b[:, :2] + b[:, 2:]) / 2 - self.stride / 2,
                        (b[:, :2] + b[:, 2:]) / 2 + self.stride / 2,
                    ],
                    1,
                )
                for b in boxes
            ]
            inst = crop_and_resize(emb, centres, 1, self.stride, 1)  # (N, E, 1, 1)
            parts.append(inst.expand(-1, -1, self.crop_size, self.crop_size))
        if self.use_xy:
            parts.append(coordinate_channels(n, self.crop_size, crops.device, crops.dtype))
        logits = self.head(torch.cat(parts, 1))  # (N, 1, M, M)
        return {"mask_logits": logits[:, 0], "boxes": boxes}
