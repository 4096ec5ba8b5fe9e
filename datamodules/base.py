"""What every parsing dataset shares: the raw-item Dataset base and the LightningDataModule base.

A dataset file (``lip.py``, ``cityscapes.py``, ...) subclasses :class:`ParsingDataset` (index the
split into ``ids``, implement ``load`` and ``load_mask``) and :class:`ParsingDataModule` (implement
``make_dataset``; override ``has_split`` / ``split_has_labels`` with cheap file-system checks).
Skipping bad samples, the cached class pixel histogram, the paired transforms, collate and loaders
come from here. Items and batches follow ``datamodules/batch.py``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import simplejpeg
import torch
from lightning import LightningDataModule
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.batch import IGNORE_INDEX, DatasetError, collate_eval, collate_train, make_palette
from datamodules.errors import ConfigError
from datamodules.files import atomic_path, write_json
from datamodules.transforms import (
    AUGMENT_IMPLS,
    PHOTOMETRIC_MODES,
    AffineTrainTransform,
    EvalTransform,
    TrainTransform,
    augmentation_settings,
    build_eval_transform,
    build_train_transform,
    check_base_resize,
    eval_input,
)
from samplers.seeding import mix_seed

log = logging.getLogger(__name__)

Transform = Callable[[dict[str, Any]], dict[str, Any]]

# -- small shared helpers ----------------------------------------------------------------------


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists/dicts; tuples -> lists; everything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rimlab"


#: A rule ``(H, W) -> r`` giving the JPEG reduction (1, 2, 4 or 8) an image of the stored size
#: ``(H, W)`` may be decoded at (``AffineTrainTransform.reduction``).
ReductionRule = Callable[[int, int], int]


def _complete_jpeg(data: bytes) -> bool:
    # SOI first and EOI last (trailing zero padding allowed): a truncated file goes to PIL, which
    # names the problem.
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


class PixelCache:
    """Decoded training JPEGs kept as uncompressed RGBX ``.npy`` files, one per (image,
    reduction), memory-mapped when read (``data.pixel_cache``): the warp then touches only the
    pixels its window needs and no JPEG is decoded. The pixels are those of
    :func:`read_image_reduced` (the same decode, stored), so training draws and pixels do not
    change; the price is disk (``4 H W / r^2`` bytes per entry, docs/performance.md).

    An entry is keyed by the image's path, size, modification time and the reduction, so an
    edited image misses the cache.

    Args:
        folder: where the entries go.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def entry(self, path: Path, reduction: int) -> Path:
        st = Path(path).stat()
        key = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}:{reduction}".encode())
        return self.folder / f"{Path(path).stem}_r{reduction}_{key.hexdigest()[:12]}.npy"

    def read(self, entry: Path, shape: tuple[int, int]) -> np.ndarray | None:
        """The ``(*shape, 4)`` uint8 entry (read-only memory map), or None when missing or
        damaged (decoded and written again then)."""
        try:
            image = np.load(entry, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return image if image.dtype == np.uint8 and image.shape == (*shape, 4) else None

    def write(self, entry: Path, image: np.ndarray) -> None:
        try:
            with atomic_path(entry) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(image), allow_pickle=False)
        except OSError as e:  # a full or read-only cache folder costs speed, not the run
            log.debug("could not write pixel cache %s: %s", entry, e)


def write_pixel_cache(
    cache: PixelCache,
    images: Sequence[Path],
    reductions: Callable[[int, int], Sequence[int]],
    num_threads: int | None = None,
) -> int:
    """Writes the missing entries of every image at every reduction ``reductions(H, W)`` gives,
    in threads (unreadable images are left to the loader, which names them).

    Returns:
        The number of entries written.
    """

    def one(path: Path) -> int:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(Path(path).read_bytes())
            written = 0
            for r in reductions(height, width):
                if not cache.entry(path, r).is_file():
                    read_image_reduced(path, lambda h, w, r=r: r, cache)
                    written += 1
            return written
        except (OSError, ValueError, DatasetError):
            return 0

    threads = num_threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(one, images))


