"""The batch contract shared by every datamodule, plus the dataset error type and collate functions.

Dataset item (``transform=None``): ``image`` (H, W, 3) uint8 RGB numpy, ``mask`` (H, W) uint8 numpy
with 255 = ignore (absent for splits without labels), ``name`` str.

Batch (after transforms and collate):

- ``image``: (B, 3, h, w) uint8 RGB as the loaders deliver it (training batches of the fused
  transform with channels-last strides, see :func:`collate_train`); :func:`network_batch` (the
  LightningModule's ``on_after_batch_transfer``) turns it into float32 normalised by
  ``IMAGENET_MEAN`` / ``IMAGENET_STD`` on the device, the one definition of the normalisation
  (predict and export use it too). Evaluation images that carry a ``valid_box`` may differ in
  size (``data.base_side=short``): they are padded bottom/right with black to the largest of the
  batch.
- ``mask``: (B, H, W) uint8 from the loaders (class ids 0..254, 255 = ignore; an eighth of the
  bytes of int64), int64 after :func:`network_batch`. Training: the crop size. Evaluation: the
  label at its original resolution, padded with 255 to the largest label of the batch.
- ``orig_size``: (B, 2) int64 ``(H, W)`` of each original image (evaluation batches only).
- ``valid_box``: (B, 4) int64 ``(top, left, height, width)`` of each image inside its network
  input (evaluation batches with ``eval_keep_ratio`` or ``base_size`` only: the image was scaled
  with its aspect ratio kept and padded with black around it).
- ``inverse_affine``: (B, 2, 3) float64 map from network-input pixels to original pixels
  (evaluation batches with ``data.eval_affine`` only, ``eval=schp_official``: the image was warped
  into the input with SCHP's affine; the predicted labels are warped back through this map).
- ``name``: list of B sample ids.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.errors import FixableError

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: A black pixel after ImageNet normalisation: the padding of the training crops and letterboxes,
#: so the padding of evaluation batches looks the same to the network.
IMAGENET_BLACK = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


class DatasetError(FixableError, ValueError):
    """A problem with one file of a dataset on disk (missing, unreadable, wrong values or size).

    Args:
        path: the offending file or directory.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        # Both go to Exception.args so the error survives pickling out of DataLoader workers.
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def make_palette(num_classes: int) -> np.ndarray:
    """The PASCAL-VOC bit-interleaved colour map, the usual palette for parsing visualisations.

    Returns:
        (num_classes, 3) uint8 RGB; class 0 is black.
    """
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for cls in range(num_classes):
        c, r, g, b = cls, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[cls] = (r, g, b)
    return palette


def save_label_png(path: Path, ids: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Writes class ids ``(H, W)`` as an 8-bit palette PNG: the pixel values are the ids (what
    evaluation scripts read back), the palette only colours them for viewers.

    Args:
        palette: (C, 3) uint8 RGB (default: :func:`make_palette` of 256 entries).
    """
    from PIL import Image

    ids = np.asarray(ids)
    if ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() > 255)):
        raise ValueError(f"{path}: expected (H, W) ids in 0..255, got {ids.shape} {ids.dtype}")
    colours = np.zeros((256, 3), dtype=np.uint8)
    pal = make_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    colours[: len(pal)] = pal[:256]
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(colours.flatten().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """The network input: ``(..., 3, H, W)`` uint8 RGB (any strides) -> contiguous float32
    ``(x / 255 - mean) / std`` with ImageNet's mean and std, on the tensor's device. A
    floating-point tensor is taken as already normalised and returned unchanged.
    """
    if image.is_floating_point():
        return image
    return normalize_255(image)


def normalize_255(image: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB values in [0, 255] of any dtype -> contiguous float32
    ``(x / 255 - mean) / std`` on the tensor's device (:func:`normalize_image` without its
    pass-through of floating-point tensors, for float crops in pixel units).
    """
    mean, std = _mean_std_255(image.device)
    # channels-last training batches (collate_train) leave contiguous: the network sees one layout
    return (image.contiguous().float() - mean) / std


@functools.lru_cache(maxsize=8)
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host tensor each step would be one more copy per step.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    return mean.to(device), std.to(device)


def network_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch (after its transfer to the device) as the network and the loss take it:
    ``image`` normalised float32 (:func:`normalize_image`), ``mask`` int64. Other keys unchanged.
    """
    out = dict(batch)
    if isinstance(out.get("image"), torch.Tensor):
        out["image"] = normalize_image(out["image"])
    if isinstance(out.get("mask"), torch.Tensor):
        out["mask"] = out["mask"].long()
    return out


def collate_train(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack transformed training items that all have the crop size.

    Images that are channels-last views (the fused transform's) are stacked as (B, h, w, 3),
    one copy, and handed over as a (B, 3, h, w) view of it, transposed on the device by
    :func:`normalize_image`; stacking the views as they are would be a strided copy several
    times slower.

    Returns:
        ``image`` (B, 3, h, w) uint8 (channels-last strides when the items are),
        ``mask`` (B, h, w) uint8, ``name`` list of B str.
    """
    images = [item["image"] for item in batch]
    if all(img.ndim == 3 and img.permute(1, 2, 0).is_contiguous() for img in images):
        # (B, h, w, 3) -> (B, 3, h, w) view
        stacked = torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)
    else:
        stacked = torch.stack(images)
    out: dict[str, Any] = {"image": stacked, "name": [item["name"] for item in batch]}
    if "mask" in batch[0]:
        out["mask"] = torch.stack([torch.as_tensor(item["mask"]) for item in batch])
    return out


