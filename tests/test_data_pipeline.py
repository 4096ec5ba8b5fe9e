"""The fast training pipeline: the fused affine transform against the reference transforms,
reduced JPEG decoding, the merged-label cache, uint8 batches normalised on the device, loaders."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import default_num_workers, read_image, read_image_reduced
from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD, network_batch, normalize_image
from datamodules.mhp import MHP_FLIP_PAIRS, MHPv2DataModule
from datamodules.transforms import (
    AffineTrainTransform,
    AugmentDraw,
    ColorJitterLUT,
    PhotoMetricDistortion,
    TrainTransform,
    build_train_transform,
    seed_augmentation,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _coordinate_sample(h: int = 60, w: int = 84, block: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """An image whose R and G encode column and row (so a warp can be read back), and a label
    map of ``block``-pixel squares over ids 1..200 (many distinct values, none 0 or 255)."""
    y, x = np.mgrid[:h, :w]
    image = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], -1)
    mask = 1 + ((y // block) * 37 + (x // block) * 11) % 200
    return image.astype(np.uint8), mask.astype(np.uint8)


def _reference_params(tf: TrainTransform) -> dict[str, float]:
    """The draws the reference pipeline just made, read off its transforms."""
    ops = {type(t).__name__: t for t in tf.aug.transforms}
    scale = ops["BaseRandomScale"].params["scale"]
    out = {"scale": scale, "flip": float(ops["HorizontalFlipSwap"].params.get("flip", 0.0))}
    return out


@pytest.mark.parametrize("base_size", [48, None])
def test_fused_draws_follow_the_reference_distribution(base_size):
    """Scale, angle, crop offset and flip rate of the fused path and of the reference path over
    the same seeds: same means and spreads within a few standard errors (each n=600)."""
    kwargs = dict(
        crop_size=(40, 40), scale_range=(0.5, 2.0), rotate=10.0, flip_prob=0.5, color_jitter=0.0
    )
    fused = build_train_transform(**kwargs, base_size=base_size, impl="fused")
    ref = build_train_transform(**kwargs, base_size=base_size, impl="reference")
    assert isinstance(fused, AffineTrainTransform) and isinstance(ref, TrainTransform)
    h, w = 60, 84
    n = 600
    stats = {"fused": [], "reference": []}
    for seed in range(n):
        d = fused.draw(seed)
        hs, ws = fused.scaled_size(h, w, d.scale)
        _, _, hp, wp = fused._padded_box(hs, ws)
        top, left = fused.crop_offset(d.crop, hp, wp)
        stats["fused"].append(
            (d.scale, d.angle, top / max(hp - 40, 1), left / max(wp - 40, 1), d.flip)
        )
        seed_augmentation(ref.aug, seed)
        params = ref.aug(image=np.zeros((h, w, 3), np.uint8), mask=np.zeros((h, w), np.uint8))
        del params
        ops = ref.aug.transforms
        scale_op = ops[0]
        rot = next(t for t in ops if isinstance(t, A.Rotate))
        crop = next(t for t in ops if isinstance(t, A.RandomCrop))
        flip = ops[-1]
        s = scale_op.params["scale"]
        hs, ws = fused.scaled_size(h, w, s)
        _, _, hp, wp = fused._padded_box(hs, ws)
        y0 = crop.params["crop_coords"][1] if "crop_coords" in crop.params else None
        x0 = crop.params["crop_coords"][0] if "crop_coords" in crop.params else None
        angle = rot.params["matrix"]
        angle = float(np.degrees(np.arctan2(angle[0][1], angle[0][0])))
        flipped = bool(flip.params.get("apply", False)) if "apply" in flip.params else None
        stats["reference"].append((s, angle, y0 / max(hp - 40, 1), x0 / max(wp - 40, 1), flipped))
    f = np.array(stats["fused"], dtype=float)
    r = np.array([row[:4] for row in stats["reference"]], dtype=float)
    for k, name in enumerate(("scale", "angle", "top", "left")):
        se = np.sqrt(f[:, k].var() / n + r[:, k].var() / n)
        assert abs(f[:, k].mean() - r[:, k].mean()) < 4 * se + 1e-9, name
        assert 0.85 < f[:, k].std() / r[:, k].std() < 1.15, name
    assert f[:, 0].min() >= 0.5 and f[:, 0].max() <= 2.0 and np.abs(f[:, 1]).max() <= 10.0
    # fair coin: within 4 standard errors of 0.5; independent of the scale draw
    assert abs(f[:, 4].mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    assert abs(np.corrcoef(f[:, 0], f[:, 4])[0, 1]) < 4 / np.sqrt(n)


def _reference_chain(image, mask, tf: AffineTrainTransform, d: AugmentDraw):
    """The reference geometry with the fused path's draws: cv2 resize, albumentations' Rotate
    matrix about the centre, centred padding, crop, flip (one op at a time)."""
    h, w = mask.shape
    hs, ws = tf.scaled_size(h, w, d.scale)
    img = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(mask, (ws, hs), interpolation=cv2.INTER_NEAREST_EXACT)
    rot = A.Rotate(limit=(d.angle, d.angle), border_mode=cv2.BORDER_CONSTANT, fill=0,
                   fill_mask=255, p=1.0)  # fmt: skip
    out = A.Compose([rot])(image=img, mask=lab)
    img, lab = out["image"], out["mask"]
    pt, pl, hp, wp = tf._padded_box(hs, ws)
    canvas = np.zeros((hp, wp, 3), np.uint8)
    labels = np.full((hp, wp), 255, np.uint8)
    canvas[pt : pt + hs, pl : pl + ws], labels[pt : pt + hs, pl : pl + ws] = img, lab
    top, left = tf.crop_offset(d.crop, hp, wp)
    img = canvas[top : top + tf.crop_h, left : left + tf.crop_w]
    lab = labels[top : top + tf.crop_h, left : left + tf.crop_w]
    if d.flip:
        img, lab = img[:, ::-1], tf.lut[lab[:, ::-1]]
    return img, lab


@pytest.mark.parametrize("seed", range(6))
def test_fused_warp_equals_the_sequential_reference(seed):
    """One warp of the output window gives the chain of resize, rotate, pad, crop and flip: the
    labels agree at almost every pixel (nearest sampling differs only on ties), the images
    within the blur of one extra bilinear pass, and labels are never interpolated."""
    image, mask = _coordinate_sample()
    tf = build_train_transform(
        (40, 48), (0.5, 2.0), 10.0, MHP_FLIP_PAIRS, 0.5, 0.0, base_size=64, impl="fused"
    )
    d = tf.draw(seed)
    out = tf({"image": image, "mask": mask, "name": "x"}, draw=d)
    ref_img, ref_lab = _reference_chain(image, mask, tf, d)
    got_lab = out["mask"].numpy()
    got_img = out["image"].permute(1, 2, 0).numpy().astype(int)
    # labels are source ids (or their left/right swap, when flipped) or 255, never a blend
    source = np.unique(mask)
    assert set(np.unique(got_lab)) <= set(source) | set(tf.lut[source]) | {255}
    # nearest sampling once instead of twice (resize, then rotate) moves some square edges
    assert (got_lab == ref_lab).mean() > 0.85
    assert ((got_lab == 255) == (ref_lab == 255)).mean() > 0.97
    inside = (ref_lab != 255) & (got_lab != 255)
    # R and G are the source column and row: the two paths sample the same source points
    diff = np.abs(got_img[inside][:, :2] - ref_img.astype(int)[inside][:, :2])
    assert np.median(diff) <= 1 and np.percentile(diff, 95) <= 3


def test_reduced_decoding_keeps_the_geometry(tmp_path):
    """A JPEG decoded at 1/2 or 1/4 and warped from the reduced grid lands where the full-size
    decode lands (the matrix accounts for libjpeg's block centres)."""
    image, mask = _coordinate_sample(200, 264)
    path = tmp_path / "a.jpg"
    Image.fromarray(image).save(path, quality=95)
    full = read_image(path)
    tf = build_train_transform((48, 48), (0.5, 0.5), 7.0, (), 0.0, 0.0, base_size=64)
    d = tf.draw(3)
    # 32 / 264 of the size: an eighth decode is still shrunk (by 0.97) by the warp
    assert tf.reduction(d, 200, 264) == 8
    reduced, r = read_image_reduced(path, lambda h, w: tf.reduction(d, h, w))
    assert r == 8 and reduced.shape == (25, 33, 4)  # RGBX: the fused path's decode
    a = tf({"image": full, "mask": mask, "name": "x"}, draw=d)["image"].numpy().astype(int)
    d.rng = np.random.default_rng(0)
    b = tf({"image": reduced, "mask": mask, "name": "x", "image_reduction": r}, draw=d)
    b = b["image"].numpy().astype(int)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert np.median(np.abs(a[inner][:2] - b[inner][:2])) <= 3


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_decode_equals_opencv_at_every_reduction(tmp_path, mode):
    """simplejpeg gives OpenCV's pixels (both bundle libjpeg-turbo: same IDCT, same upsampling)
    at 1, 1/2, 1/4 and 1/8, as RGB for evaluation and as RGBX (X = 255) for the fused
    training path; a greyscale JPEG comes back as three equal channels, as PIL converts it."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8), (5, 5), 1.5)
    path = tmp_path / "a.jpg"
    Image.fromarray(image).convert(mode).save(path, quality=90)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    flags[8] = cv2.IMREAD_REDUCED_COLOR_8
    full = read_image(path)
    np.testing.assert_array_equal(full, np.asarray(Image.open(path).convert("RGB")))
    for r, flag in flags.items():
        expected = cv2.imdecode(np.fromfile(path, np.uint8), flag)[..., ::-1]  # BGR -> RGB
        got, used = read_image_reduced(path, lambda h, w, r=r: r)
        assert used == r and got.shape == (-(-75 // r), -(-101 // r), 4)
        np.testing.assert_array_equal(got[..., :3], expected)
        assert (got[..., 3] == 255).all()
    np.testing.assert_array_equal(full, cv2.imdecode(np.fromfile(path, np.uint8), 1)[..., ::-1])


def test_fused_transform_gives_the_same_crop_from_rgbx():
    image, mask = _coordinate_sample()
    rgbx = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    tf = build_train_transform((40, 48), (0.5, 2.0), 10.0, MHP_FLIP_PAIRS, 0.5, 0.2, base_size=64)
    for seed in range(4):
        a = tf({"image": image, "mask": mask, "name": "x"}, seed=seed)
        b = tf({"image": rgbx, "mask": mask, "name": "x"}, seed=seed)
        assert a["image"].shape == b["image"].shape == (3, 40, 48)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_reduction_never_upsamples():
    tf = build_train_transform((40, 40), (0.5, 2.0), 0.0, (), 0.0, 0.0, base_size=400)
    for seed in range(200):
        d = tf.draw(seed)
        r = tf.reduction(d, 650, 900)
        hs, ws = tf.scaled_size(650, 900, d.scale)
        assert r in (1, 2, 4, 8) and r * max(hs / 650, ws / 900) <= 1.0
        assert r == 1 or 2 * r * max(hs / 650, ws / 900) > 1.0 or r == 8


def test_truncated_jpeg_still_fails_with_the_file_named(tmp_path):
    image, _ = _coordinate_sample()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(Exception, match="cut.jpg"):
        read_image(path)


def test_color_jitter_lut_is_bit_identical_to_albumentations():
    """ColorJitterLUT (hue on the H plane, contrast mean by OpenCV) under A.Compose and by
    ``seeded`` (no Compose) gives albumentations' own ColorJitter pixels, seed by seed, the
    skipped 20% included; PhotoMetricDistortion's ``seeded`` equals its Compose path."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    jitter = ColorJitterLUT(0.2, 0.2, 0.2, 0.05, p=0.8)
    skipped = 0
    for seed in range(40):
        ours = A.Compose([ColorJitterLUT(0.2, 0.2, 0.2, 0.05, p=0.8)])
        theirs = A.Compose([A.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.8)])
        seed_augmentation(ours, seed)
        seed_augmentation(theirs, seed)
        expected = theirs(image=image)["image"]
        np.testing.assert_array_equal(ours(image=image)["image"], expected)
        np.testing.assert_array_equal(jitter.seeded(image, seed), expected)
        skipped += np.array_equal(expected, image)
    assert 2 <= skipped <= 16  # p = 0.8 of 40
    mmseg = PhotoMetricDistortion()
    for seed in range(10):
        composed = A.Compose([PhotoMetricDistortion()])
        seed_augmentation(composed, seed)
        np.testing.assert_array_equal(mmseg.seeded(image, seed), composed(image=image)["image"])


