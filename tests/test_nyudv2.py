"""NYUDv2 loader and datamodule on a tiny MATLAB v7.3 (HDF5) file and splits.mat in the real layout.

The fixture frames are 6x8 (H x W), stored as MATLAB does through h5py: ``images`` (N, 3, W, H),
``labels`` / ``depths`` (N, W, H). Every pixel value depends on its row, column and frame, so a
wrong transpose, frame offset or map fails on values, not only on shapes.
"""

from __future__ import annotations

import json
import os
import pickle
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from assertions import raises_naming
from scipy.io import savemat
from torch.utils.data import DataLoader

from datamodules.base import ParsingDataModule, ParsingDataset
from datamodules.nyudv2 import (
    NYU13_CLASSES,
    NYU40_CLASSES,
    NYUDv2DataModule,
    NYUDv2Dataset,
    load_mapping,
    package_mapping,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"

N, H, W = 5, 6, 8
TRAIN_FRAMES, TEST_FRAMES = [2, 4, 5], [1, 3]  # 1-based, as in splits.mat

# Hand-mapped from DATASETS.md Appendix A (A.1 table, A.2 mapClass), 0-based, 255 = unlabeled.
# raw id: (name, 40-class id, 13-class id)
RAW = {
    0: ("unlabeled", 255, 255),
    21: ("wall", 0, 11),
    11: ("floor", 1, 4),
    3: ("cabinet", 2, 5),
    157: ("bed", 3, 0),
    5: ("chair", 4, 3),
    83: ("sofa", 5, 8),
    19: ("table", 6, 9),
    28: ("door", 7, 11),  # door -> wall in the 13-class map
    59: ("window", 8, 12),
    4: ("ceiling", 21, 2),
    85: ("books", 22, 1),
    172: ("television", 24, 10),
    331: ("person", 30, 6),
    868: ("floor trim", 37, 6),  # otherstructure
    892: ("doily", 38, 5),  # otherfurniture
    894: ("torah", 39, 6),  # otherprop
    277: ("(A.2) 277", 39, 6),  # = 21 + 256: wall if the ids were cast to uint8 first
}
RAW_IDS = np.array(list(RAW), dtype=np.uint16)
TO40 = np.vectorize(lambda r: RAW[int(r)][1])
TO13 = np.vectorize(lambda r: RAW[int(r)][2])


def frame_image(i: int) -> np.ndarray:
    """(H, W, 3) uint8: value y*W + x + 100*c + i (row, column, channel and frame all show)."""
    y, x, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(3), indexing="ij")
    return (y * W + x + 100 * c + i).astype(np.uint8)


def frame_raw(i: int) -> np.ndarray:
    """(H, W) uint16 raw NYU ids cycling through RAW_IDS, shifted per frame."""
    flat = (np.arange(H * W) + 3 * i) % len(RAW_IDS)
    return RAW_IDS[flat].reshape(H, W)


def frame_depth(i: int) -> np.ndarray:
    """(H, W) float32 metres: y + x/10 + 10*i."""
    y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return (y + x / 10 + 10 * i).astype(np.float32)


def write_labeled_mat(path: Path, raws: list[np.ndarray] | None = None) -> Path:
    """The v7.3 layout: HDF5 behind a 512-byte MATLAB user block, axes reversed by h5py."""
    raws = raws if raws is not None else [frame_raw(i) for i in range(N)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        # MATLAB H x W x 3 x N is seen by h5py as (N, 3, W, H).
        f["images"] = np.stack([frame_image(i).transpose(2, 1, 0) for i in range(N)])
        f["labels"] = np.stack([r.T for r in raws]).astype(np.uint16)  # (N, W, H)
        f["depths"] = np.stack([frame_depth(i).T for i in range(N)])  # (N, W, H)
        f.create_group("#refs#")  # present in the real file; must not be iterated as data
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116, b" "))
    return path


def write_splits(path: Path, train=TRAIN_FRAMES, test=TEST_FRAMES) -> Path:
    # MATLAB doubles, column vectors, 1-based.
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    savemat(path, {"trainNdxs": col(train), "testNdxs": col(test)})
    return path


