"""Paired image/mask transforms for parsing datasets: albumentations behind an item-dict wrapper.

Every transform takes and returns the dataset item dict (see ``datamodules/batch.py``): ``image``
(H, W, 3) uint8 numpy, optional ``mask`` (H, W) int numpy, ``name``. They are plain picklable
objects, so DataLoader workers can receive them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albucore import multiply_add

from datamodules.batch import IGNORE_INDEX, collate_eval, collate_train

__all__ = [
    "AUGMENTATION_PRESETS",
    "AUGMENT_IMPLS",
    "AffineTrainTransform",
    "AugmentDraw",
    "ColorJitterLUT",
    "BASE_SIDES",
    "PHOTOMETRIC_MODES",
    "BaseRandomScale",
    "CatMaxRatioRandomCrop",
    "EvalTransform",
    "HorizontalFlipSwap",
    "PhotoMetricDistortion",
    "TrainTransform",
    "augmentation_settings",
    "base_resize_size",
    "base_scale",
    "build_eval_transform",
    "build_train_transform",
    "check_base_resize",
    "collate_eval",
    "collate_train",
    "eval_input",
    "flip_lut",
    "letterbox_box",
    "letterbox_image",
    "schp_affine",
    "schp_affine_image",
]


def flip_lut(flip_pairs: Sequence[Sequence[int]]) -> np.ndarray:
    """Look-up table that swaps left/right class ids (the ignore value 255 maps to itself).

    Returns:
        (256,) uint8 with ``lut[a] == b`` and ``lut[b] == a`` for every pair ``(a, b)``.
    """
    lut = np.arange(256, dtype=np.uint8)
    for a, b in flip_pairs:
        a, b = int(a), int(b)
        if not (0 <= a < IGNORE_INDEX and 0 <= b < IGNORE_INDEX):
            raise ValueError(f"flip pair ({a}, {b}) outside the class id range 0..254")
        lut[a], lut[b] = b, a
    return lut


class HorizontalFlipSwap(A.DualTransform):
    """Horizontal flip that also swaps left/right class ids in the mask.

    A mirrored left arm is a right arm: flipping pixels without swapping ids would teach the network
    that "left" means "on the left of the image". Image and mask flip together (one random draw).

    Args:
        flip_pairs: ``(left_id, right_id)`` pairs to swap.
        p: probability of flipping.
    """

    def __init__(self, flip_pairs: Sequence[Sequence[int]] = (), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.flip_pairs = [tuple(int(v) for v in pair) for pair in flip_pairs]
        self.lut = flip_lut(self.flip_pairs)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[:, ::-1])

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        # The mask is uint8 here (TrainTransform converts it), so the LUT indexes directly.
        return self.lut[mask[:, ::-1]]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("flip_pairs",)


class CatMaxRatioRandomCrop(A.DualTransform):
    """Random crop that avoids crops dominated by one class (mmsegmentation's ``cat_max_ratio``).

    A crop box is drawn uniformly (top-left offset in ``0..H-h`` and ``0..W-w``). While the box
    fails the check, a new one is drawn, at most ``max_tries`` times; the box drawn after the last
    failed check is kept unchecked. A box passes when its mask holds more than one class and the
    most frequent class covers less than ``cat_max_ratio`` of the labelled (non-``ignore_index``)
    pixels. ``cat_max_ratio >= 1`` disables the check (a plain random crop). The draws come from
    the transform's generator, which :func:`seed_augmentation` fixes.

    Args:
        height, width: crop size; an image smaller than it is cropped to its own size along that
            side (pad first, as ``build_train_transform`` does).
        cat_max_ratio: largest allowed share of the most frequent class.
        ignore_index: the label value left out of the counts.
        max_tries: how many boxes are checked before the next one is taken as it is.
        p: probability of applying the transform.
    """

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _draw_box(self, shape: Sequence[int]) -> tuple[int, int]:
        # Offsets uniform over every position that keeps the box inside (both ends included).
        top = self.py_random.randint(0, max(int(shape[0]) - self.height, 0))
        left = self.py_random.randint(0, max(int(shape[1]) - self.width, 0))
        return top, left

    def crop_passes(self, mask: np.ndarray) -> bool:
        """Whether a cropped ``mask`` has >1 class and no class reaching ``cat_max_ratio``."""
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return bool(len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        shape = params["shape"]
        top, left = self._draw_box(shape)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                crop = mask[top : top + self.height, left : left + self.width]
                if self.crop_passes(crop):
                    break
                top, left = self._draw_box(shape)
        return {"top": top, "left": left}

    def apply(self, img: np.ndarray, top: int = 0, left: int = 0, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[top : top + self.height, left : left + self.width])

    def apply_to_mask(
        self, mask: np.ndarray, top: int = 0, left: int = 0, **params: Any
    ) -> np.ndarray:
        return np.ascontiguousarray(mask[top : top + self.height, left : left + self.width])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "max_tries")


# -- the scale protocol: one base resize shared by training and evaluation -----------------------

#: ``base_side`` choices: which side of an image ``base_size`` sets.
BASE_SIDES = ("long", "short")


def check_base_resize(base_size: Any, base_side: str = "long") -> tuple[int | None, str]:
    """The validated ``data.base_size`` / ``data.base_side`` pair.

    Returns:
        ``(base_size, base_side)``: a positive int (or None: no base resize) and ``"long"`` or
        ``"short"``.

    Raises:
        ValueError: naming the key, for a ``base_side`` other than long|short or a ``base_size``
            that is not a positive integer.
    """
    if base_side not in BASE_SIDES:
        raise ValueError(f"data.base_side must be one of {BASE_SIDES}, got {base_side!r}")
    if base_size is None:
        return None, str(base_side)
    try:
        size = int(base_size)
        whole = not isinstance(base_size, bool | str) and size == base_size
    except (TypeError, ValueError):
        whole = False
    if not whole or size <= 0:
        raise ValueError(f"data.base_size must be a positive integer or null, got {base_size!r}")
    return size, str(base_side)


def base_scale(height: int, width: int, base_size: int, base_side: str = "long") -> float:
    """The factor that brings an ``(height, width)`` image's long (or short) side to
    ``base_size``: original pixels -> network pixels at evaluation, and before the random scale
    in training."""
    side = max(int(height), int(width)) if base_side == "long" else min(int(height), int(width))
    return int(base_size) / side


def _round_half_up(x: float) -> int:
    # floor(x + 0.5): Python's round() would round halves to even.
    return int(math.floor(x + 0.5))


def base_resize_size(
    height: int, width: int, base_size: int, base_side: str = "long", scale: float = 1.0
) -> tuple[int, int]:
    """Size of an ``(height, width)`` image resized by ``base_scale(...) * scale``, aspect kept.

    Both sides are rounded half up (at least 1 px), the rounding :func:`letterbox_box` uses, so
    with ``scale=1`` and ``base_side="long"`` the result is the letterbox box of the image in a
    ``base_size x base_size`` input, and the chosen side is exactly ``base_size``.

    Returns:
        ``(h, w)`` in pixels.
    """
    s = base_scale(height, width, base_size, base_side) * float(scale)
    return max(1, _round_half_up(int(height) * s)), max(1, _round_half_up(int(width) * s))


def _resize(array: np.ndarray, size: Sequence[int], interpolation: int) -> np.ndarray:
    """``array`` (H, W[, C]) resized to ``size`` ``(h, w)``; returned as is when already there."""
    h, w = (int(v) for v in size)
    if array.shape[:2] == (h, w):
        return array
    return cv2.resize(array, (w, h), interpolation=interpolation)


class BaseRandomScale(A.DualTransform):
    """Base resize and random scale in one interpolation: the image's long (or short) side
    becomes ``base_size * s`` with ``s`` drawn uniformly from ``scale_range``, aspect kept.

    The factor from original to network pixels is ``base_scale(H, W) * s``; evaluation applies
    ``base_scale`` alone (:func:`build_eval_transform` with ``base_size``), so the random scale
    is relative to the evaluation scale. One resize instead of two: a second bilinear pass would
    blur the image once more and a second nearest pass would move label edges again. ``s`` is one
    draw ``1 + U(min - 1, max - 1)`` from the shared stream, as albumentations' ``RandomScale``
    draws it; a single-valued range draws nothing. Image bilinear, mask nearest-exact (labels
    never interpolate).

    Args:
        base_size: the target length of the chosen side at ``s = 1``.
        base_side: ``"long"`` or ``"short"``.
        scale_range: ``(min, max)`` of ``s``.
        p: probability of applying the transform.
    """

    def __init__(
        self,
        base_size: int,
        base_side: str = "long",
        scale_range: Sequence[float] = (1.0, 1.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        size, side = check_base_resize(base_size, base_side)
        if size is None:
            raise ValueError("BaseRandomScale needs a base_size")
        self.base_size, self.base_side = size, side
        self.scale_range = tuple(float(v) for v in scale_range)

    def get_params(self) -> dict[str, Any]:
        lo, hi = self.scale_range
        scale = lo if lo == hi else self.py_random.uniform(lo - 1.0, hi - 1.0) + 1.0
        return {"scale": scale}

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h, w = params["shape"][:2]
        size = base_resize_size(h, w, self.base_size, self.base_side, params["scale"])
        return {"size": size}

    def apply(self, img: np.ndarray, size: Sequence[int] = (1, 1), **params: Any) -> np.ndarray:
        return _resize(img, size, cv2.INTER_LINEAR)

    def apply_to_mask(
        self, mask: np.ndarray, size: Sequence[int] = (1, 1), **params: Any
    ) -> np.ndarray:
        # INTER_NEAREST samples half a source pixel off the bilinear image grid; the _EXACT
        # variant keeps label edges on the image edges.
        return _resize(mask, size, cv2.INTER_NEAREST_EXACT)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("base_size", "base_side", "scale_range")


def eval_input(
    eval_size: Sequence[int] | None,
    crop_size: Sequence[int] | None,
    base_size: int | None,
    full_resolution: bool = False,
) -> tuple[tuple[int, int] | None, int | None]:
    """The evaluation input rule, shared by the datamodules and ``lightning_modules/parser.py``.

    In order: an explicit ``eval_size`` is a fixed network input (stretched into, or letterboxed
    with ``eval_keep_ratio``; training still applies ``base_size``, so the scales then differ);
    else ``base_size`` fits each image as training does before its random scale; else
    ``crop_size``, or each image's own size for datasets scored at ``full_resolution``.

    Returns:
        ``(eval_size, base_size)`` for :func:`build_eval_transform`; at most one is not None.
    """
    if eval_size is not None:
        return (int(eval_size[0]), int(eval_size[1])), None
    if base_size is not None:
        return None, int(base_size)
    if full_resolution or crop_size is None:
        return None, None
    return (int(crop_size[0]), int(crop_size[1])), None


#: ``data.augmentation`` presets: the training settings each one imposes. ``default``: the
#: config's own keys (random scale, rotation, crop, flip, colour). ``paper``: only what the RIM
#: paper lists, rotation of +-10 degrees and cropping (a plain random crop): no random scale, no
#: flip (so no left/right swap), no colour change. The base resize is the scale protocol, not an
#: augmentation: it applies under every preset.
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "scale_range": (1.0, 1.0),
        "rotate": 10.0,
        "flip_prob": 0.0,
        "color_jitter": 0.0,
        "photometric": "jitter",
        "cat_max_ratio": None,
    },
}


def augmentation_settings(augmentation: str, **settings: Any) -> dict[str, Any]:
    """``settings`` (keyword arguments of :func:`build_train_transform`) with the values that
    the ``augmentation`` preset imposes replacing them.

    Raises:
        ValueError: naming ``data.augmentation`` for an unknown preset.
    """
    if augmentation not in AUGMENTATION_PRESETS:
        raise ValueError(
            f"data.augmentation must be one of {tuple(AUGMENTATION_PRESETS)}, got {augmentation!r}"
        )
    return {**settings, **AUGMENTATION_PRESETS[augmentation]}


def _scale_clip_uint8(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``img * alpha + beta`` in float32, clipped to 0..255 and truncated back to uint8."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class SeededImageOnly(A.ImageOnlyTransform):
    """An image-only transform that :meth:`seeded` applies as ``A.Compose([self])`` does after
    :func:`seed_augmentation` with the same seed (same draws, same pixels:
    tests/test_data_pipeline.py) without Compose's per-call bookkeeping (about 0.1 ms a call)."""

    def seeded(self, img: np.ndarray, seed: int) -> np.ndarray:
        """``img`` (H, W, 3) uint8 RGB with this sample's draws from ``seed``."""
        seed = int(seed) % 2**32
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))
        self.py_random.random()  # Compose(p=1) draws one number before its transforms run
        if not self.should_apply():
            return img
        return self.apply(img, **self.get_params())


