"""COCO-format instance masks (polygons or RLE, decoded with pycocotools) and a generated shapes set.

Layout (COCO 2017 as released)::

    <root>/annotations/instances_{train,val}2017.json
    <root>/{train,val}2017/<file_name>

Items follow :mod:`datamodules.instances`; labels are the json's own category ids (COCO's official
ids for COCO, so ``allowed_mask_classes`` presets apply unchanged). Annotations with an empty mask
are left out; images without any remaining instance are dropped. Crowd annotations (``iscrowd=1``)
are never instances; with ``load_crowd`` (the validation split) they come as ``crowd_masks`` /
``crowd_labels`` for COCO's evaluation rule (predictions matching a crowd region are ignored).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import read_image
from datamodules.batch import DatasetError
from datamodules.errors import require
from datamodules.files import generated_folder
from datamodules.instances import InstanceDataModule

log = logging.getLogger(__name__)


def _coco(ann_file: Path) -> Any:
    require("pycocotools", "COCO-format data")
    import contextlib
    import io

    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise DatasetError(ann_file, "annotation json not found")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        return COCO(str(ann_file))


class CocoInstancesDataset(Dataset):
    """Images of a COCO instances json with at least one usable instance.

    Args:
        ann_file: the instances json.
        image_dir: folder of the images (``file_name`` is relative to it).
        category_ids: keep only these categories (None = all).
        load_crowd: also return the image's crowd regions (``crowd_masks`` (K, H, W) uint8,
            ``crowd_labels`` (K,)), for evaluation.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        category_ids: Sequence[int] | None = None,
        load_crowd: bool = False,
    ):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.coco = _coco(self.ann_file)
        cats = (
            set(self.coco.getCatIds()) if category_ids is None else {int(c) for c in category_ids}
        )
        self.load_crowd = bool(load_crowd)
        self.ids: list[int] = []
        self._anns: dict[int, list[dict[str, Any]]] = {}
        self._crowds: dict[int, list[dict[str, Any]]] = {}
        for img_id in sorted(self.coco.getImgIds()):
            anns = [
                a
                for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=False))
                if a["category_id"] in cats
                and a.get("area", 1) > 0
                and a["bbox"][2] >= 1
                and a["bbox"][3] >= 1
            ]
            if anns:
                self.ids.append(img_id)
                self._anns[img_id] = anns
                self._crowds[img_id] = [
                    a
                    for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=True))
                    if a["category_id"] in cats
                ]
        if not self.ids:
            raise DatasetError(self.ann_file, "no image with a usable instance")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_id = self.ids[index]
        info = self.coco.loadImgs(img_id)[0]
        path = self.image_dir / info["file_name"]
        image = read_image(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                path,
                f"image is {image.shape[1]}x{image.shape[0]}, json says {info['width']}x{info['height']}",
            )
        anns = self._anns[img_id]
        masks = np.stack([self.coco.annToMask(a) for a in anns]).astype(np.uint8)  # (N, H, W)
        boxes = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32
        )
        keep = masks.reshape(len(masks), -1).any(1)
        item = {
            "image": image,
            "masks": masks[keep],
            "boxes": boxes[keep],
            "labels": np.array([a["category_id"] for a in anns], np.int64)[keep],
            "name": str(info["file_name"]),
        }
        if self.load_crowd:
            crowds = self._crowds[img_id]
            h, w = image.shape[:2]
            item["crowd_masks"] = (
                np.stack([self.coco.annToMask(a) for a in crowds]).astype(np.uint8)
                if crowds
                else np.zeros((0, h, w), np.uint8)
            )  # (K, H, W)
            item["crowd_labels"] = np.array([a["category_id"] for a in crowds], np.int64)
        return item


