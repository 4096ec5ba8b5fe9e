"""mmsegmentation's Cityscapes training recipe: cat_max_ratio crop, PhotoMetricDistortion, configs.

The expected values are computed by hand (step by step with numpy / cv2 in the test, or from the
HSV formulas for single pixels), not by calling the code under test a second time.
"""

from __future__ import annotations

import albumentations as A
import cv2
import hydra
import numpy as np
import pytest
import torch
from cfg_utils import compose_cfg

from datamodules.transforms import (
    CatMaxRatioRandomCrop,
    HorizontalFlipSwap,
    PhotoMetricDistortion,
    build_train_transform,
)

# -- CatMaxRatioRandomCrop -----------------------------------------------------------------------


def _mask(counts: dict[int, int]) -> np.ndarray:
    """A (1, N) mask holding ``counts[v]`` pixels of each value ``v``."""
    return np.concatenate([np.full(n, v, np.uint8) for v, n in counts.items()])[None]


@pytest.mark.parametrize(
    ("counts", "passes"),
    [
        ({3: 10}, False),  # one class
        ({3: 10, 255: 90}, False),  # one class next to ignored pixels
        ({0: 75, 1: 25}, False),  # exactly 0.75 is not below the limit
        ({0: 74, 1: 26}, True),
        ({0: 60, 1: 10, 255: 30}, False),  # 60/70 of the labelled pixels
        ({0: 40, 1: 30, 2: 30, 255: 900}, True),  # ignored pixels do not count
        ({255: 50}, False),  # nothing labelled
    ],
)
def test_crop_check_counts_labelled_pixels_only(counts, passes):
    crop = CatMaxRatioRandomCrop(1, 1, cat_max_ratio=0.75)
    assert crop.crop_passes(_mask(counts)) is passes


def _run_with_boxes(monkeypatch, mask: np.ndarray, boxes: list[tuple[int, int]], **kwargs):
    """Runs the crop with scripted box draws; returns (chosen box, number of draws used)."""
    crop = CatMaxRatioRandomCrop(2, 2, **kwargs)
    it = iter(boxes)
    drawn = []

    def draw(shape):
        drawn.append(next(it))
        return drawn[-1]

    monkeypatch.setattr(crop, "_draw_box", draw)
    params = crop.get_params_dependent_on_data({"shape": mask.shape}, {"mask": mask})
    return (params["top"], params["left"]), len(drawn)


def test_crop_retries_until_a_box_passes(monkeypatch):
    # Class 1 in column 4 only: 2x2 boxes at left 0..2 hold class 0 only, at left 3 or 4 they
    # hold classes 0 and 1 at 50% each.
    mask = np.zeros((2, 6), np.uint8)
    mask[:, 4] = 1
    boxes = [(0, 0), (0, 1), (0, 4), (0, 0)]
    assert _run_with_boxes(monkeypatch, mask, boxes) == ((0, 4), 3)
    # Passing on the first draw: no retry.
    assert _run_with_boxes(monkeypatch, mask, [(0, 3), (0, 0)]) == ((0, 3), 1)


def test_crop_keeps_the_eleventh_box_unchecked_when_none_passes(monkeypatch):
    mask = np.zeros((2, 6), np.uint8)
    boxes = [(0, i % 5) for i in range(12)]  # every box holds class 0 only
    # mmseg: a first box, then at most 10 failed checks, each followed by a new draw; the box
    # drawn after the 10th failure is used as it is.
    assert _run_with_boxes(monkeypatch, mask, boxes) == (boxes[10], 11)
    assert _run_with_boxes(monkeypatch, mask, boxes, max_tries=3) == (boxes[3], 4)
    # cat_max_ratio >= 1 (mmseg's default 1.0) is a plain crop: one draw, no check.
    assert _run_with_boxes(monkeypatch, mask, boxes, cat_max_ratio=1.0) == (boxes[0], 1)


def test_crop_offsets_cover_every_position_and_follow_the_seed():
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    mask = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)  # every pixel its own class: passes
    aug = A.Compose([CatMaxRatioRandomCrop(3, 4, cat_max_ratio=0.75)])
    seen = set()
    for seed in range(300):
        aug.set_random_seed(seed)
        out = aug(image=img, mask=mask)
        top, left = aug.transforms[0].params["top"], aug.transforms[0].params["left"]
        seen.add((top, left))
        np.testing.assert_array_equal(out["image"], img[top : top + 3, left : left + 4])
        np.testing.assert_array_equal(out["mask"], mask[top : top + 3, left : left + 4])
        aug.set_random_seed(seed)
        again = aug(image=img, mask=mask)
        np.testing.assert_array_equal(again["mask"], out["mask"])
    assert seen == {(t, w) for t in range(3) for w in range(4)}  # offsets 0..H-h, 0..W-w


