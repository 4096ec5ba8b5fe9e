"""DeepPose cascade: metrics against independent implementations, loss, nets, stage module, a
2-stage cascade end to end on generated data, and the driver (DDP ranks, resume, per-stage data)."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from cfg_utils import compose_cfg
from torch import nn

import experiments.pose as pose
import experiments.ranks as ranks
from datamodules.errors import ConfigError
from datamodules.pose_transforms import crop_affine, invert_affine
from lightning_modules.nets.deeppose import DeepPoseAlexNet, DeepPoseResNet
from lightning_modules.pose import PoseRegressionLitModule, uncrop
from lightning_modules.pose_metrics import (
    PoseMetric,
    evaluate_official,
    evaluate_pose,
    pcp_counts,
)
from losses.pose import JointL2Loss, joint_l2

# -- PCKh -----------------------------------------------------------------------------------------


def hrnet_style_pckh(pred, gt, missing, headboxes, thr):
    """Independent re-statement of HRNet's lib/dataset/mpii.py::evaluate (DATASETS.md 5.5), on
    arrays laid out like mpii_gt_val.mat: pred/gt (16, 2, N), missing (16, N), boxes (2, 2, N)."""
    jnt_visible = 1 - missing
    uv_err = np.linalg.norm(pred - gt, axis=1)
    headsizes = np.linalg.norm(headboxes[1] - headboxes[0], axis=0) * 0.6
    scaled = uv_err / (headsizes * np.ones((len(uv_err), 1)))
    less = (scaled <= thr) * jnt_visible
    jnt_count = jnt_visible.sum(1)
    pckh = np.ma.array(100.0 * less.sum(1) / jnt_count, mask=False)
    pckh.mask[6:8] = True
    jnt_count = np.ma.array(jnt_count, mask=False)
    jnt_count.mask[6:8] = True
    ratio = jnt_count / jnt_count.sum().astype(np.float64)
    return {
        "Head": pckh[9],
        "Shoulder": 0.5 * (pckh[13] + pckh[12]),
        "Elbow": 0.5 * (pckh[14] + pckh[11]),
        "Wrist": 0.5 * (pckh[15] + pckh[10]),
        "Hip": 0.5 * (pckh[3] + pckh[2]),
        "Knee": 0.5 * (pckh[4] + pckh[1]),
        "Ankle": 0.5 * (pckh[5] + pckh[0]),
        "Mean": float(np.sum(pckh * ratio)),
    }


def test_pckh_hand_made_case():
    # Two persons, head size 0.6 * 10 = 6 px (box 6x8). Person 0: every joint off by 3 px (0.5 head
    # sizes exactly: correct under the official <=), except the right wrist, off by 3.1 px.
    # Person 1: joints off by 0.5 px (within 0.1 head sizes = 0.6 px) except the left ankle (4 px)
    # and the head top, which is unlabelled.
    gt = np.zeros((2, 16, 2))
    pred = gt.copy()
    pred[0, :, 0] = 3.0
    pred[0, 10, 0] = 3.1
    pred[1, :, 1] = 0.5
    pred[1, 5, 1] = 4.0
    labelled = np.ones((2, 16))
    labelled[1, 9] = 0
    head = np.array([6.0, 6.0])
    s = evaluate_pose(pred, gt, labelled, head)
    assert s["Head"] == 100.0  # one labelled head, correct
    assert s["Wrist"] == pytest.approx((50.0 + 100.0) / 2)  # r wrist 1/2, l wrist 2/2
    # person 1's left ankle is 4 / 6 = 0.67 head sizes off: l ankle 1/2, r ankle 2/2
    assert s["joints"]["l_ankle"] == 50.0 and s["joints"]["r_ankle"] == 100.0
    assert s["Ankle"] == pytest.approx(75.0)
    # mean over 14 joints (pelvis/thorax out), weighted by counts: 27 labelled, 2 wrong
    assert s["PCKh"] == pytest.approx(100.0 * 25 / 27)
    # @0.1 (0.6 px): only person 1's 0.5-px joints, its left ankle and head top aside: 12 of 27
    assert s["PCKh@0.1"] == pytest.approx(100.0 * 12 / 27)
    assert s["joint_counts"]["head_top"] == 1


def test_pckh_single_error():
    """One wrong joint among 28 scored ones; the table averages left and right values."""
    gt = np.zeros((2, 16, 2))
    pred = gt.copy()
    pred[1, 5, 1] = 4.0
    s = evaluate_pose(pred, gt, np.ones((2, 16)), np.array([6.0, 6.0]))
    assert s["Ankle"] == pytest.approx(75.0) and s["PCKh"] == pytest.approx(100 * 27 / 28)


def test_pckh_matches_an_independent_hrnet_style_implementation(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    gt1 = rng.uniform(1, 200, (n, 16, 2))  # 1-based, as in the gt mat
    missing = (rng.random((n, 16)) < 0.15).astype(np.int64)
    boxes = np.zeros((2, 2, n))
    boxes[0] = rng.uniform(0, 50, (2, n))
    boxes[1] = boxes[0] + rng.uniform(5, 30, (2, n))
    head = 0.6 * np.linalg.norm(boxes[1] - boxes[0], axis=0)
    pred0 = gt1 - 1.0 + rng.normal(0, 1, (n, 16, 2)) * head[:, None, None] * 0.4  # 0-based
    mine = evaluate_pose(pred0, gt1 - 1.0, 1 - missing, head)
    ref = hrnet_style_pckh(
        (pred0 + 1).transpose(1, 2, 0), gt1.transpose(1, 2, 0), missing.T, boxes, 0.5
    )
    for key in ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle"):
        assert mine[key] == pytest.approx(ref[key], abs=1e-9)
    assert mine["PCKh"] == pytest.approx(ref["Mean"], abs=1e-9)
    ref01 = hrnet_style_pckh(
        (pred0 + 1).transpose(1, 2, 0), gt1.transpose(1, 2, 0), missing.T, boxes, 0.1
    )
    assert mine["PCKh@0.1"] == pytest.approx(ref01["Mean"], abs=1e-9)
    # official path: 0-based predictions against the 1-based gt mat (+1 inside)
    scipy.io.savemat(
        tmp_path / "gt.mat",
        {
            "jnt_missing": missing.T,
            "pos_gt_src": gt1.transpose(1, 2, 0),
            "headboxes_src": boxes,
        },
    )
    official = evaluate_official(pred0, tmp_path / "gt.mat")
    assert official["PCKh"] == pytest.approx(ref["Mean"], abs=1e-9)
    # the torchmetrics accumulator over batches gives the same numbers
    metric = PoseMetric()
    for sl in (slice(0, 15), slice(15, n)):
        metric.update(
            torch.tensor(pred0[sl]),
            torch.tensor(gt1[sl] - 1.0),
            torch.tensor(1 - missing[sl]),
            torch.tensor(head[sl]),
        )
    acc = metric.compute()
    assert acc["PCKh"] == pytest.approx(mine["PCKh"]) and acc["PCP"] == pytest.approx(mine["PCP"])


def test_pcp_hand_made():
    gt = np.zeros((1, 16, 2))
    gt[0, 12], gt[0, 11], gt[0, 10] = (0, 0), (0, 10), (0, 20)  # right upper / lower arm, 10 px
    pred = gt.copy()
    pred[0, 11] = (4.9, 10)  # elbow 4.9 px off: upper arm ok (<= 5), lower arm ok
    pred[0, 10] = (0, 26)  # wrist 6 px off: lower arm wrong
    lab = np.zeros((1, 16))
    lab[0, [10, 11, 12]] = 1
    hits, counts = pcp_counts(pred, gt, lab)
    assert counts.sum() == 2 and hits.sum() == 1
    s = evaluate_pose(pred, gt, lab, np.array([10.0]))
    assert s["PCP"] == 50.0 and s["PCP_limbs"]["Upper arm"] == 100.0
    assert s["PCP_limbs"]["Lower arm"] == 0.0 and np.isnan(s["PCP_limbs"]["Torso"])


# -- loss, nets, stage module ---------------------------------------------------------------------


def test_joint_l2_loss():
    pred = torch.zeros(2, 3, 2, requires_grad=True)
    target = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]], [[0.0, 2.0], [0, 0], [0, 0]]])
    lab = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    target[0, 2] = float("nan")  # unlabelled garbage must not leak
    loss = joint_l2(pred, target, lab)
    assert loss.item() == pytest.approx((25 + 1 + 4) / 3)
    loss.backward()
    assert pred.grad[0, 2].abs().sum() == 0 and pred.grad[1, 1:].abs().sum() == 0
    assert torch.allclose(pred.grad[0, 0], torch.tensor([-6.0, -8.0]) / 3)
    out = JointL2Loss(weight=2.0)(pred, target, lab)
    assert out["loss"].item() == pytest.approx(20.0) and out["loss/l2"].item() == pytest.approx(10)


def test_alexnet_has_the_papers_layout():
    net = DeepPoseAlexNet(num_joints=16, input_size=220, fc_dim=4096)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.out_channels) for c in convs] == [
        (11, 96), (5, 256), (3, 384), (3, 384), (3, 256)
    ]  # fmt: skip
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in net.features) == 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == 3
    fcs = [m for m in net.regressor if isinstance(m, nn.Linear)]
    assert [f.out_features for f in fcs] == [4096, 4096, 32]
    assert net.eval()(torch.zeros(2, 3, 220, 220)).shape == (2, 16, 2)
    with pytest.raises(ValueError, match="no pretrained"):
        DeepPoseAlexNet(pretrained=True)


def test_alexnet_feature_maps_are_the_papers_55_27_13():
    """The paper's layer sizes at 220x220: C1 55x55, C2 27x27, C3-C5 13x13; 6x6 after P3."""
    net = DeepPoseAlexNet(input_size=220, width=0.125, fc_dim=8).eval()
    sizes = []
    for m in net.features:
        if isinstance(m, nn.Conv2d | nn.MaxPool2d):
            m.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]))
    net(torch.zeros(1, 3, 220, 220))
    # conv, pool, conv, pool, conv, conv, conv, pool
    assert sizes == [55, 27, 27, 13, 13, 13, 13, 6]
    assert net.regressor[2].in_features == 6 * 6 * net.features[-3].out_channels


