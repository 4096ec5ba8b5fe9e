"""MHPv2 loader, paired transforms, collate, synthetic set and datamodule on real-format files."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from assertions import raises_naming
from fixtures.images import write_jpg
from fixtures.mhp import write_list, write_mhp_sample, write_person_png
from PIL import Image

import datamodules.base as base_mod
import datamodules.mhp as mhp_mod
from datamodules.batch import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, DatasetError
from datamodules.check import main as check_main
from datamodules.mhp import (
    MHP_CLASSES,
    MHP_FLIP_PAIRS,
    MHP_PALETTE,
    MHPv2DataModule,
    MHPv2Dataset,
)
from datamodules.synthetic import MARKER_NAME, RARE_CLASSES, ensure_synthetic_mhp
from datamodules.transforms import (
    HorizontalFlipSwap,
    build_eval_transform,
    build_train_transform,
    collate_eval,
    flip_lut,
)

ANNO_RE = re.compile(r"^(\d+)_(\d{2})_(\d{2})\.png$")
SMALL_SYNTH = {"num_train": 24, "num_val": 6, "num_test": 3, "seed": 3}

# -- loader: decoded values ----------------------------------------------------------------------


def test_constants():
    assert len(MHP_CLASSES) == 59 and MHP_CLASSES[0] == "Background"
    assert MHP_CLASSES[13] == "Polo-shirt" and MHP_CLASSES[53] == "Watch"
    assert MHP_CLASSES[58] == "Other-lower-body-clothes"
    assert MHP_PALETTE.shape == (59, 3) and MHP_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in MHP_PALETTE}) == 59
    assert MHP_FLIP_PAIRS[0] == (5, 6) and len(MHP_FLIP_PAIRS) == 8


def test_item_contract_overlap_and_prefix(mhp_root):
    ds = MHPv2Dataset(mhp_root, "train")
    assert ds.ids == ["7", "70"]
    # "7" must not collect "70_01_01.png".
    assert [p.name for p in ds.label_paths("7")] == ["7_03_01.png", "7_03_02.png", "7_03_03.png"]
    item = ds[0]
    assert set(item) == {"image", "mask", "name"} and item["name"] == "7"
    assert item["image"].shape == (8, 10, 3) and item["image"].dtype == np.uint8
    assert item["mask"].shape == (8, 10) and item["mask"].dtype == np.uint8
    expected = np.zeros((8, 10), np.uint8)
    expected[0:2] = 3  # person 1 only
    expected[2:6] = 12  # overlap rows 2-3: the later person (k=2) wins; person 3 is empty
    np.testing.assert_array_equal(item["mask"], expected)
    np.testing.assert_array_equal(ds[1]["mask"], np.full((8, 10), 58))


def test_r_channel_with_garbage_gb_and_single_channel(tmp_path):
    root = tmp_path / "mhp"
    label = np.arange(48, dtype=np.uint8).reshape(6, 8) % 59
    write_mhp_sample(root, "train", "1", [label], garbage_gb=True)
    write_mhp_sample(root, "train", "2", [label], mode="L")
    write_list(root, "train.txt", ["1", "2"])
    ds = MHPv2Dataset(root, "train")
    with Image.open(root / "train/parsing_annos/1_01_01.png") as im:
        assert np.array(im)[..., 1:].min() > 0  # the fixture really has G/B garbage
    np.testing.assert_array_equal(ds[0]["mask"], label)
    np.testing.assert_array_equal(ds[1]["mask"], label)


def test_test_split_has_images_only(mhp_root):
    ds = MHPv2Dataset(mhp_root, "test")
    assert not ds.has_labels and len(ds) == 1
    item = ds[0]
    assert set(item) == {"image", "name"} and item["name"] == "5"
    assert item["image"].shape == (8, 10, 3)


def test_image_colour_is_rgb(tmp_path):
    root = tmp_path / "mhp"
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 200  # red
    write_mhp_sample(root, "val", "1", [np.zeros((16, 16), np.uint8)], image=image)
    write_list(root, "val.txt", ["1"])
    mean = MHPv2Dataset(root, "val")[0]["image"].reshape(-1, 3).mean(0)
    assert mean[0] > 180 and mean[1] < 20 and mean[2] < 20


# -- loader: bad data --------------------------------------------------------------------------


def test_missing_root_and_list(tmp_path, mhp_root):
    raises_naming(lambda: MHPv2Dataset(tmp_path / "nope", "train"), "nope", "not found")
    (mhp_root / "list" / "val.txt").unlink()
    raises_naming(lambda: MHPv2Dataset(mhp_root, "val"), "val.txt", "not found")


def test_empty_split(mhp_root):
    write_list(mhp_root, "train.txt", [])
    raises_naming(lambda: MHPv2Dataset(mhp_root, "train"), "train.txt", "empty")


def test_image_without_annotations_and_missing_image(mhp_root):
    write_mhp_sample(mhp_root, "train", "9", None)
    write_list(mhp_root, "train.txt", ["7", "9"])
    raises_naming(lambda: MHPv2Dataset(mhp_root, "train"), "9.jpg", "no annotation files")
    write_list(mhp_root, "train.txt", ["7", "11"])
    raises_naming(lambda: MHPv2Dataset(mhp_root, "train"), "11.jpg", "not found")


def test_truncated_jpeg(mhp_root):
    path = mhp_root / "train/images/70.jpg"
    write_jpg(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = MHPv2Dataset(mhp_root, "train")
    raises_naming(lambda: ds[1], "70.jpg", "unreadable image")


def test_zero_byte_png(mhp_root):
    (mhp_root / "train/parsing_annos/7_03_02.png").write_bytes(b"")
    ds = MHPv2Dataset(mhp_root, "train")
    raises_naming(lambda: ds[0], "7_03_02.png", "unreadable annotation")


def test_label_out_of_range(mhp_root):
    write_person_png(mhp_root / "train/parsing_annos/70_01_01.png", np.full((8, 10), 59))
    ds = MHPv2Dataset(mhp_root, "train")
    raises_naming(lambda: ds[1], "70_01_01.png", r"label value 59 outside 0\.\.58")


def test_size_mismatch_image_and_between_persons(mhp_root):
    write_person_png(mhp_root / "train/parsing_annos/70_01_01.png", np.ones((8, 9)))
    ds = MHPv2Dataset(mhp_root, "train")
    raises_naming(lambda: ds[1], "70_01_01.png", "does not match image size")
    write_person_png(mhp_root / "train/parsing_annos/7_03_03.png", np.zeros((7, 10)))
    raises_naming(lambda: ds[0], "7_03_03.png", "differs from")


def test_mixed_person_counts(mhp_root):
    write_person_png(mhp_root / "train/parsing_annos/70_02_01.png", np.zeros((8, 10)))
    ds = MHPv2Dataset(mhp_root, "train")
    raises_naming(lambda: ds[1], "70_", "inconsistent person files")


def test_skip_bad_counts_and_substitutes(mhp_root):
    for name in ("71", "72", "73"):
        write_mhp_sample(mhp_root, "train", name, [np.full((8, 10), 4, np.uint8)])
    write_mhp_sample(mhp_root, "train", "9", None)  # image without annotations (index time)
    (mhp_root / "train/parsing_annos/71_01_01.png").write_bytes(b"")  # found at load time
    write_person_png(mhp_root / "train/parsing_annos/72_01_01.png", np.full((8, 10), 60))
    write_list(mhp_root, "train.txt", ["7", "9", "71", "72", "73", "70"])
    with pytest.raises(DatasetError):
        MHPv2Dataset(mhp_root, "train")
    ds = MHPv2Dataset(mhp_root, "train", skip_bad=True)
    assert ds.ids == ["7", "71", "72", "73", "70"] and ds.num_skipped == 1
    # Index 1 (71) and 2 (72) are bad: both fall through to the next good sample, 73.
    assert [ds[i]["name"] for i in range(len(ds))] == ["7", "73", "73", "73", "70"]
    assert ds.num_skipped == 3 and sorted(ds.bad_ids) == ["71", "72", "9"]
    assert "71_01_01.png" in ds.bad_samples["71"] and "60" in ds.bad_samples["72"]
    ds[1]  # a known bad sample is not decoded or counted again
    assert ds.num_skipped == 3


# -- pixel counts and caches -------------------------------------------------------------------


def test_class_pixel_counts_and_cache(mhp_root, monkeypatch):
    ds = MHPv2Dataset(mhp_root, "train")
    direct = sum(np.bincount(ds[i]["mask"].ravel(), minlength=59) for i in range(len(ds)))
    counts = ds.class_pixel_counts()
    assert counts.dtype == np.int64 and counts.shape == (59,)
    np.testing.assert_array_equal(counts, direct)
    cache = mhp_root / "train_class_counts.json"
    assert json.loads(cache.read_text())["counts"] == counts.tolist()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(MHPv2Dataset, "scan", boom)
    np.testing.assert_array_equal(MHPv2Dataset(mhp_root, "train").class_pixel_counts(), direct)
    monkeypatch.undo()
    # A changed list file changes the key: the histogram is recomputed.
    write_list(mhp_root, "train.txt", ["70"])
    np.testing.assert_array_equal(
        MHPv2Dataset(mhp_root, "train").class_pixel_counts(), np.eye(59, dtype=np.int64)[58] * 80
    )


def test_class_pixel_counts_read_only_root_falls_back(mhp_root, tmp_path, monkeypatch):
    real_write = base_mod.write_json

    def refuse_root(path, obj):
        if path.parent == mhp_root:
            raise PermissionError(f"read-only: {path}")
        real_write(path, obj)

    monkeypatch.setattr(base_mod, "write_json", refuse_root)
    cache_dir = tmp_path / "cache"
    counts = MHPv2Dataset(mhp_root, "val", cache_dir=cache_dir).class_pixel_counts()
    assert counts[5] == 18 and counts[0] == 18
    assert not (mhp_root / "val_class_counts.json").exists()
    assert len(list((cache_dir / "class_counts").glob("*_val_class_counts.json"))) == 1


def test_merge_cache(mhp_root, tmp_path, monkeypatch):
    ds = MHPv2Dataset(mhp_root, "train", cache_dir=tmp_path / "cache")
    first = ds[0]["mask"]
    assert len(list((tmp_path / "cache" / "mhp_merged").rglob("7_*.npy.lz4"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("merged again although cached")

    monkeypatch.setattr(mhp_mod, "merge_person_labels", boom)
    np.testing.assert_array_equal(ds[0]["mask"], first)
    # Without cache_dir nothing is cached (the per-person files are merged on every load).
    with pytest.raises(AssertionError, match="merged again"):
        MHPv2Dataset(mhp_root, "train")[0]


# -- transforms and collate --------------------------------------------------------------------


def _colour_coded_sample(h: int = 64, w: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocky mask over classes incl. left/right pairs; image colour = a function of the class."""
    rng = np.random.default_rng(1)
    classes = np.array([0, 3, 5, 6, 12, 24, 25, 30, 31, 58])
    mask = np.kron(rng.choice(classes, size=(h // 16, w // 16)), np.ones((16, 16), int))
    colours = rng.integers(30, 226, size=(256, 3)).astype(np.uint8)
    return colours[mask], mask.astype(np.int64), colours


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 or normalised float -> (H, W, 3) float 0..255."""
    if not image.is_floating_point():
        return image.permute(1, 2, 0).numpy().astype(np.float64)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255.0).permute(1, 2, 0).numpy()


def _interior(mask: np.ndarray, r: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has one label, so their colour is not blended.

    Scale and rotation each interpolate the image bilinearly (a 1-pixel blend at label edges, two
    in a row make 2 pixels); the frame edge counts as an edge too (rotation blends it with black).
    """
    m = np.pad(mask, r, constant_values=-1)
    same = np.ones_like(mask, dtype=bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            same &= m[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_train_transform_keeps_image_and_mask_aligned(flip_prob):
    image, mask, colours = _colour_coded_sample()
    tf = build_train_transform(
        crop_size=(48, 56),
        scale_range=(0.5, 2.0),
        rotate=10,
        flip_pairs=MHP_FLIP_PAIRS,
        flip_prob=flip_prob,
        color_jitter=0.0,
    )
    lut = flip_lut(MHP_FLIP_PAIRS)
    tf = pickle.loads(pickle.dumps(tf))  # DataLoader workers receive a pickled copy
    checked = 0
    for _ in range(6):
        out = tf({"image": image, "mask": mask, "name": "x"})
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 48, 56)
        assert out["mask"].dtype == torch.uint8 and out["mask"].shape == (48, 56)
        got, m = _denormalise(out["image"]), out["mask"].numpy()
        inner = _interior(m)
        labelled = inner & (m != IGNORE_INDEX)
        # A flipped pixel labelled "right arm" came from a "left arm" pixel of the source.
        source_cls = lut[m[labelled]] if flip_prob == 1.0 else m[labelled]
        np.testing.assert_allclose(got[labelled], colours[source_cls], atol=3)
        # Pixels that rotation or padding created carry ignore and a black image.
        ignored = inner & (m == IGNORE_INDEX)
        assert np.abs(got[ignored]).max(initial=0) < 3
        checked += labelled.sum()
    assert checked > 1000
    assert set(np.unique(m)) - {IGNORE_INDEX} <= set(np.unique(mask))


def test_flip_swaps_left_and_right():
    mask = np.zeros((4, 6), np.uint8)
    mask[:, :3] = 5
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :3] = 255
    out = HorizontalFlipSwap(flip_pairs=MHP_FLIP_PAIRS, p=1.0)(image=image, mask=mask)
    assert (out["mask"][:, 3:] == 6).all() and (out["mask"][:, :3] == 0).all()
    assert (out["image"][:, 3:] == 255).all() and (out["image"][:, :3] == 0).all()
    # Through the full pipeline (no scale, rotation or jitter): same result as int64 tensors.
    tf = build_train_transform((4, 6), (1.0, 1.0), 0, MHP_FLIP_PAIRS, 1.0, 0.0)
    got = tf({"image": image, "mask": mask.astype(np.int64), "name": "x"})["mask"]
    assert (got[:, 3:] == 6).all() and (got[:, :3] == 0).all()


def _flipped(mask: torch.Tensor) -> bool:
    """Whether a column-index mask came out mirrored (its labelled values decrease)."""
    row = mask[mask.shape[0] // 2].numpy().astype(np.int64)
    return bool((np.diff(row[row != IGNORE_INDEX]) < 0).any())


def test_flip_is_drawn_independently_of_the_scale():
    """Per-transform generators seeded alike made the p=0.5 flip fire exactly when the random
    scale fell below the middle of its range; one shared stream makes the two independent."""
    import albumentations as A

    tf = build_train_transform((16, 16), (0.5, 2.0), 0, (), 0.5, 0.0, impl="reference")
    scale = next(t for t in tf.aug.transforms if isinstance(t, A.RandomScale))
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.tile(np.arange(16, dtype=np.int64), (16, 1))  # each pixel: its column
    flips, small = [], []
    for seed in range(400):
        out = tf({"image": image, "mask": mask, "name": "x"}, seed=seed)
        flips.append(_flipped(out["mask"]))
        small.append(scale.params["scale"] < 1.25)
    flips, small = np.array(flips), np.array(small)
    assert 0.4 < flips.mean() < 0.6 and 0.4 < small.mean() < 0.6
    # Independent coins agree about half the time (coupled ones: always).
    assert 0.4 < (flips == small).mean() < 0.6
    # Still seeded: the same seed replays the same crop and flip.
    again = tf({"image": image, "mask": mask, "name": "x"}, seed=7)
    first = tf({"image": image, "mask": mask, "name": "x"}, seed=7)
    assert torch.equal(again["mask"], first["mask"])


def test_eval_transform_and_collate_pad_with_ignore():
    tf = build_eval_transform((32, 48))
    items = []
    for i, (h, w) in enumerate([(20, 30), (25, 18)]):
        mask = np.full((h, w), i + 1, np.int64)
        items.append(tf({"image": np.zeros((h, w, 3), np.uint8), "mask": mask, "name": str(i)}))
    assert items[1]["image"].shape == (3, 32, 48) and items[1]["mask"].shape == (25, 18)
    batch = collate_eval(items)
    assert batch["image"].shape == (2, 3, 32, 48) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (2, 25, 30) and batch["mask"].dtype == torch.uint8
    assert batch["orig_size"].tolist() == [[20, 30], [25, 18]]
    assert batch["orig_size"].dtype == torch.int64 and batch["name"] == ["0", "1"]
    assert (batch["mask"][0, :20, :30] == 1).all() and (batch["mask"][0, 20:] == 255).all()
    assert (batch["mask"][1, :, :18] == 2).all() and (batch["mask"][1, :, 18:] == 255).all()
    # Label-free items (test split) collate without a mask.
    no_mask = collate_eval([tf({"image": np.zeros((5, 5, 3), np.uint8), "name": "t"})])
    assert "mask" not in no_mask and no_mask["orig_size"].tolist() == [[5, 5]]


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image, self.mask, _ = _colour_coded_sample()

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform({"image": self.image, "mask": self.mask, "name": str(i)})


def test_workers_draw_different_augmentations():
    tf = build_train_transform((32, 32), (0.5, 2.0), 10, MHP_FLIP_PAIRS, 0.5, 0.2)
    loader = torch.utils.data.DataLoader(_SameImage(tf), batch_size=1, num_workers=2)
    images = [batch["image"] for batch in loader]
    # Items 0/1 come from workers 0/1 at the same point of their random streams.
    assert not torch.equal(images[0], images[1])


# -- synthetic set -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return ensure_synthetic_mhp(tmp_path_factory.mktemp("synth") / "synthetic_mhp", **SMALL_SYNTH)


def test_synthetic_layout(synth_root):
    lists = {p.name: p.read_text().split() for p in (synth_root / "list").iterdir()}
    assert {k: len(v) for k, v in lists.items()} == {
        "train.txt": 24,
        "val.txt": 6,
        "test_all.txt": 3,
    }
    assert not (synth_root / "test" / "parsing_annos").exists()
    for split, names in (("train", lists["train.txt"]), ("val", lists["val.txt"])):
        annos = [ANNO_RE.match(p.name) for p in (synth_root / split / "parsing_annos").iterdir()]
        assert all(annos) and {m[1] for m in annos} == set(names)
        for name in names:
            assert (synth_root / split / "images" / f"{name}.jpg").is_file()
            ks = sorted(int(m[3]) for m in annos if m[1] == name)
            ns = {int(m[2]) for m in annos if m[1] == name}
            assert ns == {len(ks)} and ks == list(range(1, len(ks) + 1)) and 2 <= len(ks) <= 4
    with Image.open(next((synth_root / "train" / "parsing_annos").iterdir())) as im:
        rgb = np.array(im)
    assert im.mode == "RGB" and rgb[..., 1:].max() == 0 and 0 < rgb[..., 0].max() <= 58
    sizes = {Image.open(p).size for p in (synth_root / "train" / "images").iterdir()}
    assert len(sizes) > 5 and all(96 <= s <= 128 for wh in sizes for s in wh)


def test_synthetic_is_deterministic_and_generated_once(tmp_path, synth_root):
    a = ensure_synthetic_mhp(tmp_path / "a", num_train=3, num_val=2, num_test=1, seed=3)
    b = ensure_synthetic_mhp(tmp_path / "b", num_train=3, num_val=2, num_test=1, seed=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # Per-image generators: the first train images equal those of the larger module set.
    assert (a / "train/images/1.jpg").read_bytes() == (
        synth_root / "train/images/1.jpg"
    ).read_bytes()
    stamp = (a / MARKER_NAME).stat().st_mtime_ns
    ensure_synthetic_mhp(tmp_path / "a", num_train=3, num_val=2, num_test=1, seed=3)
    assert (a / MARKER_NAME).stat().st_mtime_ns == stamp  # same parameters: not regenerated
    ensure_synthetic_mhp(tmp_path / "a", num_train=3, num_val=2, num_test=1, seed=4)
    assert (a / "train/images/1.jpg").read_bytes() != (b / "train/images/1.jpg").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_synthetic_mhp(tmp_path / "foreign", num_train=1, num_val=1, num_test=1)


def test_synthetic_loads_overlaps_and_follows_merge_rule(synth_root):
    ds = MHPv2Dataset(synth_root, "train")
    assert len(ds) == 24 and len(MHPv2Dataset(synth_root, "val")) == 6
    assert "mask" not in MHPv2Dataset(synth_root, "test")[0]
    overlapping = 0
    for index, name in enumerate(ds.ids):
        persons = [np.array(Image.open(p))[..., 0] for p in ds.label_paths(name)]
        on = np.stack([p > 0 for p in persons])
        if (on.sum(0) > 1).any():
            overlapping += 1
        # The visible label is that of the last person covering the pixel (painting order).
        expected = np.zeros_like(persons[0])
        for p in persons:
            expected[p > 0] = p[p > 0]
        np.testing.assert_array_equal(ds.load_mask(index), expected)
    assert overlapping >= len(ds) // 2


def test_synthetic_left_right_follow_facing(synth_root):
    ds = MHPv2Dataset(synth_root, "train")
    seen = {True: 0, False: 0}
    for name in ds.ids:
        for path in ds.label_paths(name):
            person = np.array(Image.open(path))[..., 0]
            xs = {c: np.nonzero(person == c)[1] for c in (5, 6, 30, 31)}
            if any(len(v) == 0 for v in xs.values()):
                continue
            front = bool((person == 3).any())  # a visible face = facing the camera
            # Facing the camera, the person's left arm/leg (5, 30) is on the image's right.
            assert (xs[5].mean() > xs[6].mean()) == front
            assert (xs[30].mean() > xs[31].mean()) == front
            seen[front] += 1
    assert seen[True] > 3 and seen[False] > 3


def test_synthetic_class_frequencies(tmp_path):
    root = ensure_synthetic_mhp(tmp_path / "s", num_train=80, num_val=1, num_test=1, seed=0)
    counts = MHPv2Dataset(root, "train").class_pixel_counts()
    fg = counts[1:]
    present = fg[fg > 0]
    assert present.max() >= 100 * present.min()
    assert sum(counts[c] > 0 for c in RARE_CLASSES) >= 3
    for frequent in (3, 4, 5, 6, 12, 13, 17, 30, 31):
        assert counts[frequent] > 0.002 * counts.sum(), MHP_CLASSES[frequent]
    # Tee and polo are equally common: only the collar and buttons tell them apart.
    assert 0.5 < counts[12] / counts[13] < 2.0


# -- datamodule, configs and the check tool ----------------------------------------------------


def test_datamodule_on_synthetic(tmp_path, synth_root):
    dm = MHPv2DataModule(
        root=str(synth_root),
        batch_size=4,
        num_workers=0,
        crop_size=(64, 64),
        eval_size=(80, 72),
        eval_batch_size=3,
        synthetic=SMALL_SYNTH,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 59 and dm.class_names[3] == "Face" and dm.ignore_index == 255
    assert dm.palette.shape == (59, 3)
    train = dm.train_dataloader()
    assert train.drop_last and not train.persistent_workers
    batch = next(iter(train))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)
    assert len(batch["name"]) == 4
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (3, 3, 80, 72) and val["orig_size"].shape == (3, 2)
    h, w = val["orig_size"].max(0).values.tolist()
    assert val["mask"].shape == (3, h, w)
    assert not dm.has_test_labels
    with pytest.raises(RuntimeError, match="no annotations"):
        dm.test_dataloader()
    assert "mask" not in next(iter(dm.predict_dataloader()))
    np.testing.assert_array_equal(
        dm.class_pixel_counts(), MHPv2Dataset(synth_root, "train").class_pixel_counts()
    )
    assert dm.num_skipped == 0


def test_datamodule_test_split_with_labels(tmp_path):
    dm = MHPv2DataModule(
        root=str(tmp_path / "s"),
        batch_size=2,
        num_workers=0,
        crop_size=(32, 32),
        synthetic={"num_train": 2, "num_val": 1, "num_test": 2, "test_labels": True},
    )
    dm.prepare_data()
    assert dm.has_test_labels
    batch = next(iter(dm.test_dataloader()))
    assert batch["mask"].shape[0] == 2 and batch["image"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", ["mhp_v2", "synthetic_mhp"])
def test_data_configs_match_constructor(name, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml"
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(path)})
    keys = set(cfg.data) - {"_target_"}
    params = MHPv2DataModule.argument_names()
    assert keys == params
    assert list(cfg.data.class_names) == list(MHP_CLASSES)
    assert [tuple(p) for p in cfg.data.flip_pairs] == list(MHP_FLIP_PAIRS)
    dm = instantiate(cfg.data)
    assert isinstance(dm, MHPv2DataModule) and dm.num_classes == 59
    assert str(dm.root).startswith(str(tmp_path))
    # palette: null is the VOC colour map (class 1 dark red, class 2 green); a given one is kept.
    assert dm.ignore_index == 255 and dm.palette.shape == (59, 3)
    assert dm.palette[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    cfg.data.palette = [[i, 255 - i, 7] for i in range(59)]
    assert instantiate(cfg.data).palette[58].tolist() == [58, 197, 7]


def test_subclasses_forward_the_base_arguments_and_refuse_a_misspelt_key(tmp_path, capsys):
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from datamodules.errors import ConfigError, run_command
    from datamodules.lip import LIPDataModule
    from datamodules.nyudv2 import NYUDv2DataModule

    base = set(inspect.signature(base_mod.ParsingDataModule.__init__).parameters) - {"self"}
    assert len(base) == 26
    assert MHPv2DataModule.argument_names() == base | {"merge_cache", "pixel_cache", "synthetic"}
    assert LIPDataModule.argument_names() == base | {"eval_affine"}
    assert NYUDv2DataModule.argument_names() == base | {"mapping_file"}
    # Dataset defaults fill what is not given; a given value wins; None names take the dataset's.
    dm = MHPv2DataModule(root=str(tmp_path), rotate=3.0, class_names=None)
    assert dm.rotate == 3.0 and dm.class_names == list(MHP_CLASSES) and dm.flip_pairs[0] == (5, 6)
    assert dm.hparams["rotate"] == 3.0 and dm.hparams["flip_pairs"] == [
        list(p) for p in MHP_FLIP_PAIRS
    ]

    path = Path(__file__).resolve().parents[1] / "conf" / "data" / "synthetic_mhp.yaml"
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(path)})
    cfg.data.crop_szie = [8, 8]
    with pytest.raises(InstantiationException) as caught:
        instantiate(cfg.data)
    assert isinstance(caught.value.__cause__, ConfigError)
    with pytest.raises(SystemExit) as stop:
        run_command(lambda: instantiate(cfg.data))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1
    assert err.startswith("ConfigError: data.crop_szie: MHPv2DataModule has no argument")
    assert "crop_size" in err


def test_check_tool(mhp_root, capsys):
    assert check_main([f"data.root={mhp_root}", "split=[train,val,test]"]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "Tee-shirt" in out
    (mhp_root / "train/parsing_annos/7_03_02.png").write_bytes(b"")
    write_list(mhp_root, "val.txt", ["3", "404"])
    assert check_main([f"data.root={mhp_root}"]) == 1
    out = capsys.readouterr().out
    assert "7_03_02.png" in out and "404.jpg" in out and "2 problem(s)" in out


def test_item_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(DatasetError("a/b.png", "label value 60 outside 0..58")))
    assert str(err) == "a/b.png: label value 60 outside 0..58" and err.path == "a/b.png"
    assert isinstance(err, ValueError) and os.fspath("a/b.png") in str(err)
