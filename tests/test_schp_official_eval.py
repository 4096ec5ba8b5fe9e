"""SCHP's official LIP evaluation geometry (``eval=schp_official``, ``data.eval_affine``).

SCHP (``datasets/datasets.py: LIPDataValSet``, ``utils/transforms.py``, ``utils/miou.py``)
warps each whole image into 473 x 473 with an unrotated affine: the person box is
``(0, 0, W - 1, H - 1)``, its centre ``((W - 1) / 2, (H - 1) / 2)`` goes to the input centre and
its width, widened to the input's aspect ratio, to ``out_w - 1`` pixels. It arg-maxes at the
input and warps the label map back by nearest neighbour through the inverse affine, built from
the centre truncated to integers. Below, that rule is written out in closed form
(``_hand_forward``) and every expectation is derived from it, not from rimlab's code.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from fixtures.lip import write_lip_split
from PIL import Image
from torch import Tensor, nn

from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD, collate_eval, network_batch
from datamodules.lip import LIP_FLIP_PAIRS, LIPDataModule
from datamodules.transforms import build_eval_transform, schp_affine, schp_affine_image
from lightning_modules import ParsingLitModule
from lightning_modules.inference import InferenceProtocol, labels_to_original_affine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [(300, 200), (200, 300), (473, 473), (101, 57), (58, 101)]  # (H, W)
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)


def _hand_forward(
    height: int, width: int, out: tuple[int, int], truncate: bool = False
) -> np.ndarray:
    """SCHP's original -> input map in closed form: ``x' = k (x - cx) + (out_w - 1) / 2``."""
    out_h, out_w = out
    box_w, box_h = width - 1, height - 1
    aspect = out_w / out_h
    if box_w < aspect * box_h:  # widen the box to the input's aspect ratio
        box_w = box_h * aspect
    k = (out_w - 1) / box_w
    cx, cy = (width - 1) / 2, (height - 1) / 2
    if truncate:  # evaluate.py keeps the centres in an np.int32 array
        cx, cy = math.trunc(cx), math.trunc(cy)
    return np.array(
        [[k, 0.0, (out_w - 1) / 2 - k * cx], [0.0, k, (out_h - 1) / 2 - k * cy]], np.float64
    )


def _hand_inverse(forward: np.ndarray) -> np.ndarray:
    k = forward[0, 0]
    return np.array([[1 / k, 0.0, -forward[0, 2] / k], [0.0, 1 / k, -forward[1, 2] / k]])


def _hand_labels_back(labels: np.ndarray, forward: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Each original pixel through ``forward`` to the nearest input pixel; outside: 0."""
    height, width = size
    h, w = labels.shape
    xs = forward[0, 0] * np.arange(width) + forward[0, 2]  # (W,) input columns
    ys = forward[1, 1] * np.arange(height) + forward[1, 2]  # (H,) input rows
    ix, iy = np.floor(xs + 0.5).astype(int), np.floor(ys + 0.5).astype(int)
    out = np.zeros((height, width), dtype=np.int64)
    cols, rows = (ix >= 0) & (ix < w), (iy >= 0) & (iy < h)
    out[np.ix_(rows, cols)] = labels[np.ix_(iy[rows], ix[cols])]
    return out


# -- (a) the matrices ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_affine_matrices_follow_schps_rule(size):
    h, w = size
    out = (473, 473)
    forward = schp_affine(h, w, out)
    np.testing.assert_allclose(forward, _hand_forward(h, w, out), rtol=0, atol=1e-9)
    truncated = schp_affine(h, w, out, truncate_center=True)
    np.testing.assert_allclose(truncated, _hand_forward(h, w, out, True), rtol=0, atol=1e-9)
    inverse = schp_affine(h, w, out, truncate_center=True, inverse=True)
    np.testing.assert_allclose(inverse, _hand_inverse(_hand_forward(h, w, out, True)), atol=1e-9)
    # The long side's first and last pixel centres land on the input's first and last.
    long_first, long_last = (0, w - 1) if w >= h else (0, h - 1)
    axis = 0 if w >= h else 1
    ends = forward[axis, axis] * np.array([long_first, long_last]) + forward[axis, 2]
    np.testing.assert_allclose(ends, [0, 472], atol=1e-9)
    # Truncation moves the map by half an original pixel along each even side, else not at all.
    shift = (truncated - forward)[:, 2]
    k = forward[0, 0]
    np.testing.assert_allclose(shift, [k * 0.5 * (w % 2 == 0), k * 0.5 * (h % 2 == 0)], atol=1e-9)