def test_pckh_head_column_is_head_top_alone():
    from lightning_modules.pose_metrics import format_pose_table, pckh_columns

    gt = np.zeros((4, 16, 2))
    pred = gt.copy()
    pred[:, 8] = 100.0  # upper_neck always wrong: no column shows it, the mean does
    pred[:2, 9] = 100.0  # head_top wrong for half of the persons
    scores = evaluate_pose(pred, gt, np.ones((4, 16)), np.ones(4))
    assert scores["Head"] == pytest.approx(50.0) and scores["Shoulder"] == 100.0
    assert scores["PCKh"] == pytest.approx(100 * (14 * 4 - 4 - 2) / (14 * 4))
    assert pckh_columns().startswith("Head = head_top; Shoulder = l/r_shoulder")
    assert "all but pelvis, thorax" in format_pose_table(scores).splitlines()[-1]


def test_resnet_variant_builds_without_download():
    net = DeepPoseResNet(num_joints=16, depth=18, pretrained=False)
    assert net.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 2)


class _Fixed(nn.Module):
    """Returns output[n, j] = (n, j) for crop n: which output was read is visible in the value."""

    def forward(self, x):
        n = x.shape[0]
        out = torch.zeros(n, 16, 2)
        out[..., 0] = torch.arange(n, dtype=torch.float32)[:, None]
        out[..., 1] = torch.arange(16, dtype=torch.float32)[None]
        return out