def test_batches_travel_uint8_and_are_normalised_once_on_the_device():
    image = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mask = torch.tensor([[0, 58, 255]], dtype=torch.uint8).expand(2, 3)
    out = network_batch({"image": image, "mask": mask, "name": ["a", "b"]})
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out["image"], (image.float() / 255 - mean) / std)
    assert out["mask"].dtype == torch.int64 and out["mask"][0].tolist() == [0, 58, 255]
    # already normalised input passes unchanged (predict/export hand floats)
    assert normalize_image(out["image"]) is out["image"]


def test_default_num_workers():
    assert default_num_workers(1, cpus=16) == 15
    assert default_num_workers(4, cpus=16) == 3
    assert default_num_workers(1, cpus=1) == 0
    assert default_num_workers(1, cpus=256) == 32


def _write_mhp(root: Path) -> None:
    import data_pipeline

    data_pipeline.write_mhp_layout(root, 3, (40, 56), 3)


def test_loader_uses_the_merge_cache_and_one_opencv_thread(tmp_path, monkeypatch):
    """prepare_data merges every label map once into cache_dir (the dataset folder stays
    untouched); the loader's batches are uint8 and its workers run OpenCV single-threaded."""
    root = tmp_path / "LV-MHP-v2"
    _write_mhp(root)
    dm = MHPv2DataModule(
        root=str(root), batch_size=2, num_workers=0, crop_size=(32, 32), base_size=48,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.prepare_data()
    cached = sorted((tmp_path / "cache" / "mhp_merged").rglob("*.npy.lz4"))
    assert len(cached) == 6  # 3 train + 3 val (the bench's val lists the same ids)
    dm.setup("fit")
    import datamodules.mhp as mhp_mod

    monkeypatch.setattr(mhp_mod, "merge_person_labels", lambda *a, **k: pytest.fail("merged"))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 32, 32)
    assert batch["mask"].dtype == torch.uint8
    loader = MHPv2DataModule(root=str(root), batch_size=2, num_workers=1, crop_size=(32, 32),
                             cache_dir=str(tmp_path / "cache")).train_dataloader()  # fmt: skip
    assert loader.worker_init_fn is not None
    loader.worker_init_fn(0)
    assert cv2.getNumThreads() == 1


