"""Instance-mask data for class-agnostic mask heads (Deep-MAC): the item/batch contract, the
resize-and-pad transform, the shared LightningDataModule, and the Cityscapes and MHPv2 instance sets.

Raw item (what a dataset's ``load`` returns)::

    image  (H, W, 3) uint8 RGB
    masks  (N, H, W) uint8 in {0, 1}, one per instance
    boxes  (N, 4) float32 xyxy in pixels, continuous coordinates (a mask covering columns
           x0..x1 and rows y0..y1 has the box [x0, y0, x1 + 1, y1 + 1])
    labels (N,) int64 class ids of the dataset's own id space (COCO category ids, Cityscapes
           labelIds, 1 = person for MHPv2)
    name   str
    crowd_masks (K, H, W) uint8, crowd_labels (K,) int64: optional (COCO ``iscrowd=1`` regions of
           evaluation items): not instances; predictions matching them are ignored by mask AP

Batch (:func:`collate_instances`): ``image`` (B, 3, S, S) uint8 RGB, the network frame being the
image resized so that its longer side is S, then padded to S x S; ``size`` (B, 2) int64 ``(h, w)``
of the resized image inside that frame (:func:`network_images`, the LightningModule's
``on_after_batch_transfer``, normalises on the device and sets the padding to 0, the mean
colour); lists over images of
``boxes`` (N_i, 4), ``masks`` (N_i, S, S) uint8 and ``labels`` (N_i,) in that frame; ``orig_boxes``
and ``orig_masks`` (N_i, H, W) in the original image (for evaluation at full resolution), with
``orig_crowd_masks`` (K_i, H, W) and ``crowd_labels`` (K_i,) when the items have crowd regions;
``scale`` (B, 2), ``name``, and ``index`` (B,) the items' dataset indices (evaluation merges the
shards of several processes by it).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.base import (
    evaluation_order,
    loader_worker_init,
    loader_workers,
    read_image,
    training_order,
)
from datamodules.batch import DatasetError, normalize_image

log = logging.getLogger(__name__)

# Cityscapes labelIds of the 8 classes of the instance benchmark (caravan 29 and trailer 30 have
# instance ids too but are not evaluated).
CITYSCAPES_INSTANCE_CLASSES: dict[int, str] = {
    24: "person",
    25: "rider",
    26: "car",
    27: "truck",
    28: "bus",
    31: "train",
    32: "motorcycle",
    33: "bicycle",
}


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of ``(N, H, W)`` masks -> ``(N, 4)`` float32 xyxy (exclusive right/bottom)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


# ---------------------------------------------------------------------- transform and collate


class InstanceTransform:
    """Optional horizontal flip, resize (longer side = ``image_size``), zero-pad to a square.

    Args:
        image_size: side S of the network frame.
        train: flip with probability ``flip_prob``; evaluation items keep ``orig_*``.
        flip_prob: horizontal-flip probability in training.
    """

    def __init__(self, image_size: int = 512, train: bool = False, flip_prob: float = 0.5) -> None:
        self.size, self.train, self.flip_prob = int(image_size), bool(train), float(flip_prob)

    def __call__(
        self, item: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        image, masks, boxes = item["image"], item["masks"], item["boxes"].astype(np.float32)
        h, w = image.shape[:2]
        if self.train and (rng or np.random.default_rng()).random() < self.flip_prob:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # (3, H, W)
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        # Resized in float and rounded once (within 0.5 of the exact value); torch's uint8
        # bilinear kernel is fixed-point and up to 1 off.
        canvas = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        canvas[:, :nh, :nw] = img.round_().clamp_(0, 255).to(torch.uint8)
        m = torch.from_numpy(np.ascontiguousarray(masks))
        net_masks = torch.zeros(len(m), self.size, self.size, dtype=torch.uint8)
        if len(m):
            # (N, H, W) -> (N, nh, nw): nearest keeps the masks binary. "nearest-exact" reads the
            # source pixel under each output pixel's centre, as the bilinear image resize does;
            # "nearest" reads floor(i / scale), shifting masks up-left against the image and never
            # reading the last source row/column when downscaling.
            resized = F.interpolate(m[None].float(), size=(nh, nw), mode="nearest-exact")[0]
            net_masks[:, :nh, :nw] = resized.to(torch.uint8)
        sx, sy = nw / w, nh / h
        b = torch.from_numpy(boxes) * torch.tensor([sx, sy, sx, sy])
        out = {
            "image": canvas,
            "boxes": b.float(),
            "masks": net_masks,
            "labels": torch.as_tensor(item["labels"], dtype=torch.int64),
            "scale": torch.tensor([sx, sy]),
            "size": torch.tensor([nh, nw]),
            "name": item.get("name", ""),
        }
        if not self.train:
            out["orig_boxes"] = torch.from_numpy(boxes)
            out["orig_masks"] = m
            if "crowd_masks" in item:
                out["orig_crowd_masks"] = torch.from_numpy(
                    np.ascontiguousarray(item["crowd_masks"])
                )
                out["crowd_labels"] = torch.as_tensor(item["crowd_labels"], dtype=torch.int64)
        return out


def collate_instances(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks images; keeps per-image instance tensors as lists (their counts differ)."""
    batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    keys = ("boxes", "masks", "labels", "orig_boxes", "orig_masks", "orig_crowd_masks")
    for key in (*keys, "crowd_labels", "name"):
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    batch["scale"] = torch.stack([it["scale"] for it in items])
    batch["size"] = torch.stack([it["size"] for it in items])
    if "index" in items[0]:
        batch["index"] = torch.tensor([int(it["index"]) for it in items])
    return batch