def test_stage_module_reads_each_crops_slot_and_uncrops():
    module = PoseRegressionLitModule(_Fixed(), JointL2Loss(), torch.optim.SGD, stage=2)
    slot = torch.arange(16).repeat(2, 1)
    slot[1, 10] = 15  # crop 10 of person 1 was flipped: it reads the left wrist output
    batch = {"image": torch.zeros(2, 16, 3, 8, 8), "slot": slot}
    pred = module.predict_normalised(batch)
    assert pred[1, 10].tolist() == [16 + 10, 15] and pred[0, 3].tolist() == [3, 3]
    # un-crop = the inverse affine of each joint's frame
    rng = np.random.default_rng(0)
    aff = np.stack(
        [
            crop_affine(rng.uniform(0, 99, 2), rng.uniform(5, 50), rng.uniform(-30, 30))
            for _ in range(32)
        ]
    ).reshape(2, 16, 2, 3)
    n = rng.uniform(-0.5, 0.5, (2, 16, 2))
    got = uncrop(torch.tensor(n), torch.tensor(aff)).numpy()
    inv = invert_affine(aff)
    want = np.einsum("bkij,bkj->bki", inv[..., :2], n) + inv[..., 2]
    np.testing.assert_allclose(got, want, atol=1e-9)


# -- the cascade end to end -----------------------------------------------------------------------