def test_data_pipeline_bench_smoke(tmp_path):
    import data_pipeline

    out = tmp_path / "d.json"
    result = data_pipeline.main(
        ["--size", "72x48", "--images", "4", "--batch", "2", "--batches", "1", "--repeats", "1",
         "--stages", "3", "--data-dir", str(tmp_path / "data"), "--json", str(out)]
    )  # fmt: skip
    stages = result["stage_ms_per_image"]
    assert set(stages) == {"rimlab", "rimlab_pixel_cache"}
    assert all(v >= 0 for ms in stages.values() for v in ms.values())
    assert set(result["images_per_s"]) == set(data_pipeline.VARIANTS)
    assert result["ratio_to_albumentations"]["albumentations"] == pytest.approx(1.0)
    assert all(v > 0 for v in result["images_per_cpu_s"].values())
    assert out.is_file()


def test_damaged_merge_cache_entry_is_merged_again(tmp_path):
    """A truncated LZ4 entry reads as missing: the per-person files are merged again (the same
    map as a dataset without cache) and the entry rewritten."""
    from datamodules.mhp import MHPv2Dataset

    root = tmp_path / "LV-MHP-v2"
    _write_mhp(root)
    ds = MHPv2Dataset(root, "train", cache_dir=tmp_path / "cache")
    expected = MHPv2Dataset(root, "train").load_mask(0)
    np.testing.assert_array_equal(ds.load_mask(0), expected)
    (entry,) = (tmp_path / "cache" / "mhp_merged").rglob(f"{ds.ids[0]}_*.npy.lz4")
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])
    np.testing.assert_array_equal(ds.load_mask(0), expected)
    assert entry.read_bytes() == good


