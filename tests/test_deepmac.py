"""Deep-MAC: crops and paste-back, head families, partial-supervision loss, mask AP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.nets.deepmac import (
    HOURGLASS_LAYOUTS,
    DeepMAC,
    build_mask_head,
    coordinate_channels,
    crop_and_resize,
    jitter_boxes,
    paste_masks,
)
from losses.mask import COCO_CATEGORY_IDS, COCO_NONVOC_IDS, COCO_VOC_IDS, MaskLoss, mask_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- crops and paste-back


def test_crop_equals_direct_indexing_on_integer_boxes():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 3, 20, 24, generator=g)
    # 6x6 boxes at integer corners, read 1:1 (stride 1, one sample per bin)
    boxes = [
        torch.tensor([[2.0, 3.0, 8.0, 9.0], [10.0, 0.0, 16.0, 6.0]]),
        torch.tensor([[18.0, 14.0, 24.0, 20.0]]),
    ]
    crops = crop_and_resize(feats, boxes, 6, stride=1, sampling_ratio=1)
    assert crops.shape == (3, 3, 6, 6)
    torch.testing.assert_close(crops[0], feats[0, :, 3:9, 2:8])
    torch.testing.assert_close(crops[1], feats[0, :, 0:6, 10:16])
    torch.testing.assert_close(crops[2], feats[1, :, 14:20, 18:24])


def test_crop_of_a_double_size_box_is_2x2_average_pooling_and_stride_scales():
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(1, 2, 16, 16, generator=g)
    box = [torch.tensor([[4.0, 2.0, 12.0, 10.0]])]  # 8x8 -> 4x4
    crop = crop_and_resize(feats, box, 4, stride=1, sampling_ratio=2)
    pooled = torch.nn.functional.avg_pool2d(feats[:, :, 2:10, 4:12], 2)
    torch.testing.assert_close(crop, pooled)
    # The same box in a stride-4 image frame: image box x4 reads the same cells.
    crop4 = crop_and_resize(feats, [box[0] * 4], 4, stride=4, sampling_ratio=2)
    torch.testing.assert_close(crop4, pooled)


def test_paste_back_reproduces_the_mask_inside_the_box_and_zero_outside():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 5, generator=g)
    boxes = torch.tensor([[1.0, 2.0, 6.0, 7.0], [7.0, 0.0, 12.0, 5.0]])
    pasted = paste_masks(logits, boxes, (9, 13))
    expect = torch.zeros(2, 9, 13)
    expect[0, 2:7, 1:6] = logits[0].sigmoid()
    expect[1, 0:5, 7:12] = logits[1].sigmoid()
    torch.testing.assert_close(pasted, expect)


def test_crop_then_paste_round_trip_on_a_hand_made_mask():
    mask = torch.zeros(1, 1, 12, 12)
    mask[0, 0, 3:7, 4:10] = 1  # a 4x6 rectangle
    box = torch.tensor([[2.0, 2.0, 10.0, 10.0]])
    crop = crop_and_resize(mask, [box], 8, stride=1, sampling_ratio=1)[:, 0]
    assert crop.sum() == 24 and crop[0, 1:5, 2:8].min() == 1
    back = paste_masks(crop, box, (12, 12), apply_sigmoid=False)[0]
    expect = mask[0, 0].clone()
    torch.testing.assert_close(back, expect)


def test_paste_of_a_half_size_mask_upsamples_bilinearly():
    probs = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = paste_masks(probs, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4), apply_sigmoid=False)[0]
    # pixel centres 0.5..3.5 -> mask coords -0.25, 0.25, 0.75, 1.25; the outer ones take the edge
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(out[1], row)


def test_paste_into_a_half_pixel_box():
    # box [0.5, 4.5): pixel j's centre j + 0.5 reads mask index j - 0.5 (edges repeat), pixel 5 is out
    probs = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).repeat(4, 1)[None]  # (1, 4, 4), varies along x
    out = paste_masks(probs, torch.tensor([[0.5, 0.5, 4.5, 4.5]]), (6, 6), apply_sigmoid=False)[0]
    torch.testing.assert_close(out[2], torch.tensor([0.0, 1 / 6, 1 / 2, 5 / 6, 1.0, 0.0]))
    assert out[5].sum() == 0


def test_forward_without_any_box():
    net = DeepMAC(backbone="lite", fpn_channels=8, head="resnet2", head_channels=8, mask_size=8)
    out = net.eval()(torch.zeros(1, 3, 32, 32), [torch.zeros(0, 4)])
    assert out["mask_logits"].shape == (0, 8, 8)


def test_jitter_keeps_boxes_valid_and_zero_jitter_is_identity():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 30.0, 20.0]])
    assert torch.equal(jitter_boxes(boxes, 0.0, (32, 32)), boxes)
    out = jitter_boxes(boxes, 0.5, (32, 32), torch.Generator().manual_seed(0))
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    assert out.min() >= 0 and out[:, 0::2].max() <= 32


def test_coordinate_channels():
    xy = coordinate_channels(1, 4, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(xy[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(xy[0, 1, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


# ---------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "name", ["hourglass10", "hourglass20", "hourglass52", "hourglass100", "resnet4", "maskrcnn"]
)
def test_head_output_shape(name):
    head = build_mask_head(name, in_channels=6, num_channels=8)
    m = 32 // head.output_scale
    out = head(torch.randn(3, 6, m, m))
    assert out.shape == (3, 1, 32, 32)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_grow_with_depth():
    hg = [_params(build_mask_head(f"hourglass{d}", 6, 8)) for d in (10, 20, 52, 100)]
    assert hg == sorted(hg) and len(set(hg)) == 4
    rn = [_params(build_mask_head(f"resnet{d}", 6, 8)) for d in (2, 4, 8)]
    # each extra residual block adds two 3x3 convs (8*8*9 weights each) and two GroupNorms (2*8 each)
    assert rn[1] - rn[0] == 2 * (2 * (8 * 8 * 9) + 2 * 16)
    assert rn == sorted(rn)
    assert sorted(HOURGLASS_LAYOUTS) == [10, 20, 32, 52, 100]


def test_deepmac_forward_masks_per_box():
    torch.manual_seed(0)
    net = DeepMAC(
        backbone="lite",
        fpn_channels=16,
        head="hourglass10",
        head_channels=8,
        mask_size=16,
        embedding_dim=4,
    )
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 20.0], [8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    out = net.eval()(torch.randn(2, 3, 48, 48), boxes)
    assert out["mask_logits"].shape == (2, 16, 16)
    net_rcnn = DeepMAC(
        backbone="lite",
        fpn_channels=16,
        head="maskrcnn",
        head_channels=8,
        mask_size=16,
        embedding_dim=0,
        use_xy=False,
    )
    assert net_rcnn.crop_size == 8
    assert net_rcnn.eval()(torch.randn(1, 3, 48, 48), boxes[:1])["mask_logits"].shape == (2, 16, 16)


# ---------------------------------------------------------------------- loss


def test_voc_presets_match_the_official_coco_ids():
    assert len(COCO_CATEGORY_IDS) == 80 and max(COCO_CATEGORY_IDS) == 90
    assert len(COCO_VOC_IDS) == 20 and len(COCO_NONVOC_IDS) == 60
    assert set(COCO_VOC_IDS) | set(COCO_NONVOC_IDS) == set(COCO_CATEGORY_IDS)
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(COCO_CATEGORY_IDS)


def test_disallowed_classes_give_zero_loss_and_zero_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    targets = (torch.rand(3, 4, 4, generator=g) > 0.5).float()
    labels = torch.tensor([1, 8, 3])  # 8 (truck) is not a VOC class
    out = mask_loss(logits, targets, labels, COCO_VOC_IDS, dice_weight=0.5)
    out["loss"].backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0
    # the loss equals that of the allowed boxes alone, computed by hand
    p = logits.detach()[[0, 2]].sigmoid()
    t = targets[[0, 2]]
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    dice = (
        1 - (2 * (p * t).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    ).mean()
    torch.testing.assert_close(out["loss"].detach(), bce + 0.5 * dice)
    # changing the disallowed box's logits and target changes nothing
    logits2, targets2 = logits.detach().clone(), targets.clone()
    logits2[1], targets2[1] = 100.0, 1 - targets[1]
    again = mask_loss(logits2, targets2, labels, COCO_VOC_IDS, dice_weight=0.5)["loss"]
    torch.testing.assert_close(again, out["loss"].detach())


def test_no_allowed_box_is_a_connected_zero():
    logits = torch.randn(2, 4, 4, requires_grad=True)
    out = MaskLoss("coco_voc")(logits, torch.ones(2, 4, 4), torch.tensor([8, 10]))
    assert out["loss"].item() == 0.0 and int(out["num_supervised"]) == 0
    out["loss"].backward()
    assert torch.count_nonzero(logits.grad) == 0


# ---------------------------------------------------------------------- mask AP with given boxes


def _write_tiny_coco(path):
    """Two 24x24 images: a 10x10 square of class 1 (uncompressed RLE) and a 6x8 box of class 2."""
    import json

    sq = np.zeros((24, 24), np.uint8)
    sq[4:14, 2:12] = 1
    rect = np.zeros((24, 24), np.uint8)
    rect[10:16, 5:13] = 1

    def rle(m):  # column-major run lengths, starting with zeros
        flat = m.flatten(order="F")
        counts, cur, run = [], 0, 0
        for v in flat:
            if v != cur:
                counts.append(run)
                cur, run = v, 0
            run += 1
        counts.append(run)
        return {"size": list(m.shape), "counts": counts}

    data = {
        "images": [
            {"id": 1, "width": 24, "height": 24, "file_name": "a.png"},
            {"id": 2, "width": 24, "height": 24, "file_name": "b.png"},
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "rect"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle(sq),
                "area": 100,
                "bbox": [2, 4, 10, 10],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "segmentation": rle(rect),
                "area": 48,
                "bbox": [5, 10, 8, 6],
                "iscrowd": 0,
            },
        ],
    }
    path.write_text(json.dumps(data))
    return sq, rect


def _gt_from_json(path):
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    return [
        (
            np.stack([coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=i))]),
            [a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=i))],
        )
        for i in (1, 2)
    ]


def test_mask_ap_is_100_for_perfect_masks(tmp_path):
    from lightning_modules.deepmac_metrics import MaskAPAccumulator

    sq, rect = _write_tiny_coco(tmp_path / "tiny.json")
    gts = _gt_from_json(tmp_path / "tiny.json")
    np.testing.assert_array_equal(gts[0][0][0], sq)  # the RLE decodes to the hand-made mask
    np.testing.assert_array_equal(gts[1][0][0], rect)
    acc = MaskAPAccumulator()
    for masks, labels in gts:
        acc.update(masks, masks.copy(), labels)
    scores = acc.compute({"seen": [1], "unseen": [2], "all": None})
    for group in ("seen", "unseen", "all"):
        assert scores[group]["AP"] == pytest.approx(100.0)
        assert scores[group]["mIoU"] == pytest.approx(100.0)


def test_mask_ap_of_a_shifted_mask_drops_as_computed_by_hand(tmp_path):
    from lightning_modules.deepmac_metrics import MaskAPAccumulator

    _write_tiny_coco(tmp_path / "tiny.json")
    gts = _gt_from_json(tmp_path / "tiny.json")
    acc = MaskAPAccumulator()
    # square shifted 2 px right: IoU = 80 / 120 = 2/3, a match at IoU thresholds 0.50..0.65 (4 of
    # the 10 thresholds 0.50:0.05:0.95), a miss above -> AP = 4/10; AP50 = 100, AP75 = 0.
    shifted = np.roll(gts[0][0], 2, axis=2)
    acc.update(gts[0][0], shifted, gts[0][1])
    acc.update(gts[1][0], gts[1][0].copy(), gts[1][1])
    scores = acc.compute({"seen": [1], "unseen": [2], "all": None})
    assert scores["seen"]["AP"] == pytest.approx(40.0)
    assert scores["seen"]["AP50"] == pytest.approx(100.0)
    assert scores["seen"]["AP75"] == pytest.approx(0.0)
    assert scores["seen"]["mIoU"] == pytest.approx(100 * 2 / 3)
    assert scores["unseen"]["AP"] == pytest.approx(100.0)
    # "all" averages the per-class APs: (40 + 100) / 2; IoU averages instances: (2/3 + 1) / 2
    assert scores["all"]["AP"] == pytest.approx(70.0)
    assert scores["all"]["mIoU"] == pytest.approx(100 * 5 / 6)
    assert scores["per_class_IoU"] == {1: pytest.approx(100 * 2 / 3), 2: pytest.approx(100.0)}
