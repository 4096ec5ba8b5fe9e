"""Evaluation protocols: flip test-time augmentation, multi-scale averaging, sliding windows.

Torch (and OpenCV for SCHP's label warp), no Lightning, so the LightningModule, the evaluate
command and the tests share one implementation:

- `flip_logits`: map scores predicted on a mirrored image back (flip W, swap left/right classes).
- `window_boxes` / `slide_inference`: mmsegmentation's sliding-window inference for inputs larger
  than the training crop (Cityscapes 1024x2048 with 512x1024 crops).
- `InferenceProtocol`: the config-built callable (``conf/eval/*.yaml``) that runs a net under a
  protocol and returns ``(B, C, h, w)`` scores at the input size.
- `scores_to_original`: input-size scores -> the original image size, cropping first to the
  image's ``valid_box`` when the input was letterboxed (``data.eval_keep_ratio``).
- `labels_to_original_affine`: SCHP's official scoring geometry (``eval=schp_official``): a label
  map arg-maxed at the input, warped back to the original image by nearest neighbour.

With its defaults (one scale 1.0, no flip, whole image) `InferenceProtocol` returns the net's
logits untouched, so the plain evaluation path is unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NetForward = Callable[[Tensor], Tensor]


def _swap_index(num_classes: int, flip_pairs: Sequence[Sequence[int]]) -> list[int]:
    """Channel order that exchanges each (left, right) pair and keeps every other class."""
    index = list(range(num_classes))
    seen: set[int] = set()
    for pair in flip_pairs:
        if len(pair) != 2:
            raise ValueError(f"flip pair {list(pair)} must hold exactly two class ids")
        a, b = int(pair[0]), int(pair[1])
        for c in (a, b):
            if not 0 <= c < num_classes:
                raise ValueError(f"flip pair ({a}, {b}): class {c} outside [0, {num_classes})")
            if c in seen:
                raise ValueError(f"class {c} appears in more than one flip pair")
            seen.add(c)
        index[a], index[b] = b, a
    return index


def flip_logits(logits: Tensor, flip_pairs: Sequence[Sequence[int]]) -> Tensor:
    """Maps scores predicted on a horizontally mirrored image back to the original image.

    Mirroring moves pixels (flip along W) and turns a left arm into a right arm, so the left/right
    class channels are exchanged as well. The map is its own inverse. Works on logits and on
    probabilities alike (a flip and a channel permutation commute with the softmax).

    Args:
        logits: ``(B, C, H, W)`` scores of the mirrored image.
        flip_pairs: ``(left, right)`` class-id pairs to exchange; empty for datasets without
            left/right classes (a mirrored street scene keeps its labels).

    Returns:
        ``(B, C, H, W)`` scores aligned with the unmirrored image.
    """
    # (B, C, H, W) -> (B, C, H, W) mirrored along W
    flipped = logits.flip(-1)
    if not flip_pairs:
        return flipped
    index = _swap_index(logits.shape[1], flip_pairs)
    # (B, C, H, W): channel c takes the scores of its mirror class
    return flipped[:, index]


def window_boxes(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes over an image at least as large as the crop (mmsegmentation's grid).

    Windows start every ``stride`` pixels; the last window of each row/column is moved back so it
    ends exactly at the border, hence every window has the full crop size and every pixel is
    covered when ``stride <= crop_size``.

    Args:
        height: image height H (``>= crop_size[0]``).
        width: image width W (``>= crop_size[1]``).
        crop_size: window size ``(ch, cw)``.
        stride: step ``(sh, sw)`` between window starts.

    Returns:
        ``(y1, y2, x1, x2)`` boxes, half-open, row-major.
    """
    (ch, cw), (sh, sw) = crop_size, stride
    if height < ch or width < cw:
        raise ValueError(f"image {height}x{width} is smaller than the crop {ch}x{cw}: pad it first")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        y2 = min(r * sh + ch, height)
        y1 = y2 - ch  # the last row is aligned to the bottom border
        for c in range(cols):
            x2 = min(c * sw + cw, width)
            x1 = x2 - cw  # the last column is aligned to the right border
            boxes.append((y1, y2, x1, x2))
    return boxes