def test_pixel_cache_serves_the_decoded_pixels(tmp_path):
    """With data.pixel_cache, prepare_data stores each training JPEG at every reduction the
    transform can pick; training items are then bit-identical to the decoding path's (same
    draws, same pixels), read from memory maps; a damaged entry is decoded and written again."""
    from datamodules.base import PixelCache, read_image_reduced

    root = tmp_path / "LV-MHP-v2"
    import data_pipeline

    data_pipeline.write_mhp_layout(root, 3, (90, 120), 3)
    kwargs = dict(root=str(root), batch_size=2, num_workers=0, crop_size=(32, 32), base_size=64)
    plain = MHPv2DataModule(**kwargs, cache_dir=str(tmp_path / "c0"))
    cached = MHPv2DataModule(**kwargs, cache_dir=str(tmp_path / "c1"), pixel_cache=True)
    for dm in (plain, cached):
        dm.prepare_data()
        dm.setup("fit")
    tf = cached.train_set.transform
    # 64/120 of the size times 0.5..2: reductions 1 (scale > 0.94) and 2, never 4
    assert tf.reductions(90, 120) == [2, 1]
    entries = sorted((tmp_path / "c1" / "pixels").rglob("*.npy"))
    assert len(entries) == 3 * 2 and not (tmp_path / "c0" / "pixels").exists()
    path = cached.train_set.image_path(cached.train_set.ids[0])
    pixels = PixelCache(entries[0].parent)
    for r in (1, 2):
        stored = np.load(pixels.entry(path, r))
        np.testing.assert_array_equal(stored, read_image_reduced(path, lambda h, w, r=r: r)[0])
    for index in range(3):
        for seed in (1, 2, 3, 4):
            a, b = plain.train_set[(index, seed)], cached.train_set[(index, seed)]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    image, r = read_image_reduced(path, lambda h, w: 1, pixels)
    assert isinstance(image, np.memmap) and r == 1
    entry = pixels.entry(path, 1)
    good = entry.read_bytes()
    entry.write_bytes(good[:100])
    image, _ = read_image_reduced(path, lambda h, w: 1, pixels)
    assert not isinstance(image, np.memmap) and entry.read_bytes() == good