TINY_POSE = [
    "experiment=deeppose_quick",
    "data.synthetic.num_train=12",
    "data.synthetic.num_val=5",
    "data.synthetic.image_size=72",
    "data.batch_size=4",
    "schedule.total_epochs=1",
    "cascade.stages.2.epochs=2",
    "cascade.stages.2.sigma=1.5",
    "+cascade.stages.2.optimizer.lr=5e-4",
    "model.fc_dim=64",
    "model.width=0.125",
    "cascade.control_epochs=2",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "~callbacks.model_summary",
]


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    """The tiny 2-stage cascade trained once (rank 0); the driver tests work on copies of it."""
    from experiments.ranks import LAUNCH_ENV
    from run import run

    tmp_path = tmp_path_factory.mktemp("cascade")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LAUNCH_ENV, "unset")  # run_pose sets its own; undone afterwards
        results = run(compose_cfg(TINY_POSE, tmp_path))
    return tmp_path, results


def test_two_stage_cascade_trains_and_reports_per_stage_pckh(cascade_run):
    from experiments.pose import stage_config
    from run import run

    tmp_path, results = cascade_run
    cfg = compose_cfg(TINY_POSE, tmp_path)
    _, epochs, sigma, _ = stage_config(cfg, 2)
    assert (epochs, sigma) == (2, 1.5)
    out = tmp_path / "run"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schedule"] == "cascade" and set(on_disk["stages"]) == {"stage1", "stage2"}
    assert (
        len(on_disk["PCKh_per_stage"]) == 2 and on_disk["val"] == on_disk["stages"]["stage2"]["val"]
    )
    assert results["val"]["PCKh"] == pytest.approx(on_disk["val"]["PCKh"])

    from datamodules.mpii import MPIIDataset

    val = MPIIDataset(tmp_path / "data" / "synthetic_mpii", "val")
    a = val.arrays()
    lab = a["keypoints"][..., 2] > 0
    for s in (1, 2):
        stage = on_disk["stages"][f"stage{s}"]
        assert (out / f"stage{s}" / "final.ckpt").is_file()
        assert len(list((out / f"stage{s}" / "overlays").glob("*.png"))) == 4
        # Independent PCKh of the saved cascade predictions (plain numpy, official rule)
        pred = np.load(out / f"stage{s}" / "val_predictions.npy")
        d = np.linalg.norm(pred - a["keypoints"][..., :2], axis=-1) / a["head_size"][:, None]
        keep = lab.copy()
        keep[:, 6:8] = False
        assert stage["val"]["PCKh"] == pytest.approx(100 * (d[keep] <= 0.5).mean())
        # ... and against the official 1-based gt mat
        assert stage["val_official_PCKh"] == pytest.approx(stage["val"]["PCKh"])
    # stage 2 changed the stage-1 estimates, by at most the crop reach
    p1 = np.load(out / "stage1" / "val_predictions.npy")
    p2 = np.load(out / "stage2" / "val_predictions.npy")
    assert np.isfinite(p2).all() and not np.allclose(p1, p2)
    # stage 1 measured its training errors for stage 2's simulated inputs
    errors = json.loads((out / "stage1" / "errors.json").read_text())
    assert np.array(errors["cov"]).shape == (16, 2, 2) and errors["persons"] == 12
    # the Lightning validation of stage 2 (crops on the stage-1 estimates, final weights) agrees
    # with the driver's evaluation of the whole cascade
    with open(next((out / "stage2").rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(r["val/PCKh"]) for r in rows if r.get("val/PCKh")]
    assert logged[-1] == pytest.approx(on_disk["stages"]["stage2"]["val"]["PCKh"], abs=1e-4)
    assert any(r.get("train/loss_step") for r in rows)

    # the equal-compute control: stage 1 alone, scored like the cascade; the budget counts a
    # stage-2 epoch as K = 16 crops per person: 1 * 1 + 2 * 16
    control = on_disk["control"]
    assert control["epochs"] == 2 and control["cascade_crop_passes"] == 1 + 2 * 16
    assert pose.crop_passes(cfg, 2) == 33
    pred = np.load(out / "control" / "val_predictions.npy")
    d = np.linalg.norm(pred - a["keypoints"][..., :2], axis=-1) / a["head_size"][:, None]
    assert control["val"]["PCKh"] == pytest.approx(100 * (d[keep] <= 0.5).mean())
    assert on_disk["cascade_minus_control_PCKh"] == pytest.approx(
        on_disk["val"]["PCKh"] - control["val"]["PCKh"]
    )
    assert (out / "control" / "final.ckpt").is_file()

    # train=false re-evaluates from the stage checkpoints (the control's included)
    again = compose_cfg([*TINY_POSE, "train=false"], tmp_path)
    re = run(again)
    assert re["PCKh_per_stage"] == pytest.approx(on_disk["PCKh_per_stage"])
    assert re["control"]["val"]["PCKh"] == pytest.approx(control["val"]["PCKh"])


def test_coordinate_head_runs_in_fp32_under_bf16_autocast():
    """bf16 coordinates would step by ~0.002 of the box side: the regressor stays in fp32."""
    from lightning_modules.nets.deeppose import DeepPoseResNet

    net = DeepPoseResNet(depth=18, input_size=64).eval()
    torch.nn.init.normal_(net.net.fc.weight)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net(x), net.net(x).view(-1, 16, 2), atol=1e-6)  # same as torchvision's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.float32


