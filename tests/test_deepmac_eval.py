"""Deep-MAC evaluation: COCO crowd regions, the per-image detection cap, merging DDP shards."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch
from fixtures.coco import mask_annotation, rle

from lightning_modules.deepmac_metrics import MaskAPAccumulator, flat_scores, gather_accumulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _cocoeval_direct(data, results):
    """pycocotools' own evaluation of a json and a results list: the reference numbers."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * float(v) if v >= 0 else float("nan") for v in ev.stats[:6]]


# Image 1 (20x20): instance A of class 1 (rows 0-7, cols 0-7) and a crowd region of class 1 (rows
# 10-19, cols 0-19). A's prediction lies in the crowd: IoU with A is 0 (a miss), but its
# intersection over its own area with the crowd is 1, so COCO ignores it instead of counting a false
# positive. Image 2: instance B of class 1, predicted perfectly.
H = W = 20
A = _box_mask(H, W, 0, 8, 0, 8)
CROWD = _box_mask(H, W, 10, 20, 0, 20)
PRED_A = _box_mask(H, W, 12, 18, 2, 10)
B = _box_mask(H, W, 4, 12, 6, 16)


def _tiny_crowd_json():
    return {
        "images": [{"id": 1, "height": H, "width": W}, {"id": 2, "height": H, "width": W}],
        "categories": [{"id": 1}],
        "annotations": [
            mask_annotation(1, 1, 1, A),
            mask_annotation(2, 1, 1, CROWD, iscrowd=1),
            mask_annotation(3, 2, 1, B),
        ],
    }


