"""Cityscapes (gtFine, 19 train classes): Dataset and LightningDataModule.

Layout as released (DATASETS.md 3.1); there are no list files, the split is the folder::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     8-bit, ids 0..33
                                          <city>_<seq>_<frame>_gtFine_instanceIds.png  16-bit
                                          <city>_<seq>_<frame>_gtFine_labelTrainIds.png  (generated
                                          by csCreateTrainIdLabelImgs or mmseg; not in the zips)

The mask is in trainIds (0..18, 255 = ignore), mapped from the labelIds through the official label
table of ``cityscapesscripts``; a ``labelTrainIds`` file is used when present and must agree with
that mapping. The test split's labels are placeholders, so it is served as images only.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import (
    ParsingDataModule,
    ParsingDataset,
    Transform,
    check_same_size,
    read_image,
    read_index_png,
    read_raw_png,
)
from datamodules.batch import IGNORE_INDEX, DatasetError
from datamodules.errors import require

log = logging.getLogger(__name__)

CITYSCAPES_NUM_CLASSES = 19
CITYSCAPES_FLIP_PAIRS: tuple[tuple[int, int], ...] = ()  # a mirrored street has no left/right ids

_SPLITS = ("train", "val", "test")
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_IDS = "_gtFine_labelIds.png"
_TRAIN_IDS = "_gtFine_labelTrainIds.png"
_INSTANCE_IDS = "_gtFine_instanceIds.png"


@functools.lru_cache(maxsize=1)
def cityscapes_labels() -> tuple[Any, ...]:
    """The official label table (``cityscapesscripts.helpers.labels.labels``): namedtuples with
    ``name, id, trainId, category, categoryId, hasInstances, ignoreInEval, color``."""
    require("cityscapesscripts.helpers.labels", "Cityscapes (its official label table)")
    from cityscapesscripts.helpers.labels import labels

    return tuple(labels)


@functools.lru_cache(maxsize=1)
def label_id_to_train_id() -> np.ndarray:
    """(256,) uint8 look-up table labelId -> trainId; unlisted ids and ignored classes -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in cityscapes_labels():
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            lut[label.id] = label.trainId
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=1)
def train_id_to_label_id() -> tuple[np.ndarray, np.ndarray]:
    """The way back, for cityscapesscripts' evaluation: (256,) uint8 look-up table
    trainId -> labelId (ignore 255 -> 0, "unlabeled") and the (256, 3) uint8 palette of the
    labelIds (each label's colour in the official table).

    Several labelIds share trainId 255, so the map is one-way: predictions only ever hold 0..18.
    """
    lut = np.zeros(256, dtype=np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)
    for label in cityscapes_labels():
        if 0 <= label.id < 256:
            colours[label.id] = label.color
        if 0 <= label.trainId < IGNORE_INDEX:
            lut[label.trainId] = label.id
    lut.flags.writeable = colours.flags.writeable = False
    return lut, colours


@functools.lru_cache(maxsize=1)
def _valid_label_ids() -> np.ndarray:
    """(256,) bool: the labelIds that the table defines (0..33; license plate -1 is never drawn)."""
    valid = np.zeros(256, dtype=bool)
    for label in cityscapes_labels():
        if 0 <= label.id < 256:
            valid[label.id] = True
    valid.flags.writeable = False
    return valid


@functools.lru_cache(maxsize=1)
def _train_classes() -> tuple[tuple[str, ...], np.ndarray]:
    by_train_id: dict[int, Any] = {}
    for label in cityscapes_labels():
        if 0 <= label.trainId < IGNORE_INDEX:
            by_train_id.setdefault(label.trainId, label)
    if sorted(by_train_id) != list(range(CITYSCAPES_NUM_CLASSES)):
        raise RuntimeError(
            f"cityscapesscripts' label table has trainIds {sorted(by_train_id)}, expected 0..18"
        )
    ordered = [by_train_id[t] for t in range(CITYSCAPES_NUM_CLASSES)]
    palette = np.array([label.color for label in ordered], dtype=np.uint8)
    palette.flags.writeable = False
    return tuple(label.name for label in ordered), palette


def __getattr__(name: str) -> Any:
    # CITYSCAPES_CLASSES and CITYSCAPES_PALETTE come from the cityscapesscripts table; computing
    # them on first access keeps this module importable (configs, tests) without the package.
    if name == "CITYSCAPES_CLASSES":
        return _train_classes()[0]  # 19 names in trainId order ("road", ..., "bicycle")
    if name == "CITYSCAPES_PALETTE":
        return _train_classes()[1]  # (19, 3) uint8 RGB, the official colours
    if name == "CITYSCAPES_ID_TO_TRAINID":
        return label_id_to_train_id()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_label_ids(path: Path) -> np.ndarray:
    """One ``_gtFine_labelIds.png``: 8-bit ids that the label table defines.

    Returns:
        (H, W) uint8 labelIds.
    """
    ids = read_index_png(path, "labelIds")
    bad = ~_valid_label_ids()[ids]
    if bad.any():
        raise DatasetError(
            path, f"labelId {int(ids[bad].max())} is not in the Cityscapes label table (0..33)"
        )
    return ids


