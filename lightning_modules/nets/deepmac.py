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
    if sum(len(b) for b in boxes) == 0:
        return features.new_zeros(0, features.shape[1], output_size, output_size)
    # Geometry stays in fp32 whatever the features' dtype: bf16 keeps 8 bits of mantissa, so a box
    # edge at x = 300.7 would read x = 300 while the targets are cropped with the exact box. The
    # sampling runs on fp32 features (outside autocast, which would cast the boxes back down) and
    # only the sampled values return to the features' dtype.
    with torch.autocast(features.device.type, enabled=False):
        crops = roi_align(
            features.float(),
            [b.float() for b in boxes],
            output_size=output_size,
            spatial_scale=1.0 / stride,
            sampling_ratio=sampling_ratio,
            aligned=True,
        )
    return crops.to(features.dtype)


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
    # The sigmoid in fp32: bf16 probabilities are 1/256 apart near the 0.5 threshold.
    probs = mask_logits.to(out.dtype)
    probs = probs.sigmoid() if apply_sigmoid else probs
    boxes = boxes.to(out.dtype)
    # Box by box over the pixels the box touches only: a full-image grid per box would need
    # N x H x W x 2 floats (gigabytes on a 1024x2048 Cityscapes frame). The pixel ranges are
    # host integers: every box is read in one transfer, not one per box.
    corners = boxes.tolist()  # N x [x1, y1, x2, y2]
    for i in range(n):
        x1, y1, x2, y2 = corners[i]
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
    # Drawn on the CPU (the same boxes on every device for a seed), then copied: from pinned
    # memory without blocking, as a copy from pageable memory waits for the device's queue.
    noise = torch.randn(boxes.shape, generator=generator, device="cpu")
    if boxes.is_cuda:
        noise = noise.pin_memory().to(boxes.device, non_blocking=True)
    noise = noise.to(boxes)
    out = boxes + noise * amount * wh
    h, w = image_size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    x1 = torch.minimum(out[:, 0], out[:, 2])
    y1 = torch.minimum(out[:, 1], out[:, 3])
    x2 = torch.maximum(torch.maximum(out[:, 0], out[:, 2]), x1 + 1)
    y2 = torch.maximum(torch.maximum(out[:, 1], out[:, 3]), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


def aligned_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row ``i`` of ``a`` with row ``i`` of ``b``: ``(N, 4)`` xyxy pairs -> ``(N,)``."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def proposal_boxes(
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    iou_range: tuple[float, float] = (0.5, 1.0),
    generator: torch.Generator | None = None,
    tries: int = 4,
    steps: int = 32,
) -> torch.Tensor:
    """Boxes as a detector's foreground proposals: IoU with their instance's box ~ U(iou_range).

    Mask R-CNN computes its mask loss on the RoIs matched to an instance with IoU >= 0.5 (He et
    al. 2017, Sec. 3) and crops the instance's mask with the RoI, so its mask head sees boxes
    anywhere in that IoU range. The IoU distribution of real positive proposals depends on the
    detector; this draws the target IoU ``u`` uniformly in ``iou_range`` (an explicit choice,
    docs/deepmac.md), a random direction ``d`` in the 4 corner coordinates (Gaussian, scaled by
    the box's width and height, largest component one box side), and bisects the step ``t`` of
    ``box + t * d`` (clipped to the image) until its IoU with ``box`` is ``u``. Along such a ray
    every coordinate moves one way, so the IoU only falls with ``t`` (each edge either grows the
    union or shrinks the intersection) and the bisection is exact. A box whose ray cannot reach
    ``u`` inside the image (an instance filling the frame, every direction pointing out) draws a
    new direction up to ``tries`` times and otherwise keeps the lowest IoU its last ray reaches
    (above ``u``).

    Args:
        boxes: ``(N, 4)`` xyxy instance boxes (at least one pixel wide and high).
        image_size: ``(H, W)``: proposals are clipped to the image.
        iou_range: ``(low, high)`` of the target IoU, ``0 < low <= high <= 1``.
        generator: random source (CPU).
        tries: directions drawn at most per box.
        steps: bisection steps (the step ``t`` is found to ``4 / 2**steps``).

    Returns:
        ``(N, 4)`` proposals (float32, sides of at least one pixel before clipping).
    """
    lo, hi = float(iou_range[0]), float(iou_range[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"iou_range={iou_range}: expected 0 < low <= high <= 1")
    n = len(boxes)
    if n == 0:
        return boxes
    gt = boxes.detach().float().cpu()
    h, w = image_size
    wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)  # (N, 4): w, h, w, h
    target = lo + (hi - lo) * torch.rand(n, generator=generator)  # (N,)
    out = gt.clone()
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(tries):
        idx = todo.nonzero()[:, 0]
        if len(idx) == 0:
            break
        d = torch.randn(len(idx), 4, generator=generator)
        d = d / d.abs().amax(1, keepdim=True) * wh[idx]  # (n, 4): largest move one box side
        g = gt[idx]
        # Largest step keeping each side >= 1 pixel (sides shrink when d_x2 < d_x1).
        side = g[:, 2:] - g[:, :2]  # (n, 2)
        shrink = (d[:, :2] - d[:, 2:]).clamp(min=1e-12)  # (n, 2)
        t_side = torch.where(
            d[:, 2:] < d[:, :2], (side - 1).clamp(min=0) / shrink, torch.full_like(side, 4.0)
        )
        t_hi = t_side.amin(1).clamp(max=4.0)  # (n,)

        def ray(t: torch.Tensor, g: torch.Tensor = g, d: torch.Tensor = d) -> torch.Tensor:
            b = g + t[:, None] * d
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            return b

        u = target[idx]
        t_lo = torch.zeros_like(t_hi)
        reached = aligned_box_iou(ray(t_hi), g) <= u
        for _ in range(steps):
            mid = (t_lo + t_hi) / 2
            above = aligned_box_iou(ray(mid), g) > u
            t_lo = torch.where(above, mid, t_lo)
            t_hi = torch.where(above, t_hi, mid)
        out[idx] = ray(torch.where(reached, (t_lo + t_hi) / 2, t_hi))
        todo[idx[reached]] = False
    return out.to(boxes)


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
#
# The heads follow the TF Object Detection API's Deep-MAC release (deepmac_meta_arch.py,
# hourglass_network.py, resnet_v1.py), whose names count 3x3 convolution layers along the deepest
# path: ``resnet8`` is 4 basic blocks (8 convolutions), ``hourglass52`` is 52 convolutions through
# the downsampling branch. docs/deepmac.md lists the layouts; tests count the layers from the
# autograd graph.


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # GroupNorm: one small box in a batch still normalises (BN fails on a 1x1 map of one crop).
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm={kind!r}: expected 'bn' or 'gn'")


