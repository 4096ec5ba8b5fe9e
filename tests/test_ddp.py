"""DDP on CPU: 2 gloo processes (ddp_spawn) compute the same metrics as 1 process."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from cfg_utils import SINGLE, SMALL_IMAGES, TINY, compose_cfg

from experiments.build import build_module
from lightning_modules import ParsingLitModule
from lightning_modules.parsing import NonFiniteLossError


class DumpScores(pl.Callback):
    """Saves rank 0's evaluation scores after a validate (the parsing confusion matrix and
    scores, or the pose module's PCKh entry)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            scores = getattr(pl_module, "val_scores", None) or pl_module.last_scores["val"]
            torch.save(scores, self.path)


def _validate(module, datamodule, devices: int, path: Path) -> dict:
    """Rank 0's scores of ``trainer.validate`` on ``devices`` CPU processes (gloo ddp_spawn)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DumpScores(str(path))],
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return torch.load(path, weights_only=False)


def _labelled_pixels(datamodule) -> int:
    """Hand count: the labelled pixels of the validation split, each image once."""
    datamodule.setup("validate")
    return sum(int((item["mask"] != 255).sum()) for item in datamodule.val_set)


def _same_parsing_scores(one: dict, two: dict, labelled: int) -> None:
    assert int(one["confusion"].sum()) == labelled > 0
    assert torch.equal(one["confusion"], two["confusion"])
    for key in ("PA", "MPA", "mIoU", "mAcc", "mPrecision", "mRecall"):
        assert one[key] == two[key] or (math.isnan(one[key]) and math.isnan(two[key])), key


@pytest.mark.slow
def test_ddp_spawn_counts_every_image_once_parsing_and_schp(tmp_path):
    """5 validation images on 2 processes (3 + 2, batches of 2: 2 and 1 batches): the summed
    confusion matrix counts each labelled pixel once and equals one process's, for the parsing
    system and for SCHP evaluating with its averaged model. Lightning's padding sampler scored
    image 0 twice here."""
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "data.synthetic.num_val=5",
            "data.eval_batch_size=2",
        ],
        tmp_path,
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    labelled = _labelled_pixels(datamodule)
    torch.manual_seed(0)
    module = build_module(cfg)
    one = _validate(module, datamodule, 1, tmp_path / "one.pt")
    two = _validate(module, datamodule, 2, tmp_path / "two.pt")
    _same_parsing_scores(one, two, labelled)

    from test_schp import SCHP_TINY

    cfg = compose_cfg([*SCHP_TINY, "data.synthetic.num_val=5"], tmp_path / "schp")
    datamodule = hydra.utils.instantiate(cfg.data)
    labelled = _labelled_pixels(datamodule)
    torch.manual_seed(0)
    module = build_module(cfg)
    module.schp_update([torch.randn(2, 3, 48, 48) for _ in range(2)], epoch=1)
    assert module.has_average  # validation scores the averaged model
    one = _validate(module, datamodule, 1, tmp_path / "schp_one.pt")
    two = _validate(module, datamodule, 2, tmp_path / "schp_two.pt")
    _same_parsing_scores(one, two, labelled)


@pytest.mark.slow
def test_ddp_spawn_train_false_scores_7_images_once(tmp_path):
    """``train=false`` under ``trainer=ddp_cpu`` on 7 images writes the val scores (it wrote
    ``null``) and they equal the single-process evaluation of the same checkpoint."""
    from run import run

    base = ["experiment=quickstart", *TINY, *SINGLE, "data.synthetic.num_val=7"]
    cfg = compose_cfg(base, tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "weights.ckpt"
    torch.save({"state_dict": build_module(cfg).state_dict(), "epoch": 0, "global_step": 0}, ckpt)
    labelled = _labelled_pixels(hydra.utils.instantiate(cfg.data))
    results = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp_cpu"])):
        over = [*base, *extra, "train=false", f"ckpt_path={ckpt}"]
        results[name] = run(compose_cfg(over, tmp_path / name, data_dir=tmp_path / "data"))
    one, two = results["one"]["val"], results["two"]["val"]
    assert one is not None and two is not None
    assert sum(map(sum, one["confusion"])) == labelled
    assert one["confusion"] == two["confusion"]
    assert (one["PA"], one["mIoU"]) == (two["PA"], two["mIoU"])


@pytest.mark.slow
def test_ddp_spawn_pose_pckh_counts_every_person_once(tmp_path):
    """7 validation persons on 2 processes: Lightning-validated PCKh equals one process's and the
    numpy reference (official rule) over the driver's whole-split predictions."""
    from test_pose import TINY_POSE

    from experiments.pose import build_pose_module, predict
    from lightning_modules.pose_metrics import evaluate_pose

    cfg = compose_cfg([*TINY_POSE, "data.synthetic.num_val=7", "data.num_workers=0"], tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    torch.manual_seed(0)
    module = build_pose_module(cfg, 1)
    one = _validate(module, datamodule, 1, tmp_path / "one.pt")
    two = _validate(module, datamodule, 2, tmp_path / "two.pt")
    val = datamodule.dataset("val")
    n = len(val)
    assert n == 7
    pred = predict(module, datamodule.predict_loader("val"), n, torch.device("cpu"))
    gt = np.stack([val.annotation(i)["keypoints"] for i in range(n)])
    head = np.array([val.annotation(i)["head_size"] for i in range(n)])
    reference = evaluate_pose(pred, gt[..., :2], gt[..., 2], head)
    assert sum(one["joint_counts"].values()) == int((gt[..., 2] > 0).sum())
    for key in ("PCKh", "PCKh@0.1", "PCP"):
        assert one[key] == pytest.approx(reference[key], abs=1e-9), key
        assert two[key] == one[key], key
    assert two["joint_counts"] == one["joint_counts"]


def test_eval_shard_sampler_never_repeats():
    """Rank r takes r, r + R, ...: the shards are disjoint and cover the split once."""
    from datamodules.base import EvalShardSampler
    from datamodules.batch import DatasetError

    data = list(range(7))
    shards = [list(EvalShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(EvalShardSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]
    with pytest.raises(DatasetError, match="fewer than the 8 processes"):
        EvalShardSampler(data, num_replicas=8, rank=0)


class _FixedSet(torch.utils.data.Dataset):
    """Eight seeded 4-class images with labels, no augmentation: identical under any split."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(8, 3, 12, 12, generator=g)
        self.masks = torch.randint(0, 4, (8, 12, 12), generator=g)
        self.masks[:, 0, :] = 255

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


class _FixedData(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_FixedSet(), batch_size=2)

    def train_class_counts(self):
        masks = _FixedSet().masks
        pixels = torch.bincount(masks[masks != 255], minlength=4)
        regions = torch.stack([(masks == c).flatten(1).any(1).sum() for c in range(4)])
        return pixels.numpy(), regions.numpy()


class _PixelNet(torch.nn.Module):
    """A 1x1 convolution: per-pixel predictions that do not depend on the batch (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class DumpStats(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        stats = {"early_confusion": pl_module.early_confusion.clone()}
        if pl_module.sampler is not None:
            stats["probs"] = pl_module.sampler.probs.clone()
        torch.save(stats, f"{self.path}.{trainer.global_rank}")


def _fit_stats(devices: int, path: Path, sampler_source: str | None, early_confusion=None) -> list:
    from functools import partial

    from lightning_modules import ParsingLitModule
    from lightning_modules.callbacks import CPASnapshot
    from losses import CrossEntropyLoss, ParsingLoss
    from samplers import RegionalBalancedSampler

    sampler = RegionalBalancedSampler(4, source=sampler_source) if sampler_source else None
    data = _FixedData()
    module = ParsingLitModule(
        net=_PixelNet(),
        loss=ParsingLoss(CrossEntropyLoss()),
        optimizer=partial(torch.optim.SGD, lr=0.0),  # weights fixed: predictions are comparable
        sampler=sampler,
        num_classes=4,
        class_counts=data.train_class_counts,
    )
    if early_confusion is not None:
        # ARBS draws from it; early_cpa_epoch stays 0, so CPASnapshot records epoch 1 over it.
        module.early_confusion.copy_(early_confusion)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        max_epochs=1,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[CPASnapshot(epoch=1), DumpStats(str(path))],
    )
    trainer.fit(module, datamodule=data)
    return [torch.load(f"{path}.{r}") for r in range(devices)]


@pytest.mark.slow
def test_ddp_spawn_cpa_statistics_and_keep_probabilities(tmp_path):
    """The early confusion matrix is summed over ranks; every rank derives the same probabilities."""
    from samplers.regional import class_pixel_accuracy, keep_probabilities

    # Independent derivation: the confusion matrix of the fixed net over all 8 images.
    data = _FixedSet()
    with torch.no_grad():
        pred = _PixelNet()(data.images)["out"].argmax(1)
    keep = data.masks != 255
    confusion = torch.zeros(4, 4, dtype=torch.long)
    confusion.index_put_(
        (data.masks[keep], pred[keep]),
        torch.ones(int(keep.sum()), dtype=torch.long),
        accumulate=True,
    )
    regions = torch.stack([(data.masks == c).flatten(1).any(1).sum() for c in range(4)])
    # ARBS starts from twice that matrix (the same recall CPA, the default reading), and the
    # CPASnapshot of epoch 1 then records the matrix of the training batches over both ranks in
    # its place; NRBS draws from the region counts (images containing each class, the default).
    for source in ("arbs", "nrbs"):
        ranks = _fit_stats(2, tmp_path / source, source, early_confusion=2 * confusion)
        one = _fit_stats(1, tmp_path / f"{source}1", source, early_confusion=2 * confusion)[0]
        for stats in (one, *ranks):
            torch.testing.assert_close(stats["early_confusion"], confusion)
        assert torch.equal(ranks[0]["probs"], ranks[1]["probs"])
        torch.testing.assert_close(ranks[0]["probs"], one["probs"])
        x = (
            class_pixel_accuracy(confusion, "recall")
            if source == "arbs"
            else regions.double() / regions.sum()
        )
        torch.testing.assert_close(one["probs"].double(), keep_probabilities(x).double())


@pytest.mark.slow
def test_ddp_spawn_shared_stage1_continues_exactly(tmp_path):
    """Under ddp_spawn the shared stage 1 hands its full state to the baseline's continuation."""
    from run import run

    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            *SMALL_IMAGES,
            "trainer=ddp_cpu",
            "schedule.total_epochs=3",
            "schedule.stage1_epochs=2",
        ],
        tmp_path,
    )
    results = run(cfg)
    assert results["val"] is not None and results["val"]["mIoU"] is not None
    assert results["stage1"]["val"] is not None
    stage1 = torch.load(
        next((tmp_path / "logs" / "stage1").glob("*/checkpoints/stage1.ckpt")),
        map_location="cpu",
        weights_only=True,
    )
    assert stage1["epoch"] == 2 and stage1["optimizer_states"]  # saved after epoch 2 ended
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["epoch"] == 2  # 3 epochs in all, not 2 + 3


@pytest.mark.slow
def test_ddp_launcher_pose_cascade_writes_once(tmp_path):
    """The real ``ddp`` launcher re-runs the pose driver on rank 1: only rank 0 writes, rank 1
    takes rank 0's between-stage numbers, and both ranks finish both stages."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    args = [
        "experiment=deeppose_quick",
        "data.synthetic.num_train=12",
        "data.synthetic.num_val=5",
        "data.synthetic.image_size=72",
        "data.batch_size=4",
        "data.num_workers=0",
        "schedule.total_epochs=1",
        "cascade.stages.2.epochs=1",
        "model.fc_dim=64",
        "model.width=0.125",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "+trainer.strategy=ddp",
        "trainer.devices=2",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("results written to") == 1, out[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["PCKh_per_stage"]) == 2
    for stage in (1, 2):
        stage_dir = run_dir / f"stage{stage}"
        assert len(list(stage_dir.rglob("final.ckpt"))) == 1
        assert (stage_dir / "handoff.json").is_file()
    assert (run_dir / "stage1" / "errors.json").is_file()


class _NonFiniteOnRank1(_PixelNet):
    """``_PixelNet`` whose logits are NaN on rank 1 only."""

    def forward(self, x):
        out = super().forward(x)["out"]
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            out = out * float("nan")
        return {"out": out}


class _Recording(ParsingLitModule):
    """Writes each rank's non-finite message to ``<record>.<rank>`` (spawned ranks run no
    ``on_exception`` callbacks)."""

    record = ""

    def _read_step_state(self, log, at_checkpoint=False):
        try:
            return super()._read_step_state(log, at_checkpoint)
        except NonFiniteLossError as err:
            Path(f"{self.record}.{self.global_rank}").write_text(str(err))
            raise


@pytest.mark.slow
def test_ddp_spawn_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Only rank 1's batch is non-finite: both ranks stop in step 0 with the same message (rank 0
    used to enter backward and wait in the gradient all-reduce until the timeout)."""
    from datetime import timedelta
    from functools import partial

    from lightning.pytorch.strategies import DDPStrategy

    from losses import CrossEntropyLoss, ParsingLoss

    module = _Recording(
        net=_NonFiniteOnRank1(),
        loss=ParsingLoss(CrossEntropyLoss()),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=4,
    )
    module.record = str(tmp_path / "error")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        # a hang would end here instead of after 30 minutes
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(Exception, match="non-finite loss"):
        trainer.fit(module, datamodule=_FixedData())
    messages = [(tmp_path / f"error.{r}").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "non-finite loss at global step 0" in messages[0]
    assert "rank 1: loss=nan" in messages[0] and "rank 0:" not in messages[0]
