"""Deep-MAC data (COCO json, Cityscapes instanceIds, MHPv2 persons), the driver and the box prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cfg_utils import compose_cfg
from fixtures.coco import mask_annotation, write_coco
from fixtures.images import write_png
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- COCO json


def _write_coco(root):
    """One 20x16 image: a polygon rectangle of class 3, an RLE (compressed) L-shape of class 44
    and a crowd polygon of class 1."""
    write_png(root / "val2017" / "x.png", np.full((16, 20, 3), 77, np.uint8))
    ell = np.zeros((16, 20), np.uint8)
    ell[8:14, 12:14] = 1
    ell[12:14, 14:18] = 1
    polygon = {"segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "area": 24, "bbox": [2, 2, 6, 4]}
    crowd = {"segmentation": [[0, 0, 4, 0, 4, 4]], "area": 8, "bbox": [0, 0, 4, 4]}
    write_coco(
        root / "annotations" / "instances_val2017.json",
        images=[{"id": 5, "file_name": "x.png", "height": 16, "width": 20}],
        annotations=[
            {"id": 1, "image_id": 5, "category_id": 3, "iscrowd": 0, **polygon},
            mask_annotation(2, 5, 44, ell),
            {"id": 3, "image_id": 5, "category_id": 1, "iscrowd": 1, **crowd},
        ],
        categories=[
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
            {"id": 44, "name": "bottle"},
        ],
    )
    return ell


def test_coco_polygon_and_rle_decode_to_the_drawn_masks(tmp_path):
    from datamodules.coco_instances import CocoInstancesDataModule

    ell = _write_coco(tmp_path / "coco")
    dm = CocoInstancesDataModule(str(tmp_path / "coco"), image_size=40, batch_size=1, num_workers=0)
    item = dm.dataset("val")[0]
    rect = np.zeros((16, 20), np.uint8)
    rect[2:6, 2:8] = 1  # polygon corners (2,2)-(8,6) cover pixels x 2..7, y 2..5
    assert item["labels"].tolist() == [3, 44]  # the crowd annotation is left out
    np.testing.assert_array_equal(item["masks"][0], rect)
    np.testing.assert_array_equal(item["masks"][1], ell)
    np.testing.assert_array_equal(item["boxes"], [[2, 2, 8, 6], [12, 8, 18, 14]])
    # The network frame: longer side 20 -> 40 (x2), padded to 40x40.
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (1, 3, 40, 40)
    torch.testing.assert_close(
        batch["boxes"][0], torch.tensor([[4.0, 4, 16, 12], [24, 16, 36, 28]])
    )
    assert int(batch["masks"][0][0].sum()) == 4 * 24 and batch["masks"][0][0][4:12, 4:16].all()
    assert batch["masks"][0][:, 32:].sum() == 0  # padding rows
    np.testing.assert_array_equal(batch["orig_masks"][0][1].numpy(), ell)


def test_instance_loaders_size_their_workers_like_the_parsing_loaders(tmp_path, monkeypatch):
    """num_workers unset: the CPUs per device less one (default_num_workers), each worker with
    one OpenCV thread; pinned memory only with CUDA; a given count is kept."""
    import cv2

    import datamodules.base as base
    from datamodules.coco_instances import CocoInstancesDataModule

    _write_coco(tmp_path / "coco")
    asked = []
    monkeypatch.setattr(base, "default_num_workers", lambda ranks: asked.append(ranks) or 1)
    dm = CocoInstancesDataModule(str(tmp_path / "coco"), image_size=40, pin_memory=True)
    loader = dm.val_dataloader()
    assert asked == [1] and loader.num_workers == 1 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    cv2.setNumThreads(4)
    loader.worker_init_fn(0)
    assert cv2.getNumThreads() == 1
    kept = CocoInstancesDataModule(str(tmp_path / "coco"), image_size=40, num_workers=0)
    loader = kept.val_dataloader()
    assert loader.num_workers == 0 and loader.worker_init_fn is None
    assert len(next(iter(loader))["boxes"][0]) == 2


def test_train_flip_mirrors_boxes_and_masks():
    from datamodules.instances import InstanceTransform, masks_to_boxes

    m = np.zeros((1, 4, 6), np.uint8)
    m[0, 1:3, 0:2] = 1
    item = {
        "image": np.zeros((4, 6, 3), np.uint8),
        "masks": m,
        "boxes": masks_to_boxes(m),
        "labels": np.array([7]),
    }
    out = InstanceTransform(6, train=True, flip_prob=1.0)(item, np.random.default_rng(0))
    torch.testing.assert_close(out["boxes"], torch.tensor([[4.0, 1, 6, 3]]))
    assert out["masks"][0, 1:3, 4:6].all() and out["masks"][0].sum() == 4
    assert "orig_masks" not in out


def test_instance_batches_travel_as_uint8_and_normalise_on_the_device_as_before():
    """The loader sends the resized image as uint8 with its size; ``network_images`` gives the
    float path's input (resize x / 255 bilinearly, ImageNet-normalise, 0 in the padding) to
    within the uint8 rounding, and its padding is exactly 0."""
    import torch.nn.functional as F

    from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD
    from datamodules.instances import InstanceTransform, collate_instances, network_images

    rng = np.random.default_rng(3)
    items = [
        {
            "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
            "masks": np.zeros((0, h, w), np.uint8),
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64),
        }
        for h, w in ((37, 53), (50, 29))
    ]
    batch = collate_instances([InstanceTransform(32)(it) for it in items])
    assert batch["image"].dtype == torch.uint8
    assert batch["size"].tolist() == [[22, 32], [32, 19]]  # round(37 * 32 / 53) = 22
    x = network_images(batch["image"], batch["size"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, (it, (h, w)) in enumerate(zip(items, batch["size"].tolist(), strict=True)):
        img = torch.from_numpy(it["image"]).permute(2, 0, 1).double()[None] / 255
        ref = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0]
        ref = (ref - mean.double()) / std.double()
        err = (x[i, :, :h, :w].double() - ref).abs().max().item()
        assert err <= 0.5 / 255 / min(IMAGENET_STD) + 1e-6
        assert err > 1e-4  # rounded to uint8, not the float path itself
        assert x[i, :, h:].abs().sum() == 0 and x[i, :, :, w:].abs().sum() == 0
    assert network_images(x, batch["size"]) is x  # already normalised: unchanged
    with pytest.raises(ValueError, match="'size'"):
        network_images(batch["image"], None)


def test_deepmac_module_normalises_loader_batches_and_refuses_raw_images():
    from datamodules.instances import network_images
    from lightning_modules.deepmac import DeepMACLitModule

    seen = []

    class Net(torch.nn.Module):
        def forward(self, image, boxes):
            seen.append(image)
            return {"mask_logits": torch.zeros(0, 4, 4), "boxes": boxes}

    module = DeepMACLitModule(net=Net(), loss=None, optimizer=None)
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    size = torch.tensor([[8, 5], [6, 8]])
    batch = module.on_after_batch_transfer({"image": image, "size": size, "boxes": []}, 0)
    torch.testing.assert_close(batch["image"], network_images(image, size), rtol=0, atol=0)
    assert batch["image"][0, :, :, 5:].abs().sum() == 0 and batch["image"][0, :, :, :5].abs().sum()
    module(batch["image"], [])
    assert seen[0] is batch["image"]
    with pytest.raises(TypeError, match="network_images"):
        module(image, [])


# ---------------------------------------------------------------------- Cityscapes, MHPv2


def test_cityscapes_instances_from_16bit_instance_ids(tmp_path):
    from fixtures.cityscapes import INSTANCE_IDS, make_cityscapes

    from datamodules.instances import CityscapesInstancesDataset

    root = make_cityscapes(tmp_path / "cityscapes")
    ds = CityscapesInstancesDataset(root, "train")
    item = ds[0]
    # person 24000, cars 26000 and 26001, bicycle 33000; the caravan (29) and the car group (26) are
    # left out; values above 255 survive (a uint8 cast would wrap them).
    assert item["labels"].tolist() == [24, 26, 26, 33]
    for mask, value in zip(item["masks"], (24000, 26000, 26001, 33000), strict=True):
        np.testing.assert_array_equal(mask, (value == INSTANCE_IDS).astype(np.uint8))
    np.testing.assert_array_equal(
        item["boxes"], [[2, 1, 4, 2], [2, 3, 4, 4], [4, 1, 6, 2], [3, 2, 5, 3]]
    )
    humans = CityscapesInstancesDataset(root, "train", classes=[24, 25])
    assert humans[0]["labels"].tolist() == [24]


def test_mhp_person_instances_one_mask_per_file(mhp_root):
    from datamodules.instances import MHPPersonInstancesDataset

    ds = MHPPersonInstancesDataset(mhp_root, "train")
    item = ds[ds.ids.index("7")]
    # person 1 rows 0-3, person 2 rows 2-5 (overlapping, both kept whole); person 3 is empty
    assert item["labels"].tolist() == [1, 1]
    assert item["masks"][0][0:4].all() and item["masks"][0].sum() == 40
    assert item["masks"][1][2:6].all() and item["masks"][1].sum() == 40
    np.testing.assert_array_equal(item["boxes"], [[0, 0, 10, 4], [0, 2, 10, 6]])


# ---------------------------------------------------------------------- driver and box prompt

QUICK = [
    "experiment=deepmac_quick",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=3",
    "data.holdout=2",
    "data.synthetic.image_size=32",
    "data.image_size=32",
    "model.mask_size=8",
    "model.fpn_channels=8",
    "model.head_channels=8",
    "model.embedding_hidden=8",
    "schedule.total_epochs=2",
    "schedule.controls=[]",
    "trainer.log_every_n_steps=1",
    "~callbacks.rich_progress_bar",
    "~callbacks.model_summary",
]


def test_run_deepmac_end_to_end_and_box_prompt(tmp_path):
    from experiments.box_prompt import box_prompt
    from run import run

    cfg = compose_cfg(QUICK, tmp_path)
    results = run(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["schedule"] == "deepmac" and saved["head"] == "hourglass10"
    for key in ("AP_seen", "AP_unseen", "mIoU_seen", "mIoU_unseen"):
        assert key in saved["val"]
    detail = results["val_detail"]
    n = detail["seen"]["num_instances"] + detail["unseen"]["num_instances"]
    assert n == detail["all"]["num_instances"] > 0
    assert (out / "final.ckpt").is_file()
    # the metrics logged during training reached the CSV logger
    metrics = next((out / "csv").rglob("metrics.csv")).read_text()
    # fit validated on the held-out training images, seen classes only (no selection on val)
    assert "train/loss" in metrics and "train/loss/centre" in metrics
    assert "holdout/AP_seen" in metrics and "AP_unseen" not in metrics.splitlines()[0]
    assert "AP_seen" in saved["holdout"] and saved["val"] != saved["holdout"]

    # train=false re-evaluates the saved weights to the same scores
    cfg2 = compose_cfg(
        [*QUICK, "train=false", f"init_from={out / 'final.ckpt'}"], tmp_path / "again"
    )
    again = run(cfg2)
    assert again["val"] == pytest.approx(results["val"], nan_ok=True)

    # box prompt on a generated image: the whole image as a box of a 32x24 picture
    img = np.zeros((24, 32, 3), np.uint8)
    img[4:20, 6:26] = 200
    Image.fromarray(img).save(tmp_path / "p.png")
    boxes = np.array([[6, 4, 26, 20], [0, 0, 32, 24]], np.float32)
    masks = box_prompt(
        out / "final.ckpt", tmp_path / "p.png", boxes, tmp_path / "prompt", device="cpu"
    )
    assert masks.shape == (2, 24, 32)
    # pasted masks never leave their boxes
    assert masks[0][:4].sum() == 0 and masks[0][:, :6].sum() == 0 and masks[0][:, 26:].sum() == 0
    written = np.array(Image.open(tmp_path / "prompt" / "mask_00.png"))
    np.testing.assert_array_equal(written, masks[0] * 255)
    assert (tmp_path / "prompt" / "overlay.png").is_file()


def test_box_prompt_cli_reads_a_boxes_json(tmp_path, monkeypatch):
    from experiments import box_prompt as bp

    (tmp_path / "b.json").write_text(json.dumps({"boxes": [[1, 2, 5, 9]]}))
    np.testing.assert_array_equal(bp.read_boxes(None, str(tmp_path / "b.json")), [[1, 2, 5, 9]])
    with pytest.raises(ValueError, match="x2 > x1"):
        bp.read_boxes([[5, 2, 1, 9]])
    seen = {}
    monkeypatch.setattr(
        bp, "box_prompt", lambda *a: seen.setdefault("args", a) and np.zeros((1, 2, 2))
    )
    bp.main(["ckpt=c.ckpt", "image=i.png", "boxes=[[0,0,4,4],[1,1,3,3]]", "output=o"])
    assert seen["args"][2].tolist() == [[0, 0, 4, 4], [1, 1, 3, 3]]


# ---------------------------------------------------------------------- configs

DEEPMAC_EXPERIMENTS = [
    "deepmac_quick",
    "deepmac_coco_voc2nonvoc",
    "deepmac_coco_nonvoc2voc",
    "deepmac_cityscapes",
]
HEADS = ["hourglass10", "hourglass20", "hourglass52", "hourglass100", "resnet", "maskrcnn"]


@pytest.mark.parametrize("name", DEEPMAC_EXPERIMENTS)
def test_deepmac_experiments_compose_and_instantiate(name, tmp_path):
    import hydra

    from experiments.deepmac import build_deepmac_module, validate_deepmac
    from run import check_config as validate_config

    cfg = compose_cfg(
        [f"experiment={name}", "model.pretrained=false", "model.backbone=lite", "trainer=cpu"],
        tmp_path,
    )
    validate_config(cfg)
    validate_deepmac(cfg)
    # selection on held-out training images' seen classes; every recipe trains all-class centres
    assert cfg.schedule.name == "deepmac" and cfg.optimized_metric == "holdout/AP_seen"
    assert cfg.data.holdout > 0 and cfg.module.val_prefix == "holdout"
    assert list(cfg.module.val_groups) == ["seen"] and cfg.module.centre_loss is not None
    hydra.utils.instantiate(cfg.data, _convert_="all")  # no file is read before setup
    module = build_deepmac_module(cfg)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    out = module.net.eval()(torch.zeros(1, 3, 32, 32), boxes)["mask_logits"]
    assert out.shape == (1, cfg.model.mask_size, cfg.model.mask_size)
    if name != "deepmac_quick":
        assert module.seen is not None and set(module.seen).isdisjoint(module.unseen)


def test_head_sweep_models_compose(tmp_path):
    """The paper's head comparison: every model of the documented multirun builds its head."""
    from experiments.deepmac import build_deepmac_module

    params = {}
    for head in HEADS:
        cfg = compose_cfg(
            [
                "experiment=deepmac_coco_voc2nonvoc",
                f"model=deepmac_{head}",
                "model.pretrained=false",
                "model.backbone=lite",
                # every head at a quarter of its width: the order by size is unchanged
                "model.head_width_scale=0.25",
                "trainer=cpu",
            ],
            tmp_path,
        )
        params[head] = sum(p.numel() for p in build_deepmac_module(cfg).net.head.parameters())
    assert (
        params["hourglass10"]
        < params["hourglass20"]
        < params["hourglass52"]
        < params["hourglass100"]
    )