class ConvNormReLU(nn.Sequential):
    """3x3 convolution (no bias), norm, ReLU: the hourglass's ``ConvolutionalBlock``."""

    def __init__(self, cin: int, cout: int, norm: str = "gn") -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), _norm(norm, cout), nn.ReLU())


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a (projected) identity shortcut, ReLU after the sum (the
    hourglass's ``ResidualBlock``)."""

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
    """``blocks`` residual blocks; the first strides and changes the channels."""
    layers = [ResidualBlock(cin, cout, stride, norm)]
    layers += [ResidualBlock(cout, cout, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _decoder_stack(cin: int, cout: int, blocks: int, norm: str = "gn") -> nn.Sequential:
    """``blocks`` residual blocks at ``cin`` channels; the last one changes them to ``cout``."""
    layers = [ResidualBlock(cin, cin, 1, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers, ResidualBlock(cin, cout, 1, norm))


class _HourglassLevel(nn.Module):
    """One encoder-decoder stage: skip branch + (downsampling encoder, inner, decoder)."""

    def __init__(self, dims: list[int], blocks: list[int], norm: str) -> None:
        super().__init__()
        self.skip = _stack(dims[0], dims[0], blocks[0], 1, norm)
        self.down = _stack(dims[0], dims[1], blocks[0], 2, norm)
        if len(dims) > 2:
            self.inner: nn.Module = _HourglassLevel(dims[1:], blocks[1:], norm)
        else:
            self.inner = _stack(dims[1], dims[1], blocks[1], 1, norm)
        self.up = _decoder_stack(dims[1], dims[0], blocks[0], norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.inner(self.down(x)))  # (N, C, ceil(h/2), ceil(w/2))
        # (N, C, h/2, w/2) -> (N, C, h, w): nearest upsampling as in the stacked hourglass
        y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        return y + self.skip(x)


# Blocks per stage and channel multipliers of num_channels (``nc``) of the TF release's
# ``hourglass_<depth>`` functions.
HOURGLASS_LAYOUTS: dict[int, tuple[list[int], list[int]]] = {
    10: ([1, 1], [2, 2]),
    20: ([1, 2, 2], [2, 2, 3]),
    32: ([2, 2, 2, 2], [2, 2, 3, 3]),
    52: ([2, 2, 2, 2, 2, 4], [2, 2, 3, 3, 3, 4]),
    100: ([4, 4, 4, 4, 4, 8], [2, 2, 3, 3, 3, 4]),
}


class HourglassHead(nn.Module):
    """The release's single-stage hourglass without initial downsampling (the crop is small).

    Input block (3x3 conv to ``nc``, a residual block to ``2 nc``), the encoder-decoder stages of
    :data:`HOURGLASS_LAYOUTS`, an output 3x3 conv block, and the 1x1 mask projection. The name's
    depth counts the 3x3 convolutions through the downsampling branch: 3 (input) + the encoder
    and decoder blocks of every stage and the innermost blocks (2 per residual block) + 1
    (output); the skip branches run in parallel and are not counted.

    Args:
        in_channels: channels of the head's input crop.
        depth: 10, 20, 32, 52 or 100 (:data:`HOURGLASS_LAYOUTS`).
        num_channels: ``nc`` (the release's ``num_init_channels``).
        norm: ``"gn"`` or ``"bn"`` (the release uses synchronised BatchNorm).
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
            ConvNormReLU(in_channels, num_channels, norm),
            ResidualBlock(num_channels, dims[0], 1, norm),
        )
        self.hourglass = _HourglassLevel(dims, blocks, norm)
        self.post = ConvNormReLU(dims[0], dims[0], norm)
        self.out = nn.Conv2d(dims[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, M, M)`` -> ``(N, 1, M, M)`` logits."""
        return self.out(self.post(self.hourglass(self.stem(x))))


class PreActBasicBlock(nn.Module):
    """The basic block of the release's ``resnet_v1.block_basic``.

    ``norm -> ReLU`` first (the "preact"), then ``conv3x3 -> norm -> ReLU -> conv3x3 -> norm ->
    ReLU`` added to the shortcut: a 1x1 convolution (with bias) of the preact in the first block
    of a stack, the block's input otherwise. No ReLU after the sum.
    """

    def __init__(self, cin: int, cout: int, conv_shortcut: bool, norm: str = "gn") -> None:
        super().__init__()
        self.pre = nn.Sequential(_norm(norm, cin), nn.ReLU())
        self.shortcut = nn.Conv2d(cin, cout, 1) if conv_shortcut else None
        if self.shortcut is None and cin != cout:
            raise ValueError(f"an identity shortcut needs cin == cout, got {cin} -> {cout}")
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            _norm(norm, cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            _norm(norm, cout),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.body(pre) + skip


# Basic blocks per stack and channel multipliers of ``nc`` of the release's ``resnetN`` mask
# networks; N = 2 x blocks = the 3x3 convolutions.
RESNET_LAYOUTS: dict[int, tuple[list[int], list[int]]] = {
    4: ([2], [2]),
    8: ([4], [2]),
    12: ([6], [2]),
    16: ([8], [2]),
    20: ([8, 2], [2, 3]),
}


class ResNetHead(nn.Module):
    """The release's ``ResNetMaskNetwork``: a 1x1 input conv to ``nc``, stacks of
    :class:`PreActBasicBlock` at full crop resolution, the 1x1 mask projection.

    Args:
        in_channels: channels of the head's input crop.
        depth: 4, 8, 12, 16 or 20 (:data:`RESNET_LAYOUTS`): the 3x3 convolutions.
        num_channels: ``nc`` (the release's ``num_init_channels``).
        norm: ``"gn"`` or ``"bn"``.
    """

    output_scale = 1

    def __init__(self, in_channels: int, depth: int = 8, num_channels: int = 64, norm: str = "gn"):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"resnet depth {depth}: expected one of {sorted(RESNET_LAYOUTS)}")
        blocks, mult = RESNET_LAYOUTS[depth]
        self.stem = nn.Conv2d(in_channels, num_channels, 1)
        layers: list[nn.Module] = []
        cin = num_channels
        for n, m in zip(blocks, mult, strict=True):
            cout = num_channels * m
            layers += [
                PreActBasicBlock(cin if i == 0 else cout, cout, i == 0, norm) for i in range(n)
            ]
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, 1, 1)

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
    """``hourglass10|20|32|52|100``, ``resnet4|8|12|16|20`` (the release's names: 3x3
    convolutions) or ``maskrcnn``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key.startswith("hourglass"):
        return HourglassHead(in_channels, int(key[len("hourglass") :]), num_channels, norm)
    if key.startswith("resnet"):
        return ResNetHead(in_channels, int(key[len("resnet") :]), num_channels, norm)
    if key == "maskrcnn":
        return MaskRCNNHead(in_channels, num_channels)
    raise ValueError(f"mask head {name!r}: expected hourglassN, resnetN or maskrcnn")


class PredictionNet(nn.Sequential):
    """CenterNet's prediction head (the release's ``make_prediction_net``): 3x3 conv to
    ``hidden`` channels, ReLU, 1x1 conv to ``out_channels``; the Deep-MAC pixel and instance
    embeddings and the centre heatmap are each one."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, 1, 1), nn.ReLU(), nn.Conv2d(hidden, out_channels, 1)
        )


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

    The head's input for a box follows the release (``_get_mask_head_input``): normalised crop
    coordinates (``use_xy``), the crop of a learned pixel embedding of the stride-4 features
    (``pixel_embedding_dim`` channels, a :class:`PredictionNet`), and the instance embedding
    (``embedding_dim`` channels, another :class:`PredictionNet`) read at the box centre and tiled
    over the crop. ``pixel_embedding_dim=0`` crops the stride-4 features themselves.

    Args:
        backbone: ``"lite"`` or a ResNet depth (see :func:`build_backbone`).
        pretrained: ImageNet weights from the torch hub cache.
        fpn_channels: channels of the stride-4 map.
        head: mask-head name (:func:`build_mask_head`).
        head_channels: the head's ``nc`` (the release's ``num_init_channels``).
        head_width_scale: factor on ``head_channels`` (rounded): shrinks every head by the same
            factor for CPU-sized runs, keeping the heads' relative widths and everything else
            as configured.
        mask_size: side ``M`` of the predicted masks.
        use_xy: prepend normalised crop coordinates (2 channels) to each crop.
        pixel_embedding_dim: pixel-embedding channels (the release's 16); 0: crop the features.
        embedding_dim: instance-embedding channels (the release's ``dim``, 32; 0 = off): tells
            the head which object the box is about when boxes overlap.
        embedding_hidden: hidden width of the embedding / heatmap prediction nets (256 as in
            CenterNet).
        box_jitter: relative Gaussian box noise in training (``box_jitter_mode="gaussian"``).
        box_jitter_mode: ``"gaussian"`` (ground-truth boxes with ``box_jitter`` noise, as
            Deep-MAC trains) or ``"proposal"`` (boxes as a detector's foreground proposals,
            :func:`proposal_boxes`, as Mask R-CNN trains its mask head).
        proposal_iou: ``(low, high)`` IoU range of the proposal boxes.
        num_centre_classes: channels of an all-class centre heatmap predicted from the stride-4
            features (CenterNet's object centres, which Deep-MAC's backbone also learns); 0 = off.
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
        head_width_scale: float = 1.0,
        mask_size: int = 32,
        use_xy: bool = True,
        pixel_embedding_dim: int = 16,
        embedding_dim: int = 32,
        embedding_hidden: int = 256,
        box_jitter: float = 0.0,
        box_jitter_mode: str = "gaussian",
        proposal_iou: tuple[float, float] = (0.5, 1.0),
        num_centre_classes: int = 0,
        sampling_ratio: int = 2,
        norm: str = "gn",
    ) -> None:
        super().__init__()
        if box_jitter_mode not in ("gaussian", "proposal"):
            raise ValueError(f"box_jitter_mode={box_jitter_mode!r}: expected gaussian or proposal")
        self.features = Stride4FPN(backbone, pretrained, fpn_channels)
        self.pixel_embedding = (
            PredictionNet(fpn_channels, pixel_embedding_dim, embedding_hidden)
            if pixel_embedding_dim > 0
            else None
        )
        self.embedding = (
            PredictionNet(fpn_channels, embedding_dim, embedding_hidden)
            if embedding_dim > 0
            else None
        )
        self.centre_heatmap = None
        if num_centre_classes > 0:
            self.centre_heatmap = PredictionNet(fpn_channels, num_centre_classes, embedding_hidden)
            # CenterNet's prior: every cell starts at p = 0.1 (bias -2.19) so the focal loss of
            # the overwhelmingly negative cells does not swamp the first steps.
            nn.init.constant_(self.centre_heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))
        self.use_xy, self.box_jitter, self.sampling_ratio = use_xy, box_jitter, sampling_ratio
        self.box_jitter_mode = box_jitter_mode
        self.proposal_iou = (float(proposal_iou[0]), float(proposal_iou[1]))
        pix = pixel_embedding_dim if pixel_embedding_dim > 0 else fpn_channels
        in_ch = pix + (2 if use_xy else 0) + max(embedding_dim, 0)
        width = max(1, round(head_channels * head_width_scale))
        self.head = build_mask_head(head, in_ch, width, norm)
        self.mask_size = mask_size
        if mask_size % self.head.output_scale:
            raise ValueError(f"mask_size={mask_size} must be divisible by {self.head.output_scale}")
        self.crop_size = mask_size // self.head.output_scale

    def training_boxes(
        self, boxes: list[torch.Tensor], size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """The boxes the head is trained on: jittered ground truth or proposal-like boxes."""
        if self.box_jitter_mode == "proposal":
            return [proposal_boxes(b, size, self.proposal_iou) for b in boxes]
        if self.box_jitter > 0:
            return [jitter_boxes(b, self.box_jitter, size) for b in boxes]
        return boxes

    def forward(
        self, images: torch.Tensor, boxes: list[torch.Tensor]
    ) -> dict[str, torch.Tensor | list]:
        """Args:
            images: ``(B, 3, H, W)`` normalised.
            boxes: B tensors ``(N_i, 4)`` xyxy in ``images`` pixels.

        Returns:
            ``mask_logits`` ``(sum N_i, M, M)``; ``boxes``: the boxes used (jittered in training),
            a list like the input, to crop targets consistently; with ``num_centre_classes``,
            ``centre_heatmap`` ``(B, K, H/4, W/4)`` logits.
        """
        if self.training:
            boxes = self.training_boxes(boxes, tuple(images.shape[-2:]))
        feats = self.features(images)  # (B, C, H/4, W/4)
        out: dict[str, torch.Tensor | list] = {"boxes": boxes}
        if self.centre_heatmap is not None:
            out["centre_heatmap"] = self.centre_heatmap(feats)  # (B, K, H/4, W/4)
        pix = feats if self.pixel_embedding is None else self.pixel_embedding(feats)
        crops = crop_and_resize(pix, boxes, self.crop_size, self.stride, self.sampling_ratio)
        n = crops.shape[0]
        if n == 0:  # no box in the whole batch: nothing for the head to do
            out["mask_logits"] = feats.new_zeros(0, self.mask_size, self.mask_size) + 0 * pix.sum()
            return out
        parts = [crops]  # (N, P, m, m)
        if self.use_xy:
            parts.insert(0, coordinate_channels(n, self.crop_size, crops.device, crops.dtype))
        if self.embedding is not None:
            emb = self.embedding(feats)  # (B, E, H/4, W/4)
            # One stride-cell box at each centre, 1 bin, 1 sample: bilinear read at the centre
            # (the release reads the cell under the centre).
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
        logits = self.head(torch.cat(parts, 1))  # (N, 1, M, M)
        out["mask_logits"] = logits[:, 0]
        return out
