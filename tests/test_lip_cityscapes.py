"""LIP and Cityscapes loaders and datamodules on tiny files written in the real on-disk formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from assertions import raises_naming
from fixtures.cityscapes import (
    INSTANCE_IDS,
    LABEL_IDS,
    TRAIN_IDS,
    H,
    W,
    make_cityscapes,
)
from fixtures.images import write_png
from fixtures.lip import LIP_IDS, LIP_TEST_IDS, lip_image, lip_label, make_lip
from PIL import Image

import datamodules.cityscapes as cs_mod
from datamodules.base import ParsingDataModule, ParsingDataset
from datamodules.batch import DatasetError
from datamodules.cityscapes import CityscapesDataModule, CityscapesDataset
from datamodules.lip import LIP_CLASSES, LIP_FLIP_PAIRS, LIP_PALETTE, LIPDataModule, LIPDataset
from datamodules.mhp import MHPv2DataModule
from datamodules.transforms import build_train_transform

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


# -- LIP ---------------------------------------------------------------------------------------


@pytest.fixture
def lip_root(tmp_path) -> Path:
    return make_lip(tmp_path / "LIP")


def test_lip_constants():
    assert len(LIP_CLASSES) == 20 and LIP_CLASSES[10] == "Jumpsuits" and LIP_CLASSES[13] == "Face"
    assert LIP_CLASSES[14:] == ("Left-arm", "Right-arm", "Left-leg", "Right-leg", "Left-shoe",
                                "Right-shoe")  # fmt: skip
    assert LIP_FLIP_PAIRS == ((14, 15), (16, 17), (18, 19))
    assert LIP_PALETTE.shape == (20, 3) and LIP_PALETTE.dtype == np.uint8
    assert LIP_PALETTE[5].tolist() == [255, 85, 0] and LIP_PALETTE[19].tolist() == [255, 170, 0]


@pytest.mark.parametrize("layout", ["flat", "trainval", "nested"])
def test_lip_layouts_decode_the_same_values(tmp_path, layout):
    root = make_lip(tmp_path / "LIP", layout)
    for split, ids in LIP_IDS.items():
        ds = LIPDataset(root, split)
        assert ds.ids == ids and ds.has_labels
        for i, name in enumerate(ids):
            item = ds[i]
            h, w = (9, 7) if i == 0 else (5, 11)
            assert set(item) == {"image", "mask", "name"} and item["name"] == name
            assert item["image"].shape == (h, w, 3) and item["image"].dtype == np.uint8
            assert item["mask"].dtype == np.uint8
            np.testing.assert_array_equal(item["mask"], lip_label(i, h, w))
            # Flat JPEG colour survives compression within a few levels.
            np.testing.assert_allclose(item["image"].reshape(-1, 3).mean(0), lip_image(i)[0, 0],
                                       atol=3)  # fmt: skip
    test = LIPDataset(root, "test")
    assert not test.has_labels and test.ids == LIP_TEST_IDS
    assert set(test[0]) == {"image", "name"} and test[0]["image"].shape == (9, 7, 3)


def test_lip_id_list_crlf_blank_lines_and_spaces(lip_root):
    (lip_root / "train_id.txt").write_bytes(
        b"\r\n77_471474  \r\n\r\n \r\n102349_900100102349\r\n\r\n"
    )
    assert LIPDataset(lip_root, "train").ids == LIP_IDS["train"]
    (lip_root / "train_id.txt").write_bytes(b"\n\n  \n")
    raises_naming(lambda: LIPDataset(lip_root, "train"), "train_id.txt", "empty")


def test_lip_grayscale_jpeg_becomes_rgb(lip_root):
    gray = np.tile(np.linspace(10, 240, 7, dtype=np.uint8), (9, 1))
    path = lip_root / "train_images/77_471474.jpg"
    Image.fromarray(gray, mode="L").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "L"  # the fixture really is a one-channel JPEG
    image = LIPDataset(lip_root, "train")[0]["image"]
    assert image.shape == (9, 7, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    np.testing.assert_allclose(image[..., 0], gray, atol=3)


def test_lip_bad_data(lip_root):
    label = lip_label(0)
    label[2, 3] = 20
    write_png(lip_root / "train_segmentations/77_471474.png", label, mode="L")
    ds = LIPDataset(lip_root, "train")
    raises_naming(lambda: ds[0], "77_471474.png", r"label value 20 outside 0\.\.19")
    # RGB labels (palette or luminance conversions) are refused, not guessed at.
    write_png(lip_root / "train_segmentations/77_471474.png", np.zeros((9, 7, 3), np.uint8))
    raises_naming(lambda: ds[0], "77_471474.png", "mode RGB")
    write_png(lip_root / "train_segmentations/77_471474.png", np.zeros((8, 7), np.uint8), "L")
    raises_naming(lambda: ds[0], "77_471474.png", "does not match image size")
    (lip_root / "val_segmentations/100034_483681.png").unlink()
    raises_naming(lambda: LIPDataset(lip_root, "val"), "100034_483681.png", "not found")
    (lip_root / "val_id.txt").unlink()
    raises_naming(lambda: LIPDataset(lip_root, "val"), "val_id.txt", "not found")
    with pytest.raises(ValueError, match="unknown LIP split"):
        LIPDataset(lip_root, "trainval")


def test_check_tool_on_lip(lip_root, capsys):
    """python -m datamodules.check data=lip ...: LIP class names, every bad file named."""
    from datamodules.check import main as check_main

    assert check_main(["data=lip", f"data.root={lip_root}"]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "Left-arm" in out
    label = lip_label(0)
    label[2, 3] = 20
    write_png(lip_root / "train_segmentations/77_471474.png", label, mode="L")
    assert check_main(["data=lip", f"data.root={lip_root}", "split='train,val'"]) == 1
    out = capsys.readouterr().out
    assert "77_471474.png" in out and "1 problem(s)" in out


def test_lip_skip_bad(lip_root):
    label = lip_label(0)
    label[0, 0] = 200
    write_png(lip_root / "train_segmentations/77_471474.png", label, mode="L")
    (lip_root / "train_id.txt").write_text("404_1\n77_471474\n102349_900100102349\n")
    with pytest.raises(DatasetError):
        LIPDataset(lip_root, "train")
    ds = LIPDataset(lip_root, "train", skip_bad=True)
    assert ds.ids == LIP_IDS["train"] and ds.bad_ids == ["404_1"]
    assert [ds[i]["name"] for i in range(2)] == ["102349_900100102349"] * 2
    assert sorted(ds.bad_ids) == ["404_1", "77_471474"] and "200" in ds.bad_samples["77_471474"]


def test_lip_flip_swaps_left_and_right_arm():
    mask = np.zeros((4, 6), np.int64)
    mask[:, :3] = 14  # left arm on the image's left
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :3] = 255
    tf = build_train_transform((4, 6), (1.0, 1.0), 0, LIP_FLIP_PAIRS, 1.0, 0.0)
    out = tf({"image": image, "mask": mask, "name": "x"})
    # Mirrored, the arm is on the right and is now a right arm (15).
    assert (out["mask"][:, 3:] == 15).all() and (out["mask"][:, :3] == 0).all()
    assert (out["image"][0, :, 3:] > out["image"][0, :, :3]).all()


def test_lip_class_pixel_counts(lip_root):
    ds = LIPDataset(lip_root, "train")
    direct = sum(np.bincount(ds[i]["mask"].ravel(), minlength=20) for i in range(len(ds)))
    counts = ds.class_pixel_counts()
    assert counts.dtype == np.int64 and counts.sum() == 9 * 7 + 5 * 11
    np.testing.assert_array_equal(counts, direct)
    assert (
        json.loads((lip_root / "train_class_counts.json").read_text())["counts"] == direct.tolist()
    )


def test_lip_datamodule(lip_root):
    dm = LIPDataModule(root=str(lip_root), batch_size=2, num_workers=0, crop_size=(8, 8))
    assert isinstance(dm, ParsingDataModule)
    assert dm.num_classes == 20 and dm.class_names[15] == "Right-arm" and dm.ignore_index == 255
    np.testing.assert_array_equal(dm.palette, LIP_PALETTE)
    assert dm.eval_size == (8, 8) and dm.flip_pairs == list(LIP_FLIP_PAIRS)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 8, 8)
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape == (1, 9, 7) and val["orig_size"].tolist() == [[9, 7]]
    assert not dm.has_test_labels
    with pytest.raises(RuntimeError, match="no annotations"):
        dm.test_dataloader()
    pred = next(iter(dm.predict_dataloader()))
    assert "mask" not in pred and pred["name"] == LIP_TEST_IDS
    assert dm.class_pixel_counts().sum() == 9 * 7 + 5 * 11


# -- Cityscapes --------------------------------------------------------------------------------


@pytest.fixture
def cs_root(tmp_path) -> Path:
    return make_cityscapes(tmp_path / "cityscapes")


def test_cityscapes_table_and_constants():
    lut = cs_mod.CITYSCAPES_ID_TO_TRAINID
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert (lut[7], lut[26], lut[0], lut[4], lut[24], lut[33]) == (0, 13, 255, 255, 11, 18)
    ignored = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
    assert (lut[ignored] == 255).all() and (lut[34:] == 255).all()
    assert sorted(lut[lut != 255].tolist()) == list(range(19))
    names = cs_mod.CITYSCAPES_CLASSES
    assert len(names) == 19 and names[0] == "road" and names[13] == "car" and names[18] == "bicycle"
    palette = cs_mod.CITYSCAPES_PALETTE
    assert palette.shape == (19, 3) and palette[0].tolist() == [128, 64, 128]
    assert palette[13].tolist() == [0, 0, 142]
    with pytest.raises(AttributeError):
        cs_mod.NOT_A_CONSTANT  # noqa: B018


@pytest.mark.parametrize("train_ids", [True, False])
def test_cityscapes_masks_with_and_without_train_id_files(tmp_path, train_ids):
    root = make_cityscapes(tmp_path / "cs", train_ids=train_ids)
    ds = CityscapesDataset(root, "train")
    # Sorted by city, then frame, whatever order the files were written in.
    assert ds.ids == [
        "aachen_000000_000000",
        "aachen_000000_000019",
        "bremen_000000_000000",
        "bremen_000000_000019",
    ]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "mask", "name"} and item["name"] == ds.ids[i]
        assert item["image"].shape == (H, W, 3) and item["image"].dtype == np.uint8
        assert item["mask"].dtype == np.uint8
        np.testing.assert_array_equal(item["mask"], TRAIN_IDS)
    # Image i was written k-th with value 10 * k: the sorted order reverses the writing order.
    assert [int(ds[i]["image"][0, 0, 0]) for i in range(len(ds))] == [30, 20, 10, 0]


def test_cityscapes_disagreeing_train_ids(cs_root):
    wrong = TRAIN_IDS.copy()
    wrong[1, 4] = 14  # truck where the labelIds say car
    stem = "frankfurt_000000_000000"
    write_png(cs_root / f"gtFine/val/frankfurt/{stem}_gtFine_labelTrainIds.png", wrong, mode="L")
    ds = CityscapesDataset(cs_root, "val")
    np.testing.assert_array_equal(ds[1]["mask"], TRAIN_IDS)  # the other file still agrees
    err = raises_naming(lambda: ds[0], f"{stem}_gtFine_labelTrainIds.png", "1 pixels disagree")
    assert "y=1, x=4" in str(err) and "file has 14" in str(err)
    bad = TRAIN_IDS.copy()
    bad[0, 0] = 19
    write_png(cs_root / f"gtFine/val/frankfurt/{stem}_gtFine_labelTrainIds.png", bad, mode="L")
    raises_naming(lambda: ds[0], "labelTrainIds.png", r"trainId 19 outside")
    ids = LABEL_IDS.copy()
    ids[0, 0] = 34
    write_png(cs_root / f"gtFine/val/frankfurt/{stem}_gtFine_labelIds.png", ids, mode="L")
    raises_naming(lambda: ds[0], f"{stem}_gtFine_labelIds.png", "labelId 34 is not in")


def test_cityscapes_16bit_instances_decoded_exactly(cs_root):
    path = cs_root / "gtFine/train/aachen/aachen_000000_000000_gtFine_instanceIds.png"
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # a real 16-bit PNG
    ds = CityscapesDataset(cs_root, "train", instances=True)
    item = ds[0]
    assert set(item) == {"image", "mask", "name", "instances"}
    inst = item["instances"]
    assert inst.dtype == np.int32 and inst.shape == (H, W)
    np.testing.assert_array_equal(inst, INSTANCE_IDS.astype(np.int32))
    assert inst[1, 4] == 26001 and inst[2, 3] == 33000 and inst[2, 0] == 26
    # The semantic part of each instance value is the labelId.
    np.testing.assert_array_equal(np.where(inst >= 1000, inst // 1000, inst), LABEL_IDS)
    assert "instances" not in CityscapesDataset(cs_root, "train")[0]
    # An 8-bit "instance" map cannot hold id*1000+k: refused.
    write_png(path, LABEL_IDS, mode="L")
    raises_naming(lambda: ds[0], "instanceIds.png", "expected 16-bit")
    path.unlink()
    raises_naming(lambda: CityscapesDataset(cs_root, "train", instances=True),
                   "instanceIds.png", "not found")  # fmt: skip


def test_cityscapes_test_split_has_images_only(cs_root):
    ds = CityscapesDataset(cs_root, "test", instances=True)
    assert not ds.has_labels and ds.ids == ["berlin_000000_000000", "berlin_000000_000019"]
    assert set(ds[0]) == {"image", "name"}


def test_cityscapes_missing_files(cs_root):
    for f in (cs_root / "gtFine/val/frankfurt").glob("frankfurt_000000_000019_gtFine_label*"):
        f.unlink()
    raises_naming(lambda: CityscapesDataset(cs_root, "val"), "000019_gtFine_labelIds.png",
                   "not found")  # fmt: skip
    ds = CityscapesDataset(cs_root, "val", skip_bad=True)
    assert ds.ids == ["frankfurt_000000_000000"] and ds.num_skipped == 1
    # Only the generated trainIds file: used as it is.
    (cs_root / "gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelIds.png").unlink()
    np.testing.assert_array_equal(
        CityscapesDataset(cs_root, "val", skip_bad=True)[0]["mask"], TRAIN_IDS
    )
    raises_naming(lambda: CityscapesDataset(cs_root / "nope", "val"), "nope", "not found")


def test_cityscapes_without_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)
    for fn in (cs_mod.cityscapes_labels, cs_mod.label_id_to_train_id, cs_mod._train_classes):
        fn.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install -e '\.\[cityscapes\]'"):
            CityscapesDataset("/nonexistent", "val")
    finally:
        for fn in (cs_mod.cityscapes_labels, cs_mod.label_id_to_train_id, cs_mod._train_classes):
            fn.cache_clear()


def test_cityscapes_datamodule(cs_root):
    dm = CityscapesDataModule(root=str(cs_root), batch_size=2, num_workers=0, crop_size=(4, 4))
    assert dm.num_classes == 19 and dm.class_names[13] == "car" and dm.flip_pairs == []
    np.testing.assert_array_equal(dm.palette, cs_mod.CITYSCAPES_PALETTE)
    assert dm.eval_size is None  # full resolution
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 4, 4) and batch["mask"].dtype == torch.uint8
    assert set(batch["mask"].unique().tolist()) <= set(TRAIN_IDS.ravel().tolist())
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (2, 3, H, W)  # not resized
    assert (val["mask"] == torch.from_numpy(TRAIN_IDS).long()).all()
    assert not dm.has_test_labels
    with pytest.raises(RuntimeError, match="no annotations"):
        dm.test_dataloader()
    assert "mask" not in next(iter(dm.predict_dataloader()))
    expected = np.bincount(TRAIN_IDS.ravel(), minlength=256)[:19] * 4
    np.testing.assert_array_equal(dm.class_pixel_counts(), expected)


# -- configs and the shared base ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "classes", "palette", "pairs", "crop"),
    [
        ("lip", LIPDataModule, LIP_CLASSES, LIP_PALETTE, LIP_FLIP_PAIRS, [473, 473]),
        ("cityscapes", CityscapesDataModule, None, None, (), [512, 1024]),
    ],
)
def test_data_configs_match_constructor(tmp_path, name, cls, classes, palette, pairs, crop):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    classes = classes if classes is not None else cs_mod.CITYSCAPES_CLASSES
    palette = palette if palette is not None else cs_mod.CITYSCAPES_PALETTE
    cfg = OmegaConf.create(
        {"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / f"{name}.yaml")}
    )
    assert set(cfg.data) - {"_target_"} == cls.argument_names()
    assert list(cfg.data.class_names) == list(classes)
    np.testing.assert_array_equal(np.array(cfg.data.palette), palette)
    assert [tuple(p) for p in cfg.data.flip_pairs] == list(pairs)
    assert list(cfg.data.crop_size) == crop and cfg.data.ignore_index == 255
    dm = instantiate(cfg.data)
    assert isinstance(dm, cls) and dm.num_classes == len(classes)
    assert str(dm.root).startswith(str(tmp_path))
    # Hyperparameters are plain containers (checkpoints load with weights_only=True).
    assert type(dm.hparams["class_names"]) is list and type(dm.hparams["crop_size"]) is list
    assert set(dm.hparams) == set(cfg.data) - {"_target_"}


def test_mhp_datamodule_builds_on_the_base(mhp_root):
    dm = MHPv2DataModule(root=str(mhp_root), batch_size=1, num_workers=0, crop_size=(8, 8))
    assert isinstance(dm, ParsingDataModule) and dm.splits["validate"] == "val"
    assert set(dm.hparams) == MHPv2DataModule.argument_names()
    assert dm.hparams["palette"] is None and dm.eval_size == (8, 8)
    assert not dm.has_test_labels
    batch = next(iter(dm.val_dataloader()))
    assert batch["mask"].shape[0] == 1 and batch["image"].shape == (1, 3, 8, 8)
    assert issubclass(LIPDataset, ParsingDataset) and issubclass(CityscapesDataset, ParsingDataset)


def test_cityscapes_miou_agrees_with_the_official_evaluation(tmp_path):
    """Our loader + confusion-matrix mIoU on trainIds equals cityscapesscripts' own pixel-level
    evaluation (evalPixelLevelSemanticLabeling) of the same predictions, written as labelIds by
    save_predictions=true prediction_format=dataset_ids."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label
    from omegaconf import OmegaConf

    from experiments.results import prediction_writer
    from lightning_modules.metrics import ConfusionMatrix, segmentation_scores

    rng = np.random.default_rng(3)
    root, h, w = tmp_path / "cityscapes", 24, 40
    cfg = OmegaConf.create({"save_predictions": True, "prediction_format": "dataset_ids"})
    dm = cs_mod.CityscapesDataModule(root=str(root), num_workers=0)
    write = prediction_writer(cfg, dm, tmp_path / "run")
    stems = [f"frankfurt_000000_{i:06d}" for i in range(3)]
    preds_train, pred_files, gt_files = {}, [], []
    for stem in stems:
        # Every labelId 0..33, void ones included; the network predicts trainIds 0..18, right
        # about half the time.
        label_ids = rng.integers(0, 34, size=(h, w)).astype(np.uint8)
        write_png(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png",
                   rng.integers(0, 255, (h, w, 3)).astype(np.uint8))  # fmt: skip
        gt = write_png(
            root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", label_ids, "L"
        )
        truth = cs_mod.label_id_to_train_id()[label_ids]
        guess = rng.integers(0, 19, size=(h, w))
        pred = np.where((rng.random((h, w)) < 0.5) & (truth != 255), truth, guess).astype(np.uint8)
        preds_train[stem] = pred
        write("val", stem, pred)
        written = tmp_path / "run" / "predictions" / "val" / f"{stem}.png"
        to_label_id = np.array([trainId2label[t].id for t in range(19)], dtype=np.uint8)
        np.testing.assert_array_equal(np.array(Image.open(written)), to_label_id[pred])
        pred_files.append(str(written))
        gt_files.append(str(gt))

    ds = CityscapesDataset(root, "val")
    metric = ConfusionMatrix(19, ignore_index=255)
    for i in range(len(ds)):
        item = ds[i]
        metric.update(
            torch.from_numpy(preds_train[item["name"]]).long()[None],
            torch.as_tensor(item["mask"]).long()[None],
        )
    ours = segmentation_scores(metric.compute())

    args = official.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    result = official.evaluateImgLists(pred_files, gt_files, args)
    names = [trainId2label[t].name for t in range(19)]
    theirs = np.array([result["classScores"][n] for n in names], dtype=float)
    np.testing.assert_allclose(np.asarray(ours["IoU"], dtype=float), 100 * theirs, rtol=1e-9)
    assert ours["mIoU"] == pytest.approx(100 * result["averageScoreClasses"], rel=1e-9)


def test_dataset_ids_need_a_dataset_with_its_own_ids(tmp_path):
    from omegaconf import OmegaConf

    from datamodules.errors import ConfigError
    from experiments.results import prediction_writer

    cfg = OmegaConf.create({"save_predictions": True, "prediction_format": "dataset_ids"})
    lip = LIPDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(ConfigError, match="LIPDataModule has no ids of its own"):
        prediction_writer(cfg, lip, tmp_path)
    cfg.prediction_format = "labelIds"
    with pytest.raises(ConfigError, match="prediction_format=labelIds: use class_ids or"):
        prediction_writer(cfg, lip, tmp_path)
    # The official colours come with the labelIds: road (7) is purple, car (26) dark blue.
    ids, colours = cs_mod.CityscapesDataModule(root=str(tmp_path)).to_dataset_ids(
        np.array([[0, 13], [255, 18]], dtype=np.uint8)
    )
    assert ids.tolist() == [[7, 26], [0, 33]]
    assert colours[7].tolist() == [128, 64, 128] and colours[26].tolist() == [0, 0, 142]
