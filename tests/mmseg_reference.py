"""mmsegmentation's three Cityscapes networks written from their published definitions, as plain
functions of a state dict in mmsegmentation's key layout (no rimlab module is used).

Sources (mmsegmentation 1.2, configs/_base_/models/{pspnet,deeplabv3plus,danet}_r50-d8.py):
``ResNetV1c`` (``mmseg/models/backbones/resnet.py``: deep stem, Bottleneck "pytorch" style,
``contract_dilation``), ``PSPHead`` (``psp_head.py``), ``DepthwiseSeparableASPPHead``
(``sep_aspp_head.py`` and ``aspp_head.py``), ``DAHead`` (``da_head.py``, ``PAM`` through
``_SelfAttentionBlock`` of ``utils/self_attention_block.py``, ``CAM``), ``FCNHead``
(``fcn_head.py``), mmcv's ``ConvModule``/``DepthwiseSeparableConvModule``/``Scale``.

- :func:`state_spec`: every tensor name and shape of the ``EncoderDecoder`` state dict;
- :func:`random_state`: random values for that spec (BatchNorm statistics and attention scales
  included, scaled so that activations stay O(1) through ResNet-50);
- :func:`forward`: the logits of every head, resized to the input as mmsegmentation's
  ``encode_decode`` (decode head) and ``loss_by_feat`` (all heads) resize them; ``align_corners``
  is the heads' (True in the ``*_cityscapes-769x769`` configs), used by every resize inside the
  heads and by those to the input;
- :func:`slide`: mmsegmentation's ``EncoderDecoder.slide_inference`` (windows, ``count_mat``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
PLANES = (64, 128, 256, 512)
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
CHANNELS = 512  # decode_head.channels in the three configs
HEADS = ("psp", "aspp", "da")


# ---------------------------------------------------------------------- the state spec


def _bn(spec: dict, prefix: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        spec[f"{prefix}.{name}"] = (c,)
    spec[f"{prefix}.num_batches_tracked"] = ()


def _conv_module(spec: dict, prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> None:
    spec[f"{prefix}.conv.weight"] = (cout, cin // groups, k, k)
    _bn(spec, f"{prefix}.bn", cout)


def _ds_conv_module(spec: dict, prefix: str, cin: int, cout: int) -> None:
    _conv_module(spec, f"{prefix}.depthwise_conv", cin, cin, 3, groups=cin)
    _conv_module(spec, f"{prefix}.pointwise_conv", cin, cout, 1)


def _conv_seg(spec: dict, prefix: str, cin: int, num_classes: int) -> None:
    spec[f"{prefix}.weight"] = (num_classes, cin, 1, 1)
    spec[f"{prefix}.bias"] = (num_classes,)


def state_spec(
    head: str, depth: int, num_classes: int, channels: int = CHANNELS, aux_channels: int = 256
) -> OrderedDict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of mmsegmentation's ``EncoderDecoder`` for ``head``.

    ``channels`` / ``aux_channels``: the decode / auxiliary heads' width (512 / 256 in the
    published configs; tests shrink them to keep CPU time down, the names stay).
    """
    spec: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for i, (cin, cout) in enumerate(((3, 32), (32, 32), (32, 64))):
        spec[f"backbone.stem.{3 * i}.weight"] = (cout, cin, 3, 3)
        _bn(spec, f"backbone.stem.{3 * i + 1}", cout)
    inplanes = 64
    for stage, (n, planes) in enumerate(zip(BLOCKS[depth], PLANES, strict=True)):
        for j in range(n):
            p = f"backbone.layer{stage + 1}.{j}"
            spec[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            _bn(spec, f"{p}.bn1", planes)
            spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(spec, f"{p}.bn2", planes)
            spec[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            _bn(spec, f"{p}.bn3", 4 * planes)
            if j == 0:
                spec[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                _bn(spec, f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    d, ch = "decode_head", channels
    if head == "psp":
        for i in range(4):
            _conv_module(spec, f"{d}.psp_modules.{i}.1", 2048, ch, 1)
        _conv_module(spec, f"{d}.bottleneck", 2048 + 4 * ch, ch, 3)
    elif head == "aspp":
        _conv_module(spec, f"{d}.image_pool.1", 2048, ch, 1)
        _conv_module(spec, f"{d}.aspp_modules.0", 2048, ch, 1)
        for i in (1, 2, 3):
            _ds_conv_module(spec, f"{d}.aspp_modules.{i}", 2048, ch)
        _conv_module(spec, f"{d}.bottleneck", 5 * ch, ch, 3)
        _conv_module(spec, f"{d}.c1_bottleneck", 256, 48, 1)
        _ds_conv_module(spec, f"{d}.sep_bottleneck.0", ch + 48, ch)
        _ds_conv_module(spec, f"{d}.sep_bottleneck.1", ch, ch)
    elif head == "da":
        _conv_module(spec, f"{d}.pam_in_conv", 2048, ch, 3)
        for name, cout in (("key", ch // 8), ("query", ch // 8), ("value", ch)):
            spec[f"{d}.pam.{name}_project.weight"] = (cout, ch, 1, 1)
            spec[f"{d}.pam.{name}_project.bias"] = (cout,)
        spec[f"{d}.pam.gamma.scale"] = ()
        _conv_module(spec, f"{d}.pam_out_conv", ch, ch, 3)
        _conv_seg(spec, f"{d}.pam_conv_seg", ch, num_classes)
        _conv_module(spec, f"{d}.cam_in_conv", 2048, ch, 3)
        spec[f"{d}.cam.gamma.scale"] = ()
        _conv_module(spec, f"{d}.cam_out_conv", ch, ch, 3)
        _conv_seg(spec, f"{d}.cam_conv_seg", ch, num_classes)
    else:
        raise ValueError(head)
    _conv_seg(spec, f"{d}.conv_seg", ch, num_classes)
    _conv_module(spec, "auxiliary_head.convs.0", 1024, aux_channels, 3)
    _conv_seg(spec, "auxiliary_head.conv_seg", aux_channels, num_classes)
    return spec


def random_state(spec: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Random tensors for ``spec``: Kaiming-scaled convs, BN weights in [0.5, 1] (0.1-0.2 on the
    residual branches' last BN so that the features do not grow block after block), BN statistics
    away from (0, 1), attention scales in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(40000)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var") or key.endswith("gamma.scale"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            small = ".bn3." in key or "downsample.1" in key
            state[key] = (0.2 if small else 1.0) * (0.5 + 0.5 * torch.rand(shape, generator=g))
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


# ---------------------------------------------------------------------- the forward pass


class _Net:
    """Functional forward over ``state``; ``training``: BatchNorm with batch statistics."""

    def __init__(self, state: dict[str, Tensor], training: bool) -> None:
        self.s = state
        self.training = training

    def bn(self, x: Tensor, p: str) -> Tensor:
        s = self.s
        # clones: batch statistics must not update the reference's running statistics
        mean, var = s[f"{p}.running_mean"].clone(), s[f"{p}.running_var"].clone()
        return F.batch_norm(
            x, mean, var, s[f"{p}.weight"], s[f"{p}.bias"], self.training, 0.1, 1e-5
        )

    def cm(self, x: Tensor, p: str, padding: int = 0, dilation: int = 1, groups: int = 1) -> Tensor:
        """mmcv ConvModule: conv (no bias) -> BN -> ReLU."""
        w = self.s[f"{p}.conv.weight"]
        x = F.conv2d(x, w, None, 1, padding, dilation, groups)
        return F.relu(self.bn(x, f"{p}.bn"))

    def ds(self, x: Tensor, p: str, dilation: int) -> Tensor:
        """DepthwiseSeparableConvModule: depthwise 3x3 ConvModule, pointwise 1x1 ConvModule."""
        x = self.cm(x, f"{p}.depthwise_conv", dilation, dilation, groups=x.shape[1])
        return self.cm(x, f"{p}.pointwise_conv")

    def seg(self, x: Tensor, p: str) -> Tensor:
        """cls_seg: dropout (identity here) -> 1x1 conv with bias."""
        return F.conv2d(x, self.s[f"{p}.weight"], self.s[f"{p}.bias"])

    def backbone(self, x: Tensor, depth: int) -> list[Tensor]:
        for i in range(3):
            conv = self.s[f"backbone.stem.{3 * i}.weight"]
            x = F.conv2d(x, conv, None, 2 if i == 0 else 1, 1)
            x = F.relu(self.bn(x, f"backbone.stem.{3 * i + 1}"))
        x = F.max_pool2d(x, 3, 2, 1)
        outs = []
        for stage, n in enumerate(BLOCKS[depth]):
            stride, dilation = STRIDES[stage], DILATIONS[stage]
            for j in range(n):
                p = f"backbone.layer{stage + 1}.{j}"
                # contract_dilation: the first block of a dilated stage uses half the dilation
                d = dilation // 2 if (j == 0 and dilation > 1) else dilation
                s = stride if j == 0 else 1
                out = F.relu(self.bn(F.conv2d(x, self.s[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.conv2d(out, self.s[f"{p}.conv2.weight"], None, s, d, d)
                out = F.relu(self.bn(out, f"{p}.bn2"))
                out = self.bn(F.conv2d(out, self.s[f"{p}.conv3.weight"]), f"{p}.bn3")
                if j == 0:
                    x = F.conv2d(x, self.s[f"{p}.downsample.0.weight"], None, s)
                    x = self.bn(x, f"{p}.downsample.1")
                x = F.relu(out + x)
            outs.append(x)
        return outs


def forward(
    state: dict[str, Tensor],
    x: Tensor,
    head: str,
    depth: int = 50,
    training: bool = False,
    align_corners: bool = False,
) -> dict[str, Tensor]:
    """Logits ``(B, C, H, W)`` of every head of the network, named as rimlab names its outputs:
    ``out`` (decode head; DAHead's ``pam_cam``), ``aux`` (FCNHead on layer3) and, for DAHead,
    ``pam`` and ``cam``."""

    def _resize(t: Tensor, size) -> Tensor:  # mmseg's resize() with the heads' align_corners
        return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=align_corners)

    net = _Net(state, training)
    size = x.shape[-2:]
    c1, _, c3, c4 = net.backbone(x, depth)
    d = "decode_head"
    out: dict[str, Tensor] = {}
    if head == "psp":
        outs = [c4]  # PPM: the input first, then the pooled branches
        for i, scale in enumerate((1, 2, 3, 6)):
            pooled = net.cm(F.adaptive_avg_pool2d(c4, scale), f"{d}.psp_modules.{i}.1")
            outs.append(_resize(pooled, c4.shape[-2:]))
        feat = net.cm(torch.cat(outs, 1), f"{d}.bottleneck", padding=1)
        out["out"] = net.seg(feat, f"{d}.conv_seg")
    elif head == "aspp":
        pooled = net.cm(F.adaptive_avg_pool2d(c4, 1), f"{d}.image_pool.1")
        outs = [_resize(pooled, c4.shape[-2:]), net.cm(c4, f"{d}.aspp_modules.0")]
        for i, rate in zip((1, 2, 3), (12, 24, 36), strict=True):
            outs.append(net.ds(c4, f"{d}.aspp_modules.{i}", rate))
        feat = net.cm(torch.cat(outs, 1), f"{d}.bottleneck", padding=1)
        low = net.cm(c1, f"{d}.c1_bottleneck")
        feat = torch.cat([_resize(feat, low.shape[-2:]), low], 1)
        feat = net.ds(net.ds(feat, f"{d}.sep_bottleneck.0", 1), f"{d}.sep_bottleneck.1", 1)
        out["out"] = net.seg(feat, f"{d}.conv_seg")
    elif head == "da":
        s = state
        f = net.cm(c4, f"{d}.pam_in_conv", padding=1)
        b, c, h, w = f.shape
        q = F.conv2d(f, s[f"{d}.pam.query_project.weight"], s[f"{d}.pam.query_project.bias"])
        k = F.conv2d(f, s[f"{d}.pam.key_project.weight"], s[f"{d}.pam.key_project.bias"])
        v = F.conv2d(f, s[f"{d}.pam.value_project.weight"], s[f"{d}.pam.value_project.bias"])
        q = q.reshape(b, q.shape[1], -1).permute(0, 2, 1)  # (B, N, 64)
        k = k.reshape(b, k.shape[1], -1)  # (B, 64, N)
        v = v.reshape(b, c, -1).permute(0, 2, 1)  # (B, N, C)
        sim = torch.softmax(q @ k, dim=-1)  # no 1/sqrt(d): matmul_norm=False
        ctx = (sim @ v).permute(0, 2, 1).reshape(b, c, h, w)
        pam = net.cm(s[f"{d}.pam.gamma.scale"] * ctx + f, f"{d}.pam_out_conv", padding=1)
        g = net.cm(c4, f"{d}.cam_in_conv", padding=1)
        flat = g.reshape(b, c, -1)
        energy = flat @ flat.transpose(1, 2)  # (B, C, C)
        energy = energy.max(dim=-1, keepdim=True)[0].expand_as(energy) - energy
        ctx = (torch.softmax(energy, dim=-1) @ flat).reshape(b, c, h, w)
        cam = net.cm(s[f"{d}.cam.gamma.scale"] * ctx + g, f"{d}.cam_out_conv", padding=1)
        out["out"] = net.seg(pam + cam, f"{d}.conv_seg")
        out["pam"] = net.seg(pam, f"{d}.pam_conv_seg")
        out["cam"] = net.seg(cam, f"{d}.cam_conv_seg")
    else:
        raise ValueError(head)
    out["aux"] = net.seg(net.cm(c3, "auxiliary_head.convs.0", padding=1), "auxiliary_head.conv_seg")
    return {name: _resize(logits, size) for name, logits in out.items()}


def slide(
    encode_decode, image: Tensor, crop: tuple[int, int], stride: tuple[int, int], classes: int
) -> Tensor:
    """mmsegmentation's ``slide_inference``: ``h_grids x w_grids`` windows starting every stride,
    the last one of a row/column moved back to end at the border (never before 0, so a side
    shorter than the crop is one shorter window, unpadded), each window's logits added into a
    zero map and divided by ``count_mat``, the number of windows covering each pixel.

    ``encode_decode``: ``(B, 3, h, w)`` window -> ``(B, classes, h, w)`` logits."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    batch, _, h_img, w_img = image.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = image.new_zeros((batch, classes, h_img, w_img))
    count_mat = image.new_zeros((batch, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = encode_decode(image[:, :, y1:y2, x1:x2])
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat
