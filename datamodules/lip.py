"""LIP (Look Into Person, single-person parsing, 20 classes): Dataset and LightningDataModule.

The release is a set of zips whose extraction lands in one of three layouts (DATASETS.md 1.1);
every one of them is found under the same ``root``::

    flat (SCHP, mmseg docs)     <root>/{train,val}_images/<id>.jpg, <root>/{train,val}_segmentations/
                                <id>.png, <root>/{train,val}_id.txt
    same-named folders          <root>/TrainVal_images/{train,val}_images/, {train,val}_id.txt
                                <root>/TrainVal_parsing_annotations/{train,val}_segmentations/
    doubly nested (tensorbay)   <root>/TrainVal_images/TrainVal_images/{train,val}_images/ (the id
                                lists in the outer TrainVal_images/), likewise for the annotations
    test                        <root>/Testing_images/testing_images/<id>.jpg + Testing_images/
                                test_id.txt (or flat <root>/test_images/ + <root>/test_id.txt)

Labels are 8-bit single-channel PNGs holding the class id 0..19 (no 255 in the ground truth); the
test split has no labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import (
    ParsingDataModule,
    ParsingDataset,
    ReductionRule,
    Transform,
    check_same_size,
    first_existing,
    read_image_reduced,
    read_index_png,
)
from datamodules.batch import DatasetError
from datamodules.transforms import EvalTransform, build_eval_transform

log = logging.getLogger(__name__)

LIP_NUM_CLASSES = 20
# Id order of SCHP, mmseg's LIPDataset and the LIP site (DATASETS.md 1.2). CIHP differs at id 10.
LIP_CLASSES: tuple[str, ...] = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks",
    "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe",
)  # fmt: skip
LIP_FLIP_PAIRS: tuple[tuple[int, int], ...] = ((14, 15), (16, 17), (18, 19))
# mmseg's LIPDataset.METAINFO palette (visualisation only; not in the data).
LIP_PALETTE: np.ndarray = np.array(
    [
        [0, 0, 0], [128, 0, 0], [255, 0, 0], [0, 85, 0], [170, 0, 51], [255, 85, 0], [0, 0, 85],
        [0, 119, 221], [85, 85, 0], [0, 85, 85], [85, 51, 0], [52, 86, 128], [0, 128, 0],
        [0, 0, 255], [51, 170, 221], [0, 255, 255], [85, 255, 170], [170, 255, 85],
        [255, 255, 0], [255, 170, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip

_SPLITS = ("train", "val", "test")


def lip_candidates(root: Path, split: str) -> dict[str, list[Path]]:
    """Where the three released layouts put a split's images, labels and id list, probe order.

    Returns:
        ``{"images": [...], "labels": [...], "list": [...]}``; ``labels`` is empty for ``test``.
    """
    if split == "test":
        return {
            "images": [
                root / "Testing_images" / "testing_images",
                root / "testing_images",
                root / "test_images",
                root / "Testing_images" / "Testing_images" / "testing_images",
            ],
            "labels": [],
            "list": [
                root / "Testing_images" / "test_id.txt",
                root / "test_id.txt",
                root / "Testing_images" / "Testing_images" / "test_id.txt",
            ],
        }
    images, labels = f"{split}_images", f"{split}_segmentations"
    tv_img, tv_ann = "TrainVal_images", "TrainVal_parsing_annotations"
    return {
        "images": [root / images, root / tv_img / images, root / tv_img / tv_img / images],
        "labels": [root / labels, root / tv_ann / labels, root / tv_ann / tv_ann / labels],
        "list": [
            root / f"{split}_id.txt",
            root / tv_img / f"{split}_id.txt",
            root / tv_img / tv_img / f"{split}_id.txt",
        ],
    }


def read_id_list(path: Path) -> list[str]:
    """Bare ids, one a line; CRLF, blank lines and surrounding spaces are tolerated."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"unreadable id list ({e})") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_lip_label(path: Path, num_classes: int = LIP_NUM_CLASSES) -> np.ndarray:
    """One LIP label: 8-bit grayscale (or palette indices), values ``0..num_classes-1``.

    Returns:
        (H, W) uint8 class ids.
    """
    label = read_index_png(path)
    if label.size and int(label.max()) >= num_classes:
        raise DatasetError(path, f"label value {int(label.max())} outside 0..{num_classes - 1}")
    return label