def collate_eval(
    batch: Sequence[dict[str, Any]], image_pad: Sequence[float] | None = None
) -> dict[str, Any]:
    """Stack evaluation items whose labels keep their original, possibly different, sizes.

    Images share one size (the eval transform resizes them to ``eval_size``), or carry a
    ``valid_box`` (``data.base_side=short``: each image at its own base-resized size): those are
    padded bottom/right with ``image_pad`` to the largest of the batch, which leaves every box
    where it was, so the scores are cropped back before scoring. Masks are padded bottom/right
    with 255 to the largest (H, W) of the batch, so the padding is never scored.

    Args:
        batch: items of the eval transform.
        image_pad: ``(3,)`` per-channel value of the image padding (default: black, the
            padding of training crops: 0 for uint8 images, ``IMAGENET_BLACK`` for normalised ones).

    Returns:
        ``image`` (B, 3, h, w) as the items (uint8), ``mask`` (B, H_max, W_max) uint8 (only when
        the items have labels), ``orig_size`` (B, 2) int64 ``(H, W)``, ``name`` list of B str, and
        ``valid_box`` (B, 4) int64 ``(top, left, height, width)`` or ``inverse_affine``
        (B, 2, 3) float64 when the items have one.
    """
    sizes = {tuple(item["image"].shape) for item in batch}
    images = [item["image"] for item in batch]
    if len(sizes) > 1:
        if not all("valid_box" in item for item in batch):
            raise ValueError(
                f"collate_eval got images of different sizes {sorted(sizes)}; resize them to one "
                "eval_size in the eval transform or use batch size 1"
            )
        # Without a box the scores could not be cropped back: only boxed images are padded.
        h = max(img.shape[-2] for img in images)
        w = max(img.shape[-1] for img in images)
        if image_pad is None:
            image_pad = IMAGENET_BLACK if images[0].is_floating_point() else (0, 0, 0)
        pad = torch.as_tensor(image_pad, dtype=images[0].dtype).view(-1, 1, 1)
        padded = []
        for img in images:
            # (3, h_i, w_i) -> (3, h, w): the image top-left, padding bottom/right
            canvas = pad.expand(img.shape[0], h, w).clone()
            canvas[:, : img.shape[-2], : img.shape[-1]] = img
            padded.append(canvas)
        images = padded
    out: dict[str, Any] = {
        "image": torch.stack(images),
        "orig_size": torch.stack(
            [torch.as_tensor(item["orig_size"], dtype=torch.int64) for item in batch]
        ),
        "name": [item["name"] for item in batch],
    }
    if "valid_box" in batch[0]:
        out["valid_box"] = torch.stack(
            [torch.as_tensor(item["valid_box"], dtype=torch.int64) for item in batch]
        )
    if "inverse_affine" in batch[0]:
        # float64: the matrix must reach the label warp as cv2.getAffineTransform solved it
        out["inverse_affine"] = torch.stack(
            [torch.as_tensor(item["inverse_affine"], dtype=torch.float64) for item in batch]
        )
    if "mask" in batch[0]:
        masks = [torch.as_tensor(item["mask"]) for item in batch]
        h = max(m.shape[0] for m in masks)
        w = max(m.shape[1] for m in masks)
        padded = torch.full((len(masks), h, w), IGNORE_INDEX, dtype=masks[0].dtype)
        for i, m in enumerate(masks):
            padded[i, : m.shape[0], : m.shape[1]] = m
        out["mask"] = padded
    return out