def test_crop_pass_rate_matches_the_retry_rule():
    # 40x40 mask: ignored rows on top, class 1 in a 16x16 bottom-right block, class 0 elsewhere.
    mask = np.zeros((40, 40), np.uint8)
    mask[:4] = 255
    mask[-16:, -16:] = 1
    img = np.zeros((40, 40, 3), np.uint8)
    check = CatMaxRatioRandomCrop(20, 20, cat_max_ratio=0.75).crop_passes
    # Fraction p of the 21 x 21 equally likely 20x20 boxes that pass (enumerated): a plain crop
    # passes with probability p, the cat_max_ratio crop with 1 - (1 - p) ** 11 (10 checked boxes,
    # then an 11th unchecked one).
    p = np.mean([check(mask[t : t + 20, x : x + 20]) for t in range(21) for x in range(21)])
    assert 0.1 < p < 0.2
    rates = {}
    for cmr in (None, 0.75):
        tf = build_train_transform((20, 20), (1.0, 1.0), 0, (), 0.0, 0.0, cat_max_ratio=cmr)
        outs = [
            tf({"image": img, "mask": mask, "name": "x"}, seed=seed)["mask"].numpy()
            for seed in range(400)
        ]
        rates[cmr] = np.mean([check(out.astype(np.uint8)) for out in outs])
    # 400 draws: standard errors below 0.025
    assert abs(rates[None] - p) < 0.07
    assert abs(rates[0.75] - (1 - (1 - p) ** 11)) < 0.07


def test_default_train_transform_is_unchanged():
    ops = build_train_transform((8, 8), impl="reference").aug.transforms
    assert any(type(t) is A.RandomCrop for t in ops)
    assert any(isinstance(t, A.ColorJitter) for t in ops)
    assert not any(isinstance(t, (CatMaxRatioRandomCrop, PhotoMetricDistortion)) for t in ops)
    ops = build_train_transform(
        (8, 8), cat_max_ratio=0.75, photometric="mmseg", impl="reference"
    ).aug.transforms
    assert not any(isinstance(t, (A.RandomCrop, A.ColorJitter)) for t in ops)
    crop = next(t for t in ops if isinstance(t, CatMaxRatioRandomCrop))
    assert (crop.height, crop.width, crop.cat_max_ratio, crop.max_tries) == (8, 8, 0.75, 10)
    # flip, then distortion (mmseg: RandomFlip, PhotoMetricDistortion); normalised on the device
    kinds = [type(t) for t in ops]
    flip_at = kinds.index(HorizontalFlipSwap)
    assert kinds[flip_at + 1 :] == [PhotoMetricDistortion]
    with pytest.raises(ValueError, match="photometric"):
        build_train_transform((8, 8), photometric="mmcv")
    with pytest.raises(ValueError, match="cat_max_ratio"):
        build_train_transform((8, 8), cat_max_ratio=0.0)