def test_affine_widens_the_box_to_a_non_square_input():
    # Input 40 x 30 (aspect 0.75). A 21 x 9 image: box 8 x 20, 8 < 0.75 * 20 -> width 15.
    forward = schp_affine(21, 9, (40, 30))
    np.testing.assert_allclose(forward, _hand_forward(21, 9, (40, 30)), atol=1e-9)
    assert forward[0, 0] == pytest.approx(29 / 15)
    # A 9 x 41 image: box 40 x 8, already wider than 0.75 * 8: k = 29 / 40.
    assert schp_affine(9, 41, (40, 30))[0, 0] == pytest.approx(29 / 40)
    with pytest.raises(ValueError, match="degenerate"):
        schp_affine(1, 1, (473, 473))


# -- (b) the input warp ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 200), (101, 57)])
def test_warp_puts_each_pixel_where_the_matrix_says(size):
    h, w = size
    # A linear ramp (columns in channel 0, rows in channel 1): bilinear sampling of a linear
    # function is the function at the sampled point, up to the uint8 rounding.
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    image = np.stack([30 + 200 * xs / (w - 1), 30 + 200 * ys / (h - 1), np.full(xs.shape, 255.0)])
    image = np.round(image.transpose(1, 2, 0)).astype(np.uint8)
    warped, inverse = schp_affine_image(image, (473, 473))
    assert warped.shape == (473, 473, 3) and warped.dtype == np.uint8
    np.testing.assert_allclose(inverse, _hand_inverse(_hand_forward(h, w, (473, 473), True)))
    back = _hand_inverse(_hand_forward(h, w, (473, 473)))  # input -> original, exact centre
    u, v = np.meshgrid(np.arange(473), np.arange(473))
    src_x, src_y = back[0, 0] * u + back[0, 2], back[1, 1] * v + back[1, 2]
    inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    expect_x, expect_y = 30 + 200 * src_x / (w - 1), 30 + 200 * src_y / (h - 1)
    assert np.abs(warped[..., 0][inside] - expect_x[inside]).max() <= 1.0
    assert np.abs(warped[..., 1][inside] - expect_y[inside]).max() <= 1.0
    # More than a pixel outside the image: the black border.
    outside = (src_x < -1) | (src_x > w) | (src_y < -1) | (src_y > h)
    assert outside.any() and not warped[outside].any()
    # A single bright pixel lands on the input pixel the forward matrix rounds it to.
    dot = np.zeros((h, w, 3), np.uint8)
    dot[h // 3, w // 4] = 255
    forward = _hand_forward(h, w, (473, 473))
    x_in, y_in = forward[0, 0] * (w // 4) + forward[0, 2], forward[1, 1] * (h // 3) + forward[1, 2]
    lit = schp_affine_image(dot, (473, 473))[0][..., 0]
    row, col = np.unravel_index(lit.argmax(), lit.shape)
    assert (row, col) == (round(y_in), round(x_in))


# -- (c) the labels back to the original size ----------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_labels_back_equal_a_per_pixel_nearest_neighbour(size):
    h, w = size
    labels = np.random.default_rng(h * w).integers(0, 20, size=(473, 473))
    inverse = torch.from_numpy(schp_affine(h, w, (473, 473), truncate_center=True, inverse=True))
    got = labels_to_original_affine(torch.from_numpy(labels), inverse, (h, w))
    assert got.dtype == torch.int64 and got.shape == (h, w)
    # Every pixel, borders included: cv2 rounds source positions in fixed point (1/1024 px), and
    # with a long side S = max(H, W) - 1 < 512 an original pixel lands either exactly on a
    # rounding tie (none for these sizes) or at least 1 / (2 S) > 1/1024 px away from one, so
    # cv2 and exact nearest neighbour agree everywhere.
    expected = _hand_labels_back(labels, _hand_forward(h, w, (473, 473), True), (h, w))
    np.testing.assert_array_equal(got.numpy(), expected)
    long_side = max(h, w)
    if long_side % 2 == 0 and long_side <= 473:
        # The truncated centre sends the last row / column of an even long side past 472.5:
        # SCHP scores it as background (border 0).
        edge = got[-1, :] if h >= w else got[:, -1]
        assert not edge.any()


def test_labels_back_refuse_a_rounded_matrix():
    inverse = torch.from_numpy(schp_affine(9, 7, (15, 15), truncate_center=True, inverse=True))
    with pytest.raises(ValueError, match="float64"):
        labels_to_original_affine(torch.zeros(15, 15, dtype=torch.long), inverse.float(), (9, 7))


# -- (d) an evaluation step end to end -------------------------------------------------------------


class PixelNet(nn.Module):
    """A per-pixel, not mirror-symmetric 20-class net: a seeded 1 x 1 convolution times a column
    ramp (so the mirrored run differs from the plain one)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.randn(20, 3, 1, 1, generator=torch.Generator().manual_seed(3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        ramp = torch.linspace(0.2, 2.0, x.shape[-1])
        return {"out": nn.functional.conv2d(x, self.weight) * ramp}


def test_eval_step_scores_schps_geometry_end_to_end(tmp_path):
    rng = np.random.default_rng(7)
    sizes = {"even": (14, 9), "odd": (9, 15)}  # (H, W): an even and an odd long side
    images = {n: rng.integers(0, 256, size=(*s, 3), dtype=np.uint8) for n, s in sizes.items()}
    labels = {n: rng.integers(0, 20, size=s) for n, s in sizes.items()}
    write_lip_split(tmp_path, "val", images, labels)
    out = (31, 31)
    dm = LIPDataModule(
        str(tmp_path), batch_size=2, num_workers=0, crop_size=out, base_size=31, eval_affine=True
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["inverse_affine"].shape == (2, 2, 3) and "valid_box" not in batch
    net = PixelNet()
    protocol = InferenceProtocol(
        flip=True, flip_pairs=LIP_FLIP_PAIRS, num_classes=20, average="logit"
    )
    module = ParsingLitModule(
        net=net, loss=nn.Module(), optimizer=lambda params: None, num_classes=20, inference=protocol
    ).eval()
    preds: dict[str, np.ndarray] = {}
    module.prediction_writer = lambda stage, name, ids: preds.__setitem__(name, ids)
    with torch.no_grad():
        module._eval_step(network_batch(batch), module.val_confmat, "val")
    got = module.val_confmat.compute().numpy()

    swap = list(range(20))
    for a, b in LIP_FLIP_PAIRS:
        swap[a], swap[b] = b, a
    expected = np.zeros((20, 20), dtype=np.int64)
    for name in batch["name"]:
        h, w = sizes[name]
        decoded = np.array(Image.open(tmp_path / "val_images" / f"{name}.jpg").convert("RGB"))
        warped = cv2.warpAffine(
            decoded, _hand_forward(h, w, out), (out[1], out[0]), flags=cv2.INTER_LINEAR
        )
        x = torch.from_numpy(((warped / 255.0 - MEAN) / STD).astype(np.float32).transpose(2, 0, 1))
        with torch.no_grad():
            z = net(x[None])["out"][0]  # (20, 31, 31)
            z_mirror = net(x.flip(-1)[None])["out"][0].flip(-1)[swap]
        at_input = (0.5 * (z + z_mirror)).argmax(0).numpy()  # arg-max at the input size
        pred = _hand_labels_back(at_input, _hand_forward(h, w, out, True), (h, w))
        np.testing.assert_array_equal(preds[name], pred)
        expected += np.bincount(labels[name].ravel() * 20 + pred.ravel(), minlength=400).reshape(
            20, 20
        )
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == sum(h * w for h, w in sizes.values())


def test_affine_needs_a_fixed_input_and_is_opt_in():
    image = np.zeros((9, 7, 3), np.uint8)
    with pytest.raises(ValueError, match="fixed input size"):
        build_eval_transform(base_size=31, base_side="short", affine=True)
    with pytest.raises(ValueError, match="fixed input size"):
        build_eval_transform(None, affine=True)
    item = build_eval_transform((20, 16), affine=True)({"image": image, "name": "a"})
    assert item["image"].shape == (3, 20, 16) and item["inverse_affine"].dtype == torch.float64
    # Without eval_affine the LIP input is rimlab's letterbox, as before.
    default = build_eval_transform(base_size=31)({"image": image, "name": "a"})
    assert "inverse_affine" not in default and default["valid_box"].tolist() == [0, 3, 31, 24]
    batch = collate_eval([item, item])
    assert batch["inverse_affine"].shape == (2, 2, 3)