@pytest.fixture
def nyu_root(tmp_path) -> Path:
    root = tmp_path / "nyudv2"
    write_labeled_mat(root / "nyu_depth_v2_labeled.mat")
    write_splits(root / "splits.mat")
    return root


# -- the shipped tables ------------------------------------------------------------------------


def test_package_mapping_matches_appendix_a():
    data = json.loads(resources.files("datamodules").joinpath("nyu_mapping.json").read_text())
    assert len(data["mapClass"]) == 894 and len(data["labels13"]) == 40
    m = package_mapping()
    mc = m.map_class  # entry k-1 = 40-id of raw k
    assert mc.shape == (894,) and mc.dtype == np.uint8
    # A.1: the single raw id of each specific class; A.2: a few rows' entries.
    specific = {21: 1, 11: 2, 3: 3, 157: 4, 5: 5, 83: 6, 19: 7, 28: 8, 59: 9, 88: 10, 64: 11,
                17: 24, 172: 25, 331: 31, 55: 37}  # fmt: skip
    rows = {1: 40, 8: 38, 12: 39, 277: 40, 868: 38, 892: 39, 894: 40}
    for raw, forty in {**specific, **rows}.items():
        assert mc[raw - 1] == forty, raw
    counts = np.bincount(mc, minlength=41)
    assert counts[40] == 707 and counts[39] == 82 and counts[38] == 68
    assert (counts[1:38] == 1).all() and counts[0] == 0
    assert m.labels13.tolist() == [12, 5, 6, 1, 4, 9, 10, 12, 13, 6, 8, 6, 13, 10, 6, 13, 6, 7, 7,
                                   5, 7, 3, 2, 6, 11, 7, 7, 7, 7, 7, 7, 6, 7, 7, 7, 7, 7, 7, 6,
                                   7]  # fmt: skip
    assert len(NYU40_CLASSES) == 40 and NYU40_CLASSES[:3] == ("wall", "floor", "cabinet")
    assert NYU40_CLASSES[19] == "floor mat" and NYU40_CLASSES[23] == "refridgerator"  # [sic]
    assert NYU40_CLASSES[-3:] == ("otherstructure", "otherfurniture", "otherprop")
    assert NYU13_CLASSES == ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                             "picture", "sofa", "table", "tv", "wall", "window")  # fmt: skip
    # The look-up tables used by the loader, 0-based with 255 = unlabeled.
    lut40, lut13 = m.lut(40), m.lut(13)
    assert lut40.shape == lut13.shape == (895,)
    for raw, (_, c40, c13) in RAW.items():
        assert (lut40[raw], lut13[raw]) == (c40, c13), raw


# -- the dataset -------------------------------------------------------------------------------


def test_decodes_image_label_depth_with_matlab_axes(nyu_root):
    ds = NYUDv2Dataset(nyu_root, "test")
    assert isinstance(ds, ParsingDataset) and len(ds) == 2 and ds.num_frames == N
    item = ds[1]  # frame 3 = row 2
    assert set(item) == {"image", "mask", "depth", "name"} and item["name"] == "00003"
    image, mask, depth = item["image"], item["mask"], item["depth"]
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert depth.shape == (H, W) and depth.dtype == np.float32
    np.testing.assert_array_equal(image, frame_image(2))
    # Spot values: row 1, column 5, channel 2 = 1*8 + 5 + 200 + 2; row 5, column 0, channel 0.
    assert image[1, 5, 2] == 215 and image[5, 0, 0] == 42 and image[0, 7, 1] == 109
    assert depth[4, 6] == pytest.approx(4.6 + 20) and depth[0, 1] == pytest.approx(20.1)
    np.testing.assert_array_equal(depth, frame_depth(2))
    # Label pixel (y, x) of frame i holds RAW_IDS[(y*W + x + 3*i) % 18].
    raw = frame_raw(2)
    assert raw[0, 0] == RAW_IDS[6] == 83 and mask[0, 0] == 5  # sofa
    assert raw[1, 3] == RAW_IDS[(8 + 3 + 6) % 18] == 277 and mask[1, 3] == 39  # not wall
    np.testing.assert_array_equal(mask, TO40(raw))
    np.testing.assert_array_equal(ds.load_raw_label(1), raw)


