"""End-to-end runs on the synthetic set: results.json, checkpoints, schedules."""

from __future__ import annotations

import json
import math

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfg_utils import SINGLE, TINY, compose_cfg

from datamodules.errors import ConfigError
from lightning_modules import ParsingLitModule
from lightning_modules.schedulers import cosine_factor, poly_schedule
from run import run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _independent_val_confusion(ckpt_path, cfg) -> np.ndarray:
    """Confusion of the checkpoint on the val split, scored image by image at original size."""
    from datamodules.batch import network_batch
    from experiments.build import build_module

    module = build_module(cfg)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    c = cfg.data.num_classes
    confusion = np.zeros((c, c), dtype=np.int64)
    for batch in datamodule.val_dataloader():
        batch = network_batch(batch)  # loaders give uint8; the module normalises after transfer
        with torch.no_grad():
            logits = module.net(batch["image"])["out"]
        for i, (h, w) in enumerate(batch["orig_size"].tolist()):
            pred = (
                F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
                .argmax(1)[0]
                .numpy()
            )
            gt = batch["mask"][i, :h, :w].numpy()
            keep = gt != 255
            np.add.at(confusion, (gt[keep], pred[keep]), 1)
    return confusion


def test_single_run_writes_results_and_checkpoints(tmp_path, data_dir):
    cfg = compose_cfg(
        ["experiment=quickstart", *TINY, *SINGLE, "schedule.total_epochs=2"], tmp_path, data_dir
    )
    results = run(cfg)
    out = tmp_path / "run"
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["val"]) >= {"PA", "MPA", "mIoU", "mAcc", "IoU", "CPA"}
    assert len(on_disk["val"]["IoU"]) == 59
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert results["checkpoints"]["best"].endswith(".ckpt")
    # The reported metrics are those of the final weights, recomputed independently here.
    confusion = _independent_val_confusion(out / "checkpoints" / "last.ckpt", cfg)
    diag = np.diag(confusion).astype(float)
    pa = 100 * diag.sum() / confusion.sum()
    union = confusion.sum(0) + confusion.sum(1) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = 100 * np.nanmean(np.where(union > 0, diag / union, np.nan))
    assert on_disk["val"]["PA"] == pytest.approx(pa, abs=1e-6)
    assert on_disk["val"]["mIoU"] == pytest.approx(miou, abs=1e-6)
    metrics_csv = list((out / "csv").rglob("metrics.csv"))
    assert metrics_csv and "train/loss" in metrics_csv[0].read_text().splitlines()[0]


def test_shared_stage1_continuation_follows_one_cosine_curve(tmp_path, data_dir):
    """stage 1 (2 of 3 epochs) + continuation = the learning rates of one 3-epoch cosine run."""
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "schedule.total_epochs=3",
            "schedule.stage1_epochs=2",
        ],
        tmp_path,
        data_dir,
    )
    results = run(cfg)
    stage1_dir = results["stage1"]["dir"]
    assert (tmp_path / "logs" / "stage1").is_dir() and stage1_dir.startswith(str(tmp_path))
    steps_per_epoch = 16 // 4
    total = 3 * steps_per_epoch
    lrs = []
    for csv in [
        *sorted((tmp_path / "logs").rglob("metrics.csv")),
        *sorted((tmp_path / "run").rglob("metrics.csv")),
    ]:
        lines = csv.read_text().splitlines()
        head = lines[0].split(",")
        col, step_col = head.index("lr-SGD"), head.index("step")
        lrs += [
            (int(r.split(",")[step_col]), float(r.split(",")[col]))
            for r in lines[1:]
            if r.split(",")[col]
        ]
    lrs = dict(lrs)
    assert sorted(lrs) == list(range(total))
    for step, lr in lrs.items():
        assert lr == pytest.approx(0.02 * cosine_factor(step, total), rel=1e-6)
    # Every epoch is seeded from (seed, epoch): the continuation is exactly the one-piece run.
    whole = compose_cfg(
        ["experiment=quickstart", *TINY, *SINGLE, "schedule.total_epochs=3"],
        tmp_path / "whole",
        data_dir,
    )
    whole_results = run(whole)
    assert whole_results["val"] == results["val"]
    ours = torch.load(results["checkpoints"]["last"], weights_only=False)["state_dict"]
    ref = torch.load(whole_results["checkpoints"]["last"], weights_only=False)["state_dict"]
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(torch.nan_to_num(ours[key]), torch.nan_to_num(ref[key])), key
    # A second run with the same config reuses stage 1 instead of training it again.
    ckpt = tmp_path / "logs" / "stage1"
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*.ckpt")}
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*.ckpt")} == before