def test_holdout_is_a_fixed_disjoint_part_of_the_training_split(tmp_path):
    from datamodules.coco_instances import SyntheticShapesDataModule

    kw = dict(
        batch_size=2,
        num_workers=0,
        image_size=32,
        synthetic={"num_train": 10, "num_val": 2, "image_size": 32},
    )
    dm = SyntheticShapesDataModule(str(tmp_path / "s"), holdout=3, holdout_seed=5, **kw)
    dm.prepare_data()
    keep, held = dm.holdout_indices(10)
    assert len(held) == 3 and sorted(keep + held) == list(range(10)) and not set(keep) & set(held)
    again = SyntheticShapesDataModule(str(tmp_path / "s"), holdout=0.3, holdout_seed=5, **kw)
    assert again.holdout_indices(10) == (keep, held)  # 0.3 of 10 = 3, same permutation
    assert len(dm.dataset("train")) == 7 and len(dm.dataset("holdout")) == 3
    names = lambda loader: sorted(n for b in loader for n in b["name"])  # noqa: E731
    held_names = names(dm.val_dataloader())
    assert held_names == sorted(f"train_{i:04d}.png" for i in held)
    assert names(dm.report_dataloader()) == ["val_0000.png", "val_0001.png"]
    train_names = set(names(dm.train_dataloader()))
    assert len(train_names) == 7 and not train_names & set(held_names)
    plain = SyntheticShapesDataModule(str(tmp_path / "s"), **kw)
    assert names(plain.val_dataloader()) == names(plain.report_dataloader())