class CocoInstancesDataModule(InstanceDataModule):
    """COCO-format instances.

    Args:
        root: dataset folder.
        train_ann, val_ann: instances jsons relative to ``root``.
        train_images, val_images: image folders relative to ``root``.
        category_ids: categories to load (None = all).
        **kwargs: :class:`~datamodules.instances.InstanceDataModule`'s.
    """

    def __init__(
        self,
        root: str,
        train_ann: str = "annotations/instances_train2017.json",
        val_ann: str = "annotations/instances_val2017.json",
        train_images: str = "train2017",
        val_images: str = "val2017",
        category_ids: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.files = {"train": (train_ann, train_images), "val": (val_ann, val_images)}
        self.category_ids = category_ids

    def make_dataset(self, split: str) -> Dataset:
        ann, images = self.files[split]
        # Crowd regions matter to the evaluation only (they are never training instances).
        return CocoInstancesDataset(
            self.root / ann, self.root / images, self.category_ids, load_crowd=split != "train"
        )


# ---------------------------------------------------------------------- generated shapes

SHAPE_CLASSES = {1: "rectangle", 2: "ellipse", 3: "triangle"}
SHAPES_VERSION = 1  # bump whenever the drawing changes: stale sets are regenerated
SHAPES_MARKER = ".synthetic_shapes.json"


def _rle_json(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_synthetic_shapes(
    root: str | Path,
    num_train: int = 32,
    num_val: int = 8,
    image_size: int = 64,
    max_shapes: int = 3,
    seed: int = 0,
) -> Path:
    """Writes a COCO-format set of rectangles (polygons), ellipses (RLE) and triangles (polygons).

    Shapes are filled with a random colour over a noisy background and may overlap (later ones on
    top; the annotations of covered parts are cut accordingly). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    for split, num in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(num):
            img = rng.integers(60, 120, (s, s, 3)).astype(np.uint8)
            shapes = []
            for _ in range(int(rng.integers(1, max_shapes + 1))):
                cls = int(rng.integers(1, 4))
                w, h = rng.uniform(0.25, 0.5, 2) * s
                x0, y0 = rng.uniform(0, s - w), rng.uniform(0, s - h)
                x0, y0, w, h = round(x0), round(y0), round(w), round(h)
                if cls == 1:
                    poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
                elif cls == 3:
                    poly = [x0 + w / 2, y0, x0 + w, y0 + h, x0, y0 + h]
                else:
                    poly = None
                if poly is None:
                    m = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
                else:
                    from pycocotools import mask as mask_utils

                    m = mask_utils.decode(
                        mask_utils.merge(mask_utils.frPyObjects([poly], s, s))
                    ).astype(bool)
                for prev in shapes:  # the new shape covers the earlier ones
                    prev["mask"] &= ~m
                shapes.append({"cls": cls, "mask": m, "poly": poly})
                img[m] = rng.integers(130, 255, 3)
            name = f"{split}_{i:04d}.png"
            Image.fromarray(img).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "height": s, "width": s})
            for sh in shapes:
                m = sh["mask"]
                if m.sum() < 4:
                    continue
                ys, xs = np.nonzero(m)
                # A covered polygon is no longer its polygon: store it as RLE then.
                full = sh["poly"] is not None and m.sum() == _poly_area(sh["poly"], s)
                seg = [sh["poly"]] if full else _rle_json(m)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": sh["cls"],
                        "segmentation": seg,
                        "area": float(m.sum()),
                        "bbox": [
                            float(xs.min()),
                            float(ys.min()),
                            float(xs.max() - xs.min() + 1),
                            float(ys.max() - ys.min() + 1),
                        ],
                        "iscrowd": 0,
                    }
                )
        data = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k, "name": v} for k, v in SHAPE_CLASSES.items()],
        }
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def ensure_synthetic_shapes(root: str | Path, **params: Any) -> Path:
    """:func:`make_synthetic_shapes` under ``root`` with ``params``, unless that set is there:
    generated in a temporary folder renamed into place when complete
    (:func:`datamodules.files.generated_folder`), again when ``params`` change."""
    bound = inspect.signature(make_synthetic_shapes).bind(root, **params)
    bound.apply_defaults()
    record = {"version": SHAPES_VERSION, **dict(bound.arguments)}
    del record["root"]

    def write(out: Path) -> None:
        log.info("generating synthetic shapes under %s", root)
        make_synthetic_shapes(out, **params)

    return generated_folder(root, record, write, SHAPES_MARKER)


def _poly_area(poly: list[float], s: int) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], s, s))).sum())


class SyntheticShapesDataModule(CocoInstancesDataModule):
    """Generated shapes in COCO format under ``root`` (created on first use).

    Args:
        root: output folder of :func:`make_synthetic_shapes` (generated by
            :func:`ensure_synthetic_shapes`).
        synthetic: its keyword arguments (``num_train``, ``num_val``, ``image_size``, ...).
    """

    def __init__(self, root: str, synthetic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs = {
            "train_ann": "annotations/instances_train.json",
            "val_ann": "annotations/instances_val.json",
            "train_images": "train",
            "val_images": "val",
            **kwargs,
        }
        super().__init__(root, **kwargs)
        self.synthetic = dict(synthetic or {})

    def prepare_data(self) -> None:
        ensure_synthetic_shapes(self.root, **self.synthetic)

    def make_dataset(self, split: str) -> Dataset:
        self.prepare_data()
        return super().make_dataset(split)