# -- the driver: rank 0 alone writes between stages, resume by config hash, per-stage data ---------
# (on copies of the run of ``cascade_run``)

RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "TORCHELASTIC_RUN_ID")


def _copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base / "run", out)
    return out


def _cfg(base: Path, tmp_path: Path, extra: list[str]):
    # Same data root as the trained run: data.root is part of every stage's config hash.
    return compose_cfg([*TINY_POSE, *extra], tmp_path, data_dir=base / "data")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


def _as_rank(monkeypatch, rank: int) -> None:
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", str(rank))


def test_other_ranks_write_nothing_and_use_rank0s_numbers(cascade_run, tmp_path, monkeypatch):
    base, _ = cascade_run
    out = _copy_run(base, tmp_path)
    # Rank 0's hand-offs, made recognisable: rank 1 must take these numbers, not compute its own.
    handoffs = {}
    for s in (1, 2):
        path = out / f"stage{s}" / "handoff.json"
        h = json.loads(path.read_text())
        h["entry"]["val"]["PCKh"] = 11.0 * s
        if h["displacement"] is not None:
            h["displacement"]["mean"] = np.full((16, 2), 0.125).tolist()
        path.write_text(json.dumps(h))
        handoffs[s] = h
    launch = handoffs[1]["launch"]
    assert launch and handoffs[2]["launch"] == launch
    _as_rank(monkeypatch, 1)
    monkeypatch.setenv(ranks.LAUNCH_ENV, launch)  # what Lightning's ddp launcher hands down

    def no_predictions(*args, **kwargs):
        raise AssertionError("a non-zero rank ran the cascade")

    monkeypatch.setattr(pose, "predict", no_predictions)
    seen = []
    from datamodules.mpii import MPIIDataModule

    original = MPIIDataModule.configure_stage

    def spy(self, stage, **kwargs):
        seen.append((stage, kwargs["displacement"], kwargs["val_centers"]))
        return original(self, stage, **kwargs)

    monkeypatch.setattr(MPIIDataModule, "configure_stage", spy)
    before = _files(out)
    results = pose.run_pose(_cfg(base, tmp_path, ["train=false"]), out)
    after = _files(out)
    # Loggers may create their (empty) folders; no file of rank 0 was touched, none was added.
    assert after == before
    assert results["PCKh_per_stage"] == [11.0, 22.0]
    # stage 2's data were built from rank 0's statistics and val estimates
    stage, displacement, centers = seen[1]
    assert stage == 2
    np.testing.assert_array_equal(displacement[0], np.full((16, 2), 0.125))
    np.testing.assert_array_equal(displacement[1], handoffs[1]["displacement"]["cov"])
    np.testing.assert_array_equal(centers, np.load(out / "stage1" / "val_predictions.npy"))


def test_handoff_of_another_launch_is_not_taken(tmp_path):
    stage_dir = tmp_path / "stage1"
    stage_dir.mkdir()
    (stage_dir / "handoff.json").write_text(json.dumps({"hash": "h", "launch": "old", "v": 1}))

    def publish():
        time.sleep(0.3)
        (stage_dir / "handoff.json").write_text(json.dumps({"hash": "h", "launch": "new", "v": 2}))

    thread = threading.Thread(target=publish)
    thread.start()
    got = ranks.await_handoff(stage_dir, "h", "new", poll_s=0.02)
    thread.join()
    assert got["v"] == 2