class PhotoMetricDistortion(SeededImageOnly):
    """mmsegmentation's photometric distortion on a uint8 RGB image.

    In order: brightness (add ``delta ~ U(-brightness_delta, brightness_delta)``, p=0.5); contrast
    (multiply by ``U(*contrast_range)``, p=0.5) here when ``contrast_first``; saturation (to HSV,
    multiply S by ``U(*saturation_range)``, back to RGB, p=0.5); hue (to HSV, add an integer
    delta to H modulo 180 (OpenCV's 0..179 hue), back to RGB, p=0.5); contrast here otherwise.
    ``contrast_first`` is a fair coin. Every step computes in float32 and truncates to uint8
    after clipping to 0..255, and the saturation and hue steps each convert to HSV and back (as
    mmseg does). The hue delta is drawn from ``-hue_delta..hue_delta-1``: mmseg draws it with
    ``numpy.random.randint``, whose upper end is exclusive.

    The image must be uint8 (place it before ``Normalize``). All draws come from the transform's
    generator (:func:`seed_augmentation` fixes them); every call draws every parameter, so the
    stream of draws does not depend on which steps fire. ``apply`` takes the parameters
    explicitly, which makes the maths testable without the generator.

    Args:
        brightness_delta: largest absolute brightness offset (32 in mmseg).
        contrast_range, saturation_range: ``(low, high)`` of the multiplicative factors.
        hue_delta: hue offsets are ``-hue_delta..hue_delta-1`` (18 in mmseg).
        p: probability of running the whole distortion (each step has its own coin).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)
        self.hue_delta = int(hue_delta)

    def get_params(self) -> dict[str, Any]:
        rng = self.py_random
        return {
            "brightness": rng.random() < 0.5,
            "beta": rng.uniform(-self.brightness_delta, self.brightness_delta),
            "contrast_first": rng.random() < 0.5,
            "contrast": rng.random() < 0.5,
            "alpha": rng.uniform(*self.contrast_range),
            "saturation": rng.random() < 0.5,
            "saturation_alpha": rng.uniform(*self.saturation_range),
            "hue": rng.random() < 0.5,
            "hue_shift": rng.randint(-self.hue_delta, self.hue_delta - 1),
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: bool = False,
        beta: float = 0.0,
        contrast_first: bool = False,
        contrast: bool = False,
        alpha: float = 1.0,
        saturation: bool = False,
        saturation_alpha: float = 1.0,
        hue: bool = False,
        hue_shift: int = 0,
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"PhotoMetricDistortion needs a uint8 image, got {img.dtype}")
        if brightness:
            img = _scale_clip_uint8(img, beta=beta)
        if contrast and contrast_first:
            img = _scale_clip_uint8(img, alpha=alpha)
        if saturation:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _scale_clip_uint8(hsv[..., 1], alpha=saturation_alpha)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(hue_shift)) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast and not contrast_first:
            img = _scale_clip_uint8(img, alpha=alpha)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


#: ``photometric`` choices of :func:`build_train_transform`.
PHOTOMETRIC_MODES = ("jitter", "mmseg")


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 numpy -> (3, H, W) uint8 contiguous tensor.

    Images stay uint8 until the device: ``datamodules.batch.network_batch`` normalises them after
    the transfer, a quarter of the bytes a float32 image would move.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"the transforms hand over uint8 images, got {image.dtype}")
    # (H, W, 3) -> (3, H, W): OpenCV's split copies the planes out fastest
    return torch.from_numpy(np.stack(cv2.split(image)) if image.ndim == 3 else image[None])


def _to_channels_last_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 numpy -> (3, H, W) uint8 tensor viewing the same memory (channels-last
    strides, no copy): :func:`~datamodules.batch.collate_train` stacks such images as
    (B, H, W, 3) and :func:`~datamodules.batch.normalize_image` makes them contiguous on the
    device, where the transposition costs next to nothing."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise TypeError(f"the transforms hand over (H, W, 3) uint8 images, got {image.dtype}")
    # (H, W, 3) -> (3, H, W) view
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _hue_shift_uint8(img: np.ndarray, factor: float) -> np.ndarray:
    """albumentations' uint8 hue step (``adjust_hue_torchvision``) with the same table applied
    to the H plane copied out and back (``cv2.extractChannel`` / ``cv2.insertChannel``), so the
    result is bit-identical; a strided single-channel or a 3-channel ``cv2.LUT`` costs two to
    five times as much."""
    if factor == 0:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hue = np.mod(np.arange(0, 256, dtype=np.int16) + 180 * factor, 180).astype(np.uint8)
    hsv = cv2.insertChannel(cv2.LUT(cv2.extractChannel(hsv, 0), hue), hsv, 0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _contrast_uint8(img: np.ndarray, factor: float) -> np.ndarray:
    """albumentations' uint8 contrast step (``adjust_contrast_torchvision``) with the grey mean
    summed by OpenCV: an exact integer sum divided by the pixel count, so the same float64 as
    numpy's mean, in a twentieth of the time."""
    if factor == 1:
        return img
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    mean = cv2.sumElems(grey)[0] / grey.size
    if factor == 0:
        return np.full_like(img, int(mean + 0.5))
    return multiply_add(img, factor, mean * (1 - factor), inplace=False)