def read_image_reduced(
    path: Path, reduction: ReductionRule | None = None, pixel_cache: PixelCache | None = None
) -> tuple[np.ndarray, int]:
    """Decode an image, a JPEG at 1/``r`` of its size when ``reduction`` allows (libjpeg's DCT
    scaling: ``ceil(H / r) x ceil(W / r)``, pixel ``i`` centred on stored pixel
    ``r i + (r - 1) / 2``).

    Complete JPEGs go through libjpeg-turbo by ``simplejpeg`` (accurate integer IDCT and fancy
    upsampling: the same pixels as OpenCV's bundled libjpeg-turbo, in about two thirds of the
    time; EXIF orientation ignored, as the annotations were drawn on the stored grid); anything
    else, or a JPEG it refuses, through PIL (:func:`read_image`'s errors name the file).

    With a ``reduction`` rule (the fused training transform's decode) a JPEG comes back as RGBX
    ``(h, w, 4)``, the fourth channel 255: libjpeg-turbo writes it at no cost, and OpenCV warps
    4-channel pixels about twice as fast as 3-channel ones. With a ``pixel_cache`` too, that
    decode is read from (or written to) the cache.

    Returns:
        ``(image, r)``: (ceil(H / r), ceil(W / r), 3 or 4) uint8 RGB(X) and the reduction used.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(path, f"unreadable image ({e})") from e
    if _complete_jpeg(data):
        cached = entry = None
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            r = int(reduction(height, width)) if reduction is not None else 1
            shape = (-(-height // r), -(-width // r))
            if pixel_cache is not None and reduction is not None:
                entry = pixel_cache.entry(path, r)
                cached = pixel_cache.read(entry, shape)
            image = cached
            if image is None:
                # the smallest of libjpeg's M/8 scalings whose output is at least ``shape``: 1/r
                image = simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB" if reduction is None else "RGBX",
                    min_height=shape[0],
                    min_width=shape[1],
                )
        except ValueError:
            image = None
        if image is not None and image.shape[:2] == shape:
            if entry is not None and cached is None:
                pixel_cache.write(entry, image)
            return image, r
    return _read_image_pil(io.BytesIO(data), path), 1


def read_image(path: Path) -> np.ndarray:
    """Decode an image fully (a truncated file fails here, not later in a worker).

    Grayscale (and palette or CMYK) images are converted, so every image comes out RGB.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    return read_image_reduced(path)[0]


