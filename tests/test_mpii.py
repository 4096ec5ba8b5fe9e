"""MPII loading (official .mat with its quirks, json + gt mat), crop geometry, flips, the sampler."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from fixtures.mpii import (
    RECT_FIELDS,
    json_person,
    make_json_set,
    make_release_quirks,
    points,
    struct_array,
    write_gt_val,
    write_json_split,
)

from datamodules.batch import DatasetError
from datamodules.mpii import MPIIDataset
from datamodules.mpii_annotations import load_release_mat
from datamodules.pose_transforms import (
    MPII_FLIP_PAIRS,
    JointCrops,
    PersonCrop,
    apply_affine,
    crop_affine,
    crop_image,
    error_statistics,
    flip_permutation,
    invert_affine,
    person_box,
    sample_displacements,
    torso_diameter,
)

# -- fixtures in the real formats -----------------------------------------------------------------


@pytest.fixture
def mat_root(tmp_path: Path) -> Path:
    return make_release_quirks(tmp_path / "mpii")


def test_release_mat_quirks(mat_root: Path, caplog):
    records, skipped = load_release_mat(mat_root / "mpii_human_pose_v1_u12_1.mat")
    assert skipped == {"train: no annopoints": 1, "train: no objpos": 1}
    train, test = records["train"], records["test"]
    assert [(r["name"], r["rect_index"]) for r in train] == [
        ("000000001.jpg", 0), ("000000001.jpg", 1), ("000000005.jpg", 0)
    ]  # fmt: skip
    a, b = train[0], train[1]
    expected = np.zeros((16, 3), np.float32)
    expected[0] = (10.0, 20.0, 1)  # 1-based (11, 21) -> 0-based
    expected[9] = (30.5, 40.0, 1)  # labelled although is_visible = '0'
    expected[13] = (50.0, 60.0, 1)  # labelled, empty is_visible
    np.testing.assert_array_equal(a["keypoints"], expected)
    assert a["visible"][[0, 9, 13]].tolist() == [1.0, 0.0, 1.0]
    assert a["head_size"] == pytest.approx(0.6 * np.hypot(30.0, 40.0))  # = 30
    np.testing.assert_array_equal(a["center"], [49.0, 59.0])
    assert a["scale"] == 2.0
    # strings, one point (a bare struct after squeeze_me)
    assert b["keypoints"][7].tolist() == [619.0, 9.5, 1.0] and b["keypoints"][:, 2].sum() == 1
    assert b["head_size"] == pytest.approx(0.6 * 5.0)
    # single_person holds 1-based rect indices: image 1 -> its second person
    assert [r["single_person"] for r in train] == [False, True, True]
    assert len(test) == 1 and test[0]["scale"] == 3.0 and test[0]["keypoints"].sum() == 0
    np.testing.assert_array_equal(test[0]["center"], [4.0, 5.0])
    assert np.isnan(test[0]["head_size"])

    caplog.set_level(logging.INFO, logger="datamodules.mpii")
    ds = MPIIDataset(mat_root, "train")
    assert ds.format == "mat" and len(ds) == 3
    assert "1 x train: no annopoints" in caplog.text and "1 x train: no objpos" in caplog.text
    item = ds[0]
    assert item["image"].shape == (70, 90, 3) and item["image"].dtype == np.uint8
    assert abs(int(item["image"].mean()) - 40) <= 2
    assert item["keypoints"].shape == (16, 3) and item["name"] == "000000001.jpg"
    assert MPIIDataset(mat_root, "train", single_person=True).records[0]["rect_index"] == 1
    assert len(MPIIDataset(mat_root, "test")) == 1


@pytest.fixture
def json_root(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    return make_json_set(tmp_path / "mpii_json")


def test_json_and_gt_val(json_root):
    root, joints, vis = json_root
    val = MPIIDataset(root, "val")
    assert val.format == "json" and len(val) == 2
    item = val[1]
    np.testing.assert_allclose(item["keypoints"][1:5, :2], joints[1][1:5] - 1.0, atol=1e-5)
    assert item["keypoints"][:, 2].tolist() == vis[1].tolist()
    assert item["keypoints"][0].tolist() == [0.0, 0.0, 0.0]  # [-1, -1] never becomes a coordinate
    assert item["head_size"] == pytest.approx(0.6 * 5.0)
    assert val[0]["head_size"] == pytest.approx(0.6 * 10.0)
    np.testing.assert_array_equal(item["center"], [29.0, 30.0])
    assert item["scale"] == pytest.approx(1.3)
    train = MPIIDataset(root, "train")
    assert len(train) == 1 and np.isnan(train[0]["head_size"])


def test_bad_files_name_the_file(json_root, mat_root, tmp_path):
    root, joints, vis = json_root
    # gt mat listing the persons in another order than mpii_val.json
    write_gt_val(root, joints[::-1], vis[::-1], [[(0, 0), (1, 1)]] * 2)
    with pytest.raises(DatasetError, match="mpii_gt_val.mat.*different split or order"):
        MPIIDataset(root, "val")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mpii_human_pose_v1_u12_1.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="mpii_human_pose_v1_u12_1.mat"):
        MPIIDataset(bad, "train")
    (bad / "mpii_human_pose_v1_u12_1.mat").unlink()
    with pytest.raises(DatasetError, match="mpii_train.json not found"):
        MPIIDataset(bad, "train")
    (mat_root / "images" / "000000001.jpg").write_bytes(b"truncated")
    with pytest.raises(DatasetError, match="000000001.jpg"):
        MPIIDataset(mat_root, "train")[0]


def test_mat_train_leaves_out_val_images(mat_root):
    # The val split (json) holds the person of image 5: every person of that image leaves train.
    joints = np.zeros((16, 2)) + 12.0
    vis = np.ones(16, np.int64)
    write_json_split(mat_root, "val", [json_person("000000005.jpg", joints, vis, (7.0, 8.0), 2.0)])
    write_gt_val(mat_root, [joints], [vis], [[(1, 1), (4, 5)]])
    train = MPIIDataset(mat_root, "train", format="mat")
    assert [r["name"] for r in train.records] == ["000000001.jpg", "000000001.jpg"]
    assert train.skipped["train: image holds a val person"] == 1
    assert len(MPIIDataset(mat_root, "val")) == 1


# -- geometry -------------------------------------------------------------------------------------


def test_crop_uncrop_inverts_exactly():
    rng = np.random.default_rng(1)
    for _ in range(50):
        c, side = rng.uniform(-50, 500, 2), rng.uniform(5, 800)
        a = crop_affine(c, side, rng.uniform(-180, 180), bool(rng.integers(2)))
        p = rng.uniform(-100, 700, (16, 2))
        np.testing.assert_allclose(apply_affine(invert_affine(a), apply_affine(a, p)), p, atol=1e-9)
    # independent values: the box maps onto [-0.5, 0.5]^2, centre at 0; a 90 degree turn
    a = crop_affine(np.array([100.0, 50.0]), 40.0)
    np.testing.assert_allclose(
        apply_affine(a, [[100, 50], [120, 50], [80, 30]]), [[0, 0], [0.5, 0], [-0.5, -0.5]]
    )
    r = crop_affine(np.array([0.0, 0.0]), 1.0, rotation=90)
    np.testing.assert_allclose(apply_affine(r, [[1.0, 0.0]]), [[0.0, -1.0]], atol=1e-12)


def test_crop_pixels_and_person_box():
    image = np.zeros((50, 60, 3), np.uint8)
    image[20, 30] = (255, 128, 7)
    # side == size: one crop pixel per image pixel; the box centre lands on pixel (S - 1) / 2
    crop = crop_image(image, crop_affine(np.array([30.0, 20.0]), 11.0), 11)
    assert crop[5, 5].tolist() == [255, 128, 7] and crop.sum() == 255 + 128 + 7
    crop = crop_image(image, crop_affine(np.array([27.0, 22.0]), 11.0), 11)
    assert crop[3, 8].tolist() == [255, 128, 7]
    c, side = person_box(np.array([10.0, 20.0]), 2.0)
    assert c.tolist() == [10.0, 50.0] and side == 500.0
    c, side = person_box(np.array([10.0, 20.0]), 2.0, shift=0.0, enlarge=1.0)
    assert c.tolist() == [10.0, 20.0] and side == 400.0


def test_flip_twice_is_identity_and_swaps_the_right_joints():
    perm = flip_permutation(16, MPII_FLIP_PAIRS)
    np.testing.assert_array_equal(perm[perm], np.arange(16))
    expected = {0: 5, 1: 4, 2: 3, 10: 15, 11: 14, 12: 13, 6: 6, 7: 7, 8: 8, 9: 9}
    for a, b in expected.items():
        assert perm[a] == b and perm[b] == a
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    c = np.array([24.0, 19.0])
    plain = crop_image(image, crop_affine(c, 30.0, 10.0), 32)
    mirrored = crop_image(image, crop_affine(c, 30.0, 10.0, flip=True), 32)
    assert np.abs(mirrored.astype(int) - plain[:, ::-1].astype(int)).max() <= 1
    # flip of the flip: the same map
    twice = crop_affine(c, 30.0, 10.0, flip=True)
    twice[0] *= -1
    np.testing.assert_allclose(twice, crop_affine(c, 30.0, 10.0))


def _person_item(rng: np.random.Generator) -> dict:
    kp = np.zeros((16, 3), np.float32)
    kp[:, :2] = rng.uniform(20, 80, (16, 2))
    kp[:, 2] = 1
    kp[4, 2] = 0
    return {
        "image": rng.integers(0, 255, (100, 110, 3), dtype=np.uint8),
        "keypoints": kp,
        "head_size": 7.0,
        "center": np.array([50.0, 45.0], np.float32),
        "scale": 0.4,
        "name": "x.jpg",
        "index": 3,
    }


def test_person_crop_targets_uncrop_to_the_joints_with_flip_swap():
    rng = np.random.default_rng(2)
    item = _person_item(rng)
    perm = flip_permutation(16, MPII_FLIP_PAIRS)
    flips = 0
    for seed in range(12):
        out = PersonCrop(64, train=True)(item, seed=seed)
        a = out["affine"][0].numpy()
        back = apply_affine(invert_affine(a), out["target"].numpy().astype(np.float64))
        # flipped when the mirrored crop map has a negative determinant
        flipped = np.linalg.det(a[:, :2]) < 0
        flips += flipped
        order = perm if flipped else np.arange(16)
        lab = out["labelled"].numpy() > 0
        np.testing.assert_allclose(back[lab], item["keypoints"][order][lab, :2], atol=1e-3)
        assert out["labelled"].tolist() == item["keypoints"][order, 2].tolist()
    assert 0 < flips < 12
    plain = PersonCrop(64)(item)
    c, side = person_box(item["center"], item["scale"])
    np.testing.assert_allclose(
        plain["target"].numpy(), (item["keypoints"][:, :2] - c) / side, atol=1e-6
    )


def test_joint_crops_simulate_the_displacement():
    rng = np.random.default_rng(3)
    item = _person_item(rng)
    mean = np.tile([[0.05, -0.02]], (16, 1))
    cov = np.zeros((16, 2, 2))  # deterministic: the estimate is ground truth + mean * box side
    t = JointCrops(32, sigma=2.0, displacement=(mean, cov), flip_pairs=())
    out = t(item, seed=0)
    _, box_side = person_box(item["center"], item["scale"])
    diam = torso_diameter(item["keypoints"][:, :2])
    lab = item["keypoints"][:, 2] > 0
    expected = -mean * box_side / (2.0 * diam)
    np.testing.assert_allclose(out["target"].numpy()[lab], expected[lab], atol=1e-6)
    assert out["image"].shape == (16, 3, 32, 32) and out["slot"].tolist() == list(range(16))
    # flipped crops read the mirror joint's output and see the displacement mirrored
    out = JointCrops(32, sigma=2.0, displacement=(mean, cov))(item, seed=1)
    perm = flip_permutation(16, MPII_FLIP_PAIRS)
    flipped = out["slot"].numpy() != np.arange(16)
    assert flipped.any()
    np.testing.assert_array_equal(out["slot"].numpy()[flipped], perm[flipped])
    got = out["target"].numpy()
    sym = lab & (perm == np.arange(16))  # pelvis/thorax/neck/head: flip state from the det
    dets = np.linalg.det(out["affine"].numpy()[:, :, :2])
    for j in np.where(lab)[0]:
        sign = -1.0 if dets[j] < 0 else 1.0
        np.testing.assert_allclose(got[j], expected[j] * [sign, 1.0], atol=1e-6)
    assert sym.any()
    # evaluation: crops on given estimates, side sigma * diam of the estimate
    centers = np.zeros((5, 16, 2))
    centers[3] = item["keypoints"][:, :2] + 1.0
    ev = JointCrops(32, sigma=1.0, centers=centers)(item)
    np.testing.assert_allclose(ev["target"].numpy(), np.full((16, 2), -1.0 / diam), atol=1e-6)


def test_torso_diameter():
    j = np.zeros((16, 2))
    j[13], j[2] = (0, 0), (3, 4)  # l_shoulder - r_hip: 5
    j[12], j[3] = (0, 0), (6, 8)  # r_shoulder - l_hip: 10
    assert torso_diameter(j) == pytest.approx(7.5)
    lab = np.ones(16)
    lab[3] = 0
    assert torso_diameter(j, lab) == pytest.approx(5.0)
    lab[2] = 0
    assert np.isnan(torso_diameter(j, lab))


def test_displacement_sampler_reproduces_mean_and_covariance():
    rng = np.random.default_rng(0)
    k, n = 16, 20000
    mean = rng.normal(0, 0.1, (k, 2))
    root = rng.normal(0, 0.05, (k, 2, 2))
    cov = root @ root.transpose(0, 2, 1)
    cov[3] = [[0.01, 0.01], [0.01, 0.01]]  # singular (perfectly correlated) still samples
    draws = sample_displacements(mean, cov, np.random.default_rng(1), num=n)  # (n, K, 2)
    assert draws.shape == (n, k, 2)
    sd = np.sqrt(np.einsum("kii->ki", cov))
    # sample mean within 5 standard errors; covariances within 5 standard errors of a Wishart entry
    assert np.all(np.abs(draws.mean(0) - mean) <= 5 * sd / np.sqrt(n) + 1e-12)
    for j in range(k):
        emp = np.cov(draws[:, j].T)
        se = np.sqrt((cov[j] ** 2 + np.outer(np.diag(cov[j]), np.diag(cov[j]))) / n)
        assert np.all(np.abs(emp - cov[j]) <= 5 * se + 1e-12), j
    # and the statistics of stage errors are the labelled joints' plain mean / unbiased covariance
    errors = rng.normal(0, 1, (50, k, 2))
    lab = rng.random((50, k)) < 0.8
    m, c, count = error_statistics(errors, lab)
    for j in range(k):
        e = errors[lab[:, j], j]
        np.testing.assert_allclose(m[j], e.mean(0))
        np.testing.assert_allclose(c[j], np.cov(e, rowvar=False))
        assert count[j] == lab[:, j].sum()


# -- persons without a usable box, numeric single_person ------------------------------------------


def test_json_persons_without_a_box_are_skipped_and_counted(json_root, caplog):
    from lightning_modules.pose_metrics import evaluate_official

    root, joints, vis = json_root
    ok = json_person("000000003.jpg", joints[0], vis[0], (20.0, 25.0), 1.0)
    write_json_split(
        root,
        "train",
        [
            {**ok, "center": [-1, -1]},  # the json form's "no objpos"
            ok,
            {**ok, "scale": -1},
            {**ok, "scale": 0.0},
        ],
    )
    caplog.set_level(logging.INFO, logger="datamodules.mpii")
    train = MPIIDataset(root, "train")
    assert len(train) == 1 and train.records[0]["source_index"] == 1
    assert train.skipped == {"no center (-1)": 1, "scale <= 0": 2}
    assert "1 x no center (-1)" in caplog.text and "2 x scale <= 0" in caplog.text
    np.testing.assert_array_equal(train[0]["center"], [19.0, 24.0])
    # val: the gt mat keeps every person; the kept ones keep their own head sizes and gt rows
    persons = [
        json_person(f"{i + 1:09d}.jpg", joints[i], vis[i], (30.0, 31.0), 0.3 + i) for i in range(2)
    ]
    write_json_split(root, "val", [{**persons[0], "center": [-1.0, -1.0]}, persons[1]])
    val = MPIIDataset(root, "val")
    assert len(val) == 1 and val.skipped == {"no center (-1)": 1}
    assert val[0]["head_size"] == pytest.approx(0.6 * 5.0)  # person 1's head box (3 x 4)
    pred = val.arrays()["keypoints"][:, :, :2]  # the ground truth itself: 100 %
    assert evaluate_official(pred, root / "annotations" / "mpii_gt_val.mat", [1])["PCKh"] == 100.0


def test_numeric_single_person_vector_is_one_entry_per_image(tmp_path):
    from datamodules.mpii_annotations import _as_list

    assert [int(v) for v in _as_list(np.array([2, 1, 3]))] == [2, 1, 3]
    assert len(_as_list(np.array(5))) == 1 and _as_list(np.zeros((0, 0))) == []
    # A RELEASE whose single_person is a plain numeric column (not a cell): image 1 -> rect 2,
    # image 2 -> rect 1. As one value it would have put both ids on image 1.
    rect = {
        "x1": np.array([[1.0]]), "y1": np.array([[1.0]]), "x2": np.array([[4.0]]),
        "y2": np.array([[5.0]]), "scale": np.array([[1.0]]),
        "objpos": {"x": np.array([[9.0]]), "y": np.array([[9.0]])},
        "annopoints": {"point": points([(0, 2.0, 3.0, np.array([[1]])), (1, 4.0, 5.0, "1")])},
    }  # fmt: skip
    annolist = struct_array(
        [
            {"image": {"name": f"{i:09d}.jpg"}, "annorect": struct_array([rect, rect], RECT_FIELDS)}
            for i in (1, 2)
        ],
        ["image", "annorect"],
    )
    release = {
        "annolist": annolist,
        "img_train": np.array([[1, 1]]),
        "single_person": np.array([[2.0], [1.0]]),
    }
    path = tmp_path / "mpii_human_pose_v1_u12_1.mat"
    scipy.io.savemat(path, {"RELEASE": release})
    records, _ = load_release_mat(path)
    got = [(r["name"], r["rect_index"], r["single_person"]) for r in records["train"]]
    assert got == [
        ("000000001.jpg", 0, False), ("000000001.jpg", 1, True),
        ("000000002.jpg", 0, True), ("000000002.jpg", 1, False),
    ]  # fmt: skip


def test_person_crop_translation_and_noise():
    """The slides' random crop moves the box by at most t box sides, the same for every joint;
    the noise has the configured standard deviation in grey levels and zero mean."""
    from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(5)
    item = _person_item(rng)
    item["image"] = np.full((100, 110, 3), 128, np.uint8)  # mid grey: no clipping of the noise
    fixed = {"scale_jitter": 0.0, "rotate": 0.0, "flip_pairs": ()}
    plain = PersonCrop(64, **fixed)(item)
    c, side = person_box(item["center"], item["scale"])
    shifts = []
    for seed in range(8):
        out = PersonCrop(64, train=True, translate=0.1, **fixed)(item, seed=seed)
        # target = (joint - (c + d)) / side: one offset d for all joints
        d = (plain["target"] - out["target"]).numpy().astype(np.float64)
        np.testing.assert_allclose(d, np.broadcast_to(d[:1], d.shape), atol=1e-5)
        shifts.append(d[0])
        # the affine is the box moved by d sides
        want = crop_affine(c + d[0] * side, side)
        np.testing.assert_allclose(out["affine"][0].numpy(), want, atol=1e-5)
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 0.1 + 1e-6 and shifts.std(0).min() > 0.01
    out = PersonCrop(64, train=True, noise=0.02, **fixed)(item, seed=0)
    std = np.asarray(IMAGENET_STD)[:, None, None]
    grey = (out["image"].numpy() * std + np.asarray(IMAGENET_MEAN)[:, None, None]) * 255.0
    inside = grey[:, 20:44, 20:44] - 128.0  # the crop's centre lies inside the image
    assert abs(inside.mean()) < 0.5 and inside.std() == pytest.approx(0.02 * 255, rel=0.08)
    # evaluation crops are never noisy nor moved
    same = PersonCrop(64, translate=0.1, noise=0.02, **fixed)(item)
    assert torch.equal(same["image"], plain["image"])


def test_jitter_laws_have_their_variances():
    """uniform on [-1, 1]: variance 1/3; the standard normal truncated to [-1, 1] (mmpose):
    1 - 2 phi(1) / (Phi(1) - Phi(-1)) = 0.2911."""
    from math import erf, exp, pi, sqrt

    from datamodules.pose_transforms import _jitter

    rng = np.random.default_rng(0)
    uni = np.array([_jitter(rng, "uniform") for _ in range(6000)])
    tn = np.array([_jitter(rng, "truncnorm") for _ in range(6000)])
    phi1 = exp(-0.5) / sqrt(2 * pi)
    want = 1 - 2 * phi1 / erf(1 / sqrt(2))
    assert np.abs(tn).max() <= 1 and tn.var() == pytest.approx(want, abs=0.015)
    assert uni.var() == pytest.approx(1 / 3, abs=0.015)
    with pytest.raises(ValueError, match="jitter"):
        PersonCrop(64, jitter="gauss")