def test_seeded_draws_replay_exactly_with_both_options():
    """The sampler's per-sample seed fixes the whole draw (exact resume), options included."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (48, 64)).astype(np.int64)
    mask[:10] = 0
    item = {"image": img, "mask": mask, "name": "a"}
    tf = build_train_transform(
        (24, 32), (0.5, 2.0), 0, (), 0.5, 0.2, cat_max_ratio=0.75, photometric="mmseg"
    )
    outs = [tf(item, seed=s) for s in (11, 12, 11)]
    assert torch.equal(outs[0]["image"], outs[2]["image"])
    assert torch.equal(outs[0]["mask"], outs[2]["mask"])
    assert not torch.equal(outs[0]["image"], outs[1]["image"])
    # A second, freshly built transform gives the same draw for the same seed.
    fresh = build_train_transform(
        (24, 32), (0.5, 2.0), 0, (), 0.5, 0.2, cat_max_ratio=0.75, photometric="mmseg"
    )
    assert torch.equal(fresh(item, seed=11)["image"], outs[0]["image"])


def test_new_transforms_do_not_repeat_the_flip_draw():
    """The transforms share one seeded stream: a p=0.5 flip and the distortion's first p=0.5 coin
    are independent (per-transform generators with one seed would always agree)."""
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.int64)
    mask[:, 4:] = 1
    tf = build_train_transform(
        (8, 8), (1.0, 1.0), 0, (), 0.5, 0.2, cat_max_ratio=0.75, photometric="mmseg",
        impl="reference",
    )  # fmt: skip
    flip = next(t for t in tf.aug.transforms if isinstance(t, HorizontalFlipSwap))
    pmd = next(t for t in tf.aug.transforms if isinstance(t, PhotoMetricDistortion))
    agree = []
    for seed in range(400):
        tf({"image": img, "mask": mask, "name": "x"}, seed=seed)
        agree.append(bool(flip.params) == pmd.params["brightness"])
    assert 0.4 < np.mean(agree) < 0.6


# -- PhotoMetricDistortion -----------------------------------------------------------------------


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def hand_distortion(img: np.ndarray, p: dict) -> np.ndarray:
    """mmseg's sequence, written out independently of the transform."""
    out = img.copy()
    if p["brightness"]:
        out = _convert(out, beta=p["beta"])
    if p["contrast"] and p["contrast_first"]:
        out = _convert(out, alpha=p["alpha"])
    if p["saturation"]:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=p["saturation_alpha"])
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p["hue"]:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        h = hsv[:, :, 0].astype(np.int64) + p["hue_shift"]
        hsv[:, :, 0] = np.mod(h, 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p["contrast"] and not p["contrast_first"]:
        out = _convert(out, alpha=p["alpha"])
    return out


def test_brightness_and_contrast_by_hand():
    t = PhotoMetricDistortion()
    img = np.array([[[0, 10, 250], [255, 128, 3]]], np.uint8)
    # x + 10.7, clipped, truncated: 0 -> 10, 10 -> 20, 250 -> 255, 255 -> 255, 128 -> 138, 3 -> 13
    np.testing.assert_array_equal(
        t.apply(img, brightness=True, beta=10.7), [[[10, 20, 255], [255, 138, 13]]]
    )
    # x - 20.5: 0 -> 0, 10 -> 0, 250 -> 229 (229.5), 255 -> 234, 128 -> 107, 3 -> 0
    np.testing.assert_array_equal(
        t.apply(img, brightness=True, beta=-20.5), [[[0, 0, 229], [234, 107, 0]]]
    )
    # x * 1.5: 0, 15, 255 (375), 255, 192, 4 (4.5)
    np.testing.assert_array_equal(
        t.apply(img, contrast=True, alpha=1.5), [[[0, 15, 255], [255, 192, 4]]]
    )
    # The coin flags gate the steps: all off is the identity.
    np.testing.assert_array_equal(t.apply(img, beta=30.0, alpha=0.5, hue_shift=9), img)


def test_hue_and_saturation_single_pixels_by_hand():
    t = PhotoMetricDistortion()
    # red (H 0, S 255, V 255), blue (H 120), grey (S 0: hue and saturation do nothing)
    img = np.array([[[255, 0, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    # H + 10 = 20 deg: red -> (255, 255 * 20/60, 0); blue 260 deg -> (255 * 20/60, 0, 255)
    np.testing.assert_array_equal(
        t.apply(img, hue=True, hue_shift=10), [[[255, 85, 0], [85, 0, 255], [128, 128, 128]]]
    )
    # H - 10 wraps to 170 (340 deg): red -> (255, 0, 85)
    np.testing.assert_array_equal(
        t.apply(img, hue=True, hue_shift=-10), [[[255, 0, 85], [0, 85, 255], [128, 128, 128]]]
    )
    # H + 60: red -> green; blue: 180 wraps to 0 -> red
    np.testing.assert_array_equal(
        t.apply(img, hue=True, hue_shift=60), [[[0, 255, 0], [255, 0, 0], [128, 128, 128]]]
    )
    # S * 0.5 = 127 (127.5 truncated): min channel = V * (1 - 127/255) = 128
    np.testing.assert_array_equal(
        t.apply(img, saturation=True, saturation_alpha=0.5),
        [[[255, 128, 128], [128, 128, 255], [128, 128, 128]]],
    )


@pytest.mark.parametrize("contrast_first", [True, False])
def test_full_sequence_matches_the_hand_computation(contrast_first):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    params = {
        "brightness": True,
        "beta": -13.25,
        "contrast_first": contrast_first,
        "contrast": True,
        "alpha": 1.37,
        "saturation": True,
        "saturation_alpha": 0.61,
        "hue": True,
        "hue_shift": -17,
    }
    out = PhotoMetricDistortion().apply(img, **params)
    np.testing.assert_array_equal(out, hand_distortion(img, params))
    # The contrast position matters: the other order gives another image.
    other = hand_distortion(img, {**params, "contrast_first": not contrast_first})
    assert not np.array_equal(out, other)


def test_seeded_draws_are_in_range_and_applied_as_drawn():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    aug = A.Compose([PhotoMetricDistortion()])
    t = aug.transforms[0]
    draws = []
    for seed in range(600):
        aug.set_random_seed(seed)
        out = aug(image=img)["image"]
        p = dict(t.params)
        draws.append(p)
        np.testing.assert_array_equal(out, hand_distortion(img, p))
        aug.set_random_seed(seed)
        np.testing.assert_array_equal(aug(image=img)["image"], out)
    for key in ("brightness", "contrast_first", "contrast", "saturation", "hue"):
        assert 0.42 < np.mean([d[key] for d in draws]) < 0.58, key
    betas = [d["beta"] for d in draws]
    assert -32 <= min(betas) < -28 and 28 < max(betas) <= 32
    for key in ("alpha", "saturation_alpha"):
        vals = [d[key] for d in draws]
        assert 0.5 <= min(vals) < 0.55 and 1.45 < max(vals) <= 1.5
    shifts = {d["hue_shift"] for d in draws}
    # numpy.random.randint(-18, 18) as mmseg draws it: -18..17
    assert shifts == set(range(-18, 18))


def test_distortion_needs_uint8():
    with pytest.raises(TypeError, match="uint8"):
        PhotoMetricDistortion().apply(np.zeros((2, 2, 3), np.float32), brightness=True)


# -- the Cityscapes recipes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["pspnet_cityscapes", "deeplabv3plus_cityscapes", "danet_cityscapes"]
)
def test_cityscapes_recipes_compose(name, tmp_path):
    cfg = compose_cfg([f"experiment={name}", "model.pretrained=false"], tmp_path)
    assert list(cfg.data.crop_size) == [512, 1024]
    assert cfg.trainer.precision == "bf16-mixed"  # mmseg trains fp32: disclosed in the README
    assert cfg.data.cat_max_ratio == 0.75 and cfg.data.photometric == "mmseg"
    # mmseg's network: ResNetV1c (deep stem), whose checkpoints load tensor by tensor
    assert cfg.model.backbone == "resnet50_v1c"
    dm = hydra.utils.instantiate(cfg.data, augment_impl="reference")
    ops = dm.train_transform().aug.transforms
    assert any(isinstance(t, CatMaxRatioRandomCrop) and t.cat_max_ratio == 0.75 for t in ops)
    assert any(isinstance(t, PhotoMetricDistortion) for t in ops)
    assert not any(isinstance(t, A.ColorJitter) for t in ops)
    if name == "deeplabv3plus_cityscapes":
        m = cfg.model
        assert (m.aspp_channels, m.low_level_channels, m.decoder_channels) == (512, 48, 512)
        assert m.separable and m.aspp_project_kernel_size == 3
        assert m.dropout_position == "classifier" and m.aux_channels == 256
        with torch.device("meta"):  # the R50 net's module tree, without initialising it
            net = hydra.utils.instantiate(m)
        assert net.aspp.branches[1].depthwise.conv.groups == 2048
        assert net.aspp.branches[1].pointwise.conv.out_channels == 512
        assert net.aspp.project[0].conv.kernel_size == (3, 3)
        assert net.decoder[0].pointwise.conv.in_channels == 512 + 48
        assert net.low_level_reduce.conv.in_channels == 256
    else:
        assert "separable" not in cfg.model


def test_other_deeplab_recipes_keep_plain_convs(tmp_path):
    cfg = compose_cfg(["experiment=deeplabv3plus_mhp", "model.pretrained=false"], tmp_path)
    assert not cfg.model.separable and cfg.model.aspp_channels == 256
    assert cfg.model.aspp_project_kernel_size == 1 and cfg.model.dropout_position == "aspp"
    # The plain data config keeps the old augmentation.
    cfg = compose_cfg(["data=cityscapes"], tmp_path)
    assert cfg.data.cat_max_ratio is None and cfg.data.photometric == "jitter"