def test_40_and_13_class_maps(nyu_root):
    ds40, ds13 = NYUDv2Dataset(nyu_root, "train"), NYUDv2Dataset(nyu_root, "train", 13)
    for index, frame in enumerate(TRAIN_FRAMES):
        raw = frame_raw(frame - 1)
        m40, m13 = ds40[index]["mask"], ds13[index]["mask"]
        np.testing.assert_array_equal(m40, TO40(raw))
        np.testing.assert_array_equal(m13, TO13(raw))
        assert (m40[raw == 0] == 255).all() and (m13[raw == 0] == 255).all()
        assert set(np.unique(m40)) <= set(range(40)) | {255}
        assert set(np.unique(m13)) <= set(range(13)) | {255}
    # Frame 2 (row 1), pixel (0, 0) = RAW_IDS[3] = cabinet: 40 -> 2, 13 -> furniture (5).
    assert ds40[0]["mask"][0, 0] == 2 and ds13[0]["mask"][0, 0] == 5
    with pytest.raises(ValueError, match="40 or 13"):
        NYUDv2Dataset(nyu_root, "train", num_classes=20)


def test_splits_are_one_based(nyu_root):
    train = NYUDv2Dataset(nyu_root, "train")
    assert train.ids == ["00002", "00004", "00005"] and train.frames == [1, 3, 4]
    test = NYUDv2Dataset(nyu_root, "test")
    assert test.ids == ["00001", "00003"] and test.frames == [0, 2]
    np.testing.assert_array_equal(test[0]["image"], frame_image(0))  # frame 1 is row 0
    np.testing.assert_array_equal(train[2]["image"], frame_image(4))  # frame 5 is the last row
    val = NYUDv2Dataset(nyu_root, "val")  # alias of test
    assert val.ids == test.ids
    with pytest.raises(ValueError, match="unknown NYUDv2 split"):
        NYUDv2Dataset(nyu_root, "trainval")
    # A 0-based list (or a frame past the end) is refused, naming splits.mat.
    write_splits(nyu_root / "splits.mat", train=[0, 1, 2], test=[3, 6])
    raises_naming(
        lambda: NYUDv2Dataset(nyu_root, "train"), "splits.mat", r"frame 0, outside 1\.\.5"
    )
    raises_naming(lambda: NYUDv2Dataset(nyu_root, "test"), "splits.mat", r"frame 6, outside")
    skipped = NYUDv2Dataset(nyu_root, "test", skip_bad=True)
    assert skipped.ids == ["00003"] and skipped.bad_ids == ["00006"]


def test_raw_id_above_894_is_an_error(tmp_path):
    root = tmp_path / "nyu"
    raws = [frame_raw(i) for i in range(N)]
    raws[3][2, 5] = 895  # frame 4, a train frame
    write_labeled_mat(root / "nyu_depth_v2_labeled.mat", raws)
    write_splits(root / "splits.mat")
    ds = NYUDv2Dataset(root, "train")
    np.testing.assert_array_equal(ds[0]["mask"], TO40(frame_raw(1)))  # other frames still load
    err = raises_naming(
        lambda: ds[1],
        "nyu_depth_v2_labeled.mat",
        r"frame 00004 .*raw label id 895 outside 0\.\.894",
    )
    assert err.path.endswith("nyu_depth_v2_labeled.mat")
    skipping = NYUDv2Dataset(root, "train", skip_bad=True)
    assert skipping[1]["name"] == "00005" and skipping.bad_ids == ["00004"]


