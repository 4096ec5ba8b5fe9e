"""Aspect-preserving evaluation input (``data.eval_keep_ratio``), as SCHP evaluates LIP.

The image is scaled by ``s = min(h / H, w / W)``, centred in the ``(h, w)`` input and padded with
black; the scores are cropped back to the image's box and resized to ``(H, W)`` before the argmax.
Expected values below are derived by hand or rebuilt step by step with plain cv2 / torch calls.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.batch import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    collate_eval,
    network_batch,
    normalize_image,
)
from datamodules.transforms import build_eval_transform, letterbox_box
from lightning_modules import ParsingLitModule
from lightning_modules.inference import InferenceProtocol, flip_logits, slide_inference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)


def _normalise(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet normalisation on the 0..1 scale."""
    return ((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def _smooth_image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _item(image: np.ndarray, mask: np.ndarray | None, name: str, keep_ratio: bool = True):
    item = {"image": image, "name": name}
    if mask is not None:
        item["mask"] = mask
    out = build_eval_transform((8, 8), keep_ratio=keep_ratio)(item)
    # normalised here as the module normalises after the transfer
    return {**out, "image": normalize_image(out["image"])}


class RowRamp(nn.Module):
    """Logits that depend on the input row only: class 0 scores 0, class 1 scores ``t - row``."""

    def __init__(self, t: float = 3.0) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        b, _, h, w = x.shape
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(b, 1, h, w)
        return {"out": torch.cat([torch.zeros_like(rows), self.t - rows], 1)}


class RedNet(nn.Module):
    """Per-pixel function of the input: class 1 where the normalised red channel is positive."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], 1)}


class SmallConv(nn.Module):
    """A fixed, not mirror-symmetric 3-class net (a seeded 3x3 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.conv(x)}


def _module(net: nn.Module, num_classes: int, inference=None):
    module = ParsingLitModule(
        net=net,
        loss=nn.Module(),
        optimizer=lambda params: None,
        num_classes=num_classes,
        inference=inference,
    ).eval()
    preds: dict[str, np.ndarray] = {}
    module.prediction_writer = lambda stage, name, ids: preds.__setitem__(name, ids)
    return module, preds


def _run_eval(module, batch) -> np.ndarray:
    with torch.no_grad():
        module._eval_step(network_batch(batch), module.val_confmat, "val")
    return module.val_confmat.compute().numpy()


# -- the transform ----------------------------------------------------------------------------


def test_letterbox_transform_of_a_wide_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 12, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, size=(6, 12)).astype(np.int64)
    out = _item(image, mask, "wide")
    # s = min(8/6, 8/12) = 2/3 -> (6*2/3, 12*2/3) = (4, 8); 4 spare rows, 2 above, 2 below.
    assert out["valid_box"].dtype == torch.int64
    assert out["valid_box"].tolist() == [2, 0, 4, 8]
    assert out["image"].shape == (3, 8, 8) and out["orig_size"].tolist() == [6, 12]
    x = out["image"].numpy()
    black = -MEAN / STD  # a 0 pixel after normalisation
    for row in (0, 1, 6, 7):
        np.testing.assert_allclose(x[:, row, :], np.repeat(black[:, None], 8, 1), atol=1e-6)
    interior = _normalise(cv2.resize(image, (8, 4), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_allclose(x[:, 2:6, :], interior, atol=1e-5)
    # The label is untouched (scored at the original resolution).
    np.testing.assert_array_equal(out["mask"].numpy(), mask)
    # Without keep_ratio: the stretched image fills the input and there is no box.
    plain = _item(image, mask, "wide", keep_ratio=False)
    assert "valid_box" not in plain
    stretched = _normalise(cv2.resize(image, (8, 8), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_allclose(plain["image"].numpy(), stretched, atol=1e-5)


def test_letterbox_boxes_by_hand():
    # (H, W) into (h, w) -> (top, left, height, width)
    assert letterbox_box(12, 6, 8, 8) == (0, 2, 8, 4)  # tall: 2 columns each side
    assert letterbox_box(5, 12, 8, 8) == (2, 0, 3, 8)  # 5*2/3 = 3.33 -> 3 rows; 5 spare: 2 + 3
    assert letterbox_box(12, 5, 8, 8) == (0, 2, 8, 3)  # 3 columns; 5 spare: 2 left, 3 right
    assert letterbox_box(4, 8, 8, 8) == (2, 0, 4, 8)  # s = 1: no resize at all
    assert letterbox_box(600, 400, 473, 473) == (0, 79, 473, 315)  # 400*473/600 = 315.3
    assert letterbox_box(473, 473, 473, 473) == (0, 0, 473, 473)
    # No eval_size (full-resolution evaluation): keep_ratio has nothing to do.
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    out = build_eval_transform(None, keep_ratio=True)({"image": image, "name": "x"})
    assert "valid_box" not in out and out["image"].shape == (3, 5, 7)


def test_collate_stacks_boxes_and_datamodule_passes_the_option(tmp_path):
    items = [
        _item(np.zeros((6, 12, 3), np.uint8), np.zeros((6, 12), np.int64), "a"),
        _item(np.zeros((12, 6, 3), np.uint8), np.zeros((12, 6), np.int64), "b"),
    ]
    batch = collate_eval(items)
    assert batch["valid_box"].dtype == torch.int64
    assert batch["valid_box"].tolist() == [[2, 0, 4, 8], [0, 2, 8, 4]]
    assert "valid_box" not in collate_eval(
        [_item(np.zeros((6, 12, 3), np.uint8), None, "c", False)]
    )

    from datamodules.cityscapes import CityscapesDataModule
    from datamodules.lip import LIPDataModule
    from datamodules.mhp import MHPv2DataModule
    from datamodules.nyudv2 import NYUDv2DataModule

    # Cityscapes with explicit names and palette: no label-table package needed.
    names = {"class_names": [str(i) for i in range(19)], "palette": [[i, i, i] for i in range(19)]}
    for cls in (LIPDataModule, MHPv2DataModule, NYUDv2DataModule, CityscapesDataModule):
        kwargs = {"root": str(tmp_path), "eval_size": (8, 8)}
        kwargs |= names if cls is CityscapesDataModule else {}
        dm = cls(eval_keep_ratio=True, **kwargs)
        assert dm.eval_keep_ratio and dm.hparams["eval_keep_ratio"] is True
        assert dm.eval_transform().letterbox == (8, 8)
        assert cls(**kwargs).eval_transform().letterbox is None


# -- the evaluation step ----------------------------------------------------------------------


def test_eval_step_crops_the_box_before_upsampling():
    """RowRamp (class 1 where ``3 - input row > 0``) on a 6x12 image in an 8x8 input.

    keep_ratio: the box is rows 2..5, whose scores ``[1, 0, -1, -2]`` upsampled to 6 rows
    (bilinear, align_corners=False: source rows -1/6 (clamped), 1/2, 7/6, 11/6, 5/2, 19/6
    (clamped)) are ``[1, 0.5, -1/6, -5/6, -1.5, -2]``: class 1 in rows 0 and 1.
    Stretched: the 8 rows ``[3, 2, ..., -4]`` resampled at 1/6, 3/2, 17/6, 25/6, ... give
    ``[17/6, 1.5, 1/6, -7/6, ...]``: class 1 in rows 0, 1 and 2.
    """
    image = _smooth_image(0, (6, 12))
    label = np.zeros((6, 12), np.int64)
    label[:2] = 1
    expected = label.astype(np.uint8)
    for keep_ratio, confusion in ((True, [[48, 0], [0, 24]]), (False, [[36, 12], [0, 24]])):
        module, preds = _module(RowRamp(3.0), 2)
        batch = collate_eval([_item(image, label, "a", keep_ratio)])
        np.testing.assert_array_equal(_run_eval(module, batch), confusion)
        if keep_ratio:
            np.testing.assert_array_equal(preds["a"], expected)
        else:
            assert preds["a"][2].tolist() == [1] * 12  # the stretched input moves the boundary


def test_eval_step_mixed_sizes_and_input_dependent_net():
    """RedNet at scale 1 (4x8 into 8x8: the image sits unresized in rows 2..5): the prediction at
    the original size is exactly ``red > 0.485 * 255``; a second, tall image shares the batch."""
    rng = np.random.default_rng(1)
    wide = np.full((4, 8, 3), 128, np.uint8)
    wide[..., 0] = rng.choice([0, 255], size=(4, 8)).astype(np.uint8)
    wide[0, :, 0] = 255  # the first row is red: stretched-and-shrunk padding would kill it
    tall = np.full((12, 6, 3), 128, np.uint8)
    tall[..., 0] = np.where(np.arange(6) < 3, 255, 0).astype(np.uint8)[None, :]
    wide_ids = (wide[..., 0] > 0.485 * 255).astype(np.int64)
    tall_ids = (tall[..., 0] > 0.485 * 255).astype(np.int64)
    module, preds = _module(RedNet(), 2)
    batch = collate_eval([_item(wide, wide_ids, "wide"), _item(tall, tall_ids, "tall")])
    confusion = _run_eval(module, batch)
    np.testing.assert_array_equal(preds["wide"], wide_ids)
    np.testing.assert_array_equal(preds["tall"], tall_ids)
    assert confusion.sum() == 4 * 8 + 12 * 6 and np.trace(confusion) == confusion.sum()


def _manual_letterbox_input(image: np.ndarray) -> tuple[Tensor, tuple[int, int, int, int]]:
    """The 8x8 input built without the transform: cv2.resize, zero padding, normalisation."""
    h, w = image.shape[:2]
    s = min(8 / h, 8 / w)
    bh, bw = int(h * s + 0.5), int(w * s + 0.5)
    top, left = (8 - bh) // 2, (8 - bw) // 2
    canvas = np.zeros((8, 8, 3), np.uint8)
    canvas[top : top + bh, left : left + bw] = cv2.resize(image, (bw, bh))
    return torch.from_numpy(_normalise(canvas))[None], (top, left, bh, bw)


def _crop_up(scores: Tensor, box, size) -> Tensor:
    top, left, bh, bw = box
    crop = scores[:, :, top : top + bh, left : left + bw]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_flip_protocol_with_keep_ratio_equals_manual(shape):
    """Flip TTA sees a mirrored letterbox (odd spare columns: the image moves by one column); the
    un-mirrored scores line up with the input again, so the crop comes after the protocol."""
    image = _smooth_image(2, shape)
    net = SmallConv().eval()
    protocol = InferenceProtocol(flip=True, flip_pairs=[(1, 2)], num_classes=3)
    module, preds = _module(net, 3, inference=protocol)
    _run_eval(module, collate_eval([_item(image, np.zeros(shape, np.int64), "a")]))
    x, box = _manual_letterbox_input(image)
    with torch.no_grad():
        p = net(x)["out"].softmax(1)
        mirrored = net(x.flip(-1))["out"].flip(-1)[:, [0, 2, 1]].softmax(1)
        expected = _crop_up((p + mirrored) / 2, box, shape).argmax(1)[0].numpy()
        no_flip = _crop_up(p, box, shape).argmax(1)[0].numpy()
    np.testing.assert_array_equal(preds["a"], expected)
    assert len(np.unique(expected)) > 1 and (expected != no_flip).any()


def test_multiscale_flip_and_slide_protocols_with_keep_ratio():
    image = _smooth_image(3, (12, 5))
    net = SmallConv().eval()
    x, box = _manual_letterbox_input(image)
    # Multi-scale + flip, rebuilt run by run.
    protocol = InferenceProtocol(scales=(0.75, 1.5), flip=True, flip_pairs=[(1, 2)], num_classes=3)
    module, preds = _module(net, 3, inference=protocol)
    _run_eval(module, collate_eval([_item(image, np.zeros((12, 5), np.int64), "a")]))
    total = 0
    with torch.no_grad():
        for size in ((6, 6), (12, 12)):
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for mirror in (False, True):
                out = net(scaled.flip(-1) if mirror else scaled)["out"]
                out = F.interpolate(out, size=(8, 8), mode="bilinear", align_corners=False)
                out = flip_logits(out, [(1, 2)]) if mirror else out
                total = total + out.softmax(1)
    expected = _crop_up(total / 4, box, (12, 5)).argmax(1)[0].numpy()
    np.testing.assert_array_equal(preds["a"], expected)
    # Sliding windows (4x4, stride 3) over the letterboxed input, then the crop: works as well.
    protocol = InferenceProtocol(mode="slide", crop_size=(4, 4), stride=(3, 3), num_classes=3)
    module, preds = _module(net, 3, inference=protocol)
    _run_eval(module, collate_eval([_item(image, np.zeros((12, 5), np.int64), "a")]))
    with torch.no_grad():
        slid = slide_inference(lambda t: net(t)["out"], x, (4, 4), (3, 3))
    np.testing.assert_array_equal(preds["a"], _crop_up(slid, box, (12, 5)).argmax(1)[0].numpy())


def test_low_resolution_logits_are_brought_to_the_input_size_first():
    """A net with stride-2 output: its logits go to the 8x8 input size, then the crop."""

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = SmallConv()

        def forward(self, x):
            return {"out": F.avg_pool2d(self.inner(x)["out"], 2)}

    image = _smooth_image(4, (6, 12))
    net = Half().eval()
    module, preds = _module(net, 3)
    _run_eval(module, collate_eval([_item(image, np.zeros((6, 12), np.int64), "a")]))
    x, box = _manual_letterbox_input(image)
    with torch.no_grad():
        up = F.interpolate(net(x)["out"], size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(preds["a"], _crop_up(up, box, (6, 12)).argmax(1)[0].numpy())


def test_dashboard_example_crops_the_box():
    from lightning_modules.dashboard import validation_example

    image = _smooth_image(5, (6, 12))
    label = np.zeros((6, 12), np.int64)
    label[:2] = 1
    module, _ = _module(RowRamp(3.0), 2)
    img, gt, pred = validation_example(module, collate_eval([_item(image, label, "a")]))
    assert img.shape == (6, 12, 3) and gt.shape == (6, 12)
    np.testing.assert_array_equal(pred, label)  # the hand-derived map of the eval-step test
    # The overlay image is the picture without its black bands (close to the original).
    assert np.abs(img.astype(int) - image.astype(int)).mean() < 12


# -- predict ----------------------------------------------------------------------------------


def test_predict_parser_matches_validation_path():
    from datamodules.batch import make_palette
    from experiments.predict import Parser

    net = SmallConv().eval()
    protocol = InferenceProtocol(flip=True, flip_pairs=[(1, 2)], num_classes=3)
    parser = Parser(
        net=net,
        num_classes=3,
        class_names=["a", "b", "c"],
        palette=make_palette(3),
        flip_pairs=[[1, 2]],
        eval_size=(8, 8),
        keep_ratio=True,
        inference=protocol,
    )
    module, preds = _module(net, 3, inference=protocol)
    for shape in ((12, 5), (6, 12)):
        image = _smooth_image(6, shape)
        _run_eval(module, collate_eval([_item(image, np.zeros(shape, np.int64), "v")]))
        ids, scores = parser.predict(image)
        assert scores.shape == (3, *shape)
        np.testing.assert_array_equal(ids, preds["v"])


# -- end to end -------------------------------------------------------------------------------


def test_quickstart_validation_with_keep_ratio_and_predict(tmp_path):
    """Validation of the tiny quickstart model with data.eval_keep_ratio=true, a checkpoint saved
    by the trainer, and predict reading the option back from it."""
    import lightning.pytorch as pl
    from cfg_utils import SINGLE, TINY, compose_cfg

    from datamodules.mhp import MHPv2Dataset
    from experiments.build import build_datamodule, build_module
    from experiments.predict import load_parser

    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "data.eval_size=[40,48]",
            "data.eval_keep_ratio=true",
        ],
        tmp_path,
    )
    torch.manual_seed(0)
    module, datamodule = build_module(cfg), build_datamodule(cfg)
    preds: dict[str, np.ndarray] = {}
    module.prediction_writer = lambda stage, name, ids: preds.__setitem__(name, ids)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val = MHPv2Dataset(tmp_path / "data" / "synthetic_mhp", "val")
    labelled = sum(int((val.load(i)["mask"] != 255).sum()) for i in range(len(val)))
    assert int(module.last_scores["val"]["confusion"].sum()) == labelled
    assert sorted(preds) == sorted(val.ids)
    assert any(val.load(i)["image"].shape[0] != val.load(i)["image"].shape[1] for i in range(6))

    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["rimlab_config"]["data"]["eval_keep_ratio"] is True
    assert saved["datamodule_hyper_parameters"]["eval_keep_ratio"] is True
    parser = load_parser(ckpt, "cpu")
    assert parser.keep_ratio and parser.eval_size == (40, 48)
    item = val.load(0)
    ids, _ = parser.predict(item["image"])
    np.testing.assert_array_equal(ids, preds[val.ids[0]])
    # keep_ratio=false on the command line goes back to the stretched input.
    assert not load_parser(ckpt, "cpu", keep_ratio=False).keep_ratio