class ColorJitterLUT(A.ColorJitter, SeededImageOnly):
    """albumentations' ``ColorJitter`` (same parameters, draws and order) with its hue step done
    by a look-up table on the contiguous H plane instead of a strided one: bit-identical output
    on uint8 RGB images (tests/test_data_pipeline.py), about a fifth of the time."""

    def apply(
        self,
        img: np.ndarray,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        order: list[int],
        **params: Any,
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return super().apply(img, brightness, contrast, saturation, hue, order, **params)
        values = [brightness, contrast, saturation, hue]
        steps = {1: _contrast_uint8, 3: _hue_shift_uint8}
        for i in order:
            img = steps.get(i, self.transforms[i])(img, values[i])
        return img


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    # OpenCV warps cannot take int64; ids 0..254 and ignore 255 fit in uint8 losslessly.
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return mask


#: Bumped whenever the same (seed, epoch, index) starts giving other augmentation draws: it is
#: part of the shared stage-1 key and of every parsing checkpoint, so neither a cached stage 1 nor a
#: resume silently mixes draws of two versions. 2: one shared stream (:func:`seed_augmentation`).
#: 3: the scale protocol (``data.base_size`` in the dataset configs: the random scale acts on the
#: base-resized image, :class:`BaseRandomScale`); with ``base_size`` null and the default preset
#: the draws are those of version 2. 4: the fused affine transform (:class:`AffineTrainTransform`,
#: ``data.augment_impl=fused``, one warp from the stored, possibly reduced, JPEG; its own draws)
#: and uint8 images normalised on the device; ``augment_impl=reference`` keeps version 3's
#: draws and warps.
AUGMENTATION_VERSION = 4

#: ``data.augment_impl`` choices: ``fused`` (:class:`AffineTrainTransform`) or ``reference``
#: (the sequential albumentations transforms of :class:`TrainTransform`).
AUGMENT_IMPLS = ("fused", "reference")


def seed_augmentation(aug: A.BaseCompose, seed: int) -> None:
    """Seeds ``aug`` with one random stream that all its transforms draw from in turn.

    ``Compose.set_random_seed`` would give every transform its own generator with the same seed,
    so their first draws coincide: a flip with p=0.5 would fire exactly when the random scale is
    below the middle of its range, and the colour step whenever the image is flipped.
    """
    seed = int(seed) % 2**32
    aug.set_random_state(np.random.default_rng(seed), random.Random(seed))


class TrainTransform:
    """The reference training transform (``data.augment_impl=reference``): (base resize and)
    random scale, rotate, pad, crop, flip-with-swap and photometric change as sequential
    albumentations transforms, each warping the whole image, then to tensor.

    Output item: ``image`` (3, h, w) uint8 RGB, ``mask`` (h, w) uint8 with 255 where the rotation
    or padding left no label, ``name`` unchanged; ``(h, w) = crop_size``.
    """

    def __init__(self, aug: A.Compose) -> None:
        self.aug = aug
        self._seeded_for: int | None = None

    def _maybe_reseed(self) -> None:
        # albumentations 2 keeps a private generator per Compose: forked DataLoader workers would
        # inherit identical copies and draw the same "random" augmentations. Reseeding from the
        # worker's torch seed decorrelates them (and seed_everything(workers=True) reproduces it).
        info = torch.utils.data.get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        if seed != self._seeded_for:
            seed_augmentation(self.aug, seed)
            self._seeded_for = seed

    def __call__(self, item: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        """Augments ``item``; ``seed`` fixes this draw (else the worker's stream continues)."""
        if seed is None:
            self._maybe_reseed()
        else:
            seed_augmentation(self.aug, seed)
            self._seeded_for = None
        out = self.aug(image=item["image"], mask=_mask_to_uint8(item["mask"]))
        return {
            **item,
            "image": _to_chw_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])),
        }


