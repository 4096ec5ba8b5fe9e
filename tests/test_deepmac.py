"""Deep-MAC: crops and paste-back, head families, partial-supervision loss, mask AP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fixtures.coco import mask_annotation, write_coco

from lightning_modules.nets.deepmac import (
    HOURGLASS_LAYOUTS,
    RESNET_LAYOUTS,
    DeepMAC,
    PreActBasicBlock,
    aligned_box_iou,
    build_mask_head,
    coordinate_channels,
    crop_and_resize,
    jitter_boxes,
    paste_masks,
    proposal_boxes,
)
from losses.mask import COCO_CATEGORY_IDS, COCO_NONVOC_IDS, COCO_VOC_IDS, MaskLoss, mask_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_deepmac(**overrides: object) -> DeepMAC:
    """A Deep-MAC small enough for CPU tests: lite backbone, 8-channel FPN, ResNet-4 head.

    ``embedding_hidden`` only sizes the embedding / centre nets, so it is inert where
    ``overrides`` switch them all off.
    """
    kwargs = dict(
        backbone="lite",
        fpn_channels=8,
        head="resnet4",
        head_channels=4,
        mask_size=8,
        embedding_hidden=8,
    )
    return DeepMAC(**(kwargs | overrides))


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
    net = _tiny_deepmac(head_channels=8)
    out = net.eval()(torch.zeros(1, 3, 32, 32), [torch.zeros(0, 4)])
    assert out["mask_logits"].shape == (0, 8, 8)


def test_jitter_keeps_boxes_valid_and_zero_jitter_is_identity():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 30.0, 20.0]])
    assert torch.equal(jitter_boxes(boxes, 0.0, (32, 32)), boxes)
    out = jitter_boxes(boxes, 0.5, (32, 32), torch.Generator().manual_seed(0))
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    assert out.min() >= 0 and out[:, 0::2].max() <= 32


def test_aligned_iou_matches_torchvision_on_hand_made_boxes():
    from torchvision.ops import box_iou

    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 5.0]])
    b = torch.tensor([[2.0, 0.0, 6.0, 4.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 3.0, 5.0]])
    # 8 / 24, disjoint, identical
    torch.testing.assert_close(aligned_box_iou(a, b), torch.tensor([1 / 3, 0.0, 1.0]))
    torch.testing.assert_close(aligned_box_iou(a, b), box_iou(a, b).diagonal())


def test_proposal_boxes_iou_is_uniform_over_the_foreground_range():
    from torchvision.ops import box_iou

    # inside the image, at a corner, the whole frame, a 2-pixel box
    boxes = torch.tensor(
        [[10.0, 12.0, 40.0, 30.0], [50.0, 50.0, 62.0, 63.0], [0.0, 0.0, 64.0, 64.0], [5, 5, 7, 7]]
    )
    n = 400
    out = proposal_boxes(boxes.repeat(n, 1), (64, 64), generator=torch.Generator().manual_seed(0))
    iou = box_iou(out, boxes.repeat(n, 1)).diagonal().view(n, 4)  # independent IoU
    assert iou.min() >= 0.5 - 1e-4 and iou.max() <= 1 + 1e-6
    assert out.min() >= 0 and out.max() <= 64
    for k in range(4):
        # 5 bins of width 0.1: Binomial(400, 0.2) counts, mean 80, sd 8; +-5 sd
        counts = torch.histc(iou[:, k], bins=5, min=0.5, max=1.0)
        assert counts.min() >= 40 and counts.max() <= 120, (k, counts)
    narrow = proposal_boxes(boxes, (64, 64), (0.6, 0.7), torch.Generator().manual_seed(1))
    v = box_iou(narrow, boxes).diagonal()
    assert ((v >= 0.6 - 1e-4) & (v <= 0.7 + 1e-4)).all()


def test_proposal_mode_crops_targets_with_the_proposals():
    net = _tiny_deepmac(box_jitter_mode="proposal")
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0]])]
    torch.manual_seed(0)
    used = net.train()(torch.zeros(1, 3, 48, 48), boxes)["boxes"]
    iou = aligned_box_iou(used[0], boxes[0])
    assert 0.5 - 1e-4 <= iou.item() < 1
    assert torch.equal(net.eval()(torch.zeros(1, 3, 48, 48), boxes)["boxes"][0], boxes[0])


def test_crop_geometry_stays_fp32_under_bf16_autocast():
    # features = x - 100 along the width: a 1x1 crop of the box [x1, x1 + 1] reads the value at
    # its centre x1 + 0.5, i.e. pixel x1 (aligned roi_align), so the crop equals x1 - 100.
    feats = (torch.arange(128.0) - 100).repeat(1, 1, 4, 1)  # (1, 1, 4, 128)
    box = torch.tensor([[100.7, 0.0, 101.7, 1.0]])  # bf16 would round 100.7 to 100.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crop = crop_and_resize(feats.bfloat16(), [box], 1, 1.0, 1)
    assert crop.dtype == torch.bfloat16
    assert abs(crop.float().item() - 0.7) < 0.01  # bf16 keeps 0.7 to 0.004
    rounded = crop_and_resize(feats, [box.bfloat16().float()], 1, 1.0, 1)
    assert abs(rounded.item() - 0.5) < 1e-6  # what the bf16 box read
    net = _tiny_deepmac().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64), [torch.tensor([[3.3, 5.1, 60.7, 41.9]])])
    assert out["mask_logits"].shape == (1, 8, 8) and torch.isfinite(out["mask_logits"]).all()
    assert out["boxes"][0].dtype == torch.float32


def test_pasted_masks_keep_exact_boxes_and_fp32_probabilities_under_bf16_autocast():
    """Validation and predict paste bf16 mask logits (the head under bf16-mixed) with the exact
    original-image boxes and an fp32 sigmoid: the same masks as from the logits cast to fp32
    first. A box cast to bf16 moves 300.7 to 300 and 801.3 to 800 (245,000 pixels, not 245,500)."""
    from lightning_modules.deepmac import DeepMACLitModule

    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8).bfloat16()
    boxes = [torch.tensor([[300.7, 10.3, 801.3, 500.9]]), torch.tensor([[2.5, 3.25, 40.75, 30.5]])]
    sizes = [(512, 1024), (48, 64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DeepMACLitModule._paste(logits, boxes, sizes)
    want = [
        paste_masks(logits[i : i + 1].float(), boxes[i], sizes[i]) for i in range(2)
    ]  # fp32 throughout
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The support is the pixels whose centres lie in the exact box: columns 301..800, rows 10..500
    # (the bf16 box [300, 10.31, 800, 500] would give 300..799 and 10..499).
    support = got[0][0] > 0
    assert support.any(1).nonzero().flatten()[[0, -1]].tolist() == [10, 500]
    assert support.any(0).nonzero().flatten()[[0, -1]].tolist() == [301, 800]


def test_paste_masks_reads_all_boxes_in_one_transfer(monkeypatch):
    """Evaluation pastes N boxes with one device-to-host read of their corners (not one per box),
    and the same masks as pasting each box on its own."""
    torch.manual_seed(0)
    logits = torch.randn(5, 8, 8)
    boxes = torch.tensor(
        [[1.5, 2.0, 20.0, 18.5], [0.0, 0.0, 8.0, 8.0], [10.2, 3.3, 31.9, 23.9], [5, 5, 5, 9],
         [-4.0, 2.0, 6.0, 30.0]]
    )  # fmt: skip
    separately = torch.cat(
        [paste_masks(logits[i : i + 1], boxes[i : i + 1], (24, 32)) for i in range(5)]
    )
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    together = paste_masks(logits, boxes, (24, 32))
    assert reads == [torch.Size([5, 4])]
    torch.testing.assert_close(together, separately, rtol=0, atol=0)
    assert together[3].sum() == 0 and together[0].sum() > 0  # the empty box pastes nothing


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
    assert sorted(HOURGLASS_LAYOUTS) == [10, 20, 32, 52, 100]
    assert sorted(RESNET_LAYOUTS) == [4, 8, 12, 16, 20]


def _longest_conv3x3_path(output: torch.Tensor) -> int:
    """Most 3x3 convolutions on one path of the autograd graph from the input to ``output``.

    Independent of the modules' structure: it reads only the recorded operations (each
    ConvolutionBackward node's weight shape).
    """
    memo: dict = {}
    stack = [(output.grad_fn, False)]
    while stack:  # post-order walk without recursion (Hourglass-100 graphs are deep)
        fn, children_done = stack.pop()
        if fn is None or fn in memo:
            continue
        nexts = [n for n, _ in fn.next_functions if n is not None]
        if not children_done:
            stack.append((fn, True))
            stack.extend((n, False) for n in nexts if n not in memo)
            continue
        own = 0
        if "Convolution" in type(fn).__name__:
            for nxt in nexts:
                var = getattr(nxt, "variable", None)
                if var is not None and var.dim() == 4 and tuple(var.shape[-2:]) == (3, 3):
                    own = 1
        memo[fn] = own + max((memo[n] for n in nexts), default=0)
    return memo[output.grad_fn]


@pytest.mark.parametrize("depth", [10, 20, 32, 52, 100])
def test_hourglass_names_count_3x3_convolutions_as_the_release(depth):
    # The release's hourglass_depth: 3 input layers + the encoder-2 / decoder / innermost
    # residual blocks (2 each) + 1 output conv; the skip branches are parallel.
    blocks, _ = HOURGLASS_LAYOUTS[depth]
    by_layout = 3 + sum(2 * 2 * b for b in blocks[:-1]) + 2 * blocks[-1] + 1
    assert by_layout == depth
    head = build_mask_head(f"hourglass{depth}", 3, 2, norm="bn").eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert _longest_conv3x3_path(head(x)) == depth


@pytest.mark.parametrize("depth", [4, 8, 12, 16, 20])
def test_resnet_names_count_3x3_convolutions_as_the_release(depth):
    head = build_mask_head(f"resnet{depth}", 3, 2, norm="bn").eval()
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    assert _longest_conv3x3_path(head(x)) == depth
    # resnetN = N / 2 basic blocks (resnet8 = 4), as in the release's ResNetMaskNetwork
    blocks = [m for m in head.modules() if isinstance(m, PreActBasicBlock)]
    assert len(blocks) == depth // 2


def test_resnet8_parameters_match_the_release_layout_by_hand():
    # in 6 channels, nc = 4, BN: 1x1 input conv 6 -> 4 (+bias); block 1: preact BN(4), 1x1
    # shortcut 4 -> 8 (+bias), 3x3 4 -> 8, BN(8), 3x3 8 -> 8, BN(8); blocks 2-4: preact BN(8),
    # two 3x3 8 -> 8, two BN(8); the 1x1 projection 8 -> 1 (+bias). BN = 2 parameters per channel.
    expect = (6 * 4 + 4) + (2 * 4 + 4 * 8 + 8 + 4 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 2 * 8)
    expect += 3 * (2 * 8 + 2 * (8 * 8 * 9) + 2 * (2 * 8)) + (8 + 1)
    assert _params(build_mask_head("resnet8", 6, 4, norm="bn")) == expect


def test_head_input_is_xy_pixel_embedding_and_instance_embedding():
    net = _tiny_deepmac(pixel_embedding_dim=16, embedding_dim=32)
    assert net.head.stem.in_channels == 2 + 16 + 32
    assert net.pixel_embedding[0].out_channels == 8 and net.pixel_embedding[-1].out_channels == 16
    raw = _tiny_deepmac(head="maskrcnn", use_xy=False, pixel_embedding_dim=0, embedding_dim=0)
    assert raw.head.convs[0].in_channels == 8 and raw.pixel_embedding is None


def test_deepmac_forward_masks_per_box():
    torch.manual_seed(0)
    net = _tiny_deepmac(
        fpn_channels=16, head="hourglass10", head_channels=8, mask_size=16, embedding_dim=4
    )
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 20.0], [8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    out = net.eval()(torch.randn(2, 3, 48, 48), boxes)
    assert out["mask_logits"].shape == (2, 16, 16)
    net_rcnn = _tiny_deepmac(
        fpn_channels=16,
        head="maskrcnn",
        head_channels=8,
        mask_size=16,
        embedding_dim=0,
        pixel_embedding_dim=0,
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
    """Two 24x24 images: a 10x10 square of class 1 and a 6x8 box of class 2 (uncompressed RLE)."""
    sq = np.zeros((24, 24), np.uint8)
    sq[4:14, 2:12] = 1
    rect = np.zeros((24, 24), np.uint8)
    rect[10:16, 5:13] = 1
    write_coco(
        path,
        images=[
            {"id": 1, "width": 24, "height": 24, "file_name": "a.png"},
            {"id": 2, "width": 24, "height": 24, "file_name": "b.png"},
        ],
        annotations=[
            mask_annotation(1, 1, 1, sq, compressed=False),
            mask_annotation(2, 2, 2, rect, compressed=False),
        ],
        categories=[{"id": 1, "name": "square"}, {"id": 2, "name": "rect"}],
    )
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


# ---------------------------------------------------------------------- centre heatmap


def _iou_of_displacements(h: float, w: float, r: float) -> tuple[float, float, float]:
    """IoU with an h x w box of: both corners shifted by r in x and y; shrunk by r on every
    side; grown by r on every side (CenterNet's three configurations)."""
    shifted = (h - r) * (w - r) / (2 * h * w - (h - r) * (w - r))
    shrunk = (h - 2 * r) * (w - 2 * r) / (h * w)
    grown = h * w / ((h + 2 * r) * (w + 2 * r))
    return shifted, shrunk, grown


@pytest.mark.parametrize("hw", [(10.0, 10.0), (4.0, 30.0), (57.0, 13.0)])
def test_exact_overlap_radius_keeps_the_iou_in_every_configuration(hw):
    from losses.centernet import overlap_radius

    r = overlap_radius(*hw, min_overlap=0.7, rule="exact")
    ious = _iou_of_displacements(*hw, r)
    assert min(ious) == pytest.approx(0.7, abs=1e-9) and all(v >= 0.7 - 1e-9 for v in ious)


def test_centernet_overlap_radius_by_hand():
    from losses.centernet import overlap_radius

    # 10 x 10, IoU 0.7, the release's (-b + sqrt(b^2 - 4ac)) / 2: the "grown" case a = 2.8,
    # b = 28, c = -30 gives (-28 + sqrt(784 + 336)) / 2 = 2.7332; the other two cases are larger
    # (19.07, 36.73).
    assert overlap_radius(10, 10, 0.7) == pytest.approx((-28 + 1120**0.5) / 2)


def test_centre_heatmap_targets_by_hand():
    from losses.centernet import centre_heatmap_targets, overlap_radius

    boxes = torch.tensor([[8.0, 4.0, 28.0, 20.0], [0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]])
    labels = torch.tensor([7, 3, 99])  # 99 is not a heatmap class
    hm = centre_heatmap_targets(boxes, labels, [3, 7], (8, 10), stride=4)
    assert hm.shape == (2, 8, 10)
    # box 1 (class 7): centre (18, 12) px -> cell (x 4, y 3); 5 x 4 cells
    assert hm[1, 3, 4] == 1 and hm[1].max() == 1 and (hm[1] == 1).sum() == 1
    sigma = (2 * overlap_radius(4, 5, 0.7) + 1) / 6
    assert hm[1, 3, 5].item() == pytest.approx(np.exp(-1 / (2 * sigma**2)), rel=1e-5)
    assert hm[1, 5, 6].item() == pytest.approx(np.exp(-8 / (2 * sigma**2)), rel=1e-5)
    assert hm[0, 1, 1] == 1  # class 3 at cell (1, 1)
    assert (hm == 1).sum() == 2  # class 99 left out


def _heatmap_by_loop(boxes, labels, class_ids, size, stride, min_overlap, rule):
    """One image's heatmap object by object on the host, from :func:`overlap_radius` (a second,
    plain implementation of CenterNet's target assigner)."""
    from losses.centernet import overlap_radius

    h, w = size
    out = torch.zeros(len(class_ids), h, w)
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)
    for box, lab in zip(boxes.float(), labels.tolist(), strict=True):
        if lab not in class_ids:
            continue
        x1, y1, x2, y2 = (box / stride).tolist()
        cx = min(max(math.floor((x1 + x2) / 2), 0), w - 1)
        cy = min(max(math.floor((y1 + y2) / 2), 0), h - 1)
        sigma = (2 * overlap_radius(y2 - y1, x2 - x1, min_overlap, rule) + 1) / 6
        g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma))
        k = class_ids.index(lab)
        out[k] = torch.maximum(out[k], g)
    return out


