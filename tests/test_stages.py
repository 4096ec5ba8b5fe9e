"""Shared stage 1 under external launchers: every rank follows rank 0's reuse/train decision."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from cfg_utils import TINY, compose_cfg

import experiments.stages as stages

TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "sweep7",
    "WORLD_SIZE": "2",
    "MASTER_ADDR": "node1",
    "MASTER_PORT": "29500",
}


@pytest.fixture()
def cfg(tmp_path):
    return compose_cfg(["experiment=quickstart", *TINY], tmp_path)


@pytest.fixture()
def trained(monkeypatch):
    """Replaces the stage-1 fit by a recorder; returns the list of directories it was asked to train."""
    calls: list[Path] = []

    def fake_train(cfg, directory, epochs, resume, final, seed):
        calls.append(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"ckpt")
        return {"mIoU": 1.0}

    monkeypatch.setattr(stages, "_train_shared", fake_train)
    return calls


def _launch(monkeypatch, rank: int, env: dict[str, str] | None) -> None:
    for key in (
        "RANK",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        *TORCHRUN,
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)


def test_rank0_publishes_its_decision_per_launch(cfg, trained, monkeypatch):
    _launch(monkeypatch, 0, TORCHRUN)
    first = stages.shared_stage1(cfg)
    assert trained == [first.directory]
    lock = first.directory.with_suffix(".lock")
    decision = lock.with_name(f"{lock.name}.torchrun-sweep7-node1-29500-.decision")
    assert json.loads(decision.read_text()) == {"reuse": False}
    # A second launch of the same config reuses stage 1 and says so.
    monkeypatch.setenv("MASTER_PORT", "29501")
    second = stages.shared_stage1(cfg)
    assert trained == [first.directory] and second.val == {"mIoU": 1.0}
    decision2 = lock.with_name(f"{lock.name}.torchrun-sweep7-node1-29501-.decision")
    assert json.loads(decision2.read_text()) == {"reuse": True}


def test_other_ranks_follow_rank0_not_the_directory(cfg, trained, monkeypatch):
    """Rank 1 starts while stage 1 is unfinished; its rank 0 then finds it finished (another sweep
    job completed it) and reuses it. Rank 1 must reuse it too instead of entering a stage-1 fit."""
    _launch(monkeypatch, 1, TORCHRUN)
    directory = Path(cfg.schedule.stage1_dir) / stages.stage1_key(cfg)
    lock = directory.with_suffix(".lock")
    assert not (directory / "done.json").exists()

    def rank0_of_this_launch() -> None:
        time.sleep(0.3)
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "checkpoints" / "stage1.ckpt").write_bytes(b"ckpt")
        (directory / "done.json").write_text(json.dumps({"val": {"mIoU": 2.0}}))
        lock.with_name(f"{lock.name}.torchrun-sweep7-node1-29500-.decision").write_text(
            json.dumps({"reuse": True})
        )

    other = threading.Thread(target=rank0_of_this_launch)
    other.start()
    result = stages.shared_stage1(cfg)
    other.join()
    assert trained == []
    assert result.val == {"mIoU": 2.0}


def test_other_ranks_train_when_rank0_trains(cfg, trained, monkeypatch):
    _launch(monkeypatch, 1, {"SLURM_JOB_ID": "812", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
    directory = Path(cfg.schedule.stage1_dir) / stages.stage1_key(cfg)
    lock = directory.with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.with_name(f"{lock.name}.slurm-812-0-.decision").write_text(json.dumps({"reuse": False}))
    stages.shared_stage1(cfg)
    assert trained == [directory]
    # Only rank 0 writes the shared files.
    assert not (directory / "stage1_config.yaml").exists()
    assert not (directory / "done.json").exists()


def test_ddp_launcher_children_decide_from_the_directory(cfg, trained, monkeypatch):
    """Lightning's own launcher starts rank 1 after rank 0 decided: no token, no waiting."""
    _launch(monkeypatch, 1, None)
    assert stages.launch_token() is None
    directory = Path(cfg.schedule.stage1_dir) / stages.stage1_key(cfg)
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "checkpoints" / "stage1.ckpt").write_bytes(b"ckpt")
    (directory / "done.json").write_text(json.dumps({"val": {"mIoU": 3.0}}))
    assert stages.shared_stage1(cfg).val == {"mIoU": 3.0}
    assert trained == []