@dataclass
class AugmentDraw:
    """One sample's draws of :class:`AffineTrainTransform`, made before the image is decoded.

    Attributes:
        scale: the random scale ``s`` (relative to the base resize).
        angle: rotation in degrees (counter-clockwise, albumentations' ``Rotate``).
        flip: whether the crop is mirrored (and left/right ids swapped).
        crop: ``(u_top, u_left)`` in ``[0, 1)``: the crop offsets are
            ``floor(u * (range + 1))``, uniform over every position (albumentations' rule).
        colour_seed: seed of the photometric step.
        rng: the sample's generator, for the crops ``cat_max_ratio`` redraws.
    """

    scale: float
    angle: float
    flip: bool
    crop: tuple[float, float]
    colour_seed: int
    rng: np.random.Generator


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


class AffineTrainTransform:
    """The training augmentation as one affine warp of the output window (``augment_impl=fused``).

    The same distribution as :class:`TrainTransform`: base resize times ``s ~ U(scale_range)``
    to the size :func:`base_resize_size` gives, rotation by ``U(-rotate, rotate)`` degrees about
    that image's centre in its own frame (what leaves the frame is lost, as albumentations'
    ``Rotate`` loses it), centred padding to the crop size, a crop offset uniform over every
    position, a flip with probability ``flip_prob`` (left/right ids swapped), then the
    photometric step. Instead of a full-image resize and a full-image rotation, the chain
    source -> scaled -> rotated -> padded -> cropped -> flipped is composed into one ``(2, 3)``
    matrix and only the ``crop_size`` output is computed: image bilinear (0 outside), labels
    nearest (255 outside; they never interpolate). When the total scale allows it the JPEG is
    decoded at 1/2, 1/4 or 1/8 of its size (:meth:`reduction`, libjpeg's DCT scaling) and the
    matrix starts from the reduced grid.

    The draws come from ``numpy.random.default_rng(seed)`` (the sampler's per-sample seed), made
    by :meth:`draw` before decoding; tests/test_data_pipeline.py compares their statistics and
    the warped output with the reference path.

    Args:
        crop_size, scale_range, rotate, flip_pairs, flip_prob, cat_max_ratio, base_size,
            base_side: as :func:`build_train_transform`.
        photometric: the colour step on the uint8 RGB crop (None: none), applied by
            :meth:`SeededImageOnly.seeded` with :attr:`AugmentDraw.colour_seed`: the draws and
            pixels of ``A.Compose([photometric])`` seeded by :func:`seed_augmentation`.
    """

    #: The largest JPEG reduction tried (libjpeg scales by 1/2, 1/4, 1/8).
    MAX_REDUCTION = 8

    def __init__(
        self,
        crop_size: Sequence[int],
        scale_range: Sequence[float] = (1.0, 1.0),
        rotate: float = 0.0,
        flip_pairs: Sequence[Sequence[int]] = (),
        flip_prob: float = 0.5,
        photometric: SeededImageOnly | None = None,
        cat_max_ratio: float | None = None,
        base_size: int | None = None,
        base_side: str = "long",
    ) -> None:
        self.crop_h, self.crop_w = (int(v) for v in crop_size)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.rotate = float(rotate)
        self.flip_prob = float(flip_prob)
        self.lut = flip_lut(flip_pairs)
        self.photometric = photometric
        self.crop_check = (
            CatMaxRatioRandomCrop(self.crop_h, self.crop_w, float(cat_max_ratio))
            if cat_max_ratio is not None and float(cat_max_ratio) < 1.0
            else None
        )
        self.base_size, self.base_side = check_base_resize(base_size, base_side)
        self._stream: np.random.Generator | None = None
        self._seeded_for: int | None = None

    # -- draws -----------------------------------------------------------------------------

    def _worker_stream(self) -> np.random.Generator:
        # Without a sampler seed, one stream per DataLoader worker (see TrainTransform).
        info = torch.utils.data.get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        if self._stream is None or seed != self._seeded_for:
            self._stream, self._seeded_for = np.random.default_rng(seed % 2**64), seed
        return self._stream

    def draw(self, seed: int | None = None) -> AugmentDraw:
        """The sample's scale, angle, flip, crop position and colour seed (``seed`` None: the
        worker's stream continues)."""
        rng = (
            np.random.default_rng(int(seed) % 2**64) if seed is not None else self._worker_stream()
        )
        lo, hi = self.scale_range
        scale = lo if lo == hi else float(rng.uniform(lo, hi))
        angle = float(rng.uniform(-self.rotate, self.rotate)) if self.rotate else 0.0
        flip = bool(rng.random() < self.flip_prob)
        crop = (float(rng.random()), float(rng.random()))
        colour_seed = int(rng.integers(2**32))
        return AugmentDraw(scale, angle, flip, crop, colour_seed, rng)

    # -- geometry --------------------------------------------------------------------------

    def scaled_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """``(h, w)`` of the scaled image before rotation (the reference path's resize)."""
        if self.base_size is not None:
            return base_resize_size(height, width, self.base_size, self.base_side, scale)
        if scale == 1.0:
            return int(height), int(width)
        # albumentations' RandomScale: each side rounded half up
        return max(1, _round_half_up(height * scale)), max(1, _round_half_up(width * scale))

    def reduction(self, draw: AugmentDraw, height: int, width: int) -> int:
        """The largest JPEG reduction ``r`` (1, 2, 4, 8) at which an ``(height, width)`` image is
        still downscaled (or kept) by the warp: ``r * max(h_s / H, w_s / W) <= 1``."""
        return self._reduction_at(draw.scale, height, width)

    def _reduction_at(self, scale: float, height: int, width: int) -> int:
        hs, ws = self.scaled_size(height, width, scale)
        factor = max(hs / height, ws / width)
        r = 1
        while r < self.MAX_REDUCTION and 2 * r * factor <= 1.0 and min(height, width) >= 16 * r:
            r *= 2
        return r

    def reductions(self, height: int, width: int) -> list[int]:
        """Every reduction :meth:`reduction` can pick for an ``(height, width)`` image over the
        scale range (it falls as the scale grows), largest first."""
        lo, hi = (self._reduction_at(s, height, width) for s in self.scale_range)
        return [r for r in (8, 4, 2, 1) if hi <= r <= lo]

    def _padded_box(self, hs: int, ws: int) -> tuple[int, int, int, int]:
        """``(pad_top, pad_left, Hp, Wp)``: albumentations' centred ``PadIfNeeded``."""
        top = (self.crop_h - hs) // 2 if hs < self.crop_h else 0
        left = (self.crop_w - ws) // 2 if ws < self.crop_w else 0
        return top, left, max(hs, self.crop_h), max(ws, self.crop_w)

    def crop_offset(self, u: tuple[float, float], hp: int, wp: int) -> tuple[int, int]:
        """Crop ``(top, left)`` in the padded image from the fractions ``u``."""
        return int((hp - self.crop_h + 1) * u[0]), int((wp - self.crop_w + 1) * u[1])

    def matrix(
        self,
        height: int,
        width: int,
        draw: AugmentDraw,
        offset: tuple[int, int],
        reduction: int = 1,
    ) -> np.ndarray:
        """The ``(3, 3)`` map from pixel centres of the stored image (decoded at 1/``reduction``)
        to pixel centres of the output crop.

        In order: reduced -> full grid (``x = r x' + (r - 1) / 2``, libjpeg's block centres),
        resize to ``(h_s, w_s)`` (``x_s = (x + 0.5) w_s / W - 0.5``, OpenCV's resize grid),
        rotation about ``(w_s / 2 - 0.5, h_s / 2 - 0.5)`` (albumentations' ``Rotate``), padding
        and crop (translations), flip (``x -> w - 1 - x``).
        """
        hs, ws = self.scaled_size(height, width, draw.scale)
        pad_top, pad_left, _, _ = self._padded_box(hs, ws)
        r = float(reduction)
        m = _translation((r - 1) / 2, (r - 1) / 2) @ np.diag([r, r, 1.0])
        sx, sy = ws / width, hs / height
        m = _translation(0.5 * sx - 0.5, 0.5 * sy - 0.5) @ np.diag([sx, sy, 1.0]) @ m
        if draw.angle:
            cx, cy = ws / 2 - 0.5, hs / 2 - 0.5
            a = np.deg2rad(draw.angle % 360)
            rot = np.array([[np.cos(a), np.sin(a), 0.0], [-np.sin(a), np.cos(a), 0.0], [0, 0, 1]])
            m = _translation(cx, cy) @ rot @ _translation(-cx, -cy) @ m
        top, left = offset
        m = _translation(pad_left - left, pad_top - top) @ m
        if draw.flip:
            m = np.array([[-1.0, 0.0, self.crop_w - 1.0], [0.0, 1.0, 0.0], [0, 0, 1]]) @ m
        return m

    def _frame(self, hs: int, ws: int, offset: tuple[int, int], flip: bool) -> tuple[int, ...]:
        """``(y0, y1, x0, x1)``: where the scaled image's frame lies in the output; the
        reference rotation loses whatever it turns outside that frame."""
        pad_top, pad_left, _, _ = self._padded_box(hs, ws)
        y0, x0 = pad_top - offset[0], pad_left - offset[1]
        y1, x1 = y0 + hs, x0 + ws
        if flip:
            x0, x1 = self.crop_w - x1, self.crop_w - x0
        clip = lambda v, n: min(max(v, 0), n)  # noqa: E731
        return (
            clip(y0, self.crop_h),
            clip(y1, self.crop_h),
            clip(x0, self.crop_w),
            clip(x1, self.crop_w),
        )

    def _warp(self, array: np.ndarray, m: np.ndarray, nearest: bool, fill: int) -> np.ndarray:
        return cv2.warpAffine(
            array,
            m[:2],
            (self.crop_w, self.crop_h),
            flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(fill,) * array.shape[2] if array.ndim == 3 else fill,
        )

    @staticmethod
    def _outside_frame(array: np.ndarray, frame: tuple[int, ...], fill: int) -> np.ndarray:
        y0, y1, x0, x1 = frame
        array[:y0], array[y1:], array[:, :x0], array[:, x1:] = fill, fill, fill, fill
        return array

    # -- the transform ---------------------------------------------------------------------

    def __call__(
        self, item: dict[str, Any], seed: int | None = None, draw: AugmentDraw | None = None
    ) -> dict[str, Any]:
        """Augments ``item`` (``image`` (h', w', 3) uint8 RGB or (h', w', 4) RGBX decoded at
        1/``image_reduction`` of the stored size, ``mask`` (H, W) at the stored size) with
        ``draw`` (else one drawn from ``seed``).

        Returns:
            The item with ``image`` (3, h, w) uint8 RGB (a channels-last view, see
            :func:`_to_channels_last_tensor`) and ``mask`` (h, w) uint8 (255 where no label
            reached), ``(h, w) = crop_size``; ``image_reduction`` removed.
        """
        draw = draw if draw is not None else self.draw(seed)
        item = dict(item)
        reduction = int(item.pop("image_reduction", 1))
        mask = _mask_to_uint8(item["mask"])
        height, width = mask.shape[:2]
        hs, ws = self.scaled_size(height, width, draw.scale)
        _, _, hp, wp = self._padded_box(hs, ws)
        offset = self.crop_offset(draw.crop, hp, wp)
        m = self.matrix(height, width, draw, offset)
        out_mask = self._warp(mask, m, nearest=True, fill=IGNORE_INDEX)
        if self.crop_check is not None:
            # mmseg's cat_max_ratio: redraw the offset while the crop is dominated by one class;
            # the offset drawn after the last failed check is kept unchecked
            for _ in range(self.crop_check.max_tries):
                if self.crop_check.crop_passes(out_mask):
                    break
                draw.crop = (float(draw.rng.random()), float(draw.rng.random()))
                offset = self.crop_offset(draw.crop, hp, wp)
                m = self.matrix(height, width, draw, offset)
                out_mask = self._warp(mask, m, nearest=True, fill=IGNORE_INDEX)
        frame = self._frame(hs, ws, offset, draw.flip)
        out_mask = self._outside_frame(out_mask, frame, IGNORE_INDEX)
        if draw.flip:
            out_mask = cv2.LUT(out_mask, self.lut)
        m_image = m if reduction == 1 else self.matrix(height, width, draw, offset, reduction)
        image = self._outside_frame(self._warp(item["image"], m_image, False, 0), frame, 0)
        if image.shape[2] == 4:  # RGBX from the reduced decode: the warp's fast path
            image = cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
        if self.photometric is not None:
            image = self.photometric.seeded(image, draw.colour_seed)
        item["image"] = _to_channels_last_tensor(image)
        item["mask"] = torch.from_numpy(out_mask)
        return item


