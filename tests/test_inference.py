"""Tests for lightning_modules.inference: flip TTA, multi-scale, sliding windows, eval configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from lightning_modules.inference import (
    InferenceProtocol,
    flip_logits,
    slide_inference,
    window_boxes,
)

EVAL_CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"
C = 6
PAIRS = [(1, 2), (4, 5)]
SWAP = [0, 2, 1, 3, 5, 4]  # channel order that exchanges the pairs


def _conv(kernel: int, seed: int = 0) -> nn.Conv2d:
    """A fixed random conv 3 -> C; with kernel 3 it is not flip-equivariant."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, C, kernel, padding=kernel // 2).eval()
    for p in conv.parameters():
        p.requires_grad_(False)
    return conv


def _image(h: int, w: int, b: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- flip


def test_flip_logits_moves_pixels_and_swaps_pairs() -> None:
    logits = torch.randn(2, C, 4, 5)
    out = flip_logits(logits, PAIRS)
    for c in range(C):
        torch.testing.assert_close(out[:, SWAP[c]], logits[:, c].flip(-1), rtol=0, atol=0)
    # No pairs: a plain mirror.
    assert torch.equal(flip_logits(logits, []), logits.flip(-1))


def test_flip_logits_twice_is_identity() -> None:
    logits = torch.randn(2, C, 4, 5)
    assert torch.equal(flip_logits(flip_logits(logits, PAIRS), PAIRS), logits)


@pytest.mark.parametrize("pairs", [[(1, 6)], [(1, 2), (2, 3)], [(1, 2, 3)]])
def test_flip_logits_rejects_bad_pairs(pairs: list[tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        flip_logits(torch.zeros(1, C, 2, 2), pairs)


def test_flip_tta_equals_manual_flipping() -> None:
    net, x = _conv(3), _image(7, 9)
    plain = net(x).softmax(1)
    # (B, 3, H, W) mirrored -> probabilities mirrored back, left/right channels exchanged
    mirrored = net(x.flip(-1)).softmax(1).flip(-1)[:, SWAP]
    expected = (plain + mirrored) / 2
    out = InferenceProtocol(flip=True, flip_pairs=PAIRS)(net, x)
    torch.testing.assert_close(out, expected)
    # The swap matters: without it the result differs.
    no_swap = InferenceProtocol(flip=True)(net, x)
    assert not torch.allclose(no_swap, expected)
    # Logit averaging: the same runs, averaged before any softmax.
    out = InferenceProtocol(flip=True, flip_pairs=PAIRS, average="logit")(net, x)
    torch.testing.assert_close(out, (net(x) + net(x.flip(-1)).flip(-1)[:, SWAP]) / 2)


def test_flip_tta_of_a_mirror_equivariant_net_is_its_softmax() -> None:
    # g(x) = h(x) + swap(flip(h(flip(x)))) satisfies g(flip(x)) = swap(flip(g(x))), so both flip
    # runs agree and the average is the plain prediction.
    h = _conv(3)

    def g(x: Tensor) -> Tensor:
        return h(x) + flip_logits(h(x.flip(-1)), PAIRS)

    x = _image(6, 8)
    out = InferenceProtocol(flip=True, flip_pairs=PAIRS)(g, x)
    torch.testing.assert_close(out, g(x).softmax(1))


# ---------------------------------------------------------------------- protocol


def test_default_protocol_returns_net_output_unchanged() -> None:
    net, x = _conv(3), _image(7, 9)
    out = InferenceProtocol()(net, x)
    assert torch.equal(out, net(x))
    # The very tensor: no softmax, no copy.
    seen = []

    def forward(image: Tensor) -> Tensor:
        seen.append(net(image))
        return seen[-1]

    assert InferenceProtocol()(forward, x) is seen[0]


def test_multiscale_single_scale_equals_single_scale() -> None:
    net, x = _conv(3), _image(7, 9)
    assert torch.equal(InferenceProtocol(scales=[1.0])(net, x), InferenceProtocol()(net, x))
    # Two identical runs average to the probabilities of one.
    torch.testing.assert_close(InferenceProtocol(scales=[1.0, 1.0])(net, x), net(x).softmax(1))


def test_multiscale_resizes_image_and_scores_back() -> None:
    net, x = _conv(3), _image(10, 14)
    half = F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False)
    # (B, C, 5, 7) -> (B, C, 10, 14)
    half_scores = F.interpolate(net(half), size=(10, 14), mode="bilinear", align_corners=False)
    expected = (half_scores.softmax(1) + net(x).softmax(1)) / 2
    out = InferenceProtocol(scales=[0.5, 1.0])(net, x)
    assert out.shape == (2, C, 10, 14)
    torch.testing.assert_close(out, expected)
    # Scales x flip: 6 runs, still at the input size, still probabilities.
    out = InferenceProtocol(scales=[0.5, 0.75, 1.5], flip=True, flip_pairs=PAIRS)(net, x)
    assert out.shape == (2, C, 10, 14)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 10, 14))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scales": []},
        {"scales": [0.0]},
        {"mode": "tile"},
        {"average": "max"},
        {"mode": "slide"},
        {"mode": "slide", "crop_size": [4, 4], "stride": [5, 2]},
        {"num_classes": 4, "flip_pairs": [(1, 4)]},
    ],
)
def test_protocol_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        InferenceProtocol(**kwargs)


