"""Paired image/mask transforms for parsing datasets: albumentations behind an item-dict wrapper.

Every transform takes and returns the dataset item dict (see ``datamodules/batch.py``): ``image``
(H, W, 3) uint8 numpy, optional ``mask`` (H, W) int numpy, ``name``. They are plain picklable
objects, so DataLoader workers can receive them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from datamodules.batch import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, collate_eval, collate_train

__all__ = [
    "EvalTransform",
    "HorizontalFlipSwap",
    "TrainTransform",
    "build_eval_transform",
    "build_train_transform",
    "collate_eval",
    "collate_train",
    "flip_lut",
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


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float numpy -> (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def _mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    # OpenCV warps cannot take int64; ids 0..254 and ignore 255 fit in uint8 losslessly.
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return mask


class TrainTransform:
    """Random scale, rotate, pad, crop, flip-with-swap, colour jitter, normalise, to tensor.

    Output item: ``image`` (3, h, w) float32 normalised, ``mask`` (h, w) int64 with 255 where the
    rotation or padding left no label, ``name`` unchanged; ``(h, w) = crop_size``.
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
            self.aug.set_random_seed(seed % 2**32)
            self._seeded_for = seed

    def __call__(self, item: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        """Augments ``item``; ``seed`` fixes this draw (else the worker's stream continues)."""
        if seed is None:
            self._maybe_reseed()
        else:
            self.aug.set_random_seed(seed % 2**32)
            self._seeded_for = None
        out = self.aug(image=item["image"], mask=_mask_to_uint8(item["mask"]))
        return {
            **item,
            "image": _to_chw_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).long(),
        }


class EvalTransform:
    """Resize the image only (to the network input size), normalise; the label stays untouched.

    Output item: ``image`` (3, h, w) float32, ``mask`` (H, W) int64 at original resolution (if the
    item has one), ``orig_size`` (2,) int64 ``(H, W)``, ``name``.
    """

    def __init__(self, aug: A.Compose) -> None:
        self.aug = aug

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        h, w = item["image"].shape[:2]
        out = {
            **item,
            "image": _to_chw_tensor(self.aug(image=item["image"])["image"]),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if "mask" in item:
            out["mask"] = torch.as_tensor(np.asarray(item["mask"], dtype=np.int64))
        return out


def build_train_transform(
    crop_size: Sequence[int] = (400, 400),
    scale_range: Sequence[float] = (0.5, 2.0),
    rotate: float = 10.0,
    flip_pairs: Sequence[Sequence[int]] = (),
    flip_prob: float = 0.5,
    color_jitter: float = 0.2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TrainTransform:
    """Paired training augmentation.

    Args:
        crop_size: ``(h, w)`` of the output crop; smaller images are padded (mask with 255).
        scale_range: ``(min, max)`` isotropic scale factor.
        rotate: maximum absolute rotation in degrees (0 disables); the mask uses nearest
            interpolation and fills 255, the image fills 0.
        flip_pairs: left/right class id pairs swapped by the horizontal flip.
        flip_prob: probability of the horizontal flip.
        color_jitter: brightness/contrast/saturation strength (hue gets a tenth); 0 disables.
        mean, std: normalisation on the 0..1 scale (ImageNet by default).
    """
    crop_h, crop_w = (int(v) for v in crop_size)
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
    ops: list[A.BasicTransform] = []
    if (lo, hi) != (1.0, 1.0):
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
        A.RandomCrop(height=crop_h, width=crop_w),
        HorizontalFlipSwap(flip_pairs=flip_pairs, p=flip_prob),
    ]
    if color_jitter:
        cj = float(color_jitter)
        ops.append(
            A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=min(cj / 10.0, 0.5), p=0.8)
        )
    ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return TrainTransform(A.Compose(ops))


def build_eval_transform(
    eval_size: Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> EvalTransform:
    """Evaluation transform: image resized to ``eval_size`` ``(h, w)`` (kept as is if None).

    The mask is not resized: scoring happens at the original resolution after the LightningModule
    upsamples the logits to ``orig_size``.
    """
    ops: list[A.BasicTransform] = []
    if eval_size is not None:
        h, w = (int(v) for v in eval_size)
        ops.append(A.Resize(height=h, width=w, interpolation=cv2.INTER_LINEAR))
    ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return EvalTransform(A.Compose(ops))