def letterbox_box(
    height: int, width: int, out_height: int, out_width: int
) -> tuple[int, int, int, int]:
    """Where an ``(height, width)`` image lies inside an ``(out_height, out_width)`` input when it is
    scaled to fit with its aspect ratio kept and centred (SCHP's evaluation input for LIP).

    The scale is ``s = min(out_height / height, out_width / width)``; the scaled image is
    ``(round(height * s), round(width * s))`` (halves round up), and the leftover rows and columns
    are split between the two sides, the extra one (odd leftover) going to the bottom / right.

    Returns:
        ``(top, left, box_height, box_width)`` of the image inside the input, in input pixels.
    """
    height, width, out_height, out_width = (int(v) for v in (height, width, out_height, out_width))
    if min(height, width, out_height, out_width) <= 0:
        raise ValueError(
            f"letterbox of a {height}x{width} image into {out_height}x{out_width}: sizes must be "
            "positive"
        )
    scale = min(out_height / height, out_width / width)
    # floor(x + 0.5): Python's round() would round halves to even.
    box_h = min(out_height, max(1, int(math.floor(height * scale + 0.5))))
    box_w = min(out_width, max(1, int(math.floor(width * scale + 0.5))))
    return (out_height - box_h) // 2, (out_width - box_w) // 2, box_h, box_w


