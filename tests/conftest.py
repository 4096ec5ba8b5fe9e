"""Shared fixture helpers: tiny datasets written in the real on-disk formats under tmp_path."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Third-party warnings judged benign for tiny CPU test runs, by message. Everything else is shown,
#: and rimlab's own DeprecationWarnings fail under ``pytest -W error::DeprecationWarning``: these
#: are added to every test as ``filterwarnings`` marks, which take precedence over ``-W``.
BENIGN_WARNINGS = (
    # lightning's pytree helper on torch >= 2.10 (a FutureWarning from torch)
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    # tests load data in the main process on purpose (num_workers=0)
    r"ignore:The '\w+_dataloader' does not have many workers:UserWarning",
    # tiny epochs have fewer batches than log_every_n_steps
    r"ignore:The number of training batches \(\d+\) is smaller than the logging interval:UserWarning",
    # rimlab logs epoch-level scores computed from metrics already summed over the ranks
    r"ignore:It is recommended to use `self.log\(.*sync_dist=True\)`:UserWarning",
    # resumed and repeated runs write into their own folders again
    r"ignore:Checkpoint directory .* exists and is not empty:UserWarning",
    r"ignore:Experiment logs directory .* exists and is not empty:UserWarning",
    # RIM stage 2 trains with the frozen encoder (BatchNorm included) in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training:UserWarning",
    # ParsingLitModule normalises uint8 batches in its own on_after_batch_transfer on purpose
    r"ignore:You have overridden `on_after_batch_transfer` in `LightningModule`:UserWarning",
    # one CPU device in tests
    r"ignore:GPU available but not used:UserWarning",
    r"ignore:The `srun` command is available on your system but is not used:UserWarning",
    # pycocotools' compiled mask code calls np.array(copy=False) under numpy 2
    r"ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (bench/device_check.sh runs it)")
    for item in items:
        for spec in BENIGN_WARNINGS:
            item.add_marker(pytest.mark.filterwarnings(spec))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def write_jpg(path: Path, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image as JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)
    return path


def write_person_png(
    path: Path, label: np.ndarray, mode: str = "RGB", garbage_gb: bool = False
) -> Path:
    """Write one MHP per-person annotation: class ids in R (or a single channel with mode="L").

    Args:
        label: (H, W) class ids.
        garbage_gb: fill G and B with nonzero noise (the loader must still read only R).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.asarray(label, dtype=np.uint8)
    if mode == "L":
        Image.fromarray(label, mode="L").save(path)
        return path
    rgb = np.zeros((*label.shape, 3), dtype=np.uint8)
    rgb[..., 0] = label
    if garbage_gb:
        rng = np.random.default_rng(0)
        rgb[..., 1:] = rng.integers(1, 256, size=(*label.shape, 2), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def write_list(root: Path, list_name: str, ids: Iterable[str]) -> Path:
    path = root / "list" / list_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def write_mhp_sample(
    root: Path,
    split: str,
    name: str,
    persons: list[np.ndarray] | None,
    image: np.ndarray | None = None,
    **png_kwargs,
) -> None:
    """Write ``<split>/images/<name>.jpg`` and ``<name>_<N>_<k>.png`` per person (None: no PNGs)."""
    folder = "test" if split.startswith("test") else split
    if image is None:
        shape = persons[0].shape if persons else (8, 10)
        image = np.full((*shape, 3), 128, dtype=np.uint8)
    write_jpg(root / folder / "images" / f"{name}.jpg", image)
    if persons is None:
        return
    (root / folder / "parsing_annos").mkdir(parents=True, exist_ok=True)
    n = len(persons)
    for k, label in enumerate(persons, start=1):
        write_person_png(
            root / folder / "parsing_annos" / f"{name}_{n:02d}_{k:02d}.png", label, **png_kwargs
        )


@pytest.fixture
def mhp_root(tmp_path: Path) -> Path:
    """A valid miniature LV-MHP-v2: train ids 7 and 70 (prefix trap), val id 3, test id 5.

    - ``7`` (8x10): person 1 = class 3 on rows 0-3, person 2 = class 12 on rows 2-5 (overlap on
      rows 2-3, where the later person wins), person 3 empty.
    - ``70`` (8x10): one person, class 58 everywhere.
    - ``3`` (6x6, val): one person with class 5 on the left half.
    """
    root = tmp_path / "LV-MHP-v2"
    p1 = np.zeros((8, 10), np.uint8)
    p1[0:4] = 3
    p2 = np.zeros((8, 10), np.uint8)
    p2[2:6] = 12
    write_mhp_sample(root, "train", "7", [p1, p2, np.zeros((8, 10), np.uint8)])
    write_mhp_sample(root, "train", "70", [np.full((8, 10), 58, np.uint8)])
    v = np.zeros((6, 6), np.uint8)
    v[:, :3] = 5
    write_mhp_sample(root, "val", "3", [v])
    write_mhp_sample(root, "test", "5", None)
    write_list(root, "train.txt", ["7", "70"])
    write_list(root, "val.txt", ["3"])
    write_list(root, "test_all.txt", ["5"])
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on a small shared CPU, more threads than free cores
    make small convolutions many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_host_sync():
    """Inside ``with no_host_sync():`` any tensor -> host conversion raises (``.item()``,
    ``.cpu()``, ``.tolist()``, ``bool(t)``, ...): on an accelerator each is a device sync."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def guard():
        with pytest.MonkeyPatch.context() as mp:
            for name in ("cpu", "numpy", "item", "tolist", "__bool__", "__float__", "__int__"):

                def refuse(self, *args, _name=name, **kwargs):
                    raise AssertionError(f"host sync: Tensor.{_name}")

                mp.setattr(torch.Tensor, name, refuse)
            yield

    return guard