class LIPDataset(ParsingDataset):
    """One split of LIP in any of its released layouts.

    Args:
        root: the ``LIP`` folder.
        split: ``train``, ``val`` or ``test`` (images only).
        transform: callable taking and returning the item dict; None returns the raw item
            (``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8, ``name``).
        skip_bad: skip bad samples (see :class:`~datamodules.base.ParsingDataset`).
        num_classes: valid label ids are ``0..num_classes-1``.
        cache_dir: pixel-count cache folder when ``root`` is read-only.
    """

    dataset_name = "LIP"
    decodes_reduced = True

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        skip_bad: bool = False,
        num_classes: int = LIP_NUM_CLASSES,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(root, split, transform, skip_bad, num_classes, cache_dir)
        if split not in _SPLITS:
            raise ValueError(f"unknown LIP split '{split}' (expected train, val or test)")
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset root not found (expected the LIP folder)")
        where = lip_candidates(self.root, split)
        list_file = first_existing(where["list"], "file")
        if list_file is None:
            raise DatasetError(
                where["list"][0],
                f"id list of split '{split}' not found (looked for {_rel(where['list'], self.root)})",
            )
        self.list_file = self.index_source = list_file
        image_dir = first_existing(where["images"])
        if image_dir is None:
            raise DatasetError(
                where["images"][0],
                f"image folder of split '{split}' not found "
                f"(looked for {_rel(where['images'], self.root)})",
            )
        self.image_dir = image_dir
        self.has_labels = split != "test"
        self.label_dir: Path | None = None
        if self.has_labels:
            self.label_dir = first_existing(where["labels"])
            if self.label_dir is None:
                raise DatasetError(
                    where["labels"][0],
                    f"label folder of split '{split}' not found "
                    f"(looked for {_rel(where['labels'], self.root)})",
                )

        listed = read_id_list(list_file)
        if not listed:
            raise DatasetError(list_file, f"split '{split}' is empty")
        with os.scandir(self.image_dir) as it:
            image_names = {e.name for e in it}
        label_names: set[str] = set()
        if self.label_dir is not None:
            with os.scandir(self.label_dir) as it:
                label_names = {e.name for e in it}
        for name in listed:
            problem = None
            if f"{name}.jpg" not in image_names:
                problem = DatasetError(self.image_path(name), "listed image not found")
            elif self.has_labels and f"{name}.png" not in label_names:
                problem = DatasetError(self.label_path(name), "listed label not found")
            self._add_sample(name, problem)
        self._finish_index()

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        if self.label_dir is None:
            raise DatasetError(self.image_dir, f"split '{self.split}' has no labels")
        return self.label_dir / f"{name}.png"

    def load_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8 class ids of sample ``index``."""
        return read_lip_label(self.label_path(self.ids[index]), self.num_classes)

    def load(self, index: int, reduction: ReductionRule | None = None) -> dict[str, Any]:
        """Raw item ``index``; ``reduction`` may decode the JPEG at a reduced size (the item then
        says ``image_reduction``; the label keeps the stored size)."""
        name = self.ids[index]
        # grayscale JPEGs come out as 3 equal channels
        image, r = read_image_reduced(self.image_path(name), reduction)
        item: dict[str, Any] = {"image": image, "name": name}
        if r != 1:
            item["image_reduction"] = r
        if self.has_labels:
            mask = self.load_mask(index)
            check_same_size(mask, image, self.label_path(name), f"{name}.jpg", r)
            item["mask"] = mask
        return item


def _rel(paths: Sequence[Path], root: Path) -> str:
    return ", ".join(str(p.relative_to(root)) for p in paths)


class LIPDataModule(ParsingDataModule):
    """LIP for Lightning (train / val / unlabelled test).

    Arguments as :class:`~datamodules.base.ParsingDataModule`; the defaults follow SCHP's LIP
    recipe (473x473 crops, scale 0.75-1.25, rotation up to 30 degrees) and LIP's 20 classes,
    left/right pairs and mmseg palette.

    Args:
        eval_affine: SCHP's official evaluation input (``LIPDataValSet``; set by
            ``eval=schp_official``): each evaluation image is warped into the fixed input
            (the ``base_size`` fit with ``base_side: long``, or ``eval_size``) by SCHP's affine
            (``datamodules.transforms.schp_affine_image``) instead of rimlab's letterbox, and
            batches carry ``inverse_affine``: the evaluation arg-maxes at the input and warps the
            labels back by nearest neighbour (``lightning_modules.inference``,
            ``docs/schp.md``).
    """

    dataset_name = "LIP"

    def __init__(self, root: str, eval_affine: bool = False, **kwargs: Any) -> None:
        defaults = {
            "crop_size": (473, 473),
            "scale_range": (0.75, 1.25),
            "rotate": 30.0,
            "num_classes": LIP_NUM_CLASSES,
            "class_names": LIP_CLASSES,
            "flip_pairs": LIP_FLIP_PAIRS,
            "palette": LIP_PALETTE.tolist(),
        }
        super().__init__(root, **self.with_defaults(kwargs, defaults))
        self.eval_affine = bool(eval_affine)

    def eval_transform(self) -> EvalTransform:
        if not self.eval_affine:
            return super().eval_transform()
        return build_eval_transform(
            self.eval_size, base_size=self.eval_base_size, base_side=self.base_side, affine=True
        )

    def has_split(self, split: str) -> bool:
        where = lip_candidates(self.root, split)
        return (
            first_existing(where["list"], "file") is not None
            and first_existing(where["images"]) is not None
        )

    def split_has_labels(self, split: str) -> bool:
        # The LIP test split ships without annotations.
        return (
            split != "test"
            and first_existing(lip_candidates(self.root, split)["labels"]) is not None
        )

    def make_dataset(self, split: str, transform: Transform | None) -> LIPDataset:
        return LIPDataset(
            self.root,
            split,
            transform=transform,
            skip_bad=self.skip_bad,
            num_classes=self._num_classes,
            cache_dir=self.cache_dir,
        )