def letterbox_image(
    image: np.ndarray, size: Sequence[int]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Scales ``image`` to fit ``size`` with its aspect ratio kept and pads it centred with 0.

    Args:
        image: ``(H, W, 3)`` (or ``(H, W)``) image, any dtype OpenCV resizes (uint8 here).
        size: ``(h, w)`` of the output.

    Returns:
        The ``(h, w, 3)`` image (same dtype; padding 0, i.e. black before normalisation) resized
        with bilinear interpolation (``cv2.INTER_LINEAR``), and its :func:`letterbox_box`.
    """
    out_h, out_w = (int(v) for v in size)
    top, left, box_h, box_w = letterbox_box(image.shape[0], image.shape[1], out_h, out_w)
    if (box_h, box_w) != image.shape[:2]:
        image = cv2.resize(image, (box_w, box_h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((out_h, out_w, *image.shape[2:]), dtype=image.dtype)
    out[top : top + box_h, left : left + box_w] = image
    return out, (top, left, box_h, box_w)


def _schp_box_width(height: int, width: int, out_size: Sequence[int]) -> np.float32:
    """Width of SCHP's person box for a whole ``(height, width)`` image, in original pixels.

    ``LIPDataValSet`` takes the box ``(0, 0, W - 1, H - 1)`` (the pixel centres of the first and
    last column / row), so its sides are ``W - 1`` and ``H - 1``; the shorter one is widened to the
    output's aspect ratio ``out_w / out_h``. Only the width enters the affine map (its scale is
    isotropic). float32, as SCHP stores its scales.
    """
    out_h, out_w = (int(v) for v in out_size)
    box_w, box_h = float(int(width) - 1), float(int(height) - 1)
    aspect = out_w / out_h
    if box_w < aspect * box_h:
        box_w = box_h * aspect
    if box_w <= 0:
        raise ValueError(
            f"SCHP's affine of a {height}x{width} image is degenerate (a single pixel)"
        )
    return np.float32(box_w)


def _three_points(centre: np.ndarray, half: np.float32) -> np.ndarray:
    """The three float32 points an unrotated affine is solved from: ``centre``, the point ``b``
    ``half`` above it, and ``b`` plus ``centre - b`` turned by 90 degrees (the top-left corner).

    Returns:
        ``(3, 2)`` float32 ``(x, y)`` points; every step rounds to float32 as SCHP's arrays do.
    """
    a = centre.astype(np.float32)
    b = a + np.array([0.0, -half], dtype=np.float32)
    d = a - b
    c = b + np.array([-d[1], d[0]], dtype=np.float32)
    return np.stack([a, b, c]).astype(np.float32)


def schp_affine(
    height: int,
    width: int,
    out_size: Sequence[int],
    *,
    truncate_center: bool = False,
    inverse: bool = False,
) -> np.ndarray:
    """SCHP's evaluation affine for a whole ``(height, width)`` image (``LIPDataValSet``).

    The box centre ``((W - 1) / 2, (H - 1) / 2)`` goes to the output centre
    ``((out_w - 1) / 2, (out_h - 1) / 2)`` and the box width (:func:`_schp_box_width`, the longer
    side minus one for a square output) to ``out_w - 1`` pixels: scale
    ``k = (out_w - 1) / box_w``, no rotation, so the longer side's first and last pixel centres
    land on the output's first and last. The matrix is solved by ``cv2.getAffineTransform`` from
    three float32 point pairs (the centre, the point half a box width above it, the box's top-left
    corner), as SCHP's ``get_affine_transform`` does, so that it equals SCHP's to the last bit.

    Args:
        height, width: the original image size ``(H, W)``.
        out_size: ``(out_h, out_w)`` of the network input.
        truncate_center: integer-truncate the centre first, as SCHP's ``evaluate.py`` does before
            scoring (it stores the centres in an ``np.int32`` array): the map its label warp
            inverts, half an original pixel off the input warp for even sides.
        inverse: the map from input pixels to original pixels instead.

    Returns:
        ``(2, 3)`` float64 ``[[k, 0, tx], [0, k, ty]]`` (or its inverse) acting on ``(x, y, 1)``
        pixel coordinates.
    """
    out_h, out_w = (int(v) for v in out_size)
    centre = np.array([(int(width) - 1) * 0.5, (int(height) - 1) * 0.5], dtype=np.float32)
    if truncate_center:
        centre = np.trunc(centre)
    src = _three_points(centre, _schp_box_width(height, width, out_size) * np.float32(0.5))
    out_centre = np.array([(out_w - 1) * 0.5, (out_h - 1) * 0.5], dtype=np.float32)
    dst = _three_points(out_centre, np.float32((out_w - 1) * 0.5))
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


def schp_affine_image(image: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Warps a whole image into ``size`` by :func:`schp_affine`, as SCHP's ``LIPDataValSet``.

    Args:
        image: ``(H, W, 3)`` uint8 (channel order does not matter: each channel is warped alone).
        size: ``(h, w)`` of the network input.

    Returns:
        The ``(h, w, 3)`` uint8 input (``cv2.warpAffine``, bilinear, constant black border) and the
        ``(2, 3)`` float64 input-to-original map SCHP's scoring uses (truncated centre,
        ``schp_affine(..., truncate_center=True, inverse=True)``).
    """
    out_h, out_w = (int(v) for v in size)
    height, width = image.shape[:2]
    warped = cv2.warpAffine(
        image,
        schp_affine(height, width, (out_h, out_w)),
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    inverse = schp_affine(height, width, (out_h, out_w), truncate_center=True, inverse=True)
    return warped, inverse


class EvalTransform:
    """Resize the image only (to the network input size); the label stays untouched. Images stay
    uint8: ``datamodules.batch.network_batch`` normalises them on the device.

    Output item: ``image`` (3, h, w) uint8 RGB, ``mask`` (H, W) uint8 at original resolution (if
    the item has one), ``orig_size`` (2,) int64 ``(H, W)``, ``name``; with ``letterbox`` or
    ``short_side`` also ``valid_box`` (4,) int64 ``(top, left, height, width)`` of the image
    inside the input; with ``affine`` instead ``inverse_affine`` (2, 3) float64, the map from
    input pixels to original pixels that the predicted labels are warped back with.

    Args:
        aug: the albumentations pipeline (a resize, or nothing).
        letterbox: ``(h, w)``: before ``aug``, scale the image to fit ``(h, w)`` with its aspect
            ratio kept and pad it centred with black (:func:`letterbox_image`); None: ``aug``
            alone decides the size.
        short_side: before ``aug``, resize the image so that its short side has this length
            (aspect kept, :func:`base_resize_size`) without padding: the input is the image
            (``valid_box`` ``(0, 0, h, w)``) and ``collate_eval`` pads a batch of such inputs
            bottom/right to its largest one.
        affine: ``(h, w)``: before ``aug``, warp the image into ``(h, w)`` with SCHP's official
            affine (:func:`schp_affine_image`; ``eval=schp_official``); the evaluation then
            arg-maxes at the input and warps the labels back by nearest neighbour.
    """

    def __init__(
        self,
        aug: A.Compose,
        letterbox: Sequence[int] | None = None,
        short_side: int | None = None,
        affine: Sequence[int] | None = None,
    ) -> None:
        if sum(v is not None for v in (letterbox, short_side, affine)) > 1:
            raise ValueError(
                "EvalTransform takes at most one of a letterbox size, a short side, an affine size"
            )
        self.aug = aug
        self.letterbox = tuple(int(v) for v in letterbox) if letterbox is not None else None
        self.short_side = int(short_side) if short_side is not None else None
        self.affine = tuple(int(v) for v in affine) if affine is not None else None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        h, w = image.shape[:2]
        extra: dict[str, Any] = {}
        if self.letterbox is not None:
            image, box = letterbox_image(image, self.letterbox)
            extra["valid_box"] = torch.tensor(box, dtype=torch.int64)
        elif self.short_side is not None:
            size = base_resize_size(h, w, self.short_side, "short")
            image = _resize(image, size, cv2.INTER_LINEAR)
            extra["valid_box"] = torch.tensor((0, 0, *size), dtype=torch.int64)
        elif self.affine is not None:
            image, inverse = schp_affine_image(image, self.affine)
            extra["inverse_affine"] = torch.from_numpy(inverse)
        out = {
            **item,
            "image": _to_chw_tensor(self.aug(image=image)["image"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            **extra,
        }
        if "mask" in item:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(_mask_to_uint8(item["mask"])))
        return out


def build_train_transform(
    crop_size: Sequence[int] = (400, 400),
    scale_range: Sequence[float] = (0.5, 2.0),
    rotate: float = 10.0,
    flip_pairs: Sequence[Sequence[int]] = (),
    flip_prob: float = 0.5,
    color_jitter: float = 0.2,
    *,
    cat_max_ratio: float | None = None,
    photometric: str = "jitter",
    base_size: int | None = None,
    base_side: str = "long",
    impl: str = "fused",
) -> AffineTrainTransform | TrainTransform:
    """Paired training augmentation; images leave as uint8 (normalised on the device by
    ``datamodules.batch.network_batch``).

    Args:
        crop_size: ``(h, w)`` of the output crop; smaller images are padded (mask with 255).
        scale_range: ``(min, max)`` isotropic scale factor; relative to the base-resized image
            when ``base_size`` is given, to the original image otherwise.
        rotate: maximum absolute rotation in degrees (0 disables); the mask uses nearest
            interpolation and fills 255, the image fills 0.
        flip_pairs: left/right class id pairs swapped by the horizontal flip.
        flip_prob: probability of the horizontal flip (0 disables it, and with it the left/right
            swap); a coin is drawn either way, so the other draws do not depend on it.
        color_jitter: brightness/contrast/saturation strength (hue gets a tenth), applied with
            probability 0.8; 0 disables. Used by ``photometric="jitter"`` only.
        cat_max_ratio: None: plain random crop. A float: redraw crops in which one class covers
            ``cat_max_ratio`` or more of the labelled pixels (or that hold a single class), as
            mmsegmentation's ``RandomCrop(cat_max_ratio=...)`` (see ``CatMaxRatioRandomCrop``).
        photometric: ``"jitter"``: ``ColorJitter`` of strength ``color_jitter``; ``"mmseg"``:
            mmsegmentation's ``PhotoMetricDistortion`` (``color_jitter`` is then unused).
        base_size, base_side: None: no base resize (the random scale acts on the original image,
            as before the scale protocol). An int: first resize so that the long (or short) side
            equals it, in the same interpolation as the random scale (:class:`BaseRandomScale`);
            evaluation fits images the same way (:func:`build_eval_transform`).
        impl: ``"fused"``: :class:`AffineTrainTransform` (one warp of the output window, reduced
            JPEG decoding); ``"reference"``: :class:`TrainTransform` (sequential albumentations
            transforms), the same distribution of augmentations.
    """
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"data.augment_impl must be one of {AUGMENT_IMPLS}, got {impl!r}")
    crop_h, crop_w = (int(v) for v in crop_size)
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
    if not 0.0 <= float(flip_prob) <= 1.0:
        raise ValueError(f"data.flip_prob must lie in [0, 1], got {flip_prob}")
    base_size, base_side = check_base_resize(base_size, base_side)
    if photometric not in PHOTOMETRIC_MODES:
        raise ValueError(f"photometric must be one of {PHOTOMETRIC_MODES}, got {photometric!r}")
    if cat_max_ratio is not None and not 0 < float(cat_max_ratio) <= 1:
        raise ValueError(f"cat_max_ratio must lie in (0, 1] or be None, got {cat_max_ratio}")
    colour: SeededImageOnly | None = None
    if photometric == "mmseg":
        colour = PhotoMetricDistortion()
    elif color_jitter:
        cj = float(color_jitter)
        colour = ColorJitterLUT(
            brightness=cj, contrast=cj, saturation=cj, hue=min(cj / 10.0, 0.5), p=0.8
        )
    if impl == "fused":
        return AffineTrainTransform(
            (crop_h, crop_w),
            (lo, hi),
            float(rotate or 0.0),
            flip_pairs,
            float(flip_prob),
            colour,
            cat_max_ratio,
            base_size,
            base_side,
        )
    ops: list[A.BasicTransform] = []
    if base_size is not None:
        ops.append(BaseRandomScale(base_size, base_side, (lo, hi)))
    elif (lo, hi) != (1.0, 1.0):
        # RandomScale samples 1 + U(scale_limit): express (lo, hi) relative to 1.
        ops.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                # INTER_NEAREST samples half a source pixel off the bilinear image grid;
                # the _EXACT variant keeps label edges on the image edges.
                mask_interpolation=cv2.INTER_NEAREST_EXACT,
                p=1.0,
            )
        )
    if rotate:
        ops.append(
            A.Rotate(
                limit=(-float(rotate), float(rotate)),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
                p=1.0,
            )
        )
    ops += [
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position="center",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=IGNORE_INDEX,
        ),
        A.RandomCrop(height=crop_h, width=crop_w)
        if cat_max_ratio is None
        else CatMaxRatioRandomCrop(crop_h, crop_w, cat_max_ratio=float(cat_max_ratio)),
        HorizontalFlipSwap(flip_pairs=flip_pairs, p=float(flip_prob)),
    ]
    if colour is not None:
        ops.append(colour)
    return TrainTransform(A.Compose(ops))


