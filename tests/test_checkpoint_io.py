"""Checkpoints are atomic; NaN/Inf losses stop the run (or are skipped) without bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cfg_utils import SINGLE, TINY, compose_cfg

from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.parsing import NonFiniteLossError, NonFiniteWeightsError
from run import run


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")  # the first bytes of a checkpoint, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


class _PoisonLoss(torch.nn.Module):
    """Wraps the real loss and returns NaN at one global call index."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0
        self.aux_weight = getattr(inner, "aux_weight", 0.0)

    def forward(self, outputs, target, sample_mask=None):
        losses = self.inner(outputs, target, sample_mask=sample_mask)
        self.calls += 1
        if self.calls == self.at:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def _poisoned_run(tmp_path: Path, policy: str, monkeypatch) -> dict:
    import experiments.single as train

    real_build = train.build_module

    def build(cfg, stage_overrides=None, **kwargs):
        module = real_build(cfg, stage_overrides, **kwargs)
        module.loss = _PoisonLoss(module.loss, at=6)  # epoch 2 (4 steps per epoch), step 6
        return module

    monkeypatch.setattr(train, "build_module", build)
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "schedule.total_epochs=2",
            f"module.nonfinite={policy}",
        ],
        tmp_path,
    )
    return run(cfg)


def test_nan_loss_stops_with_step_terms_and_last_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError) as err:
        _poisoned_run(tmp_path, "stop", monkeypatch)
    message = str(err.value)
    assert "global step 5" in message and "loss=nan" in message and "loss/ce=" in message
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(last) in message
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # end of epoch 1: nothing was saved after the NaN
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert weights and all(
        torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()
    )


def test_nan_loss_skip_policy_counts_and_finishes(tmp_path, monkeypatch, caplog):
    results = _poisoned_run(tmp_path, "skip", monkeypatch)
    assert results["val"]["mIoU"] is not None
    assert "non-finite loss, batch skipped (1 so far)" in caplog.text
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["epoch"] == 1  # last.ckpt is written after every validation
    weights = {k: v for k, v in last["state_dict"].items() if k.startswith("net.")}
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    col = metrics[0].split(",").index("train/skipped_nonfinite")
    assert [float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]] == [1.0]


class _NonFiniteLearningRate(pl.Callback):
    """Sets the learning rate to NaN for the optimizer step of one global step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = float("nan")


@pytest.mark.parametrize("found_by", ["read", "save"])
def test_nonfinite_weights_are_never_checkpointed_nor_called_good(tmp_path, monkeypatch, found_by):
    """A finite loss whose optimizer step (NaN learning rate) makes the weights NaN in the last step
    of epoch 2. ``read``: the read after that step (an epoch's last batch) stops the run before
    the end-of-epoch save; ``save``: last.ckpt is saved after every step, by a callback that runs
    before that read, and that save is refused. Either message names the newest checkpoint,
    which holds finite weights; no file on disk holds a non-finite weight."""
    import experiments.build as train

    real_callbacks = train.build_callbacks

    def callbacks(cfg, out_dir):
        # 4 steps per epoch: global step 7 is the last optimizer step of epoch 2.
        return [*real_callbacks(cfg, out_dir), _NonFiniteLearningRate(at_step=7)]

    monkeypatch.setattr(train, "build_callbacks", callbacks)
    overrides = ["experiment=quickstart", *TINY, *SINGLE, "schedule.total_epochs=2"]
    if found_by == "save":
        overrides += [
            "callbacks.last_checkpoint.every_n_epochs=null",
            "+callbacks.last_checkpoint.every_n_train_steps=1",
        ]
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(NonFiniteWeightsError) as err:
        run(cfg)
    message = str(err.value)
    assert "non-finite weights at global step 8 (epoch 1)" in message
    if found_by == "save":
        assert "This checkpoint was not written" in message
    else:
        assert "The run stopped after this step and nothing was written after it" in message
    folder = tmp_path / "run" / "checkpoints"
    files = sorted(folder.glob("*.ckpt"))
    assert files and [p for p in folder.iterdir() if p.suffix != ".ckpt"] == []
    named = [p for p in files if str(p) in message]
    assert named == [folder / "last.ckpt"]
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        # the end of epoch 1, or (save) last.ckpt after step 6: never after the NaN step
        expected = 7 if found_by == "save" and path.name == "last.ckpt" else 4
        assert ckpt["global_step"] == expected, path
        weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
        assert weights and all(bool(torch.isfinite(v).all()) for v in weights), path


def test_pose_and_deepmac_checkpoints_refuse_nonfinite_weights():
    """The pose and Deep-MAC modules check their weights before any checkpoint is written too."""
    from torch import nn

    from lightning_modules.deepmac import DeepMACLitModule
    from lightning_modules.pose import PoseRegressionLitModule
    from losses.pose import JointL2Loss

    modules = {
        "pose": PoseRegressionLitModule(nn.Linear(2, 2), JointL2Loss(), torch.optim.SGD, stage=2),
        "deepmac": DeepMACLitModule(net=nn.Linear(2, 2), loss=nn.Identity(), optimizer=None),
    }
    for name, module in modules.items():
        checkpoint: dict = {}
        module.on_save_checkpoint(checkpoint)  # finite: saved
        with torch.no_grad():
            module.net.bias[1] = float("inf")
        with pytest.raises(NonFiniteWeightsError) as err:
            module.on_save_checkpoint(checkpoint)
        assert "in 1 of 2 parameters (e.g. net.bias)" in str(err.value), name
        assert (
            "last good checkpoint (weights checked finite when it was written) is not saved yet"
            in str(err.value)
        ), name