def test_resume_reuses_finished_stages_and_their_errors(cascade_run, tmp_path, monkeypatch):
    base, trained = cascade_run
    out = _copy_run(base, tmp_path)
    errors_before = (out / "stage1" / "errors.json").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed what resume should reuse")

    monkeypatch.setattr(pose, "error_statistics", fail)
    monkeypatch.setattr(pose, "build_trainer", fail)
    calls = []
    real_predict = pose.predict

    def counting(module, loader, num, device):
        calls.append(num)
        return real_predict(module, loader, num, device)

    monkeypatch.setattr(pose, "predict", counting)
    results = pose.run_pose(_cfg(base, tmp_path, ["resume=true"]), out)
    assert results["PCKh_per_stage"] == pytest.approx(trained["PCKh_per_stage"])
    # val after each stage and the (reused) control's; no pass over the 12 training persons
    assert calls == [5, 5, 5]
    assert (out / "stage1" / "errors.json").read_text() == errors_before
    record = json.loads((out / "stage2" / "stage.json").read_text())
    assert record["hash"] == results["stages"]["stage2"]["config_hash"]
    assert record["hash"] == pose.config_hash(record["config"])


def test_resume_refuses_a_stage_trained_with_another_config(cascade_run, tmp_path, monkeypatch):
    base, _ = cascade_run
    out = _copy_run(base, tmp_path)
    changed = [o.replace("lr=5e-4", "lr=1e-4") for o in TINY_POSE]
    assert changed != TINY_POSE
    monkeypatch.setattr(pose, "build_trainer", lambda *a, **k: pytest.fail("must not train"))
    cfg = compose_cfg([*changed, "resume=true"], tmp_path, data_dir=base / "data")
    with pytest.raises(ConfigError, match=r"stage 2's final.ckpt was made with another config"):
        pose.run_pose(cfg, out)


def test_resume_remeasures_errors_whose_hash_differs(cascade_run, tmp_path, monkeypatch):
    """error_persons changes stage 1's errors (recomputed) and so stage 2's inputs (refused)."""
    base, _ = cascade_run
    out = _copy_run(base, tmp_path)
    old = json.loads((out / "stage1" / "errors.json").read_text())
    monkeypatch.setattr(pose, "build_trainer", lambda *a, **k: pytest.fail("must not train"))
    cfg = _cfg(base, tmp_path, ["resume=true", "cascade.error_persons=6"])
    with pytest.raises(ConfigError, match="stage 2's final.ckpt"):
        pose.run_pose(cfg, out)
    new = json.loads((out / "stage1" / "errors.json").read_text())
    assert new["persons"] == 6 and old["persons"] == 12 and new["hash"] != old["hash"]
    rows = np.isfinite(np.load(out / "stage1" / "train_predictions.npy")[:, 0, 0])
    assert rows.sum() == 6


def test_init_from_replaced_at_the_same_path_remeasures_errors(cascade_run, tmp_path, monkeypatch):
    """The errors hash covers the init_from file's bytes, not only its path."""
    base, _ = cascade_run
    out = _copy_run(base, tmp_path)
    weights = tmp_path / "stage1_init.ckpt"
    shutil.copy(out / "stage1" / "final.ckpt", weights)
    extra = [
        "resume=true",
        f"+cascade.stages.1.init_from={weights}",
        f"+cascade.stages.2.init_from={out / 'stage2' / 'final.ckpt'}",
    ]
    monkeypatch.setattr(pose, "build_trainer", lambda *a, **k: pytest.fail("must not train"))
    measured = []
    real = pose.error_statistics

    def counting(*args, **kwargs):
        measured.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pose, "error_statistics", counting)
    pose.run_pose(_cfg(base, tmp_path, extra), out)
    first = json.loads((out / "stage1" / "errors.json").read_text())
    pose.run_pose(_cfg(base, tmp_path, extra), out)
    assert len(measured) == 1, "same file, same bytes: the errors are reused"

    ckpt = torch.load(weights, weights_only=False)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    torch.save(ckpt, weights)
    pose.run_pose(_cfg(base, tmp_path, extra), out)
    second = json.loads((out / "stage1" / "errors.json").read_text())
    assert len(measured) == 2, "new bytes at the same path: the errors are measured again"
    assert second["hash"] != first["hash"]
    assert second["mean"] != first["mean"]