def read_train_ids(path: Path) -> np.ndarray:
    """One ``_gtFine_labelTrainIds.png``: 8-bit values 0..18 or 255.

    Returns:
        (H, W) uint8 trainIds.
    """
    train = read_index_png(path, "labelTrainIds")
    bad = (train >= CITYSCAPES_NUM_CLASSES) & (train != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(path, f"trainId {int(train[bad].max())} outside 0..18 and 255")
    return train


def read_instance_ids(path: Path) -> np.ndarray:
    """One 16-bit ``_gtFine_instanceIds.png`` without wrap-around: ``id*1000+k`` for individual
    objects of instance classes, the plain labelId (< 1000) for stuff and groups.

    Returns:
        (H, W) int32.
    """
    # Pillow gives mode I;16 (uint16) or I (int32) depending on its version; never
    # convert("L") (clips) or cast to uint8 (wraps 26001 to 145).
    arr = read_raw_png(
        path, "instanceIds", lambda mode: mode.startswith("I"), "16-bit single-channel"
    )
    inst = arr.astype(np.int32)
    if inst.size:
        semantic = np.where(inst >= 1000, inst // 1000, inst)
        bad = (inst < 0) | (semantic > 255)
        bad[~bad] = ~_valid_label_ids()[semantic[~bad]]
        if bad.any():
            raise DatasetError(
                path, f"instance value {int(inst[bad][0])} has no labelId of the label table"
            )
    return inst


class CityscapesDataset(ParsingDataset):
    """One split of Cityscapes (fine annotations) in its released layout, files sorted.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val`` or ``test`` (images only: its labels are placeholders).
        transform: callable taking and returning the item dict; None returns the raw item
            (``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8 trainIds with 255 = ignore,
            ``name`` ``<city>_<seq>_<frame>``).
        skip_bad: skip bad samples (see :class:`~datamodules.base.ParsingDataset`).
        instances: also return ``instances`` (H, W) int32 from ``_gtFine_instanceIds.png``
            (``id*1000+k`` kept as is; labelled splits only).
        cache_dir: pixel-count cache folder when ``root`` is read-only.
    """

    dataset_name = "Cityscapes"

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        skip_bad: bool = False,
        instances: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(root, split, transform, skip_bad, CITYSCAPES_NUM_CLASSES, cache_dir)
        if split not in _SPLITS:
            raise ValueError(f"unknown Cityscapes split '{split}' (expected train, val or test)")
        self.lut = label_id_to_train_id()  # fails early, with the pip hint, without the package
        self.instances = bool(instances)
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset root not found (expected the cityscapes folder)")
        self.image_dir = self.index_source = self.root / "leftImg8bit" / split
        self.gt_dir = self.root / "gtFine" / split
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, "image folder not found")
        self.has_labels = split != "test"
        if self.has_labels and not self.gt_dir.is_dir():
            raise DatasetError(self.gt_dir, "annotation folder not found")

        # (city, stem) in sorted order: os.listdir order differs between file systems.
        samples: list[tuple[str, str]] = []
        for city in sorted(e.name for e in os.scandir(self.image_dir) if e.is_dir()):
            with os.scandir(self.image_dir / city) as it:
                stems = [
                    e.name[: -len(_IMAGE_SUFFIX)] for e in it if e.name.endswith(_IMAGE_SUFFIX)
                ]
            samples += [(city, stem) for stem in sorted(stems)]
        if not samples:
            raise DatasetError(self.image_dir, f"split '{split}' is empty (no *{_IMAGE_SUFFIX})")

        self._city: dict[str, str] = {}
        self._has_train_ids: dict[str, bool] = {}
        self._has_label_ids: dict[str, bool] = {}
        gt_names: dict[str, set[str]] = {}
        for city, stem in samples:
            problem = None
            if self.has_labels:
                if city not in gt_names:
                    city_dir = self.gt_dir / city
                    gt_names[city] = set(os.listdir(city_dir)) if city_dir.is_dir() else set()
                names = gt_names[city]
                self._has_label_ids[stem] = f"{stem}{_LABEL_IDS}" in names
                self._has_train_ids[stem] = f"{stem}{_TRAIN_IDS}" in names
                if not (self._has_label_ids[stem] or self._has_train_ids[stem]):
                    problem = DatasetError(
                        self.gt_dir / city / f"{stem}{_LABEL_IDS}", "label file not found"
                    )
                elif self.instances and f"{stem}{_INSTANCE_IDS}" not in names:
                    problem = DatasetError(
                        self.gt_dir / city / f"{stem}{_INSTANCE_IDS}", "instance file not found"
                    )
            if self._add_sample(stem, problem):
                self._city[stem] = city
        self._finish_index()

    # -- paths ----------------------------------------------------------------------------------

    def image_path(self, name: str) -> Path:
        return self.image_dir / self._city[name] / f"{name}{_IMAGE_SUFFIX}"

    def gt_path(self, name: str, suffix: str = _LABEL_IDS) -> Path:
        """``gtFine/<split>/<city>/<name><suffix>``, e.g. ``suffix="_gtFine_instanceIds.png"``."""
        return self.gt_dir / self._city[name] / f"{name}{suffix}"

    # -- loading --------------------------------------------------------------------------------

    def load_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8 trainIds of sample ``index`` (255 = ignore).

        ``LUT[labelIds]``; when a ``labelTrainIds`` file exists it is read too and must agree.
        """
        name = self.ids[index]
        mapped = None
        if self._has_label_ids[name]:
            mapped = self.lut[read_label_ids(self.gt_path(name, _LABEL_IDS))]
        if not self._has_train_ids[name]:
            return mapped
        path = self.gt_path(name, _TRAIN_IDS)
        train = read_train_ids(path)
        if mapped is not None:
            if train.shape != mapped.shape:
                raise DatasetError(
                    path,
                    f"size {train.shape[1]}x{train.shape[0]} (WxH) differs from the labelIds "
                    f"file's {mapped.shape[1]}x{mapped.shape[0]}",
                )
            wrong = train != mapped
            if wrong.any():
                y, x = (int(v[0]) for v in np.nonzero(wrong))
                raise DatasetError(
                    path,
                    f"{int(wrong.sum())} pixels disagree with the labelIds mapped through the "
                    f"label table (first at y={y}, x={x}: file has {int(train[y, x])}, labelIds "
                    f"give {int(mapped[y, x])})",
                )
        return train

    def load(self, index: int) -> dict[str, Any]:
        name = self.ids[index]
        image = read_image(self.image_path(name))
        item: dict[str, Any] = {"image": image, "name": name}
        if self.has_labels:
            mask = self.load_mask(index)
            suffix = _LABEL_IDS if self._has_label_ids[name] else _TRAIN_IDS
            check_same_size(mask, image, self.gt_path(name, suffix), f"{name}{_IMAGE_SUFFIX}")
            item["mask"] = mask.astype(np.uint8, copy=False)
            if self.instances:
                path = self.gt_path(name, _INSTANCE_IDS)
                inst = read_instance_ids(path)
                check_same_size(inst, image, path, f"{name}{_IMAGE_SUFFIX}")
                item["instances"] = inst
        return item


class CityscapesDataModule(ParsingDataModule):
    """Cityscapes (fine) for Lightning: train / val, and the unlabelled test split for predict.

    Arguments as :class:`~datamodules.base.ParsingDataModule`; the defaults follow mmseg's
    Cityscapes recipe (512x1024 crops, scale 0.5-2.0, no rotation). ``eval_size`` None means the
    full resolution (no resize at evaluation). Class names and palette default to the official
    label table's 19 train classes.
    """

    dataset_name = "Cityscapes"
    test_labels_hint = "the released test labels are placeholders"
    full_resolution_eval = True

    def __init__(self, root: str, **kwargs: Any) -> None:
        num_classes = kwargs.get("num_classes", CITYSCAPES_NUM_CLASSES)
        if int(num_classes) != CITYSCAPES_NUM_CLASSES:
            raise ValueError(
                f"Cityscapes has {CITYSCAPES_NUM_CLASSES} train classes, got {num_classes}"
            )
        defaults: dict[str, Any] = {
            "batch_size": 8,
            "crop_size": (512, 1024),
            "rotate": 0.0,
            "num_classes": CITYSCAPES_NUM_CLASSES,
            "flip_pairs": CITYSCAPES_FLIP_PAIRS,
        }
        # Names and palette from the label table, looked up only when needed, so that explicit
        # ones work without the package.
        if kwargs.get("class_names") is None or kwargs.get("palette") is None:
            names, colours = _train_classes()
            defaults.update(class_names=names, palette=colours.tolist())
        super().__init__(root, **self.with_defaults(kwargs, defaults))

    @staticmethod
    def to_dataset_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted trainIds ``(H, W)`` as official labelIds (what cityscapesscripts'
        evaluation reads), with the labelId palette."""
        lut, colours = train_id_to_label_id()
        return lut[np.asarray(ids, dtype=np.uint8)], colours

    def has_split(self, split: str) -> bool:
        return (self.root / "leftImg8bit" / split).is_dir()

    def split_has_labels(self, split: str) -> bool:
        return split != "test" and (self.root / "gtFine" / split).is_dir()

    def make_dataset(self, split: str, transform: Transform | None) -> CityscapesDataset:
        return CityscapesDataset(
            self.root, split, transform=transform, skip_bad=self.skip_bad, cache_dir=self.cache_dir
        )
