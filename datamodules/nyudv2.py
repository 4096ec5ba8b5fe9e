"""NYU Depth V2, labeled subset (1449 indoor RGB-D frames, 40 or 13 classes): Dataset and
LightningDataModule.

Files under ``root`` (DATASETS.md 4.1)::

    <root>/nyu_depth_v2_labeled.mat   MATLAB v7.3, i.e. HDF5 (read with h5py; scipy cannot)
    <root>/splits.mat                 MAT v5: trainNdxs (795x1), testNdxs (654x1), 1-based frames

MATLAB stores column-major and h5py reverses the axes, so the file holds ``images`` as
(N, 3, W, H) uint8, ``labels`` as (N, W, H) uint16 (0 = unlabeled, 1..894 = raw NYU class ids) and
``depths`` as (N, W, H) float32 metres; frame ``i`` is ``images[i].transpose(2, 1, 0)``,
``labels[i].T`` and ``depths[i].T``.

Raw ids are mapped to Gupta et al.'s 40 classes with ``mapClass`` (classMapping40.mat) and, for 13
classes, ``labels13`` (class13Mapping.mat) is applied on top of the 40-class id. Both tables ship
as package data (``nyu_mapping.json``, transcribed from DATASETS.md Appendix A); a user's
``classMapping40.mat`` can replace ``mapClass``. Classes are numbered from 0 (40-id 1 "wall" -> 0)
and unlabeled (0) becomes 255 = ignore, as in VainF's extraction (``uint8(lab40) - 1``).

NYU has no validation split: the standard protocol trains on the 795 train frames and reports the
654 test frames, so the datamodule validates and tests on ``test``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from datamodules.base import ParsingDataModule, ParsingDataset, Transform
from datamodules.batch import IGNORE_INDEX, DatasetError
from datamodules.errors import require

log = logging.getLogger(__name__)

LABELED_FILE = "nyu_depth_v2_labeled.mat"
SPLITS_FILE = "splits.mat"
NYU_NUM_RAW = 894  # raw class ids 1..894 (0 = unlabeled)
NYU_NUM_CLASSES = (40, 13)
# "val" is an alias of "test": NYU has no separate validation split.
_SPLIT_KEYS: dict[str, str] = {"train": "trainNdxs", "test": "testNdxs", "val": "testNdxs"}
_MAPPING_RESOURCE = "nyu_mapping.json"


@dataclass(frozen=True)
class NYUMapping:
    """The 894 -> 40 -> 13 class tables, 1-based as in the .mat files.

    Attributes:
        map_class: (894,) uint8, entry ``k-1`` = 40-class id (1..40) of raw label ``k``.
        labels13: (40,) uint8, entry ``c-1`` = 13-class id (1..13) of 40-class id ``c``.
        names40: the 40 class names (``className``, in 40-id order).
        names13: the 13 class names (``classMapping13.classNames``, in 13-id order).
    """

    map_class: np.ndarray
    labels13: np.ndarray
    names40: tuple[str, ...]
    names13: tuple[str, ...]

    def lut(self, num_classes: int = 40) -> np.ndarray:
        """Raw id -> training class id.

        Returns:
            (895,) uint8: index 0 (unlabeled) -> 255, raw id ``k`` -> ``0..num_classes-1``.
        """
        if num_classes not in NYU_NUM_CLASSES:
            raise ValueError(f"NYUDv2 has 40 or 13 classes, got num_classes={num_classes}")
        ids = self.map_class.astype(np.int64)  # 1..40
        if num_classes == 13:
            ids = self.labels13.astype(np.int64)[ids - 1]  # 1..13, applied on top of the 40-map
        lut = np.empty(len(ids) + 1, dtype=np.uint8)
        lut[0] = IGNORE_INDEX
        lut[1:] = ids - 1  # 1-based -> 0-based
        lut.flags.writeable = False
        return lut

    def digest(self) -> str:
        """Identifies the tables (for the class-count cache)."""
        return hashlib.sha1(self.map_class.tobytes() + self.labels13.tobytes()).hexdigest()[:12]


def _checked_table(values: Any, length: int, top: int, source: Path | str, what: str) -> np.ndarray:
    arr = np.asarray(values).ravel()
    if arr.size != length or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(
            source, f"{what} has {arr.size} entries of {arr.dtype}; expected {length}"
        )
    if (arr != np.round(arr)).any() or arr.min() < 1 or arr.max() > top:
        raise DatasetError(source, f"{what} values must be integers 1..{top}")
    return arr.astype(np.uint8)


def _from_json(data: Mapping[str, Any], source: Path | str) -> NYUMapping:
    try:
        names40, names13 = tuple(data["classNames40"]), tuple(data["classNames13"])
        map_class, labels13 = data["mapClass"], data["labels13"]
    except (KeyError, TypeError) as e:
        raise DatasetError(source, f"mapping JSON lacks {e}") from e
    if len(names40) != 40 or len(names13) != 13:
        raise DatasetError(source, "mapping JSON needs 40 classNames40 and 13 classNames13")
    return NYUMapping(
        map_class=_checked_table(map_class, NYU_NUM_RAW, 40, source, "mapClass"),
        labels13=_checked_table(labels13, 40, 13, source, "labels13"),
        names40=names40,
        names13=names13,
    )


@functools.lru_cache(maxsize=1)
def package_mapping() -> NYUMapping:
    """The tables shipped as package data (``datamodules/nyu_mapping.json``)."""
    text = resources.files("datamodules").joinpath(_MAPPING_RESOURCE).read_text()
    return _from_json(json.loads(text), _MAPPING_RESOURCE)


def load_mapping(mapping_file: str | Path | None = None) -> NYUMapping:
    """The class tables, with ``mapClass`` optionally read from the user's file.

    Args:
        mapping_file: None for the package tables; a ``classMapping40.mat`` (variable
            ``mapClass``, 1x894) replacing the package ``mapClass`` (the 40->13 table and the
            names stay the package's); or a JSON file in the package format.
    """
    base = package_mapping()
    if mapping_file is None:
        return base
    path = Path(mapping_file)
    if not path.is_file():
        raise DatasetError(path, "class mapping file not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(path, f"unreadable mapping JSON ({e})") from e
        return _from_json(data, path)
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["mapClass"])
    except (NotImplementedError, OSError, ValueError, TypeError) as e:
        raise DatasetError(path, f"unreadable classMapping40.mat ({e})") from e
    if "mapClass" not in mat:
        raise DatasetError(
            path, "no variable 'mapClass' (expected Gupta et al.'s classMapping40.mat)"
        )
    map_class = _checked_table(mat["mapClass"], NYU_NUM_RAW, 40, path, "mapClass")
    return NYUMapping(map_class, base.labels13, base.names40, base.names13)


NYU40_CLASSES: tuple[str, ...] = package_mapping().names40  # "wall", "floor", ..., "otherprop"
NYU13_CLASSES: tuple[str, ...] = package_mapping().names13  # "bed", "books", ..., "window"


def nyu_class_names(num_classes: int) -> tuple[str, ...]:
    """The 40 or 13 class names, in training id order."""
    if num_classes not in NYU_NUM_CLASSES:
        raise ValueError(f"NYUDv2 has 40 or 13 classes, got num_classes={num_classes}")
    return NYU40_CLASSES if num_classes == 40 else NYU13_CLASSES


def read_split_indices(path: Path, split: str) -> np.ndarray:
    """The 1-based frame numbers of ``split`` from ``splits.mat`` (MAT v5; v7.3 via h5py).

    Returns:
        (n,) int64 1-based frame numbers, in file order.
    """
    key = _SPLIT_KEYS[split]
    if not path.is_file():
        raise DatasetError(path, "splits file not found (expected the NYU toolbox splits.mat)")
    from scipy.io import loadmat

    try:
        values = loadmat(path, variable_names=[key]).get(key)
    except NotImplementedError:  # saved as v7.3: HDF5
        require("h5py", f"{path} (a MATLAB v7.3 file, HDF5)")
        import h5py

        with h5py.File(path, "r") as f:
            values = f[key][()] if key in f else None
    except (OSError, ValueError, TypeError) as e:
        raise DatasetError(path, f"unreadable splits file ({e})") from e
    if values is None:
        raise DatasetError(path, f"no variable '{key}' (split '{split}')")
    arr = np.asarray(values).ravel()
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.number) or (arr != np.round(arr)).any():
        raise DatasetError(path, f"'{key}' must be a non-empty list of integer frame numbers")
    return arr.astype(np.int64)


def _open_h5(path: Path) -> Any:
    require("h5py", f"NYUDv2's labelled set {path} (MATLAB v7.3, HDF5)")
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            path, f"cannot open as HDF5 ({e}); expected the MATLAB v7.3 nyu_depth_v2_labeled.mat"
        ) from e


class NYUDv2Dataset(ParsingDataset):
    """One split of the labeled NYU Depth V2 frames.

    The HDF5 file is opened lazily, on the first item read in each process (h5py handles do not
    survive ``fork``), and never pickled; each item reads one frame.

    Args:
        root: folder holding ``nyu_depth_v2_labeled.mat`` and ``splits.mat``.
        split: ``train`` (795 frames) or ``test`` (654); ``val`` is an alias of ``test``.
        num_classes: 40 (Gupta et al.) or 13 (applied on top of the 40-class map).
        transform: callable taking and returning the item dict; None returns the raw item:
            ``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8 class ids with 255 = unlabeled,
            ``depth`` (H, W) float32 metres (in-painted), ``name`` the 1-based frame number as
            five digits (``"00003"``, the file names of VainF's extraction).
        skip_bad: skip bad samples (see :class:`~datamodules.base.ParsingDataset`).
        mapping_file: a user's ``classMapping40.mat`` (or JSON) replacing the package ``mapClass``.
        cache_dir: pixel-count cache folder when ``root`` is read-only.
    """

    dataset_name = "NYUDv2"
    _keys: ClassVar[tuple[str, ...]] = ("images", "labels", "depths")

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = 40,
        transform: Transform | None = None,
        skip_bad: bool = False,
        mapping_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(root, split, transform, skip_bad, num_classes, cache_dir)
        if split not in _SPLIT_KEYS:
            raise ValueError(f"unknown NYUDv2 split '{split}' (expected train or test; val = test)")
        if self.num_classes not in NYU_NUM_CLASSES:
            raise ValueError(f"NYUDv2 has 40 or 13 classes, got num_classes={num_classes}")
        self.mapping_file = Path(mapping_file) if mapping_file is not None else None
        self.mapping = load_mapping(self.mapping_file)
        self.lut = self.mapping.lut(self.num_classes)  # (895,) uint8
        self.mat_path = self.root / LABELED_FILE
        self.splits_path = self.index_source = self.root / SPLITS_FILE
        if not self.mat_path.is_file():
            raise DatasetError(self.mat_path, "labeled NYU Depth V2 file not found")
        self._h5: Any = None  # opened by _file() in the process that reads
        self._h5_pid: int | None = None

        # Shapes only, with the file closed again before any DataLoader forks.
        with _open_h5(self.mat_path) as f:
            shapes = {}
            for key in self._keys:
                if key not in f:
                    raise DatasetError(self.mat_path, f"no dataset '{key}'")
                shapes[key] = f[key].shape
        n, c, w, h = shapes["images"] if len(shapes["images"]) == 4 else (0, 0, 0, 0)
        if c != 3:
            raise DatasetError(
                self.mat_path, f"'images' has shape {shapes['images']}; expected (N, 3, W, H)"
            )
        for key in ("labels", "depths"):
            if tuple(shapes[key]) != (n, w, h):
                raise DatasetError(
                    self.mat_path,
                    f"'{key}' has shape {shapes[key]}; expected {(n, w, h)} to match 'images'",
                )
        self.num_frames = n

        frames = read_split_indices(self.splits_path, split)
        self.frames: list[int] = []  # 0-based index into the file's first axis, per sample
        for frame in frames.tolist():
            problem = None
            if not 1 <= frame <= n:
                problem = DatasetError(
                    self.splits_path,
                    f"'{_SPLIT_KEYS[split]}' lists frame {frame}, outside 1..{n} (1-based indices "
                    f"into the {n} frames of {LABELED_FILE})",
                )
            if self._add_sample(f"{frame:05d}", problem):
                self.frames.append(frame - 1)  # MATLAB frame 1 is row 0
        self._finish_index()

    # -- the lazily opened HDF5 file ------------------------------------------------------------

    def _file(self) -> Any:
        pid = os.getpid()
        if self._h5 is None or self._h5_pid != pid:
            # A handle inherited through fork is never read from: HDF5's cached state would be
            # shared with the parent's. Dropping it only releases this process's copy.
            self._h5 = None
            self._h5 = _open_h5(self.mat_path)
            self._h5_pid = pid
        return self._h5

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if self._h5 is not None and self._h5_pid == os.getpid():
            self._h5.close()
        self._h5, self._h5_pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) and checkpoints get the dataset without the handle.
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, None
        return state

    # -- loading --------------------------------------------------------------------------------

    def _frame_error(self, index: int, problem: str) -> DatasetError:
        return DatasetError(
            self.mat_path, f"frame {self.ids[index]} (row {self.frames[index]}): {problem}"
        )

    def load_raw_label(self, index: int) -> np.ndarray:
        """(H, W) uint16 raw NYU ids of sample ``index`` (0 = unlabeled, 1..894)."""
        labels = self._file()["labels"]
        if not np.issubdtype(labels.dtype, np.integer):
            raise self._frame_error(index, f"'labels' has dtype {labels.dtype}; expected uint16")
        raw = np.ascontiguousarray(labels[self.frames[index]].T)  # (W, H) -> (H, W)
        if raw.size and int(raw.max()) > len(self.lut) - 1:
            raise self._frame_error(
                index, f"raw label id {int(raw.max())} outside 0..{len(self.lut) - 1}"
            )
        return raw

    def load_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8 class ids ``0..num_classes-1`` of sample ``index`` (255 = unlabeled)."""
        # Indexing with the uint16 ids directly: casting to uint8 first would corrupt ids > 255.
        return self.lut[self.load_raw_label(index)]

    def load(self, index: int) -> dict[str, Any]:
        f = self._file()
        row = self.frames[index]
        image = f["images"][row]  # (3, W, H)
        if image.dtype != np.uint8:
            raise self._frame_error(index, f"'images' has dtype {image.dtype}; expected uint8")
        image = np.ascontiguousarray(image.transpose(2, 1, 0))  # (3, W, H) -> (H, W, 3)
        depth = np.ascontiguousarray(f["depths"][row].T, dtype=np.float32)  # (W, H) -> (H, W)
        mask = self.load_mask(index).astype(np.uint8, copy=False)
        return {"image": image, "mask": mask, "depth": depth, "name": self.ids[index]}

    def count_key(self) -> str:
        # The counts depend on the class tables as well as on the frames.
        return hashlib.sha1(
            f"{super().count_key()}:{self.num_classes}:{self.mapping.digest()}".encode()
        ).hexdigest()


class NYUDv2DataModule(ParsingDataModule):
    """NYU Depth V2 (labeled, 40 or 13 classes) for Lightning.

    NYU has no validation split: ``fit`` uses the 795 ``train`` frames, and ``validate`` and
    ``test`` both use the 654 ``test`` frames (the split every published number is on).
    Arguments as :class:`~datamodules.base.ParsingDataModule`, plus ``mapping_file`` (see
    :class:`NYUDv2Dataset`). ``class_names`` defaults to the 40 or 13 names of ``num_classes``;
    there are no left/right classes. ``eval_size`` None evaluates at the full 480x640.
    """

    splits: ClassVar[Mapping[str, str]] = {"fit": "train", "validate": "test", "test": "test"}
    dataset_name = "NYUDv2"
    full_resolution_eval = True

    def __init__(self, root: str, mapping_file: str | None = None, **kwargs: Any) -> None:
        num_classes = int(kwargs.get("num_classes", 40))
        if num_classes not in NYU_NUM_CLASSES:
            raise ValueError(f"NYUDv2 has 40 or 13 classes, got num_classes={num_classes}")
        defaults = {
            "batch_size": 8,
            "crop_size": (480, 640),
            "rotate": 0.0,
            "num_classes": num_classes,
            # A user's classMapping40.mat replaces only mapClass: the names stay the package's.
            "class_names": nyu_class_names(num_classes),
        }
        args = self.with_defaults(kwargs, defaults)
        if len(args["class_names"]) != num_classes:
            raise ValueError(
                f"{len(args['class_names'])} class_names given for num_classes={num_classes}; "
                "set class_names=null for the default NYUDv2 names of that class count"
            )
        super().__init__(root, **args)
        self.mapping_file = mapping_file

    def has_split(self, split: str) -> bool:
        return (self.root / LABELED_FILE).is_file() and (self.root / SPLITS_FILE).is_file()

    def split_has_labels(self, split: str) -> bool:
        # Every frame of the labeled file is annotated.
        return split in _SPLIT_KEYS and self.has_split(split)

    def make_dataset(self, split: str, transform: Transform | None) -> NYUDv2Dataset:
        return NYUDv2Dataset(
            self.root,
            split,
            num_classes=self._num_classes,
            transform=transform,
            skip_bad=self.skip_bad,
            mapping_file=self.mapping_file,
            cache_dir=self.cache_dir,
        )