@pytest.mark.parametrize("rule", ["centernet", "exact"])
def test_centre_heatmap_batch_equals_an_object_by_object_loop(rule, no_host_sync):
    """The batched, on-device targets equal a per-object loop over every image of a batch:
    overlapping objects of one class (the maximum), a class outside the heatmap, boxes whose
    centre lies outside the map (clamped), an image without objects; and they are built without
    a host transfer."""
    from losses.centernet import CentreHeatmapLoss, centre_heatmap_batch

    g = torch.Generator().manual_seed(3)
    boxes, labels = [], []
    for n in (5, 0, 7, 1):
        xy = torch.rand(n, 2, generator=g) * 60 - 8
        boxes.append(torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 30], 1))
        labels.append(torch.randint(0, 5, (n,), generator=g))
    boxes[0][1] = boxes[0][0] + 1.5  # overlaps box 0
    labels[0][1] = labels[0][0]
    class_ids = [1, 3, 4]  # 0 and 2 are not heatmap classes
    size, stride = (12, 15), 4.0
    with no_host_sync():
        got = centre_heatmap_batch(boxes, labels, class_ids, size, stride, 0.7, rule)
    want = torch.stack(
        [
            _heatmap_by_loop(b, lab, class_ids, size, stride, 0.7, rule)
            for b, lab in zip(boxes, labels, strict=True)
        ]
    )
    assert got.shape == (4, 3, 12, 15) and (want == 1).sum() > 5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got == 1, want == 1)  # the peaks exactly
    assert not got[1].any()
    loss = CentreHeatmapLoss(class_ids=class_ids, rule=rule)
    logits = torch.randn(4, 3, *size)
    with no_host_sync():
        terms = loss(logits, boxes, labels, stride)
    from losses.centernet import penalty_reduced_focal_loss

    torch.testing.assert_close(terms["loss/centre"], penalty_reduced_focal_loss(logits, want))