def test_selection_keys_must_match_the_holdout(tmp_path):
    from omegaconf import OmegaConf

    from datamodules.errors import ConfigError
    from experiments.deepmac import validate_deepmac

    cfg = compose_cfg(["experiment=deepmac_quick", "model.backbone=lite"], tmp_path)
    validate_deepmac(cfg)
    for key, value, message in [
        ("data.holdout", 0, "val_prefix"),
        ("optimized_metric", "val/AP_unseen", "optimized_metric"),
        ("model.num_centre_classes", 2, "num_centre_classes"),
    ]:
        bad = cfg.copy()
        OmegaConf.update(bad, key, value, force_add=True)
        with pytest.raises(ConfigError, match=message):
            validate_deepmac(bad)


def test_quick_experiment_runs_the_proposal_crop_control(tmp_path, monkeypatch, capsys):
    from experiments import deepmac

    calls = []

    def fake_run(cfg, out_dir):
        calls.append((cfg.model.box_jitter_mode, str(out_dir), cfg.task_name))
        ap = 50.0 if cfg.model.box_jitter_mode == "gaussian" else 20.0
        return {"val": {"AP_seen": 60.0, "AP_unseen": ap, "AP50_unseen": 80.0}}

    monkeypatch.setattr(deepmac, "run_one_deepmac", fake_run)
    cfg = compose_cfg(["experiment=deepmac_quick"], tmp_path)
    assert list(cfg.schedule.controls) == ["proposal_crops"]
    results = deepmac.run_deepmac(cfg, tmp_path / "run")
    assert calls == [
        ("gaussian", str(tmp_path / "run"), "deepmac_quick"),
        ("proposal", str(tmp_path / "run" / "proposal_crops"), "deepmac_quick/proposal_crops"),
    ]
    assert results["val"]["AP_unseen"] == 50.0
    assert results["controls"]["proposal_crops"]["val"]["AP_unseen"] == 20.0
    table = capsys.readouterr().out
    assert "ground-truth boxes" in table and "proposal crops" in table