# ---------------------------------------------------------------------- sliding windows


def _coverage(h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    count = torch.zeros(h, w, dtype=torch.long)
    for y1, y2, x1, x2 in window_boxes(h, w, crop, stride):
        assert (y2 - y1, x2 - x1) == crop
        assert y1 >= 0 and y2 <= h and x1 >= 0 and x2 <= w
        count[y1:y2, x1:x2] += 1
    return count


def test_window_boxes_tile_exactly() -> None:
    boxes = window_boxes(8, 12, (4, 6), (4, 6))
    assert boxes == [(0, 4, 0, 6), (0, 4, 6, 12), (4, 8, 0, 6), (4, 8, 6, 12)]
    assert torch.equal(_coverage(8, 12, (4, 6), (4, 6)), torch.ones(8, 12, dtype=torch.long))


def test_window_boxes_cover_when_not_a_multiple_of_the_stride() -> None:
    # 11 = 4 + 3 + 3 + 1: the last window is moved back to end at the border.
    boxes = window_boxes(11, 13, (4, 5), (3, 4))
    assert max(b[1] for b in boxes) == 11 and max(b[3] for b in boxes) == 13
    assert (_coverage(11, 13, (4, 5), (3, 4)) >= 1).all()
    # Cityscapes: 1024x2048 with 512x1024 windows every (341, 683).
    count = _coverage(1024, 2048, (512, 1024), (341, 683))
    assert (count >= 1).all()
    assert len(window_boxes(1024, 2048, (512, 1024), (341, 683))) == 3 * 3


def test_slide_equals_whole_when_windows_tile_exactly() -> None:
    net, x = _conv(1), _image(8, 12)  # 1x1 conv: each output pixel sees only its input pixel
    out = slide_inference(net, x, (4, 6), (4, 6), num_classes=C)
    torch.testing.assert_close(out, net(x))


def test_slide_overlapping_windows_average_to_whole() -> None:
    net, x = _conv(1), _image(10, 13)
    out = slide_inference(net, x, (6, 8), (3, 4), num_classes=C)
    torch.testing.assert_close(out, net(x))
    # The protocol in slide mode (a single run: logits).
    protocol = InferenceProtocol(mode="slide", crop_size=(6, 8), stride=(3, 4), num_classes=C)
    torch.testing.assert_close(protocol(net, x), net(x))


def test_slide_covers_every_pixel_not_multiple_of_stride() -> None:
    # A net of ones: sum / count is exactly 1 where a window landed, NaN (0 / 0) where none did.
    def ones(image: Tensor) -> Tensor:
        return image.new_ones(image.shape[0], 2, *image.shape[-2:])

    out = slide_inference(ones, _image(11, 17), (4, 5), (3, 4))
    assert torch.equal(out, torch.ones(2, 2, 11, 17))


def test_slide_pads_images_smaller_than_the_crop() -> None:
    shapes = []
    net = _conv(1)

    def forward(image: Tensor) -> Tensor:
        shapes.append(tuple(image.shape[-2:]))
        return net(image)

    x = _image(5, 7)
    out = slide_inference(forward, x, (8, 8), (4, 4))
    assert shapes == [(8, 8)]  # one padded window
    assert out.shape == (2, C, 5, 7)
    torch.testing.assert_close(out, net(x))
    # Smaller in one dimension only: padded rows, sliding columns.
    shapes.clear()
    x = _image(5, 20)
    out = slide_inference(forward, x, (8, 8), (4, 4))
    assert set(shapes) == {(8, 8)} and len(shapes) == 4
    torch.testing.assert_close(out, net(x))


def test_slide_resizes_low_resolution_outputs_to_the_window() -> None:
    net = _conv(1)

    def stride2(image: Tensor) -> Tensor:
        # (B, 3, h, w) -> (B, C, h/2, w/2)
        return net(F.avg_pool2d(image, 2))

    out = slide_inference(stride2, _image(12, 16), (8, 8), (4, 4), num_classes=C)
    assert out.shape == (2, C, 12, 16)
    with pytest.raises(ValueError, match="classes"):
        slide_inference(net, _image(8, 8), (8, 8), (4, 4), num_classes=C + 1)


def test_slide_with_flip_and_scales() -> None:
    net, x = _conv(1), _image(10, 13)
    protocol = InferenceProtocol(
        scales=[1.0], flip=True, flip_pairs=PAIRS, mode="slide", crop_size=(6, 8), stride=(3, 4)
    )
    whole = InferenceProtocol(flip=True, flip_pairs=PAIRS)
    torch.testing.assert_close(protocol(net, x), whole(net, x))


# ---------------------------------------------------------------------- configs


def _root(data: dict, name: str):
    return OmegaConf.merge(
        OmegaConf.create({"data": data}), {"eval": OmegaConf.load(EVAL_CONF / name)}
    )


@pytest.mark.parametrize("name", ["default.yaml", "flip.yaml", "ms_flip.yaml", "slide.yaml"])
def test_eval_configs_instantiate(name: str) -> None:
    data = {
        "flip_pairs": [[14, 15], [16, 17], [18, 19]],
        "crop_size": [512, 1024],
        "num_classes": 20,
    }
    protocol = instantiate(_root(data, name).eval)
    assert isinstance(protocol, InferenceProtocol)
    assert protocol.flip_pairs == ((14, 15), (16, 17), (18, 19))
    assert protocol.num_classes == 20
    expected = {
        "default.yaml": ((1.0,), False, "whole"),
        "flip.yaml": ((1.0,), True, "whole"),
        "ms_flip.yaml": ((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True, "whole"),
        "slide.yaml": ((1.0,), False, "slide"),
    }[name]
    assert (protocol.scales, protocol.flip, protocol.mode) == expected
    if name == "slide.yaml":
        assert protocol.crop_size == (512, 1024)
        assert protocol.stride == (341, 683)
    # Every protocol runs end to end on a tiny net (the slide one with tiny windows).
    if name == "slide.yaml":
        protocol = InferenceProtocol(
            flip_pairs=protocol.flip_pairs, mode="slide", crop_size=(4, 4), num_classes=20
        )
    torch.manual_seed(0)
    net = nn.Conv2d(3, 20, 3, padding=1).eval()
    with torch.no_grad():
        assert protocol(net, torch.randn(1, 3, 9, 10)).shape == (1, 20, 9, 10)


def test_slide_config_follows_the_data_crop() -> None:
    data = {"flip_pairs": [], "crop_size": [473, 473], "num_classes": 20}
    protocol = instantiate(_root(data, "slide.yaml").eval)
    assert protocol.crop_size == (473, 473) and protocol.stride == (315, 315)


# ---------------------------------------------------------------------- predict: class-id PNGs


class _FixedScores(nn.Module):
    """A fake parser net: the same scores for any image, argmax = ``ids``."""

    def __init__(self, ids: Tensor, num_classes: int) -> None:
        super().__init__()
        # (H, W) -> (1, H, W, C) -> (1, C, H, W); the true class gets 5, the others 0
        self.scores = F.one_hot(ids, num_classes).permute(2, 0, 1)[None].float() * 5.0

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.scores.expand(x.shape[0], -1, -1, -1)}


@pytest.mark.parametrize("num_classes", [300, 20])
def test_predict_writes_class_ids_beyond_255_as_16_bit_png(
    num_classes: int, tmp_path: Path
) -> None:
    import numpy as np
    from PIL import Image

    from datamodules.batch import make_palette
    from experiments.predict import predict_image
    from lightning_modules.parser import Parser, save_ids_png

    ids = torch.tensor([[0, 1, 255, 256], [257, 299, 7, 128]]) % num_classes
    parser = Parser(
        net=_FixedScores(ids, num_classes),
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        palette=make_palette(num_classes),
    )
    image = np.full((2, 4, 3), 100, dtype=np.uint8)
    written = predict_image(parser, image, tmp_path / "photo")
    with Image.open(tmp_path / "photo.png") as png:
        mode, back = png.mode, np.asarray(png)
    assert np.array_equal(back, ids.numpy()) and np.array_equal(written, ids.numpy())
    if num_classes > 256:
        # 256..299 would wrap around in 8 bits (256 -> 0); 16-bit grey keeps them.
        assert mode == "I;16" and back.dtype == np.uint16 and int(back.max()) == 299
    else:
        assert mode == "P" and back.dtype == np.uint8  # the palette PNG SCHP users know
    assert (tmp_path / "photo_overlay.jpg").is_file()
    if num_classes > 256:
        from lightning_modules.parser import PredictError, ids_dtype

        with pytest.raises(PredictError, match="65536"):
            ids_dtype(70000)
        # Video frames go through the same writer.
        save_ids_png(tmp_path / "frame.png", ids.numpy(), parser.palette, num_classes)
        with Image.open(tmp_path / "frame.png") as png:
            assert png.mode == "I;16" and np.array_equal(np.asarray(png), ids.numpy())