def test_poly_schedule_matches_mmseg_polylr():
    """lr(t) = (lr0 - eta_min) * (1 - t/T)^0.9 + eta_min, per step, entered at start_epoch."""
    lr0, eta_min, steps_per_epoch, epochs = 0.01, 1e-4, 5, 4
    total = steps_per_epoch * epochs
    for start_epoch in (0, 1):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
        sched = poly_schedule(opt, steps_per_epoch, epochs, start_epoch, 0.9, eta_min / lr0)
        for step in range(start_epoch * steps_per_epoch, total):
            expected = (lr0 - eta_min) * (1 - step / total) ** 0.9 + eta_min
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(eta_min, rel=1e-9)


def test_cosine_factor_values():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert cosine_factor(0, 10, warmup_steps=2) == pytest.approx(0.5)


def test_module_rejects_wrong_class_names():
    with pytest.raises(ValueError, match="class_names has 2 entries but num_classes is 3"):
        ParsingLitModule(
            net=torch.nn.Identity(),
            loss=torch.nn.Identity(),
            optimizer=None,
            num_classes=3,
            class_names=["a", "b"],
        )


@pytest.mark.slow
def test_wandb_without_network_logs_offline_dashboard(tmp_path, data_dir, monkeypatch, caplog):
    """logger=wandb set online with no W&B host answering: the run falls back to offline at once,
    names the run after its ablation, logs the resolved config and the dashboard's panels."""
    import time

    import experiments.build as train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    made = []
    real_build = train.build_loggers
    monkeypatch.setattr(
        train, "build_loggers", lambda *a, **k: made.extend(real_build(*a, **k)) or made[-1:]
    )
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "schedule.total_epochs=1",
            "logger=wandb",
            "logger.wandb.offline=false",
            "loss=focal",
        ],
        tmp_path,
        data_dir,
    )
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        run(cfg)
    assert time.monotonic() - start < 120
    assert "did not answer" in caplog.text
    (logger,) = made
    # Named by what it is (experiments/variants.py): a one-stage focal-loss PSPNet, seed 42.
    assert logger._wandb_init["name"] == "PSPNet [main_loss=FocalLoss, schedule=single] seed=42"
    assert logger._wandb_init["group"] == "quickstart"
    runs = list((tmp_path / "run").rglob("offline-run-*"))
    assert runs, "no offline W&B run written"
    # Offline runs keep the config in the run's record file: the resolved data config is there.
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"cfg" in record and b'"synthetic":{"num_train":16,"num_val":6' in record
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media").rglob("*.*")}
    assert {"per", "confusion", "examples"} <= media, media
    tables = list((runs[0] / "files" / "media").rglob("per_class*.table.json"))
    table = json.loads(tables[0].read_text())
    assert (
        table["columns"] == ["id", "class", "IoU", "precision", "recall"]
        and len(table["data"]) == 59
    )