def build_eval_transform(
    eval_size: Sequence[int] | None = None,
    keep_ratio: bool = False,
    *,
    base_size: int | None = None,
    base_side: str = "long",
    affine: bool = False,
) -> EvalTransform:
    """Evaluation transform: image resized to ``eval_size`` ``(h, w)``, or fitted by
    ``base_size`` as training fits it, or kept as is (neither). :func:`eval_input` says which.

    The mask is not resized: scoring happens at the original resolution after the LightningModule
    upsamples the logits to ``orig_size`` (cropped to ``valid_box`` first when there is one).

    Args:
        eval_size: network input ``(h, w)``; None keeps each image's own size.
        keep_ratio: with ``eval_size``, scale the image by ``min(h / H, w / W)`` instead of
            stretching it, pad it centred with black and record the image's ``valid_box``
            (SCHP's evaluation input); the evaluation crops the scores to that box before
            resizing them to ``orig_size``. No effect without ``eval_size``.
        base_size, base_side: instead of ``eval_size``: scale each image by
            :func:`base_scale` (long or short side to ``base_size``, aspect kept), the factor
            training applies before its random scale. ``long``: the input is
            ``base_size x base_size``, the image centred with black padding (the letterbox of
            ``keep_ratio``). ``short``: the input is the resized image itself; ``collate_eval``
            pads a batch bottom/right to its largest image. Both record ``valid_box``.
        affine: SCHP's official evaluation input (``data.eval_affine``, set by
            ``eval=schp_official``): warp each image into the fixed input (``eval_size``, or
            ``base_size x base_size`` with ``base_side="long"``) by :func:`schp_affine_image`
            instead of the letterbox, and record ``inverse_affine`` instead of ``valid_box``.
            ``keep_ratio`` is then moot (the affine keeps the aspect ratio).
    """
    base_size, base_side = check_base_resize(base_size, base_side)
    if base_size is not None and eval_size is not None:
        raise ValueError(
            f"eval_size={list(eval_size)} and base_size={base_size} both given: the evaluation "
            "input is one or the other (datamodules.transforms.eval_input picks it)"
        )
    ops: list[A.BasicTransform] = []
    letterbox = None
    short_side = None
    affine_size = None
    fixed = (base_size, base_size) if base_size is not None and base_side == "long" else None
    if affine:
        affine_size = fixed or (None if base_size is not None else eval_size)
        if affine_size is None:
            raise ValueError(
                "SCHP's affine evaluation input (data.eval_affine) needs a fixed input size: "
                "data.eval_size, or data.base_size with data.base_side=long"
            )
    elif fixed is not None:
        letterbox = fixed
    elif base_size is not None:
        short_side = base_size
    elif eval_size is not None:
        h, w = (int(v) for v in eval_size)
        if keep_ratio:
            letterbox = (h, w)
        else:
            ops.append(A.Resize(height=h, width=w, interpolation=cv2.INTER_LINEAR))
    return EvalTransform(
        A.Compose(ops), letterbox=letterbox, short_side=short_side, affine=affine_size
    )