def _read_image_pil(source: Any, path: Path) -> np.ndarray:
    try:
        with Image.open(source) as im:
            im.load()
            # No EXIF transpose: the annotations were drawn on the stored pixel grid.
            rgb = im.convert("RGB")
        return np.array(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:  # missing, unidentified, truncated, corrupt
        raise DatasetError(path, f"unreadable image ({e})") from e


def read_raw_png(
    path: Path, what: str, mode_ok: Callable[[str], bool], expected: str
) -> np.ndarray:
    """Read a single-channel PNG as stored, without any mode conversion.

    Args:
        what: the file's kind in error messages (``label``, ``instanceIds``).
        mode_ok: whether a Pillow mode is one this kind of file may have.
        expected: the accepted modes in words, for the error message.

    Returns:
        (H, W) array of Pillow's dtype for the mode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(path, f"unreadable {what} PNG ({e})") from e
    if not mode_ok(mode) or arr.ndim != 2:
        raise DatasetError(path, f"{what} PNG has mode {mode} {arr.shape}; expected {expected}")
    return arr


def read_index_png(path: Path, what: str = "label") -> np.ndarray:
    """Read an 8-bit single-channel label PNG as raw indices (mode ``L``, or ``P`` without palette
    conversion: converting would turn ids into colours or luminance).

    Returns:
        (H, W) uint8.
    """
    arr = read_raw_png(path, what, lambda mode: mode in ("L", "P"), "8-bit single-channel (L or P)")
    return arr.astype(np.uint8, copy=False)


def check_same_size(
    label: np.ndarray, image: np.ndarray, label_path: Path, image_name: str, reduction: int = 1
) -> None:
    """Raises :class:`DatasetError` unless ``image`` (decoded at 1/``reduction``) has the size
    of ``label``."""
    r = int(reduction)
    if (-(-label.shape[0] // r), -(-label.shape[1] // r)) != image.shape[:2]:
        raise DatasetError(
            label_path,
            f"label size {label.shape[1]}x{label.shape[0]} (WxH) does not match image size "
            f"{image.shape[1]}x{image.shape[0]} of {image_name}",
        )


@dataclass
class ScanResult:
    """Outcome of a pass over a split.

    Attributes:
        counts: (C,) int64 label pixel histogram over the good samples (None without labels).
        num_ok: number of good samples.
        problems: sample id -> "file: problem" for every bad sample.
        errors: the errors behind ``problems`` found during the pass.
        region_counts: (C,) int64 number of good samples in which each class has a labelled
            pixel (the class regions NRBS counts; None without labels).
    """

    counts: np.ndarray | None
    num_ok: int
    problems: dict[str, str] = field(default_factory=dict)
    errors: list[DatasetError] = field(default_factory=list)
    region_counts: np.ndarray | None = None


# -- Dataset base ------------------------------------------------------------------------------


class ParsingDataset(Dataset, ABC):
    """One split of a parsing dataset; items follow ``datamodules/batch.py``.

    Subclasses index the split in ``__init__`` (after calling this one) by passing each candidate
    sample to :meth:`_add_sample` and then calling :meth:`_finish_index`; they set ``has_labels``
    and implement :meth:`load` and :meth:`load_mask`.

    Args:
        root: the dataset folder.
        split: split name (dataset specific).
        transform: callable taking and returning the item dict; None returns the raw item
            (``image`` (H, W, 3) uint8, ``mask`` (H, W) uint8 with 255 = ignore, ``name``).
        skip_bad: on a bad sample, log a warning, record it in ``bad_samples`` and return the next
            good sample instead of raising :class:`DatasetError`. Samples found bad while indexing
            are dropped up front; others are found when first loaded. Counts live per process, so
            DataLoader workers keep their own.
        num_classes: valid class ids are ``0..num_classes-1`` (255 = ignore where allowed).
        cache_dir: where the pixel-count cache goes when ``root`` is read-only
            (default ``~/.cache/rimlab``).
    """

    dataset_name: ClassVar[str] = "dataset"
    #: Whether :meth:`load` takes ``reduction`` (a :data:`ReductionRule`) and then may return a
    #: JPEG decoded at a reduced size, saying so in ``image_reduction``.
    decodes_reduced: ClassVar[bool] = False

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        skip_bad: bool = False,
        num_classes: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.skip_bad = bool(skip_bad)
        self.num_classes = int(num_classes)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.bad_samples: dict[str, str] = {}
        self.ids: list[str] = []
        self.has_labels = True
        # The file or folder that defines the split (named by "empty split" style errors).
        self.index_source: Path = self.root

    # -- indexing -------------------------------------------------------------------------------

    def _add_sample(self, name: str, problem: DatasetError | None) -> bool:
        """Keep sample ``name`` in the index, or drop it (skip_bad) / raise when it has a problem."""
        if problem is None:
            self.ids.append(name)
            return True
        if not self.skip_bad:
            raise problem
        self._mark_bad(name, problem)
        return False

    def _finish_index(self) -> None:
        if not self.ids:
            raise DatasetError(self.index_source, f"split '{self.split}' has no usable sample")

    # -- per-sample access ----------------------------------------------------------------------

    @abstractmethod
    def load(self, index: int) -> dict[str, Any]:
        """Raw item ``index`` without transform; raises :class:`DatasetError` on bad data."""

    def load_mask(self, index: int) -> np.ndarray:
        """(H, W) integer class ids of sample ``index``, decoding as little as possible.

        Used by the pixel counter; the default loads the whole item.
        """
        return self.load(index)["mask"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        # (index, seed) comes from EpochShuffleSampler: the augmentation of this draw is fixed by
        # the seed, so a resumed run replays an epoch exactly.
        index, seed = index if isinstance(index, tuple) else (index, None)
        if isinstance(self.transform, AffineTrainTransform):
            # Drawn before decoding: the drawn scale decides how small the JPEG may be decoded.
            draw = self.transform.draw(seed)
            extra = {}
            if self.decodes_reduced:
                extra["reduction"] = functools.partial(self.transform.reduction, draw)
            item = (
                self._load_skipping(index, **extra) if self.skip_bad else self.load(index, **extra)
            )
            return self.transform(item, draw=draw)
        item = self._load_skipping(index) if self.skip_bad else self.load(index)
        if self.transform is None:
            return item
        return self.transform(item) if seed is None else self.transform(item, seed=seed)

    @property
    def num_skipped(self) -> int:
        """Number of distinct bad samples skipped so far (in this process)."""
        return len(self.bad_samples)

    @property
    def bad_ids(self) -> list[str]:
        return list(self.bad_samples)

    def _mark_bad(self, name: str, err: DatasetError) -> None:
        if name not in self.bad_samples:
            log.warning("skipping bad %s sample %s: %s", self.dataset_name, name, err)
            self.bad_samples[name] = str(err)

    def _load_skipping(self, index: int, **load_args: Any) -> dict[str, Any]:
        # Deterministic substitute: the next good sample (index + 1, wrapping around).
        n = len(self.ids)
        for offset in range(n):
            j = (index + offset) % n
            name = self.ids[j]
            if name in self.bad_samples:
                continue
            try:
                return self.load(j, **load_args)
            except DatasetError as e:
                self._mark_bad(name, e)
        raise DatasetError(self.index_source, f"every sample of split '{self.split}' is bad")

    # -- whole-split passes ---------------------------------------------------------------------

    def scan(
        self,
        num_classes: int | None = None,
        decode_images: bool = True,
        num_threads: int | None = None,
    ) -> ScanResult:
        """Load every sample once, collecting the label histogram and every problem found.

        Args:
            num_classes: histogram length (default: the dataset's).
            decode_images: also decode and size-check the images (labels only if False).
            num_threads: decoding threads (PIL releases the GIL); default min(8, cpu count).
        """
        c = num_classes or self.num_classes

        def one(index: int) -> tuple[str, np.ndarray | None, DatasetError | None]:
            name = self.ids[index]
            try:
                if decode_images:
                    mask = self.load(index).get("mask")
                else:
                    mask = self.load_mask(index) if self.has_labels else None
            except DatasetError as e:
                return name, None, e
            if mask is None:
                return name, None, None
            # 255 (ignore) and anything else >= C fall off the end of the histogram.
            hist = np.bincount(np.asarray(mask).ravel(), minlength=c)[:c]
            return name, hist.astype(np.int64), None

        counts = np.zeros(c, dtype=np.int64) if self.has_labels else None
        regions = np.zeros(c, dtype=np.int64) if self.has_labels else None
        result = ScanResult(
            counts=counts, num_ok=0, problems=dict(self.bad_samples), region_counts=regions
        )
        threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, hist, err in pool.map(one, range(len(self))):
                if err is not None:
                    result.problems[name] = str(err)
                    result.errors.append(err)
                    continue
                result.num_ok += 1
                if hist is not None and counts is not None and regions is not None:
                    counts += hist
                    regions += hist > 0
        return result

    def count_key(self) -> str:
        """Identifies the split's content for the count cache: a changed split recomputes."""
        return hashlib.sha1("\n".join([self.split, *self.ids]).encode()).hexdigest()

    def class_pixel_counts(self, num_classes: int | None = None) -> np.ndarray:
        """Label pixel histogram of the split (255 = ignore not counted), cached beside the data.

        The cache is ``<root>/<split>_class_counts.json`` keyed by :meth:`count_key`; if ``root``
        is read-only it goes to ``cache_dir`` (or ``~/.cache/rimlab``). Bad samples raise, or are
        excluded with ``skip_bad``.

        Returns:
            (C,) int64 pixel count per class id.
        """
        return self.class_counts(num_classes)[0]

    def class_region_counts(self, num_classes: int | None = None) -> np.ndarray:
        """Number of samples of the split that contain each class (a labelled pixel of it).

        The class region of an image is the sampling unit of RIM's regional sampler, so this is
        NRBS's sample count (``sampler.nrbs_count=regions``). Cached with the pixel counts.

        Returns:
            (C,) int64 image count per class id.
        """
        return self.class_counts(num_classes)[1]

    def class_counts(self, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel counts, region counts)`` of the split, each (C,) int64, computed in one pass
        and cached (see :meth:`class_pixel_counts`)."""
        c = num_classes or self.num_classes
        if not self.has_labels:
            raise DatasetError(self.index_source, f"split '{self.split}' has no labels to count")
        key = self.count_key()
        paths = self._count_cache_paths()
        for path in paths:
            try:
                data = json.loads(path.read_text())
                # Caches written before region counts existed are recomputed once.
                if (
                    data.get("key") == key
                    and data.get("num_classes") == c
                    and "region_counts" in data
                ):
                    return (
                        np.asarray(data["counts"], dtype=np.int64),
                        np.asarray(data["region_counts"], dtype=np.int64),
                    )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        result = self.scan(c, decode_images=False)
        if result.problems:
            if not self.skip_bad:
                # Problems found while indexing were raised in __init__, so errors is not empty.
                raise result.errors[0]
            for name, problem in result.problems.items():
                self.bad_samples.setdefault(name, problem)
        payload = {
            "key": key,
            "num_classes": c,
            "split": self.split,
            "skipped": sorted(result.problems),
            "counts": [int(v) for v in result.counts],
            "region_counts": [int(v) for v in result.region_counts],
        }
        for path in paths:
            try:
                write_json(path, payload)
                break
            except OSError as e:  # read-only dataset folder: fall back to the cache dir
                log.debug("could not write %s: %s", path, e)
        return result.counts, result.region_counts

    def _count_cache_paths(self) -> list[Path]:
        root_key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        fallback = (self.cache_dir or default_cache_dir()) / "class_counts"
        return [
            self.root / f"{self.split}_class_counts.json",
            fallback / f"{root_key}_{self.split}_class_counts.json",
        ]


# -- training order ---------------------------------------------------------------------------


class EpochShuffleSampler(DistributedSampler):
    """The training order and augmentation draws as a function of ``(seed, epoch)`` only.

    Yields ``(index, sample_seed)``: the permutation is DistributedSampler's (seeded by
    ``seed + epoch``, split over the DDP ranks), and each index carries the seed of its
    augmentation, so what a batch contains does not depend on the RNG history of the process or its
    DataLoader workers. A run resumed at an epoch boundary therefore sees the same batches as an
    uninterrupted one. ``epoch_fn`` (e.g. the trainer's epoch counter) fixes the epoch when the
    iterator is created before Lightning's ``set_epoch`` call, as it is right after a resume.

    Args:
        dataset: the training set.
        seed: the run's seed.
        epoch_fn: returns the current epoch; None relies on ``set_epoch`` alone.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch_fn: Callable[[], int] | None = None):
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=int(seed),
            drop_last=False,
        )
        self.epoch_fn = epoch_fn

    def __iter__(self):  # -> Iterator[tuple[int, int]]
        if self.epoch_fn is not None:
            self.set_epoch(int(self.epoch_fn()))
        for index in super().__iter__():
            yield index, mix_seed(self.seed, self.epoch, index)