def test_penalty_reduced_focal_loss_by_hand():
    from losses.centernet import penalty_reduced_focal_loss

    logits = torch.tensor([[[[0.5, -1.0, 2.0]]]])
    targets = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    p = torch.sigmoid(logits)[0, 0, 0]
    pos = (1 - p[0]) ** 2 * torch.log(p[0])
    neg = (1 - 0.5) ** 4 * p[1] ** 2 * torch.log(1 - p[1]) + p[2] ** 2 * torch.log(1 - p[2])
    expect = -(pos + neg) / 1  # one peak
    torch.testing.assert_close(penalty_reduced_focal_loss(logits, targets), expect)


def test_centre_loss_trains_the_backbone_from_every_class():
    from losses.centernet import CentreHeatmapLoss

    torch.manual_seed(0)
    net = _tiny_deepmac(num_centre_classes=2).train()
    out = net(torch.randn(1, 3, 32, 32), [torch.zeros(0, 4)])
    # CenterNet's prior: every cell starts at p = 0.1
    torch.testing.assert_close(
        out["centre_heatmap"][-1].sigmoid().mean(), torch.tensor(0.1), atol=0.05, rtol=0
    )
    loss = CentreHeatmapLoss(class_ids=[1, 3], weight=0.2)
    terms = loss(
        out["centre_heatmap"], [torch.tensor([[4.0, 4.0, 20.0, 28.0]])], [torch.tensor([3])], 4
    )
    torch.testing.assert_close(terms["loss"], 0.2 * terms["loss/centre"])
    terms["loss"].backward()
    grads = [p.grad for p in net.features.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------- training step


def _stub_lit_module(steps: list[dict[str, float]]):
    """A Deep-MAC LightningModule whose ``_loss`` returns ``steps[i]`` at its i-th call (and
    whose ``global_step`` counts those calls), with instance counts 3, 4, 5, ..."""
    from lightning_modules.deepmac import DeepMACLitModule

    class Stub(DeepMACLitModule):
        calls = 0

        @property
        def global_step(self) -> int:
            return self.calls - 1

        def _loss(self, batch, out=None):
            values = steps[self.calls]
            type(self).calls += 1
            return {k: torch.tensor(v) for k, v in values.items()}, self.calls + 2

    return Stub(net=torch.nn.Identity(), loss=torch.nn.Identity(), optimizer=None)


def test_training_step_keeps_the_finite_check_on_the_device(no_host_sync):
    """No host transfer in a step (a check in the step would sync each step); the read names the
    first non-finite step and its terms, and a later finite step hides nothing."""
    bad = {"loss": float("nan"), "loss/mask": float("inf")}
    steps = [{"loss": 1.0, "loss/mask": 1.0}, {"loss": 2.0, "loss/mask": 2.0}, bad, bad]
    module = _stub_lit_module([*steps[:3], {"loss": 1.0, "loss/mask": 1.0}])
    with no_host_sync():
        for _ in range(2):
            module.training_step({}, 0)
    module._check_finite()  # two finite steps: nothing raised
    # Their terms were read, weighted by the steps' instance counts 3 and 4.
    assert module._step_log.epoch_means()["loss"] == pytest.approx((3 * 1.0 + 4 * 2.0) / 7)
    with no_host_sync():
        for _ in range(2):
            module.training_step({}, 0)
    with pytest.raises(FloatingPointError, match=r"at step 2: loss=nan, loss/mask=inf"):
        module._check_finite()