def test_evaluate_command_and_flip_protocol(tmp_path, data_dir):
    """train=false ckpt_path=... rescores a checkpoint; eval=flip averages mirrored predictions."""
    base = ["experiment=quickstart", *TINY, *SINGLE, "schedule.total_epochs=1"]
    trained = run(compose_cfg(base, tmp_path / "a", data_dir))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    again = run(
        compose_cfg(
            [*base, "train=false", f"ckpt_path={ckpt}", "save_predictions=true"],
            tmp_path / "b",
            data_dir,
        )
    )
    assert again["val"]["mIoU"] == pytest.approx(trained["val"]["mIoU"], abs=1e-9)
    # The PNGs hold the scored predictions: the confusion rebuilt from them and the raw labels
    # gives the same pixel accuracy and mIoU.
    from PIL import Image

    from datamodules.mhp import MHPv2Dataset

    val = MHPv2Dataset(data_dir / "synthetic_mhp", "val")
    pngs = sorted((tmp_path / "b" / "run" / "predictions" / "val").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(val.ids)
    confusion = np.zeros((59, 59), dtype=np.int64)
    for i, name in enumerate(val.ids):
        with Image.open(tmp_path / "b" / "run" / "predictions" / "val" / f"{name}.png") as im:
            assert im.mode == "P"
            pred = np.array(im).astype(np.int64)
        gt = val.load(i)["mask"]
        assert pred.shape == gt.shape
        keep = gt != 255
        np.add.at(confusion, (gt[keep], pred[keep]), 1)
    assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(again["val"]["PA"])
    flipped = run(
        compose_cfg(
            [*base, "train=false", f"ckpt_path={ckpt}", "eval=flip"], tmp_path / "c", data_dir
        )
    )
    # (flip averaging itself is checked value by value in tests/test_inference.py)
    assert 0.0 <= flipped["val"]["PA"] <= 100.0 and len(flipped["val"]["IoU"]) == 59
    # results.json says which checkpoint was scored, and under which protocol.
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    for folder, flip in (("b", False), ("c", True)):
        on_disk = json.loads((tmp_path / folder / "run" / "results.json").read_text())
        assert on_disk["evaluated"] == {
            "checkpoint": str(ckpt),
            "source": "ckpt_path",
            "epoch": saved["epoch"],
            "global_step": saved["global_step"],
        }
        assert saved["global_step"] == 16 // 4  # one epoch of 4 batches
        protocol = on_disk["eval_protocol"]
        assert protocol["flip"] is flip and protocol["scales"] == [1.0]
        assert protocol["mode"] == "whole" and protocol["num_classes"] == 59
        assert protocol["_target_"] == "lightning_modules.inference.InferenceProtocol"
        # the input geometry is part of the protocol: the synthetic set's base-size fit
        assert protocol["input"]["base_size"] == 112 and protocol["input"]["base_side"] == "long"


def test_evaluate_without_checkpoint_is_a_config_error(tmp_path, data_dir):
    """train=false with neither ckpt_path nor init_from would score an untrained network."""

    base = ["experiment=quickstart", *TINY, *SINGLE, "schedule.total_epochs=1", "train=false"]
    with pytest.raises(ConfigError, match=r"train=false needs ckpt_path=<checkpoint to evaluate>"):
        run(compose_cfg([*base, "eval=flip"], tmp_path / "a", data_dir))
    assert not (tmp_path / "a" / "run" / "results.json").exists()
    with pytest.raises(ConfigError, match=r"ckpt_path=.*missing\.ckpt: no such checkpoint"):
        run(
            compose_cfg([*base, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "b", data_dir)
        )


def test_evaluate_records_init_from_and_multiscale_protocol(tmp_path, data_dir):
    """train=false init_from=... eval=ms_flip: results.json names the weights and the scales."""
    import experiments.build as train

    module = train.build_module(
        compose_cfg(["experiment=quickstart", *TINY, *SINGLE], tmp_path / "m", data_dir)
    )
    ckpt = tmp_path / "init.ckpt"
    torch.save({"state_dict": module.state_dict(), "epoch": 7, "global_step": 123}, ckpt)
    results = run(
        compose_cfg(
            [
                "experiment=quickstart",
                *TINY,
                *SINGLE,
                "schedule.total_epochs=1",
                "train=false",
                f"init_from={ckpt}",
                "eval=ms_flip",
                "eval.scales=[0.75,1.0]",
            ],
            tmp_path / "a",
            data_dir,
        )
    )
    on_disk = json.loads((tmp_path / "a" / "run" / "results.json").read_text())
    assert on_disk["evaluated"] == {
        "checkpoint": str(ckpt),
        "source": "init_from",
        "epoch": 7,
        "global_step": 123,
    }
    assert on_disk["eval_protocol"]["scales"] == [0.75, 1.0]
    assert on_disk["eval_protocol"]["flip"] is True
    assert results["evaluated"] == on_disk["evaluated"]


def test_rim_evaluation_records_the_checkpoint_and_protocol(tmp_path, data_dir):
    """schedule=rim train=false scores the given weights and says so, like schedule=single."""
    import experiments.build as train

    base = ["experiment=quickstart", *TINY]
    module = train.build_module(compose_cfg(base, tmp_path / "m", data_dir))
    ckpt = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": module.state_dict(), "epoch": 3, "global_step": 9}, ckpt)
    with pytest.raises(ConfigError, match=r"train=false needs ckpt_path=<checkpoint to evaluate>"):
        run(compose_cfg([*base, "train=false"], tmp_path / "a", data_dir))
    results = run(
        compose_cfg(
            [*base, "train=false", f"ckpt_path={ckpt}", "eval=flip"], tmp_path / "b", data_dir
        )
    )
    assert results["schedule"] == "rim"
    assert results["evaluated"] == {
        "checkpoint": str(ckpt),
        "source": "ckpt_path",
        "epoch": 3,
        "global_step": 9,
    }
    assert results["eval_protocol"]["flip"] is True and results["eval_protocol"]["scales"] == [1.0]