def training_order(
    dataset: Dataset, trainer: Any | None
) -> tuple[EpochShuffleSampler, torch.Generator]:
    """The ``sampler`` and ``generator`` of a training DataLoader whose epochs replay exactly.

    The seed is the one ``seed_everything`` exported; the epoch comes from the trainer's loop
    state. The private generator only feeds the workers' base seed: drawing that from the global
    RNG would shift dropout and the regional sampler depending on when the iterator was created
    (at fit start after a resume, at epoch start otherwise). Workers need no RNG of their own:
    every augmentation is seeded by the sampler.
    """
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    epoch_fn = (
        (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None
    )
    sampler = EpochShuffleSampler(dataset, seed, epoch_fn)
    return sampler, torch.Generator().manual_seed(mix_seed(sampler.seed, sampler.rank))


class EvalShardSampler(DistributedSampler):
    """Evaluation order under DDP: every index once, on exactly one rank, nothing repeated.

    Rank ``r`` of ``R`` takes indices ``r, r + R, r + 2R, ...`` (the layout of
    ``DistributedSampler(shuffle=False)`` without its padding). Lightning's own sampler repeats
    the first images so that every rank gets as many batches as the others; summed confusion
    matrices and PCKh counts would then count those images twice. Ranks may run one batch fewer
    than others here, which is safe because rimlab's evaluation has no per-batch collective:
    metrics and ``sync_dist`` logs meet at the epoch end, and DDP's buffer broadcast happens in
    the first forward only. Being a ``DistributedSampler``, Lightning leaves it in place.

    Args:
        dataset: the evaluation split.
        num_replicas: process count (default: the initialised process group's, else 1).
        rank: this process (default: the process group's, else 0).

    Raises:
        DatasetError: the split has fewer items than there are processes: a rank without a batch
            would skip the evaluation epoch and leave the others waiting in the metric sync.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        if n < self.num_replicas:
            where = getattr(dataset, "index_source", None) or getattr(dataset, "root", None)
            raise DatasetError(
                where or "evaluation split",
                f"the evaluation split has {n} item(s), fewer than the {self.num_replicas} "
                "processes evaluating it (every process needs at least one); evaluate on at "
                f"most {n} device(s) (trainer.devices) or a larger split",
            )
        self.total_size = n
        self.num_samples = len(range(self.rank, n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def evaluation_order(dataset: Dataset, trainer: Any | None) -> EvalShardSampler | None:
    """The sampler of an evaluation DataLoader: :class:`EvalShardSampler` when a multi-process
    trainer is running (Lightning is asking for the loader of its evaluation loop), else None.

    A loader built outside a running fit, validate, test or predict call (a driver scoring the
    whole split in one process after the fit, the report) reads the whole split in order, even
    when a process group is still initialised.
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    running = trainer is not None and trainer.state.status == TrainerStatus.RUNNING
    return EvalShardSampler(dataset) if running and trainer.world_size > 1 else None


def default_num_workers(ranks: int = 1, cpus: int | None = None) -> int:
    """Loader workers per process when ``data.num_workers`` is unset: the CPUs this process may
    use, shared by the ``ranks`` processes of the node, less one for each main process, at most
    32 (a worker holds a dataset copy; beyond that memory grows faster than throughput).

    Args:
        ranks: processes on this node reading data (DDP ranks per node).
        cpus: available CPUs (default: this process's affinity).
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    return max(0, min(32, int(cpus) // max(1, int(ranks)) - 1))


def _local_ranks(trainer: Any | None) -> int:
    if trainer is not None:
        return max(1, int(getattr(trainer, "num_devices", 1) or 1))
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def loader_workers(num_workers: int | None, trainer: Any | None) -> int:
    """A datamodule's ``num_workers``, or when None :func:`default_num_workers` for the
    ``trainer``'s devices on this node (``LOCAL_WORLD_SIZE`` without a trainer)."""
    if num_workers is None:
        return default_num_workers(_local_ranks(trainer))
    return int(num_workers)


def loader_worker_init(worker_id: int) -> None:
    """One OpenCV thread per loader worker: the workers already use every core, and OpenCV's own
    pool (one thread per core in each worker) would oversubscribe them."""
    cv2.setNumThreads(1)


def split_loader(
    dataset: Dataset, train: bool, datamodule: LightningDataModule, collate_fn: Any = None
) -> DataLoader:
    """A DataLoader over ``dataset``: in the exactly replayable :func:`training_order` with full
    batches only when ``train``, else in dataset order, sharded over the DDP ranks without
    repeats while a multi-process trainer runs it (:func:`evaluation_order`).

    ``datamodule`` gives the loader settings: ``batch_size`` (training), ``eval_batch_size``,
    ``num_workers`` (None: :func:`default_num_workers` for the trainer's devices),
    ``pin_memory``, ``persistent_workers`` and its ``trainer`` (for the epoch and the devices).
    Workers run OpenCV single-threaded (:func:`loader_worker_init`).
    """
    trainer = datamodule.trainer
    sampler, generator = (
        training_order(dataset, trainer) if train else (evaluation_order(dataset, trainer), None)
    )
    workers = loader_workers(datamodule.num_workers, trainer)
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size if train else datamodule.eval_batch_size,
        sampler=sampler,
        generator=generator,
        drop_last=train,
        num_workers=workers,
        pin_memory=bool(datamodule.pin_memory) and torch.cuda.is_available(),
        persistent_workers=bool(datamodule.persistent_workers) and workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=loader_worker_init if workers > 0 else None,
    )