def test_stage_record_hashes_init_weights_only_with_init_from(tmp_path):
    """Stages without init_from keep the record (and hash) they had before weights were hashed."""
    cfg = compose_cfg(TINY_POSE, tmp_path)
    scfg, epochs, sigma, _ = pose.stage_config(cfg, 1)
    plain = pose.stage_record(scfg, 1, epochs, sigma, None, None)
    assert "init_weights" not in plain["stage"]
    weights = tmp_path / "w.ckpt"
    weights.write_bytes(b"abc")
    given = pose.stage_record(scfg, 1, epochs, sigma, str(weights), None)
    # sha256("abc"), first 16 hex digits
    assert given["stage"]["init_weights"] == "ba7816bf8f01cfea"
    with pytest.raises(ConfigError, match=r"cascade\.stages\.1\.init_from=.*no such checkpoint"):
        pose.stage_record(scfg, 1, epochs, sigma, str(tmp_path / "missing.ckpt"), None)


def test_init_from_changed_while_loading_is_refused(cascade_run, tmp_path, monkeypatch):
    base, _ = cascade_run
    out = _copy_run(base, tmp_path)
    weights = tmp_path / "stage1_init.ckpt"
    shutil.copy(out / "stage1" / "final.ckpt", weights)
    real = PoseRegressionLitModule.load_init_weights

    def load_then_replace(module, path):
        real(module, path)
        Path(path).write_bytes(Path(path).read_bytes() + b"x")  # another writer, mid-run

    monkeypatch.setattr(PoseRegressionLitModule, "load_init_weights", load_then_replace)
    cfg = _cfg(base, tmp_path, ["resume=true", f"+cascade.stages.1.init_from={weights}"])
    with pytest.raises(ConfigError, match=r"cascade\.stages\.1\.init_from=.*changed while"):
        pose.run_pose(cfg, out)


def test_output_only_keys_leave_the_stage_hash_alone(tmp_path):
    cfg = compose_cfg(TINY_POSE, tmp_path)
    other = compose_cfg(
        [*TINY_POSE, "prediction_format=dataset_ids", "save_predictions=true"], tmp_path
    )
    for s in (1, 2):
        hashes = []
        for c in (cfg, other):
            scfg, epochs, sigma, init_from = pose.stage_config(c, s)
            hashes.append(
                pose.config_hash(pose.stage_record(scfg, s, epochs, sigma, init_from, None))
            )
        assert hashes[0] == hashes[1]


def test_per_stage_data_overrides_are_applied_or_rejected(tmp_path):
    from datamodules.mpii import MPIIDataModule

    cfg = compose_cfg([*TINY_POSE, "+cascade.stages.2.data.root=/elsewhere"], tmp_path)
    with pytest.raises(ConfigError, match=r"cascade\.stages\.2\.data\.root"):
        pose.validate_cascade(cfg)
    cfg = compose_cfg([*TINY_POSE, "+cascade.stages.2.data.synthetic.num_train=3"], tmp_path / "b")
    with pytest.raises(ConfigError, match=r"cascade\.stages\.2\.data\.synthetic\.num_train"):
        pose.validate_cascade(cfg)
    cfg = compose_cfg(
        [*TINY_POSE, "+cascade.stages.2.data.rotate=0", "+cascade.stages.2.data.flip=false"],
        tmp_path / "c",
    )
    assert pose.validate_cascade(cfg) == 2
    dm = MPIIDataModule(root=str(tmp_path), rotate=15.0, batch_size=4)
    for stage, rotate, flips in ((2, 0.0, 0), (1, 15.0, 6)):
        opts = pose.stage_data_options(pose.stage_config(cfg, stage)[0])
        dm.set_stage_options(**opts)
        assert dm.rotate == rotate and len(dm.person_transform(True).flip_pairs) == flips
        assert dm.batch_size == 4 and dm.eval_batch_size == 4


# -- no host syncs per step -----------------------------------------------------------------------


# (the no_host_sync fixture lives in conftest.py)