def test_a_prediction_inside_a_crowd_region_is_ignored_as_pycocotools_does():
    data = _tiny_crowd_json()
    anns = data["annotations"]
    results = [
        {"image_id": 1, "category_id": 1, "segmentation": rle(PRED_A), "score": 1.0},
        {"image_id": 2, "category_id": 1, "segmentation": rle(B), "score": 1.0},
    ]
    for r, a in zip(results, (anns[0], anns[2]), strict=True):
        r["bbox"] = a["bbox"]  # the ground-truth box is the detection
    reference = _cocoeval_direct(data, results)
    # By hand: 2 instances (the crowd is not one), B found, A's miss ignored: precision 1 up to
    # recall 1/2, so AP = 51/101 at every threshold (COCO's 101 recall points 0, 0.01, .., 0.5).
    assert reference[0] == pytest.approx(100 * 51 / 101)

    acc = MaskAPAccumulator()
    acc.update(A[None], PRED_A[None], [1], crowd_masks=CROWD[None], crowd_labels=[1])
    acc.update(B[None], B[None], [1])
    scores = acc.compute({"all": None})["all"]
    got = [scores[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    np.testing.assert_allclose(got, reference, equal_nan=True)
    assert scores["num_instances"] == 2 and scores["mIoU"] == pytest.approx(50.0)

    # Without the crowd region the miss is a false positive ranked first: precision 1/2 up to
    # recall 1/2 -> AP = 51/101 / 2. The crowd changes the score, so the test above can fail.
    plain = MaskAPAccumulator()
    plain.update(A[None], PRED_A[None], [1])
    plain.update(B[None], B[None], [1])
    assert plain.compute({"all": None})["all"]["AP"] == pytest.approx(100 * 51 / 101 / 2)


def test_a_class_with_only_crowd_regions_is_not_present():
    acc = MaskAPAccumulator()
    acc.update(B[None], B[None], [1], crowd_masks=CROWD[None], crowd_labels=[7])
    assert acc.present_classes() == [1]
    scores = acc.compute({"seen": [1], "unseen": [7], "all": None})
    assert scores["unseen"]["num_instances"] == 0 and np.isnan(scores["unseen"]["AP"])
    assert scores["seen"]["AP"] == pytest.approx(100.0)


def test_more_than_100_instances_of_a_class_in_one_image_all_count():
    # 120 one-pixel instances, perfect masks: COCO's default cap of 100 detections per image would
    # leave 20 unmatched (AP < 100); every instance is a detection here, so AP must be 100.
    n, side = 120, 16
    masks = np.zeros((n, side, side), np.uint8)
    for i in range(n):
        masks[i, (2 * i) // side, (2 * i) % side] = 1
    acc = MaskAPAccumulator()
    acc.update(masks, masks.copy(), [1] * n)
    assert acc.compute({"all": None})["all"]["AP"] == pytest.approx(100.0)


def _shard_items(seed=0, num=7):
    """Per-image (gt, pred, labels, crowd) with imperfect predictions, 2 classes."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(num):
        k = int(rng.integers(1, 4))
        gt = np.zeros((k, 12, 12), np.uint8)
        for j in range(k):
            y, x = rng.integers(0, 6, 2)
            gt[j, y : y + 6, x : x + 6] = 1
        pred = np.roll(gt, int(rng.integers(-2, 3)), axis=2)
        labels = rng.integers(1, 3, k).tolist()
        items.append((gt, pred, labels, _box_mask(12, 12, 0, 3, 0, 12)[None], [1]))
    return items


def _accumulate(items, indices):
    acc = MaskAPAccumulator()
    for i in indices:
        gt, pred, labels, crowd, crowd_labels = items[i]
        acc.update(gt, pred, labels, crowd, crowd_labels, key=i)
    return acc


def test_merged_shards_equal_one_accumulation_over_the_whole_set():
    items = _shard_items()
    full = _accumulate(items, range(len(items)))
    # A padded DistributedSampler over 7 items and 2 ranks: rank 0 gets 0 2 4 6, rank 1 gets
    # 1 3 5 and item 0 again.
    shards = [_accumulate(items, [0, 2, 4, 6]), _accumulate(items, [1, 3, 5, 0])]
    merged = MaskAPAccumulator.merge(shards)
    assert merged.records == full.records
    groups = {"seen": [1], "unseen": [2], "all": None}
    expected, got = full.compute(groups), merged.compute(groups)
    assert flat_scores(got) == pytest.approx(flat_scores(expected), nan_ok=True)
    assert got["per_class_IoU"] == pytest.approx(expected["per_class_IoU"])
    # A single shard scores a different set: the merge is what makes the numbers whole-set ones.
    assert shards[0].compute(groups)["all"]["AP"] != pytest.approx(expected["all"]["AP"])


def test_gather_without_a_process_group_is_the_identity():
    acc = _accumulate(_shard_items(num=2), [0, 1])
    assert gather_accumulator(acc) is acc


def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        items = _shard_items()
        acc = _accumulate(items, [[0, 2, 4, 6], [1, 3, 5, 0]][rank])
        scores = gather_accumulator(acc).compute({"all": None})
        (out_dir / f"rank{rank}.json").write_text(json.dumps(scores["all"]))
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_processes_scores_the_whole_set(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children need not re-import torch and this module (spawn takes ~20 s on 2 cores)
    mp.start_processes(
        _gather_worker, args=(2, port, tmp_path), nprocs=2, join=True, start_method="fork"
    )
    items = _shard_items()
    expected = _accumulate(items, range(len(items))).compute({"all": None})["all"]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(expected, nan_ok=True)


# ---------------------------------------------------------------------- crowd regions in the data


def test_coco_crowd_regions_reach_the_evaluation_batch_only(tmp_path):
    from PIL import Image

    from datamodules.coco_instances import CocoInstancesDataModule, CocoInstancesDataset
    from datamodules.instances import collate_instances

    data = _tiny_crowd_json()
    for img in data["images"]:
        img["file_name"] = f"{img['id']}.png"
        Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(tmp_path / img["file_name"])
    (tmp_path / "ann.json").write_text(json.dumps(data))

    train = CocoInstancesDataset(tmp_path / "ann.json", tmp_path)
    item = train[0]
    assert "crowd_masks" not in item  # never a training instance
    np.testing.assert_array_equal(item["masks"], A[None])
    np.testing.assert_array_equal(item["labels"], [1])

    dm = CocoInstancesDataModule(
        str(tmp_path),
        train_ann="ann.json",
        val_ann="ann.json",
        train_images=".",
        val_images=".",
        batch_size=1,
        num_workers=0,
        image_size=40,
    )
    batches = list(dm.val_dataloader())
    assert [int(b["index"][0]) for b in batches] == [0, 1]
    np.testing.assert_array_equal(batches[0]["orig_crowd_masks"][0].numpy(), CROWD[None])
    assert batches[0]["crowd_labels"][0].tolist() == [1]
    assert batches[1]["orig_crowd_masks"][0].shape == (0, H, W)
    np.testing.assert_array_equal(batches[0]["orig_masks"][0].numpy(), A[None])
    assert "orig_crowd_masks" not in collate_instances([train_item_transformed(train)])


def train_item_transformed(ds):
    from datamodules.instances import InstanceTransform

    return InstanceTransform(40, train=True)(ds[0], np.random.default_rng(0))


def test_module_accumulate_passes_crowds_and_indices():
    from lightning_modules.deepmac import DeepMACLitModule

    module = DeepMACLitModule(net=torch.nn.Identity(), loss=torch.nn.Identity(), optimizer=None)
    acc = MaskAPAccumulator()
    batch = {
        "orig_masks": [torch.from_numpy(A[None])],
        "labels": [torch.tensor([1])],
        "orig_crowd_masks": [torch.from_numpy(CROWD[None])],
        "crowd_labels": [torch.tensor([1])],
        "index": torch.tensor([5]),
    }
    module.accumulate(acc, batch, [torch.from_numpy(PRED_A[None]).float()])
    (rec,) = acc.records
    assert rec["key"] == 5 and [c for c, _ in rec["crowds"]] == [1]
    assert rec["ious"] == [0.0]


def test_resized_masks_read_the_source_pixel_under_each_output_pixel_centre():
    from datamodules.instances import InstanceTransform

    # 10 x 10 image -> 8 x 8 frame (scale 0.8); one instance is the last source column only.
    h = w = 10
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, :, 9] = 1
    masks[1, 2:7, 3:6] = 1
    item = {
        "image": np.zeros((h, w, 3), np.uint8),
        "masks": masks,
        "boxes": np.array([[9, 0, 10, 10], [3, 2, 6, 7]], np.float32),
        "labels": np.array([1, 2]),
    }
    out = InstanceTransform(8, train=False)(item)["masks"].numpy()
    # Output pixel i covers source [i / 0.8, (i + 1) / 0.8): its centre is in source pixel
    # floor((i + 0.5) / 0.8).
    src = np.floor((np.arange(8) + 0.5) / 0.8).astype(int)
    np.testing.assert_array_equal(out, masks[:, src][:, :, src])
    assert out[0, :, 7].all()  # the edge column survives (plain "nearest" reads column 8, not 9)


def test_validation_runs_the_net_once_and_scores_what_predict_masks_pastes():
    from lightning_modules.deepmac import DeepMACLitModule

    calls = []

    class Net(torch.nn.Module):
        def forward(self, image, boxes):
            calls.append(len(boxes))
            g = torch.linspace(-2, 2, 8)
            n = sum(len(b) for b in boxes)
            return {
                "mask_logits": (g[None, :, None] + g[None, None, :]).repeat(n, 1, 1),
                "boxes": boxes,
            }

    def loss(logits, targets, labels):
        return {"loss": (logits.sigmoid() - targets).abs().mean()}

    module = DeepMACLitModule(net=Net(), loss=loss, optimizer=None).eval()
    mask = np.zeros((20, 30), np.uint8)
    mask[4:14, 6:20] = 1
    batch = {
        "image": torch.zeros(1, 3, 32, 32),
        "boxes": [torch.tensor([[4.0, 4.0, 20.0, 20.0]])],
        "orig_boxes": [torch.tensor([[6.0, 4.0, 20.0, 14.0]])],
        "masks": [torch.from_numpy(mask[None]).float()],
        "orig_masks": [torch.from_numpy(mask[None])],
        "labels": [torch.tensor([1])],
        "index": torch.tensor([0]),
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer: nothing to log to
        module.validation_step(batch, 0)
    assert calls == [1]
    expected = MaskAPAccumulator()
    probs = module.predict_masks(batch["image"], batch["boxes"], batch["orig_boxes"], [(20, 30)])
    module.accumulate(expected, batch, probs)
    assert module.accumulator.records == expected.records
    assert 0.0 < module.accumulator.records[0]["ious"][0] < 1.0