def test_user_mapping_file_overrides_the_package_map(nyu_root, tmp_path):
    mapping = package_mapping().map_class.copy()
    mapping[21 - 1] = 2  # wall -> floor
    mapping[277 - 1] = 5  # 277 -> chair
    path = tmp_path / "classMapping40.mat"
    savemat(
        path,
        {"mapClass": mapping.reshape(1, -1), "className": np.array(NYU40_CLASSES, dtype=object)},
    )
    assert load_mapping(path).map_class[20] == 2 and package_mapping().map_class[20] == 1
    raw = frame_raw(0)
    expected40 = TO40(raw)
    expected40[raw == 21], expected40[raw == 277] = 1, 4
    mask = NYUDv2Dataset(nyu_root, "test", mapping_file=path)[0]["mask"]
    np.testing.assert_array_equal(mask, expected40)
    # The 13-class map applies on top of the user's 40-class ids (floor -> floor, chair -> chair).
    expected13 = TO13(raw)
    expected13[raw == 21], expected13[raw == 277] = 4, 3
    mask13 = NYUDv2Dataset(nyu_root, "test", num_classes=13, mapping_file=path)[0]["mask"]
    np.testing.assert_array_equal(mask13, expected13)
    # A table of the wrong size or range is refused, naming the file.
    savemat(path, {"mapClass": mapping[:100].reshape(1, -1)})
    raises_naming(
        lambda: NYUDv2Dataset(nyu_root, "test", mapping_file=path),
        "classMapping40.mat",
        "100 entries",
    )
    savemat(path, {"other": np.ones(3)})
    raises_naming(lambda: load_mapping(path), "classMapping40.mat", "no variable 'mapClass'")
    raises_naming(lambda: load_mapping(tmp_path / "missing.mat"), "missing.mat", "not found")


def test_pickles_without_the_h5_handle_and_works_in_workers(nyu_root):
    ds = NYUDv2Dataset(nyu_root, "train")
    assert ds._h5 is None  # __init__ read the shapes and closed the file again
    first = ds[0]
    assert ds._h5 is not None  # opened lazily by the read
    clone = pickle.loads(pickle.dumps(ds))  # an open h5py.File would not pickle
    assert clone._h5 is None and ds._h5 is not None
    for key in ("image", "mask", "depth"):
        np.testing.assert_array_equal(clone[0][key], first[key])
    # Forked DataLoader workers inherit the parent's open handle and must open their own: the
    # transform (run in the worker, on the worker's copy of ds) reports whose handle was read.
    ds.transform = lambda item: {**item, "pid": os.getpid(), "handle_pid": ds._h5_pid}
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = {item["name"]: item for item in loader}
    ds.transform = None
    assert sorted(got) == ds.ids
    assert all(v["handle_pid"] == v["pid"] != os.getpid() for v in got.values())
    for index, name in enumerate(ds.ids):
        np.testing.assert_array_equal(np.asarray(got[name]["mask"]), ds[index]["mask"])
        np.testing.assert_array_equal(np.asarray(got[name]["image"]), ds[index]["image"])
    np.testing.assert_array_equal(ds[2]["depth"], frame_depth(4))  # the parent's handle still works
    ds.close()
    assert ds._h5 is None and ds[0]["name"] == "00002"