def test_pose_metric_counts_on_device_and_skips_nan_head_sizes(no_host_sync):
    # Person 0 has no head size (NaN): its 16 labelled joints count, none can be a hit. Person 1 is
    # exact. PCKh over the 14 scored joints = 14 / 28; PCP needs no head size: every limb right.
    gt = np.arange(64, dtype=np.float64).reshape(2, 16, 2)
    pred = gt.copy()
    head = np.array([np.nan, 6.0])
    lab = np.ones((2, 16))
    s = evaluate_pose(pred, gt, lab, head)
    assert s["PCKh"] == pytest.approx(50.0) and s["PCKh@0.1"] == pytest.approx(50.0)
    assert s["joint_counts"]["head_top"] == 2 and s["Head"] == 50.0 and s["PCP"] == 100.0
    metric = PoseMetric()
    args = [torch.tensor(x) for x in (pred, gt, lab, head)]
    with no_host_sync():
        metric.update(*args)
    acc = metric.compute()
    assert acc["PCKh"] == pytest.approx(50.0) and acc["PCP"] == 100.0
    assert acc["joint_counts"] == s["joint_counts"]


def test_nonfinite_loss_is_caught_without_a_sync_per_step(no_host_sync):
    good = {"loss": torch.tensor(1.0), "loss/l2": torch.tensor(1.0)}
    bad = {"loss": torch.tensor(float("nan")), "loss/l2": torch.tensor(float("inf"))}
    steps = iter([good, bad, good])

    class Terms(nn.Module):
        def forward(self, pred, target, labelled):
            return next(steps)

    module = PoseRegressionLitModule(_Fixed(), Terms(), torch.optim.SGD)
    batch = {"image": torch.zeros(2, 3, 8, 8), "target": torch.zeros(2, 16, 2)}
    batch["labelled"] = torch.ones(2, 16)
    with no_host_sync():
        module.training_step(batch, 0)
    module.check_finite()  # one finite step: no error
    with no_host_sync():
        module.training_step(batch, 1)
        module.training_step(batch, 2)  # a later finite step does not hide the first bad one
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 0: loss=nan, loss/l2=inf"
    ):
        module.check_finite()


# -- stage >= 2 crops travel as uint8 -------------------------------------------------------------


def test_joint_crops_are_uint8_and_normalise_to_the_float_path():
    from datamodules.batch import IMAGENET_MEAN, IMAGENET_STD
    from datamodules.pose_transforms import (
        JointCrops,
        crop_image,
        normalise_images,
        to_tensor_image,
    )

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    kp = np.concatenate([rng.uniform(10, 40, (16, 2)), np.ones((16, 1))], 1).astype(np.float32)
    item = {
        "image": image,
        "keypoints": kp,
        "head_size": 5.0,
        "center": np.array([25.0, 25.0], np.float32),
        "scale": 0.2,
        "name": "a.jpg",
        "index": 0,
    }
    centers = kp[None, :, :2] + rng.normal(0, 2, (1, 16, 2))
    out = JointCrops(24, sigma=1.0, centers=centers)(item)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (16, 3, 24, 24)
    # the float32 crops of the old path, bit for bit
    old = torch.stack([to_tensor_image(crop_image(image, a, 24)) for a in out["affine"].numpy()])
    assert torch.equal(normalise_images(out["image"]), old)
    # ... and an independent float64 normalisation, within float32 rounding
    ref = out["image"].numpy().astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]
    ref /= np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(normalise_images(out["image"]).numpy(), ref, atol=1e-5)
    # the stage module normalises uint8 batches itself
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 32), nn.Unflatten(1, (16, 2)))
    module = PoseRegressionLitModule(net, JointL2Loss(), torch.optim.SGD, stage=2).eval()
    batch = {"image": out["image"][None], "slot": out["slot"][None]}
    as_float = {"image": old[None], "slot": out["slot"][None]}
    with torch.no_grad():
        assert torch.equal(module.predict_normalised(batch), module.predict_normalised(as_float))


def test_other_ranks_stop_when_rank0_reports_a_failure(tmp_path):
    """A failure in rank 0's between-stage work reaches the waiting ranks instead of a hang."""
    import json

    from experiments.ranks import await_handoff

    (tmp_path / "handoff.json").write_text(
        json.dumps({"hash": "abc", "launch": "L1", "error": "OSError: disk full"})
    )
    with pytest.raises(RuntimeError, match="disk full"):
        await_handoff(tmp_path, "abc", "L1", poll_s=0.01)
