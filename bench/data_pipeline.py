"""Training data pipeline throughput: rimlab's MHPv2 loader vs a plain albumentations pipeline.

    python bench/data_pipeline.py                          # 900x650 JPEG, 3 persons, one core
    python bench/data_pipeline.py --workers 14 --batches 40   # a GPU machine's loader
    python bench/data_pipeline.py --size 96x64 --images 4 --batches 2 --batch 2 --repeats 1
                                                           # CPU smoke test

The benchmark writes its own data set in the released LV-MHP-v2 layout (``list/train.txt``,
``train/images/<id>.jpg``, one ``train/parsing_annos/<id>_<N>_<k>.png`` per person with the class
id in R) and times, interleaved round by round on the same files, training batches of:

- ``rimlab``: ``MHPv2DataModule`` composed from ``conf/data/mhp_v2.yaml`` (the MHPv2 training
  transform: base resize to 400, scale 0.5-2, rotation +-10 degrees, 400x400 crop, flip with the
  left/right swap, colour jitter) through ``prepare_data`` / ``setup`` and its training loader, as
  ``run.py`` builds it; images leave as uint8 and are normalised on the device.
- ``rimlab_pixel_cache``: the same with ``data.pixel_cache=true``: ``prepare_data`` stores the
  JPEGs decoded (at each reduction the transform can pick) and training reads those pixels
  memory-mapped instead of decoding (the same pixels).
- ``rimlab_reference``: the same datamodule with ``data.augment_impl=reference`` (the sequential
  albumentations transforms, one full-image warp each, normalised on the host) and no merged-label
  cache: the pipeline before the fused transform.
- ``albumentations``: what a straightforward loader does with the same files: decode the JPEG,
  merge the per-person PNGs, then ``LongestMaxSize``, ``RandomScale``, ``Rotate``,
  ``PadIfNeeded``, ``RandomCrop``, ``HorizontalFlip`` with the left/right swap, ``ColorJitter``,
  ``Normalize``, ``ToTensorV2``; batches by ``default_collate``.

One process and one thread by default (``--workers 0``, ``torch.set_num_threads(1)``,
``cv2.setNumThreads(1)``): the images/s are then per core. Reported: the median images/s of each
variant over ``--repeats`` rounds and its ratio to ``albumentations``, in wall-clock images/s and
(without workers) in images per CPU second of the process, which a machine loaded by other
processes disturbs less. ``--stages N`` also profiles the stages of the rimlab variants
(draw, decode, label map, transform, colour alone, collate; CPU ms per image). Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RIMLAB_ROOT", str(ROOT))

import albumentations as A  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402

from datamodules.synthetic import render_scene  # noqa: E402
from datamodules.transforms import flip_lut  # noqa: E402

VARIANTS = ("rimlab", "rimlab_pixel_cache", "rimlab_reference", "albumentations")


def parse_size(text: str) -> tuple[int, int]:
    """``"900x650"`` (width x height, as image sizes are written) -> ``(650, 900)`` ``(H, W)``."""
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def write_mhp_layout(root: Path, images: int, size: tuple[int, int], persons: int) -> Path:
    """``images`` synthetic scenes of ``size`` ``(H, W)`` in the LV-MHP-v2 train layout, each with
    exactly ``persons`` per-person PNGs (extra painted persons are merged into the last file, a
    missing one repeats the last). JPEG quality 92, PNG as the release stores them (RGB, id in R).

    Returns:
        ``root``.
    """
    h, w = size
    img_dir, ann_dir = root / "train" / "images", root / "train" / "parsing_annos"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    (root / "list").mkdir(exist_ok=True)
    names = [str(i + 1) for i in range(images)]
    for i, name in enumerate(names):
        rng = np.random.default_rng([7, i])
        image, painted = render_scene(rng, h, w)
        labels = list(painted[: persons - 1])
        if len(painted) >= persons:  # the persons painted last, later ones winning on overlap
            tail = painted[persons - 1].copy()
            for person in painted[persons:]:
                tail[person > 0] = person[person > 0]
            labels.append(tail)
        labels += [labels[-1]] * (persons - len(labels))
        Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=92)
        for k, label in enumerate(labels, start=1):
            rgb = np.zeros((h, w, 3), dtype=np.uint8)
            rgb[..., 0] = label
            Image.fromarray(rgb).save(ann_dir / f"{name}_{persons:02d}_{k:02d}.png")
    for split in ("train", "val"):
        (root / "list" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    # val reads the train files: the datamodule wants the split, the bench never times it
    (root / "val").mkdir(exist_ok=True)
    for sub in ("images", "parsing_annos"):
        link = root / "val" / sub
        if not link.exists():
            link.symlink_to(root / "train" / sub, target_is_directory=True)
    return root


class AlbumentationsMHP(Dataset):
    """The straightforward peer: full decode, per-person merge, one albumentations Compose."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.images = sorted((root / "train" / "images").glob("*.jpg"))
        anno = root / "train" / "parsing_annos"
        self.persons = [sorted(anno.glob(f"{p.stem}_*.png")) for p in self.images]
        crop_h, crop_w = settings["crop_size"]
        lo, hi = settings["scale_range"]
        cj = float(settings["color_jitter"])
        self.lut = flip_lut(settings["flip_pairs"])
        self.flip = A.HorizontalFlip(p=0.5)
        self.geometry = A.Compose(
            [
                A.LongestMaxSize(max_size=int(settings["base_size"])),
                A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
                A.Rotate(
                    limit=float(settings["rotate"]),
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=255,
                    p=1.0,
                ),
                A.PadIfNeeded(
                    crop_h, crop_w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255
                ),
                A.RandomCrop(crop_h, crop_w),
            ]
        )
        self.rest = A.Compose(
            [
                A.ColorJitter(cj, cj, cj, cj / 10, p=0.8),
                A.Normalize(),
                ToTensorV2(),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = cv2.cvtColor(cv2.imread(str(self.images[index])), cv2.COLOR_BGR2RGB)
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        for path in self.persons[index]:
            person = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., 2]  # BGR: R is last
            mask[person > 0] = person[person > 0]
        out = self.geometry(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
        if np.random.random() < 0.5:  # flip with the left/right swap
            image, mask = image[:, ::-1], self.lut[mask[:, ::-1]]
        out = self.rest(image=np.ascontiguousarray(image))
        return {"image": out["image"], "mask": torch.from_numpy(np.ascontiguousarray(mask)).long()}


def compose_data(overrides: list[str], data_dir: Path):
    """The ``conf/data/mhp_v2.yaml`` datamodule config with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "run",
            overrides=[
                "data=mhp_v2",
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={data_dir / 'logs'}",
                "paths.output_dir=.",
                *overrides,
            ],
        )
    return cfg.data


def rimlab_loader(cfg, batch: int, workers: int) -> DataLoader:
    """rimlab's training loader as ``run.py`` builds it (prepare_data, setup, train_dataloader)."""
    # Persistent workers (run.py's default): each round's epoch reuses them, so the rounds time
    # loading, not the start of `workers` processes.
    dm = instantiate(cfg, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    dm.prepare_data()
    dm.setup("fit")
    return dm.train_dataloader()


def peer_loader(root: Path, cfg, batch: int, workers: int) -> DataLoader:
    settings = {k: cfg[k] for k in ("crop_size", "scale_range", "rotate", "color_jitter")}
    settings |= {"flip_pairs": cfg["flip_pairs"], "base_size": cfg["base_size"]}
    return DataLoader(
        AlbumentationsMHP(root, settings),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=default_collate,
        generator=torch.Generator().manual_seed(0),
    )


def time_loader(loader: DataLoader, batches: int) -> tuple[float, float]:
    """``(images per wall second, images per CPU second of this process)`` over ``batches``
    batches (the loader is cycled when it holds fewer). Without workers the second is the
    throughput of one core however loaded the machine is."""
    done, images = 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    while done < batches:
        for b in loader:
            images += len(b["image"])
            done += 1
            if done == batches:
                break
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def stage_profile(loader: DataLoader, images: int) -> dict[str, float]:
    """Milliseconds of CPU per image in each stage of rimlab's fused training path, over
    ``images`` (index, seed) pairs of ``loader``'s sampler: the draw, the JPEG decode (with the
    drawn reduction; from the pixel cache when it is on), the merged label map, the transform
    (warps, flip, colour, tensor), the colour step alone (repeated on the transform's crop) and
    collate."""
    from datamodules.base import read_image_reduced

    ds = loader.dataset
    tf = ds.transform
    pairs = list(itertools.islice(itertools.cycle(list(loader.sampler)), images))
    clock = time.process_time
    spent = dict.fromkeys(("draw", "decode", "label", "transform", "colour", "collate"), 0.0)
    items = []
    for index, seed in pairs:
        t0 = clock()
        draw = tf.draw(seed)
        t1 = clock()
        image, r = read_image_reduced(
            ds.image_path(ds.ids[index]), functools.partial(tf.reduction, draw), ds.pixels
        )
        t2 = clock()
        mask = ds.load_mask(index)
        t3 = clock()
        item = {"image": image, "mask": mask, "name": ds.ids[index], "image_reduction": r}
        out = tf(item, draw=draw)
        t4 = clock()
        crop = out["image"].permute(1, 2, 0).numpy()
        if tf.photometric is not None:
            tf.photometric.seeded(crop, draw.colour_seed)
        t5 = clock()
        items.append(out)
        for key, a, b in zip(spent, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=False):
            spent[key] += b - a
    t0 = clock()
    for k in range(0, len(items), loader.batch_size):
        loader.collate_fn(items[k : k + loader.batch_size])
    spent["collate"] = clock() - t0
    return {key: 1e3 * v / len(pairs) for key, v in spent.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="900x650", help="image width x height")
    parser.add_argument("--persons", type=int, default=3)
    parser.add_argument("--images", type=int, default=32, help="distinct images written")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="batches timed per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: main)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument(
        "--stages",
        type=int,
        default=0,
        metavar="N",
        help="also profile the stages of the rimlab variants over N images (CPU ms per image)",
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "data_pipeline.json"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="rimlab-data-bench-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        root = write_mhp_layout(data_dir / "LV-MHP-v2", args.images, size, args.persons)
        cache = [f"data.cache_dir={data_dir / 'cache'}"]
        cfg = compose_data(cache, data_dir)
        loaders = {}
        for name in variants:
            if name == "rimlab":
                loaders[name] = rimlab_loader(cfg, args.batch, args.workers)
            elif name == "rimlab_pixel_cache":
                pixels = compose_data([*cache, "data.pixel_cache=true"], data_dir)
                loaders[name] = rimlab_loader(pixels, args.batch, args.workers)
            elif name == "rimlab_reference":
                ref = compose_data(
                    ["data.augment_impl=reference", "data.merge_cache=false"], data_dir
                )
                loaders[name] = rimlab_loader(ref, args.batch, args.workers)
            else:
                loaders[name] = peer_loader(root, cfg, args.batch, args.workers)
        for loader in loaders.values():  # warm-up: every worker's start, first decodes, the cache
            time_loader(loader, max(1, args.workers))
        stages = {
            name: stage_profile(loaders[name], args.stages)
            for name in ("rimlab", "rimlab_pixel_cache")
            if args.stages and name in loaders
        }
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        cpu_rounds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                wall, cpu = time_loader(loader, args.batches)
                rounds[name].append(wall)
                cpu_rounds[name].append(cpu)
    median = {name: statistics.median(v) for name, v in rounds.items()}
    # with workers the main process only collects: its CPU time says nothing
    cpu_median = (
        {name: statistics.median(v) for name, v in cpu_rounds.items()} if not args.workers else {}
    )
    peer = median.get("albumentations")
    cpu_peer = cpu_median.get("albumentations")
    result = {
        "size_wxh": args.size,
        "persons": args.persons,
        "images": args.images,
        "batch": args.batch,
        "batches_per_round": args.batches,
        "repeats": args.repeats,
        "workers": args.workers,
        "threads": 1,
        "cpu_count": os.cpu_count(),
        "images_per_s": median,
        "images_per_s_rounds": rounds,
        "ratio_to_albumentations": {n: v / peer for n, v in median.items()} if peer else None,
        "images_per_cpu_s": cpu_median or None,
        "images_per_cpu_s_rounds": cpu_rounds if cpu_median else None,
        "cpu_ratio_to_albumentations": (
            {n: v / cpu_peer for n, v in cpu_median.items()} if cpu_peer else None
        ),
        "stage_ms_per_image": stages or None,
    }
    print(f"{'variant':<20}{'images/s':>10}{'x albumentations':>18}{'images/CPU-s':>14}{'x':>7}")
    for name, value in median.items():
        ratio = f"{value / peer:.2f}" if peer else "-"
        cpu = cpu_median.get(name)
        cpu_text = f"{cpu:>14.1f}{cpu / cpu_peer:>7.2f}" if cpu and cpu_peer else f"{'-':>14}"
        print(f"{name:<20}{value:>10.1f}{ratio:>18}{cpu_text}")
    for name, ms in stages.items():
        print(f"{name} stages (CPU ms/image): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
