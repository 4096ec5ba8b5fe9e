"""LV-MHP-v2 (multi-human parsing, 58 part classes + background): Dataset and LightningDataModule.

Layout (the official release, see DATASETS.md section 2)::

    <root>/list/{train,val,test_all}.txt        one image id per line
    <root>/{train,val,test}/images/<id>.jpg
    <root>/{train,val}/parsing_annos/<id>_<N:02d>_<k:02d>.png   one file per person k of N

Each per-person PNG holds the class id in the R channel (PIL channel 0). The persons are merged into
one semantic map; on overlap the later person (ascending ``k``) wins, as in M-CE2P's converter.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lz4.frame
import numpy as np
from PIL import Image

from datamodules.base import (
    ParsingDataModule,
    ParsingDataset,
    PixelCache,
    ReductionRule,
    default_cache_dir,
    plain,
    read_image_reduced,
    write_pixel_cache,
)
from datamodules.batch import DatasetError, make_palette
from datamodules.files import atomic_write
from datamodules.synthetic import ensure_synthetic_mhp
from datamodules.transforms import AffineTrainTransform

log = logging.getLogger(__name__)

MHP_NUM_CLASSES = 59
MHP_CLASSES: tuple[str, ...] = (
    "Background", "Cap/hat", "Helmet", "Face", "Hair", "Left-arm", "Right-arm", "Left-hand",
    "Right-hand", "Protector", "Bikini/bra", "Jacket/windbreaker/hoodie", "Tee-shirt", "Polo-shirt",
    "Sweater", "Singlet", "Torso-skin", "Pants", "Shorts/swim-shorts", "Skirt", "Stockings",
    "Socks", "Left-boot", "Right-boot", "Left-shoe", "Right-shoe", "Left-highheel",
    "Right-highheel", "Left-sandal", "Right-sandal", "Left-leg", "Right-leg", "Left-foot",
    "Right-foot", "Coat", "Dress", "Robe", "Jumpsuit", "Other-full-body-clothes", "Headwear",
    "Backpack", "Ball", "Bats", "Belt", "Bottle", "Carrybag", "Cases", "Sunglasses", "Eyewear",
    "Glove", "Scarf", "Umbrella", "Wallet/purse", "Watch", "Wristband", "Tie", "Other-accessary",
    "Other-upper-body-clothes", "Other-lower-body-clothes",
)  # fmt: skip
MHP_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (5, 6), (7, 8), (22, 23), (24, 25), (26, 27), (28, 29), (30, 31), (32, 33),
)  # fmt: skip
MHP_PALETTE: np.ndarray = make_palette(MHP_NUM_CLASSES)  # (59, 3) uint8 RGB

# Split name -> (list file, image folder). test_* lists all index into test/ (DATASETS.md 2.1).
_SPLITS = {
    "train": ("train.txt", "train"),
    "val": ("val.txt", "val"),
    "test": ("test_all.txt", "test"),
}
# "<id>_<N>_<k>.png"; the id group is matched whole, so "7" never collects "70_01_01.png".
_ANNO_RE = re.compile(r"^(?P<id>.+)_(?P<n>\d{2})_(?P<k>\d{2})\.png$")


def _split_paths(split: str) -> tuple[str, str]:
    if split in _SPLITS:
        return _SPLITS[split]
    if split.startswith("test_"):  # test_all, test_inter_top20, test_inter_top10
        return f"{split}.txt", "test"
    raise ValueError(f"unknown MHPv2 split '{split}' (expected train, val, test or test_*)")


def read_label(path: Path, num_classes: int = MHP_NUM_CLASSES) -> np.ndarray:
    """Read one per-person MHP annotation: class ids from the R channel (or the only channel).

    Never converts to luminance: ``L`` of ``(v, 0, 0)`` is about ``0.299 * v`` and destroys the ids.

    Returns:
        (H, W) uint8 class ids in ``0..num_classes-1``.
    """
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(path, f"unreadable annotation PNG ({e})") from e
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DatasetError(path, f"annotation has unexpected shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise DatasetError(path, f"label value {bad} outside 0..{num_classes - 1}")
    return arr.astype(np.uint8)


def merge_person_labels(paths: Sequence[Path], num_classes: int = MHP_NUM_CLASSES) -> np.ndarray:
    """Merge per-person label files into one semantic map, later persons winning on overlap.

    Args:
        paths: per-person PNGs in ascending person index ``k``.

    Returns:
        (H, W) uint8 class ids; 0 where no person has a part.
    """
    merged: np.ndarray | None = None
    first: Path | None = None
    for path in paths:
        person = read_label(path, num_classes)
        if merged is None:
            merged = np.zeros_like(person)
            first = Path(path)
        elif person.shape != merged.shape:
            raise DatasetError(
                path,
                f"person label size {person.shape[1]}x{person.shape[0]} (WxH) differs from "
                f"{merged.shape[1]}x{merged.shape[0]} of {first.name}",
            )
        on = person != 0  # an all-zero (empty) person mask simply changes nothing
        merged[on] = person[on]
    if merged is None:
        raise ValueError("merge_person_labels needs at least one path")
    return merged


class MHPv2Dataset(ParsingDataset):
    """One split of LV-MHP-v2 in its released layout.

    Args:
        root: the ``LV-MHP-v2`` folder.
        split: ``train``, ``val`` or ``test`` (``test`` reads ``list/test_all.txt``; other
            ``test_*`` list names work too).
        transform: callable taking and returning the item dict; None returns the raw item
            (``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8 with 255 = ignore, ``name``).
        skip_bad: on a bad sample, log a warning, record it in ``bad_samples`` and return the next
            good sample instead of raising :class:`DatasetError`. Bad samples found while building
            the index (missing image or annotations) are dropped from the split up front; others are
            found when first loaded. Counts live per process, so DataLoader workers keep their own.
        cache_dir: where merged label maps are cached (default ``~/.cache/rimlab``); it also
            holds the pixel-count cache when ``root`` is read-only.
        num_classes: valid label ids are ``0..num_classes-1``.
        merge_cache: read (and write) merged label maps in ``cache_dir/mhp_merged`` as
            LZ4-compressed ``.npy`` files, so the per-person files are merged once; a cache
            entry is keyed by the person files' names, sizes and modification times.
        pixel_cache: the fused training path reads its decoded JPEGs from
            ``cache_dir/pixels`` (:class:`~datamodules.base.PixelCache`) instead of decoding.
    """

    dataset_name = "MHPv2"
    decodes_reduced = True

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        skip_bad: bool = False,
        cache_dir: str | Path | None = None,
        num_classes: int = MHP_NUM_CLASSES,
        merge_cache: bool = False,
        pixel_cache: bool = False,
    ) -> None:
        super().__init__(root, split, transform, skip_bad, num_classes, cache_dir)
        self.merge_cache = bool(merge_cache) or cache_dir is not None
        self.pixels = (
            PixelCache((self.cache_dir or default_cache_dir()) / "pixels" / self.split)
            if pixel_cache
            else None
        )
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset root not found (expected the LV-MHP-v2 folder)")
        list_name, folder = _split_paths(split)
        self.list_file = self.index_source = self.root / "list" / list_name
        if not self.list_file.is_file():
            raise DatasetError(self.list_file, f"list file of split '{split}' not found")
        listed = [ln.strip() for ln in self.list_file.read_text().splitlines() if ln.strip()]
        if not listed:
            raise DatasetError(self.list_file, f"split '{split}' is empty")

        self.image_dir = self.root / folder / "images"
        self.anno_dir = self.root / folder / "parsing_annos"
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, "image folder not found")
        # test/ ships without annotations; train/val must have them.
        self.has_labels = self.anno_dir.is_dir()
        if not self.has_labels and not folder.startswith("test"):
            raise DatasetError(self.anno_dir, "annotation folder not found")

        with os.scandir(self.image_dir) as it:
            image_names = {e.name for e in it}
        self._annos = self._index_annotations() if self.has_labels else {}

        for name in listed:
            problem = None
            if f"{name}.jpg" not in image_names:
                problem = DatasetError(self.image_dir / f"{name}.jpg", "listed image not found")
            elif self.has_labels and name not in self._annos:
                problem = DatasetError(
                    self.image_dir / f"{name}.jpg",
                    f"no annotation files {name}_NN_KK.png in {self.anno_dir}",
                )
            self._add_sample(name, problem)
        self._finish_index()

    def _index_annotations(self) -> dict[str, list[str]]:
        """One directory listing for the whole split: id -> per-person file names sorted by k."""
        found: dict[str, list[tuple[int, int, str]]] = {}
        with os.scandir(self.anno_dir) as it:
            for entry in it:
                m = _ANNO_RE.match(entry.name)
                if m:
                    found.setdefault(m["id"], []).append((int(m["k"]), int(m["n"]), entry.name))
        return {key: [name for _, _, name in sorted(files)] for key, files in found.items()}

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def label_paths(self, name: str) -> list[Path]:
        """Per-person annotation files of sample ``name`` in ascending person index."""
        return [self.anno_dir / f for f in self._annos.get(name, [])]

    def load_mask(self, index: int) -> np.ndarray:
        """Merged label map of sample ``index`` (through the merge cache when enabled).

        Returns:
            (H, W) uint8 class ids.
        """
        name = self.ids[index]
        paths = self.label_paths(name)
        if not paths:
            raise DatasetError(self.image_path(name), f"no annotation files in {self.anno_dir}")
        parsed = [_ANNO_RE.match(p.name) for p in paths]
        if len({m["n"] for m in parsed}) > 1 or len({m["k"] for m in parsed}) < len(parsed):
            # e.g. stale files from an older export: which persons belong together is ambiguous.
            raise DatasetError(
                paths[-1], f"inconsistent person files for {name}: {[p.name for p in paths]}"
            )
        cached = self._merge_cache_path(name, paths)
        if cached is not None:
            label = _read_cached_label(cached)
            if label is not None:
                return label
        merged = merge_person_labels(paths, self.num_classes)
        if cached is not None:
            try:
                atomic_write(cached, _cached_label_bytes(merged))
            except OSError as e:
                log.debug("could not write merge cache %s: %s", cached, e)
        return merged

    def write_merge_cache(self, num_threads: int | None = None) -> int:
        """Merges every sample whose cache entry is missing, in ``num_threads`` threads
        (default: the CPU count; decoding and LZ4 release the GIL).

        Bad samples raise as :meth:`load_mask` would, or are left to the loader with
        ``skip_bad``.

        Returns:
            The number of entries written.
        """
        if not self.merge_cache or not self.has_labels:
            return 0
        missing = []
        for index, name in enumerate(self.ids):
            try:
                path = self._merge_cache_path(name, self.label_paths(name))
            except DatasetError:
                if self.skip_bad:
                    continue
                raise
            if path is not None and not path.is_file():
                missing.append(index)

        def one(index: int) -> bool:
            try:
                self.load_mask(index)
            except DatasetError:
                if not self.skip_bad:
                    raise
                return False
            return True

        threads = num_threads or min(16, os.cpu_count() or 1)
        if missing:
            log.info(
                "%s %s: merging %d label maps into the cache",
                self.dataset_name,
                self.split,
                len(missing),
            )
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return sum(pool.map(one, missing))

    def _merge_cache_path(self, name: str, paths: Sequence[Path]) -> Path | None:
        if not self.merge_cache:
            return None
        # Keyed by the person files' names, sizes and mtimes: edited annotations miss the cache.
        sig = hashlib.sha1()
        for p in paths:
            try:
                st = p.stat()
            except OSError as e:
                raise DatasetError(p, f"annotation file not readable ({e})") from e
            sig.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return self._merge_cache_dir / f"{name}_{sig.hexdigest()[:12]}.npy.lz4"

    @functools.cached_property
    def _merge_cache_dir(self) -> Path:
        root_key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        return (self.cache_dir or default_cache_dir()) / "mhp_merged" / root_key / self.split

    def load(self, index: int, reduction: ReductionRule | None = None) -> dict[str, Any]:
        """Raw item ``index`` without transform; raises :class:`DatasetError` on bad data.

        Args:
            reduction: may decode the JPEG at a reduced size (``read_image_reduced``); the item
                then says ``image_reduction`` and the mask keeps the stored size.
        """
        name = self.ids[index]
        image, r = read_image_reduced(self.image_path(name), reduction, self.pixels)
        item: dict[str, Any] = {"image": image, "name": name}
        if r != 1:
            item["image_reduction"] = r
        if self.has_labels:
            mask = self.load_mask(index)
            if (-(-mask.shape[0] // r), -(-mask.shape[1] // r)) != image.shape[:2]:
                raise DatasetError(
                    self.label_paths(name)[0],
                    f"label size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match image size "
                    f"{image.shape[1]}x{image.shape[0]} of {name}.jpg",
                )
            item["mask"] = mask
        return item

    def count_key(self) -> str:
        # The list file's bytes: the cache survives re-indexing and follows edits of the list.
        return hashlib.sha1(self.list_file.read_bytes()).hexdigest()


def _cached_label_bytes(label: np.ndarray) -> bytes:
    """``(H, W)`` uint8 -> LZ4-frame-compressed ``.npy`` bytes: labels compress about 20-fold and
    inflate about five times faster than zlib's (level 1), fifteen times faster than the same map
    decoded as a PNG (docs/performance.md)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(label, dtype=np.uint8), allow_pickle=False)
    return lz4.frame.compress(buf.getvalue())