# -- LightningDataModule base ------------------------------------------------------------------

#: Arguments whose None, given to a subclass, means the dataset's own default.
_NONE_TAKES_DEFAULT = ("class_names", "palette")


class ParsingDataModule(LightningDataModule, ABC):
    """Generic parsing datamodule: transforms, collate and loaders around ``make_dataset``.

    A subclass's constructor names only its own arguments, takes the others as ``**kwargs`` and
    passes them on through :meth:`with_defaults` with the dataset's defaults (class names, flip
    pairs, sizes); it implements :meth:`make_dataset` and, with cheap file-system checks,
    :meth:`has_split` and :meth:`split_has_labels`. Every constructor argument is saved as a
    hyperparameter, as a plain container: the value given, else the default in effect.

    Args:
        root: the dataset folder.
        num_classes: number of classes (valid ids ``0..num_classes-1``).
        batch_size: training batch size (drop_last, so each batch is full).
        num_workers: DataLoader workers per process (None: from the CPU count and the number of
            devices, :func:`default_num_workers`).
        crop_size: ``(h, w)`` training crop.
        scale_range: ``(min, max)`` random scale factor (relative to the base resize when
            ``base_size`` is given).
        rotate: maximum absolute rotation in degrees.
        eval_size: ``(h, w)`` network input size at evaluation; labels stay at their original
            resolution. None: the ``base_size`` fit when given, else ``crop_size``, or the
            original image size when the class sets ``full_resolution_eval``
            (``datamodules.transforms.eval_input``). Given together with ``base_size`` it wins
            at evaluation (a warning says the scales then differ).
        eval_batch_size: evaluation batch size (default: ``batch_size``).
        skip_bad: skip bad samples with a warning instead of raising.
        pin_memory: pin host memory (only when CUDA is available).
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        class_names: ``num_classes`` names (default: the ids as strings).
        flip_pairs: left/right class ids swapped by the horizontal flip.
        color_jitter: colour jitter strength (0 disables; used when ``photometric="jitter"``).
        cache_dir: cache folder (pixel counts when ``root`` is read-only; dataset specific uses).
        palette: ``num_classes`` RGB triples for visualisation (default: the VOC colour map).
        ignore_index: the label value that is never scored; the transforms and collate pad with
            255, so it must be 255 (it is a key so configs can interpolate it).
        cat_max_ratio: None: plain random training crop; a float: mmsegmentation's
            ``cat_max_ratio`` crop (see ``datamodules.transforms.CatMaxRatioRandomCrop``).
        photometric: ``"jitter"`` (``ColorJitter`` of strength ``color_jitter``) or ``"mmseg"``
            (mmsegmentation's ``PhotoMetricDistortion``).
        eval_keep_ratio: with an ``eval_size``, fit each evaluation image into it with its
            aspect ratio kept (scale ``min(h / H, w / W)``, centred, black padding; SCHP's LIP
            evaluation) instead of stretching it; batches then carry ``valid_box`` and the
            scores are cropped to it before being resized to the original size. No effect when
            evaluation runs at the original size or by the ``base_size`` fit (which always keeps
            the aspect ratio).
        base_size: the scale protocol (``docs/scale_protocol.md``). None: no base resize
            (training scales the original image, evaluation follows ``eval_size``). An int:
            training first resizes each image so that its ``base_side`` equals it (aspect kept;
            in the same interpolation as the random scale), and evaluation fits each image the
            same way, so the random scale is relative to the evaluation scale.
        base_side: ``"long"`` (evaluation input ``base_size x base_size``, the image centred
            with black padding) or ``"short"`` (the input is the resized image; evaluation
            batches are padded bottom/right to their largest image).
        flip_prob: probability of the training flip (0 disables it and the left/right swap).
        augmentation: ``"default"`` (the keys above) or ``"paper"`` (only the RIM paper's
            rotation of +-10 degrees and plain cropping: it replaces ``scale_range``,
            ``rotate``, ``flip_prob``, colour and ``cat_max_ratio``, see
            ``datamodules.transforms.AUGMENTATION_PRESETS``). The attributes hold the values
            in effect.
        augment_impl: ``"fused"`` (one affine warp of the training crop, reduced JPEG
            decoding: ``datamodules.transforms.AffineTrainTransform``) or ``"reference"`` (the
            sequential albumentations transforms); the same distribution of augmentations.
    """

    #: Stage -> split name given to ``make_dataset`` ("test" also serves ``predict``).
    splits: ClassVar[Mapping[str, str]] = {"fit": "train", "validate": "val", "test": "test"}
    #: Used in messages.
    dataset_name: ClassVar[str] = "dataset"
    #: Where the test annotations would be, for the "no test labels" message (may be empty).
    test_labels_hint: ClassVar[str] = ""
    #: eval_size None means the original image size (no resize) instead of crop_size.
    full_resolution_eval: ClassVar[bool] = False
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        root: str,
        *,
        num_classes: int,
        batch_size: int = 16,
        num_workers: int | None = None,
        crop_size: Sequence[int] = (400, 400),
        scale_range: Sequence[float] = (0.5, 2.0),
        rotate: float = 10.0,
        eval_size: Sequence[int] | None = None,
        eval_batch_size: int | None = None,
        skip_bad: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        class_names: Sequence[str] | None = None,
        flip_pairs: Sequence[Sequence[int]] = (),
        color_jitter: float = 0.2,
        cache_dir: str | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = IGNORE_INDEX,
        cat_max_ratio: float | None = None,
        photometric: str = "jitter",
        eval_keep_ratio: bool = False,
        base_size: int | None = None,
        base_side: str = "long",
        flip_prob: float = 0.5,
        augmentation: str = "default",
        augment_impl: str = "fused",
    ) -> None:
        super().__init__()
        self._save_plain_hyperparameters(inspect.currentframe())
        crop_size, scale_range = plain(crop_size), plain(scale_range)
        eval_size, class_names = plain(eval_size), plain(class_names)
        flip_pairs, palette = plain(flip_pairs), plain(palette)
        if int(ignore_index) != IGNORE_INDEX:
            raise ValueError(
                f"ignore_index={ignore_index}: the transforms and collate pad labels with "
                f"{IGNORE_INDEX}, so the ignore index must be {IGNORE_INDEX}"
            )
        self.ignore_index = IGNORE_INDEX
        self.root = Path(root)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)
        if augment_impl not in AUGMENT_IMPLS:
            raise ValueError(
                f"data.augment_impl must be one of {AUGMENT_IMPLS}, got {augment_impl!r}"
            )
        self.augment_impl = str(augment_impl)
        self.crop_size = tuple(int(v) for v in crop_size)
        self.base_size, self.base_side = check_base_resize(base_size, base_side)
        if eval_size is not None and self.base_size is not None:
            log.warning(
                "%s: data.eval_size=%s overrides the base_size=%d fit at evaluation: training "
                "sees images at the base_size scale, evaluation at eval_size (set "
                "data.eval_size=null to evaluate as training fits)",
                self.dataset_name,
                list(eval_size),
                self.base_size,
            )
        # The evaluation input: eval_size, else the base_size fit, else crop_size / own size.
        self.eval_size, self.eval_base_size = eval_input(
            eval_size, self.crop_size, self.base_size, self.full_resolution_eval
        )
        # The preset replaces the augmentation keys it lists; the attributes hold what is used.
        aug = augmentation_settings(
            str(augmentation),
            scale_range=scale_range,
            rotate=rotate,
            flip_prob=flip_prob,
            color_jitter=color_jitter,
            photometric=photometric,
            cat_max_ratio=cat_max_ratio,
        )
        self.augmentation = str(augmentation)
        scale_range, rotate, flip_prob = aug["scale_range"], aug["rotate"], aug["flip_prob"]
        color_jitter, photometric = aug["color_jitter"], aug["photometric"]
        cat_max_ratio = aug["cat_max_ratio"]
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"data.flip_prob must lie in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.rotate = float(rotate)
        self.skip_bad = bool(skip_bad)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.flip_pairs = [tuple(int(v) for v in pair) for pair in flip_pairs]
        self.color_jitter = float(color_jitter)
        self.cat_max_ratio = None if cat_max_ratio is None else float(cat_max_ratio)
        if photometric not in PHOTOMETRIC_MODES:
            raise ValueError(f"photometric must be one of {PHOTOMETRIC_MODES}, got {photometric!r}")
        self.photometric = str(photometric)
        self.eval_keep_ratio = bool(eval_keep_ratio)
        self.cache_dir = cache_dir
        self._num_classes = int(num_classes)
        names = [str(n) for n in class_names] if class_names is not None else None
        if names is None:
            names = [str(i) for i in range(self._num_classes)]
        if len(names) != self._num_classes:
            raise ValueError(f"{len(names)} class_names given for num_classes={num_classes}")
        self._class_names = names
        if palette is None:
            self.palette = make_palette(self._num_classes)  # (C, 3) uint8 RGB
        else:
            pal = np.asarray(palette, dtype=np.int64)
            if pal.shape != (self._num_classes, 3) or pal.min() < 0 or pal.max() > 255:
                raise ValueError(
                    f"palette must be {self._num_classes} RGB triples in 0..255, got shape "
                    f"{pal.shape}"
                )
            self.palette = pal.astype(np.uint8)
        self.train_set: ParsingDataset | None = None
        self.val_set: ParsingDataset | None = None
        self.test_set: ParsingDataset | None = None

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every keyword ``cls`` accepts: the keys a ``conf/data`` file of this class may set."""
        names: set[str] = set()
        for klass in cls.__mro__[: cls.__mro__.index(ParsingDataModule) + 1]:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names.update(
                    name
                    for name, p in inspect.signature(init).parameters.items()
                    if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                )
        return names

    @classmethod
    def with_defaults(cls, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments a subclass passes on: ``given`` over the dataset's ``defaults``.

        ``class_names`` or ``palette`` given as None take the dataset's default too (a config's
        ``null`` means "the dataset's own"); the base's None (ids as names, the VOC colour map)
        applies where the dataset has none.

        Raises:
            ConfigError: a key ``cls`` does not accept (a misspelt ``conf/data`` key).
        """
        unknown = sorted(set(given) - cls.argument_names())
        if unknown:
            raise ConfigError(
                f"data.{unknown[0]}: {cls.__name__} has no argument {unknown[0]!r} (misspelt "
                f"key?); its arguments are {', '.join(sorted(cls.argument_names()))}"
            )
        kept = {k: v for k, v in given.items() if v is not None or k not in _NONE_TAKES_DEFAULT}
        return {**defaults, **kept}

    def _save_plain_hyperparameters(self, frame: Any) -> None:
        # Every level's arguments, the most specific winning: the base sees each value in effect
        # (a dataset default the subclass passed on), the subclass its own keys and the values as
        # given. Plain containers: Hydra passes ListConfig/DictConfig, which checkpoints could not
        # load with weights_only=True.
        hparams: dict[str, Any] = {}
        for level in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            hparams.update({k: plain(v) for k, v in level.items()})
        self.save_hyperparameters(hparams, logger=False)

    # -- what a subclass provides ---------------------------------------------------------------

    @abstractmethod
    def make_dataset(self, split: str, transform: Transform | None) -> ParsingDataset:
        """The dataset of ``split`` (a value of ``splits``) with ``transform`` applied to items."""

    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists on disk (decides whether a test set is built)."""
        return True

    def split_has_labels(self, split: str) -> bool:
        """Whether ``split`` has annotations that can be scored.

        The default builds the dataset; subclasses should answer from the file system instead.
        """
        try:
            return bool(self.make_dataset(split, None).has_labels)
        except DatasetError:
            return False

    # -- common properties ----------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def has_test_labels(self) -> bool:
        """Whether ``trainer.test`` can score: the test split exists and has annotations."""
        split = self.splits["test"]
        return self.has_split(split) and self.split_has_labels(split)

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped so far by the datasets of this process (workers count their own)."""
        sets = (self.train_set, self.val_set, self.test_set)
        return sum(ds.num_skipped for ds in sets if ds is not None)

    # -- transforms and setup -------------------------------------------------------------------

    def train_transform(self) -> AffineTrainTransform | TrainTransform:
        return build_train_transform(
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            rotate=self.rotate,
            flip_pairs=self.flip_pairs,
            flip_prob=self.flip_prob,
            color_jitter=self.color_jitter,
            cat_max_ratio=self.cat_max_ratio,
            photometric=self.photometric,
            base_size=self.base_size,
            base_side=self.base_side,
            impl=self.augment_impl,
        )

    def eval_transform(self) -> EvalTransform:
        return build_eval_transform(
            self.eval_size,
            keep_ratio=self.eval_keep_ratio,
            base_size=self.eval_base_size,
            base_side=self.base_side,
        )

    def setup(self, stage: str | None = None) -> None:
        # Idempotent and cheap once done; covers setup() called without prepare_data().
        self.prepare_data()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.make_dataset(self.splits["fit"], self.train_transform())
        eval_tf = self.eval_transform()
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self.make_dataset(self.splits["validate"], eval_tf)
        test_split = self.splits["test"]
        if (
            stage in (None, "test", "predict")
            and self.test_set is None
            and self.has_split(test_split)
        ):
            self.test_set = self.make_dataset(test_split, eval_tf)
        if self.num_skipped:
            log.warning(
                "%s: %d bad samples skipped while indexing", self.dataset_name, self.num_skipped
            )

    # -- loaders --------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return split_loader(dataset, train, self, collate_train if train else collate_eval)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"train split has {len(self.train_set)} samples, fewer than batch_size="
                f"{self.batch_size}; with drop_last there would be no batch"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_labels:
            hint = f" ({self.test_labels_hint})" if self.test_labels_hint else ""
            raise RuntimeError(
                f"{self.root}: the {self.dataset_name} test split has no annotations{hint}, so "
                "trainer.test cannot score it; evaluate on val (trainer.validate) or use "
                "predict_dataloader for test-set predictions"
            )
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Test images (labels only if present) for ``trainer.predict``."""
        if self.test_set is None:
            self.setup("predict")
        if self.test_set is None:
            raise RuntimeError(self._missing_test_split_message())
        return self._loader(self.test_set, train=False)

    def _missing_test_split_message(self) -> str:
        return f"{self.root}: the {self.dataset_name} test split was not found"

    def class_pixel_counts(self) -> np.ndarray:
        """(C,) int64 label pixel histogram of the train split (cached by the dataset)."""
        return self.train_class_counts()[0]

    def class_region_counts(self) -> np.ndarray:
        """(C,) int64 number of training images containing each class (cached by the dataset)."""
        return self.train_class_counts()[1]

    def train_class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel counts, region counts)`` of the train split, each (C,) int64, from one pass
        (cached by the dataset); what the regional sampler's statistics are drawn from."""
        dataset = self.train_set
        if dataset is None:
            self.prepare_data()
            dataset = self.make_dataset(self.splits["fit"], None)
        return dataset.class_counts(self._num_classes)


def first_existing(candidates: Iterable[Path], kind: str = "dir") -> Path | None:
    """The first candidate that is a directory (``kind="dir"``) or a file (``kind="file"``)."""
    for path in candidates:
        if path.is_dir() if kind == "dir" else path.is_file():
            return path
    return None