def slide_inference(
    net_forward: NetForward,
    image: Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int | None = None,
    *,
    pad_to_crop: bool = True,
    align_corners: bool = False,
) -> Tensor:
    """Sliding-window inference: the average of overlapping window logits (mmsegmentation's).

    Every window of `window_boxes` goes through the net, window logits are summed into place
    and divided by the number of windows covering each pixel (mmsegmentation's ``count_mat``).
    An image smaller than the crop along a side is, with ``pad_to_crop``, zero-padded at the
    bottom/right to the crop size (zero is the mean colour after normalisation; the padding is
    cropped away afterwards); without it the windows shrink to the image's side, as
    mmsegmentation's ``EncoderDecoder.slide_inference`` does. Images at least as large as the
    crop slide the same windows either way.

    Args:
        net_forward: ``(B, 3, ch, cw)`` image -> ``(B, C, h', w')`` logits; outputs at a lower
            resolution are resized to the window (bilinear, with ``align_corners``).
        image: ``(B, 3, H, W)`` normalised image.
        crop_size: window size ``(ch, cw)``.
        stride: step ``(sh, sw)``, each at most the crop size so that every pixel is covered.
        num_classes: C, checked against the net's output when given.
        pad_to_crop: pad a smaller image to the crop size (True) or shrink the windows (False).
        align_corners: of the resize of lower-resolution window logits (the net's own, see
            `lightning_modules.nets.logits_align_corners`).

    Returns:
        ``(B, C, H, W)`` logits, float32 or wider.
    """
    ch, cw = (int(s) for s in crop_size)
    sh, sw = (int(s) for s in stride)
    if not (0 < sh <= ch and 0 < sw <= cw):
        raise ValueError(f"stride {(sh, sw)} must be positive and at most the crop {(ch, cw)}")
    batch, _, height, width = image.shape
    if not pad_to_crop:
        # mmsegmentation: a side shorter than the crop is one window of that side's length
        ch, cw = min(ch, height), min(cw, width)
    pad_h, pad_w = max(ch - height, 0), max(cw - width, 0)
    if pad_h or pad_w:
        # (B, 3, H, W) -> (B, 3, max(H, ch), max(W, cw)): zeros at the bottom and right
        image = F.pad(image, (0, pad_w, 0, pad_h))
    padded_h, padded_w = image.shape[-2:]
    scores: Tensor | None = None
    count = torch.zeros((1, 1, padded_h, padded_w), device=image.device)
    for y1, y2, x1, x2 in window_boxes(padded_h, padded_w, (ch, cw), (sh, sw)):
        # (B, 3, ch, cw) -> (B, C, h', w')
        logits = net_forward(image[:, :, y1:y2, x1:x2])
        if logits.shape[-2:] != (ch, cw):
            # (B, C, h', w') -> (B, C, ch, cw), in float32 at least: a bf16 resize rounds the
            # class differences the arg-max decides between.
            logits = F.interpolate(
                logits.to(torch.promote_types(logits.dtype, torch.float32)),
                size=(ch, cw),
                mode="bilinear",
                align_corners=align_corners,
            )
        if scores is None:
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(f"net returned {logits.shape[1]} classes, expected {num_classes}")
            # Accumulate in float32 at least: half-precision sums over many windows lose digits.
            dtype = torch.promote_types(logits.dtype, torch.float32)
            scores = logits.new_zeros((batch, logits.shape[1], padded_h, padded_w), dtype=dtype)
        scores[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    # (B, C, H', W') / (1, 1, H', W') -> (B, C, H', W') -> (B, C, H, W) without the padding
    return (scores / count)[:, :, :height, :width]


def scores_to_original(
    scores: Tensor,
    orig_size: Sequence[int],
    valid_box: Sequence[int] | None = None,
    input_size: Sequence[int] | None = None,
    align_corners: bool = False,
) -> Tensor:
    """Maps scores of a network input back to the original image (bilinear).

    Without ``valid_box`` the whole map is resized to ``orig_size`` (the input was the image,
    stretched). With it (the image was scaled with its aspect ratio kept and padded, see
    ``datamodules.transforms.letterbox_image``) the map is first brought to ``input_size`` when
    the net returned another resolution, then cropped to the box, then resized: the inverse of the
    letterbox, as SCHP warps its logits back with the inverse affine.

    Args:
        scores: ``(N, C, h', w')`` logits or probabilities of ``N`` inputs of one size.
        orig_size: ``(H, W)`` of the original image(s).
        valid_box: ``(top, left, height, width)`` of the image inside the input (shared by the
            ``N`` maps), in input pixels; None: the input is the whole image.
        input_size: ``(h, w)`` of the network input the box refers to; required with
            ``valid_box`` (a net's output may be smaller than its input).
        align_corners: of the bilinear resizes: the net's own
            (`lightning_modules.nets.logits_align_corners`; mmsegmentation resizes to the
            original image with its head's ``align_corners``), False for most nets.

    Returns:
        ``(N, C, H, W)`` scores at the original size.
    """
    height, width = (int(v) for v in orig_size)
    if valid_box is not None:
        top, left, box_h, box_w = (int(v) for v in valid_box)
        if input_size is None:
            # Reading the box in the score map's pixels would crop the wrong region silently.
            raise ValueError("valid_box needs input_size, the network input it refers to")
        in_h, in_w = (int(v) for v in input_size)
        if min(top, left) < 0 or min(box_h, box_w) <= 0:
            raise ValueError(f"valid_box {[top, left, box_h, box_w]} is not a box")
        if top + box_h > in_h or left + box_w > in_w:
            raise ValueError(
                f"valid_box {[top, left, box_h, box_w]} does not fit the {in_h}x{in_w} input"
            )
        if scores.shape[-2:] != (in_h, in_w):
            # (N, C, h', w') -> (N, C, h, w): the net's output at the input resolution
            scores = F.interpolate(
                scores, size=(in_h, in_w), mode="bilinear", align_corners=align_corners
            )
        # (N, C, h, w) -> (N, C, box_h, box_w): the image without its padding
        scores = scores[:, :, top : top + box_h, left : left + box_w]
    if scores.shape[-2:] != (height, width):
        # (N, C, h'', w'') -> (N, C, H, W)
        scores = F.interpolate(
            scores, size=(height, width), mode="bilinear", align_corners=align_corners
        )
    return scores


def labels_to_original_affine(
    labels: Tensor, inverse_affine: Tensor, orig_size: Sequence[int]
) -> Tensor:
    """Warps a label map predicted at the network input back to the original image, as SCHP's
    ``transform_parsing`` does (``eval=schp_official``, ``data.eval_affine``).

    Original pixel ``(x, y)`` takes the label of the input pixel nearest to where the forward map
    (the inverse of ``inverse_affine``) sends it; pixels sent outside the input get 0
    (background), SCHP's border value. ``cv2.warpAffine`` itself does the work: its nearest
    neighbour rounds source positions in fixed point (1/1024 pixel), which a float
    re-implementation would follow only up to ties, and SCHP scored with exactly this call.

    Args:
        labels: ``(h, w)`` integer class ids at the network input (any device).
        inverse_affine: ``(2, 3)`` float64 map from input pixels to original pixels (the batch's
            ``inverse_affine``; SCHP's, with its integer-truncated centre).
        orig_size: ``(H, W)`` of the original image.

    Returns:
        ``(H, W)`` int64 class ids on the device of ``labels``.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be one (h, w) map, got shape {tuple(labels.shape)}")
    if inverse_affine.shape != (2, 3) or inverse_affine.dtype != torch.float64:
        # A "*-true" precision plugin casts floating batch tensors: a rounded matrix would move
        # the labels silently.
        raise ValueError(
            f"inverse_affine must be a (2, 3) float64 matrix, got {tuple(inverse_affine.shape)} "
            f"{inverse_affine.dtype}"
        )
    height, width = (int(v) for v in orig_size)
    # int32: what OpenCV makes of SCHP's int64 arg-max (it has no 64-bit integer warp)
    src = labels.detach().to("cpu", torch.int32).numpy()
    warped = cv2.warpAffine(
        src,
        inverse_affine.detach().cpu().numpy(),
        (width, height),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return torch.from_numpy(np.ascontiguousarray(warped)).to(labels.device, torch.int64)


@dataclass
class InferenceProtocol:
    """How evaluation turns an image into class scores (built from ``conf/eval/*.yaml``).

    Every run (scale x {plain, mirrored}) resizes the image, infers the whole image or slides
    windows over it, resizes the scores back to the input size and un-mirrors them with
    `flip_logits`; the runs are averaged. With a single run (the default) the net's logits are
    returned as they are.

    Args:
        scales: image resize factors, e.g. ``(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)``.
        flip: also infer every scale on the horizontally mirrored image.
        flip_pairs: ``(left, right)`` class-id pairs exchanged when un-mirroring.
        mode: ``"whole"`` (one forward per run) or ``"slide"`` (`slide_inference`).
        crop_size: sliding-window size ``(ch, cw)``; required for ``mode="slide"``.
        stride: sliding-window step ``(sh, sw)``; None: two thirds of ``crop_size``, rounded
            (``(341, 683)`` for ``(512, 1024)``, mmsegmentation's ``513`` for ``769``).
        num_classes: C, checked against the net's output in slide mode when given.
        average: ``"prob"`` averages softmax probabilities over runs (mmsegmentation's aug_test);
            ``"logit"`` averages logits.
        pad_to_crop: in slide mode, pad an image smaller than ``crop_size`` to it (True) or
            shrink the windows to the image, as mmsegmentation does (False; `slide_inference`).
    """

    scales: Sequence[float] = (1.0,)
    flip: bool = False
    flip_pairs: Sequence[Sequence[int]] = ()
    mode: str = "whole"
    crop_size: Sequence[int] | None = None
    stride: Sequence[int] | None = None
    num_classes: int | None = None
    average: str = "prob"
    pad_to_crop: bool = True

    def __post_init__(self) -> None:
        # Plain tuples: Hydra passes ListConfigs, which neither hash nor index like lists.
        self.scales = tuple(float(s) for s in self.scales)
        self.flip_pairs = tuple((int(a), int(b)) for a, b in self.flip_pairs)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales {list(self.scales)} must be a non-empty list of positives")
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode={self.mode!r}: expected 'whole' or 'slide'")
        if self.average not in ("prob", "logit"):
            raise ValueError(f"average={self.average!r}: expected 'prob' or 'logit'")
        if self.num_classes is not None:
            self.num_classes = int(self.num_classes)
            _swap_index(self.num_classes, self.flip_pairs)  # validates the pairs
        if self.crop_size is not None:
            self.crop_size = tuple(int(s) for s in self.crop_size)
        if self.mode == "slide":
            if self.crop_size is None or len(self.crop_size) != 2:
                raise ValueError("mode='slide' needs crop_size: [h, w]")
            if self.stride is None:
                self.stride = tuple(max(1, round(s * 2 / 3)) for s in self.crop_size)
            self.stride = tuple(int(s) for s in self.stride)
            if len(self.stride) != 2 or not all(
                0 < s <= c for s, c in zip(self.stride, self.crop_size, strict=True)
            ):
                raise ValueError(
                    f"stride {list(self.stride)} must be 2 positive steps at most crop_size "
                    f"{list(self.crop_size)} (larger steps leave pixels without a window)"
                )

    @property
    def num_runs(self) -> int:
        """Forward passes (or window sweeps) per image: scales x (2 with flip, else 1)."""
        return len(self.scales) * (2 if self.flip else 1)

    def _infer(self, net_forward: NetForward, image: Tensor, align_corners: bool) -> Tensor:
        """Logits ``(B, C, h', w')`` of ``image`` ``(B, 3, h', w')`` in whole or slide mode."""
        if self.mode == "slide":
            return slide_inference(
                net_forward,
                image,
                self.crop_size,
                self.stride,
                num_classes=self.num_classes,
                pad_to_crop=self.pad_to_crop,
                align_corners=align_corners,
            )
        return net_forward(image)

    def __call__(
        self, net_forward: NetForward, image: Tensor, align_corners: bool = False
    ) -> Tensor:
        """Scores of ``image`` under this protocol.

        Args:
            net_forward: ``(B, 3, h', w')`` image -> ``(B, C, h', w')`` logits (e.g.
                ``lambda x: net(x)["out"]``); called in whatever grad/autocast context the
                caller set.
            image: ``(B, 3, h, w)`` normalised image.
            align_corners: of the resizes of logits (window logits to the window, each run's
                logits to the input size): the net's own
                (`lightning_modules.nets.logits_align_corners`). The rescaled images of
                ``scales`` are resized without it, as an image resize in a data pipeline is.

        Returns:
            ``(B, C, h, w)`` scores for an argmax: the net's logits for a single whole-image run
            at scale 1 (returned as is), otherwise the run average of probabilities
            (``average="prob"``, float32 or wider) or logits (``average="logit"``). A single
            slide or rescaled run returns its logits.
        """
        height, width = image.shape[-2:]
        if self.num_runs == 1 and self.mode == "whole" and self.scales[0] == 1.0:
            return net_forward(image)
        total: Tensor | None = None
        for scale in self.scales:
            size = (int(height * scale + 0.5), int(width * scale + 0.5))
            if size == (height, width):
                scaled = image
            else:
                # (B, 3, h, w) -> (B, 3, h*s, w*s)
                scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            for mirrored in (False, True) if self.flip else (False,):
                # (B, 3, h*s, w*s) -> (B, 3, h*s, w*s) mirrored along W
                logits = self._infer(
                    net_forward, scaled.flip(-1) if mirrored else scaled, align_corners
                )
                if logits.shape[-2:] != (height, width):
                    # (B, C, h*s, w*s) -> (B, C, h, w), in float32 at least (as above)
                    logits = F.interpolate(
                        logits.to(torch.promote_types(logits.dtype, torch.float32)),
                        size=(height, width),
                        mode="bilinear",
                        align_corners=align_corners,
                    )
                if mirrored:
                    logits = flip_logits(logits, self.flip_pairs)
                if self.num_runs == 1:
                    return logits
                # Average in float32 at least: half-precision probabilities lose the small ones.
                scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
                if self.average == "prob":
                    scores = scores.softmax(1)
                # Out of place: in logit mode `scores` may be the net's own output tensor.
                total = scores if total is None else total + scores
        return total / self.num_runs