def _read_cached_label(path: Path) -> np.ndarray | None:
    """The cached ``(H, W)`` uint8 label map, or None when missing or damaged (rebuilt then)."""
    try:
        data = lz4.frame.decompress(path.read_bytes(), return_bytearray=True)
        head = io.BytesIO(data[:256])  # np.save pads its header to a multiple of 64 bytes
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(np.lib.format.read_magic(head))
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(head)
        if dtype != np.uint8 or len(shape) != 2 or fortran:
            return None
        # a view of the inflated buffer (np.load would copy it once more)
        return np.frombuffer(data, np.uint8, shape[0] * shape[1], head.tell()).reshape(shape)
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a damaged LZ4 frame
        return None


class MHPv2DataModule(ParsingDataModule):
    """LV-MHP-v2 for Lightning; with ``synthetic`` set it generates and serves the synthetic set.

    Arguments as :class:`~datamodules.base.ParsingDataModule` (the defaults: LV-MHP-v2's 59
    classes and left/right pairs; ``palette`` None is the VOC colour map, MHPv2 publishes no
    palette of its own; ``conf/data/mhp_v2.yaml`` sets the paper's ``base_size`` 400, long side),
    and:

    Args:
        root: the ``LV-MHP-v2`` folder (or where the synthetic set is generated).
        merge_cache: merge each image's per-person files once, in parallel in
            ``prepare_data``, into one cached label map that training reads instead (off: merge
            on every read). The cache lives in ``cache_dir`` (None: ``~/.cache/rimlab``, or
            ``$XDG_CACHE_HOME/rimlab``; the dataset folder may be read-only).
        pixel_cache: also store the training JPEGs decoded (at every reduction the fused
            transform can pick) in ``cache_dir``, in ``prepare_data``, and train from those
            memory-mapped pixels: no JPEG decoding, the same pixels, about ``4 H W`` bytes per
            image (:class:`~datamodules.base.PixelCache`; off by default).
        synthetic: keyword arguments of :func:`ensure_synthetic_mhp`; when given, ``prepare_data``
            generates the synthetic set under ``root`` first.
    """

    dataset_name = "MHPv2"
    test_labels_hint = "test/parsing_annos"

    def __init__(
        self,
        root: str,
        merge_cache: bool = True,
        pixel_cache: bool = False,
        synthetic: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "num_classes": MHP_NUM_CLASSES,
            "class_names": MHP_CLASSES,
            "flip_pairs": MHP_FLIP_PAIRS,
        }
        super().__init__(root, **self.with_defaults(kwargs, defaults))
        synthetic = plain(synthetic)
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.merge_cache = bool(merge_cache)
        self.pixel_cache = bool(pixel_cache)

    def has_split(self, split: str) -> bool:
        return (self.root / "list" / _split_paths(split)[0]).is_file()

    def split_has_labels(self, split: str) -> bool:
        return (self.root / _split_paths(split)[1] / "parsing_annos").is_dir()

    def _missing_test_split_message(self) -> str:
        return f"{self.root / 'list' / 'test_all.txt'} not found"

    def prepare_data(self) -> None:
        """Generates the synthetic set (when configured) and writes the merged-label cache of
        the labelled train and val splits (one pass over the missing entries, in threads)."""
        if self.synthetic is not None:
            ensure_synthetic_mhp(self.root, **self.synthetic)
        train = self.splits["fit"]
        transform = self.train_transform()
        if (
            self.pixel_cache
            and self.has_split(train)
            and isinstance(transform, AffineTrainTransform)  # the reference path decodes itself
        ):
            ds = self.make_dataset(train, None)
            images = [ds.image_path(name) for name in ds.ids]
            write_pixel_cache(ds.pixels, images, transform.reductions)
        if not self.merge_cache:
            return
        for stage in ("fit", "validate"):
            split = self.splits[stage]
            if self.has_split(split) and self.split_has_labels(split):
                self.make_dataset(split, None).write_merge_cache()

    def make_dataset(self, split: str, transform: Callable | None) -> MHPv2Dataset:
        return MHPv2Dataset(
            self.root,
            split,
            transform=transform,
            skip_bad=self.skip_bad,
            cache_dir=self.cache_dir,
            num_classes=self._num_classes,
            merge_cache=self.merge_cache,
            pixel_cache=self.pixel_cache,
        )