def test_missing_and_malformed_files(nyu_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_naming(lambda: NYUDv2Dataset(empty, "train"), "nyu_depth_v2_labeled.mat", "not found")
    (nyu_root / "splits.mat").unlink()
    raises_naming(lambda: NYUDv2Dataset(nyu_root, "train"), "splits.mat", "not found")
    savemat(nyu_root / "splits.mat", {"trainNdxs": np.array([[1.0]])})
    raises_naming(lambda: NYUDv2Dataset(nyu_root, "test"), "splits.mat", "no variable 'testNdxs'")
    # A MAT v5 file where the v7.3 (HDF5) one belongs.
    bad = tmp_path / "v5" / "nyu_depth_v2_labeled.mat"
    bad.parent.mkdir()
    savemat(bad, {"images": np.zeros((2, 2))})
    write_splits(bad.parent / "splits.mat")
    raises_naming(lambda: NYUDv2Dataset(bad.parent, "train"), "nyu_depth_v2_labeled.mat", "HDF5")
    # Shapes that do not follow the (N, 3, W, H) / (N, W, H) layout.
    with h5py.File(bad, "w") as f:
        f["images"] = np.zeros((N, 3, W, H), np.uint8)
        f["labels"] = np.zeros((N, H, W), np.uint16)
        f["depths"] = np.zeros((N, W, H), np.float32)
    raises_naming(
        lambda: NYUDv2Dataset(bad.parent, "train"), "nyu_depth_v2_labeled.mat", "'labels' has shape"
    )
    del_depth = bad.parent / "nyu_depth_v2_labeled.mat"
    with h5py.File(del_depth, "a") as f:
        del f["depths"]
    raises_naming(
        lambda: NYUDv2Dataset(bad.parent, "train"),
        "nyu_depth_v2_labeled.mat",
        "no dataset 'depths'",
    )


# -- the datamodule and config -----------------------------------------------------------------


def test_datamodule(nyu_root):
    dm = NYUDv2DataModule(root=str(nyu_root), batch_size=2, num_workers=0, crop_size=(4, 4))
    assert isinstance(dm, ParsingDataModule)
    assert dict(dm.splits) == {"fit": "train", "validate": "test", "test": "test"}
    assert dm.num_classes == 40 and dm.class_names == list(NYU40_CLASSES) and dm.flip_pairs == []
    assert dm.eval_size is None and dm.has_test_labels
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 4, 4) and batch["mask"].dtype == torch.uint8
    assert set(batch["mask"].unique().tolist()) <= set(TO40(RAW_IDS).tolist())
    val = next(iter(dm.val_dataloader()))
    assert val["name"] == ["00001", "00003"] and val["image"].shape == (2, 3, H, W)
    assert val["orig_size"].tolist() == [[H, W]] * 2
    expected = torch.from_numpy(np.stack([TO40(frame_raw(0)), TO40(frame_raw(2))]))
    assert (val["mask"] == expected).all()
    test = next(iter(dm.test_dataloader()))
    assert (test["mask"] == expected).all()
    direct = sum(
        np.bincount(TO40(frame_raw(f - 1)).ravel(), minlength=256)[:40] for f in TRAIN_FRAMES
    )
    np.testing.assert_array_equal(dm.class_pixel_counts(), direct)

    dm13 = NYUDv2DataModule(root=str(nyu_root), num_classes=13, batch_size=1, num_workers=0)
    assert dm13.class_names == list(NYU13_CLASSES) and dm13.crop_size == (480, 640)
    # Same split, other class count: the cached 40-class histogram is not reused.
    direct13 = sum(
        np.bincount(TO13(frame_raw(f - 1)).ravel(), minlength=256)[:13] for f in TRAIN_FRAMES
    )
    np.testing.assert_array_equal(dm13.class_pixel_counts(), direct13)
    with pytest.raises(ValueError, match="40 or 13"):
        NYUDv2DataModule(root=str(nyu_root), num_classes=894)
    with pytest.raises(ValueError, match="class_names=null"):
        NYUDv2DataModule(root=str(nyu_root), num_classes=13, class_names=NYU40_CLASSES)


def test_data_config_matches_constructor(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(CONF / "nyudv2.yaml")}
    )
    params = NYUDv2DataModule.argument_names()
    assert set(cfg.data) - {"_target_"} == params
    assert list(cfg.data.class_names) == list(NYU40_CLASSES) and cfg.data.num_classes == 40
    assert list(cfg.data.crop_size) == [480, 640] and cfg.data.ignore_index == 255
    assert list(cfg.data.flip_pairs) == [] and cfg.data.root == str(tmp_path / "nyudv2")
    dm = instantiate(cfg.data)
    assert isinstance(dm, NYUDv2DataModule) and dm.num_classes == 40
    assert type(dm.hparams["class_names"]) is list and set(dm.hparams) == params
    cfg.data.num_classes, cfg.data.class_names = 13, None
    assert instantiate(cfg.data).class_names == list(NYU13_CLASSES)