def network_images(image: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The network input of an instance batch, on the images' device.

    Args:
        image: ``(B, 3, S, S)`` uint8 RGB from :func:`collate_instances` (a floating-point
            tensor is taken as already normalised and returned unchanged).
        size: ``(B, 2)`` ``(h, w)`` of each resized image in its frame (the batch's ``size``),
            needed for uint8 images: without it their padding would stay black, not 0.

    Returns:
        ``(B, 3, S, S)`` float32 normalised by :func:`~datamodules.batch.normalize_image`, 0 (the
        mean colour) outside each image.
    """
    if image.is_floating_point():
        return image
    if size is None:
        raise ValueError(
            "a uint8 instance batch needs its 'size' ((B, 2) (h, w) of each image in its "
            "padded frame, as collate_instances makes it) to set the padding to the mean colour"
        )
    x = normalize_image(image)
    size = size.to(x.device)
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    inside = (rows[None, :, None] < size[:, 0, None, None]) & (
        cols[None, None, :] < size[:, 1, None, None]
    )  # (B, S, S)
    return x * inside[:, None]


class TransformedInstances(Dataset):
    """A raw instance dataset seen through :class:`InstanceTransform`.

    Indexed by ``index`` or, from :class:`~datamodules.base.EpochShuffleSampler`, by
    ``(index, sample_seed)``; items carry ``index`` (the dataset index) either way.
    """

    def __init__(self, raw: Dataset, transform: InstanceTransform) -> None:
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        # (index, seed) comes from EpochShuffleSampler: the seed alone fixes this draw's flip, so
        # a resumed run replays an epoch exactly. A plain index (evaluation, direct use) draws the
        # seed from torch's generator, which EpochSeed and the worker seeding keep reproducible.
        index, seed = index if isinstance(index, tuple) else (index, None)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        rng = np.random.default_rng(seed)
        return {**self.transform(self.raw[index], rng), "index": int(index)}


class InstanceDataModule(LightningDataModule, ABC):
    """Shared loaders of the instance datasets; subclasses implement :meth:`make_dataset`.

    The training loader follows :func:`~datamodules.base.training_order` (exact resumes; the last
    batch may be partial); the validation loader is in dataset order, one image per batch.

    Args:
        batch_size: images per batch (each brings all its instances).
        num_workers: loader processes (None: :func:`~datamodules.base.loader_workers` picks
            them from the CPUs per device); each runs OpenCV single-threaded.
        image_size: network-frame side S.
        pin_memory: DataLoader's (with CUDA only).
        max_instances: keep at most this many instances per training image (largest first; None =
            all): bounds the memory of crowded images.
        holdout: training images held out for model selection (an int count or a fraction of the
            training split; 0 = none). With a holdout, ``fit``'s validation loop
            (:meth:`val_dataloader`) scores those images and the training loader leaves them
            out, while :meth:`report_dataloader` always serves the validation split, so that
            checkpoint selection and sweeps never read the split whose scores are reported.
        holdout_seed: the fixed permutation choosing the held-out images.
    """

    def __init__(
        self,
        batch_size: int = 8,
        num_workers: int | None = None,
        image_size: int = 512,
        pin_memory: bool = False,
        max_instances: int | None = None,
        holdout: int | float = 0,
        holdout_seed: int = 0,
    ) -> None:
        super().__init__()
        if holdout < 0 or (isinstance(holdout, float) and holdout >= 1):
            raise ValueError(f"holdout={holdout}: a count >= 0 or a fraction in [0, 1)")
        self.holdout, self.holdout_seed = holdout, int(holdout_seed)
        self.batch_size = int(batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)
        self.image_size, self.pin_memory = int(image_size), bool(pin_memory)
        self.max_instances = max_instances
        self._sets: dict[str, Dataset] = {}

    @abstractmethod
    def make_dataset(self, split: str) -> Dataset:
        """The raw dataset of ``split`` (items as in this module's docstring)."""

    def dataset(self, split: str) -> Dataset:
        """``train``, ``val``, or ``holdout`` (the held-out training images; ``train`` then
        leaves them out)."""
        if split not in self._sets:
            if split in ("train", "holdout") and self.holdout:
                full = self.make_dataset("train")
                keep, held = self.holdout_indices(len(full))
                self._sets["train"], self._sets["holdout"] = Subset(full, keep), Subset(full, held)
            else:
                self._sets[split] = self.make_dataset(split)
        return self._sets[split]

    def holdout_indices(self, n: int) -> tuple[list[int], list[int]]:
        """``(kept, held out)`` training indices (sorted) for a training split of ``n`` images."""
        k = int(round(self.holdout * n)) if isinstance(self.holdout, float) else int(self.holdout)
        if not 0 < k < n:
            raise DatasetError(
                f"data.holdout={self.holdout}", f"holds out {k} of {n} training images"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.holdout_seed))
        held = sorted(perm[:k].tolist())
        held_set = set(held)
        return [i for i in range(n) if i not in held_set], held

    def _loader(self, split: str, train: bool) -> DataLoader:
        raw = self.dataset(split)
        if train and self.max_instances:
            raw = _CapInstances(raw, int(self.max_instances))
        data = TransformedInstances(raw, InstanceTransform(self.image_size, train=train))
        # Training: the order and each item's augmentation depend on (seed, epoch, index) only,
        # so resume=true equals an uninterrupted run. EpochShuffleSampler is a DistributedSampler
        # (split over the DDP ranks), which Lightning leaves in place. Evaluation: dataset order,
        # each image on one rank only (the AP merge also drops repeats by index, see
        # MaskAPAccumulator.merge).
        sampler, generator = (
            training_order(data, self.trainer)
            if train
            else (evaluation_order(data, self.trainer), None)
        )
        workers = loader_workers(self.num_workers, self.trainer)
        return DataLoader(
            data,
            batch_size=self.batch_size if train else 1,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            collate_fn=collate_instances,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=False,
            persistent_workers=workers > 0,
            worker_init_fn=loader_worker_init if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """The validation loop of ``fit``: the held-out training images if ``holdout``, else the
        validation split. One image per batch: masks are pasted at each image's resolution."""
        return self._loader("holdout" if self.holdout else "val", False)

    def report_dataloader(self) -> DataLoader:
        """The validation split, whose scores are reported (whatever ``holdout`` is)."""
        return self._loader("val", False)


class _CapInstances(Dataset):
    def __init__(self, raw: Dataset, cap: int) -> None:
        self.raw, self.cap = raw, cap

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.raw[index])
        if len(item["labels"]) > self.cap:
            keep = np.argsort(-item["masks"].reshape(len(item["masks"]), -1).sum(1), kind="stable")[
                : self.cap
            ]
            for key in ("masks", "boxes", "labels"):
                item[key] = item[key][keep]
        return item


# ---------------------------------------------------------------------- Cityscapes instances


def cityscapes_instances(inst: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Splits an instanceIds map into per-object masks.

    Args:
        inst: ``(H, W)`` int32 from :func:`~datamodules.cityscapes.read_instance_ids`: ``id*1000+k``
            for individual objects, the plain labelId for stuff and crowd groups (left out).
        classes: the labelIds to keep.

    Returns:
        ``masks`` (N, H, W) uint8 and ``labels`` (N,) int64 labelIds, in increasing instance value.
    """
    values = np.unique(inst[inst >= 1000])
    values = values[np.isin(values // 1000, np.asarray(list(classes)))]
    masks = (inst[None] == values[:, None, None]).astype(np.uint8)
    return masks, (values // 1000).astype(np.int64)


class CityscapesInstancesDataset(Dataset):
    """Cityscapes (gtFine) objects of the instance classes, from ``_gtFine_instanceIds.png``.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train`` or ``val``.
        classes: labelIds to keep (default: the 8 of :data:`CITYSCAPES_INSTANCE_CLASSES`).
        min_pixels: smaller objects are dropped (tiny far-away objects give degenerate crops).
        skip_empty: leave out images without any kept object (training).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Sequence[int] | None = None,
        min_pixels: int = 1,
        skip_empty: bool = False,
    ) -> None:
        from datamodules.cityscapes import CityscapesDataset

        # The parsing dataset indexes the split and checks that every instanceIds file exists.
        self.base = CityscapesDataset(root, split, instances=True)
        self.classes = tuple(classes) if classes is not None else tuple(CITYSCAPES_INSTANCE_CLASSES)
        self.min_pixels = int(min_pixels)
        self.ids = list(self.base.ids)
        if skip_empty:
            self.ids = [n for n in self.ids if len(self._instances(n)[1])]

    def _instances(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        from datamodules.cityscapes import read_instance_ids

        inst = read_instance_ids(self.base.gt_path(name, "_gtFine_instanceIds.png"))
        masks, labels = cityscapes_instances(inst, self.classes)
        keep = masks.reshape(len(masks), -1).sum(1) >= self.min_pixels
        return masks[keep], labels[keep]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        image = read_image(self.base.image_path(name))
        masks, labels = self._instances(name)
        if masks.shape[1:] != image.shape[:2]:
            raise DatasetError(
                self.base.gt_path(name, "_gtFine_instanceIds.png"), "size differs from the image"
            )
        return {
            "image": image,
            "masks": masks,
            "boxes": masks_to_boxes(masks),
            "labels": labels,
            "name": name,
        }


class CityscapesInstancesDataModule(InstanceDataModule):
    """Cityscapes instances (see :class:`CityscapesInstancesDataset`); other args as the base's."""

    def __init__(
        self, root: str, classes: Sequence[int] | None = None, min_pixels: int = 16, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.root, self.classes, self.min_pixels = root, classes, int(min_pixels)

    def make_dataset(self, split: str) -> Dataset:
        return CityscapesInstancesDataset(
            self.root, split, self.classes, self.min_pixels, skip_empty=split == "train"
        )


# ---------------------------------------------------------------------- MHPv2 person instances


class MHPPersonInstancesDataset(Dataset):
    """LV-MHP-v2 persons: one mask (any part > 0) per per-person annotation file, label 1.

    Args:
        root: the ``LV-MHP-v2`` folder.
        split: ``train`` or ``val``.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        from datamodules.mhp import MHPv2Dataset

        self.base = MHPv2Dataset(root, split)
        if not self.base.has_labels:
            raise DatasetError(self.base.anno_dir, "person instances need annotated splits")
        self.ids = list(self.base.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from datamodules.mhp import read_label

        name = self.ids[index]
        image = read_image(self.base.image_path(name))
        masks = [read_label(p) > 0 for p in self.base.label_paths(name)]
        # Each file is one person: persons overlap legitimately (no merge); empty files are dropped.
        masks = np.stack([m for m in masks if m.any()] or [np.zeros(image.shape[:2], bool)])
        masks = masks[masks.reshape(len(masks), -1).any(1)].astype(np.uint8)
        return {
            "image": image,
            "masks": masks,
            "boxes": masks_to_boxes(masks),
            "labels": np.ones(len(masks), np.int64),
            "name": name,
        }


class MHPPersonInstancesDataModule(InstanceDataModule):
    """MHPv2 person instances (see :class:`MHPPersonInstancesDataset`)."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root

    def make_dataset(self, split: str) -> Dataset:
        return MHPPersonInstancesDataset(self.root, split)


def save_mask_png(path: Path, mask: np.ndarray) -> None:
    """A binary mask as an 8-bit PNG (0 / 255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(path)
