"""Shared stage 1 under external launchers: every rank follows rank 0's reuse/train decision."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest
from cfg_utils import TINY, compose_cfg

import experiments.keys as keys
import experiments.ranks as ranks
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

    def fake_train(cfg, directory, epochs, resume, final, seed, role="stage1"):
        calls.append(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"ckpt")
        return {"mIoU": 1.0}

    monkeypatch.setattr(stages, "_train_shared", fake_train)
    return calls


def _decision(lock: Path, token: str, call: int = 0) -> Path:
    return lock.with_name(f"{lock.name}.{token}.{call}.decision")


def _publish(path: Path, reuse: bool, started: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    start = ranks._PROCESS_START if started is None else started
    path.write_text(json.dumps({"reuse": reuse, "started": start}))


def _launch(monkeypatch, rank: int, env: dict[str, str] | None) -> None:
    # Each test is one fresh launch: its coordinated calls count from 0.
    monkeypatch.setattr(ranks, "_CALLS", itertools.count())
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
    token = "torchrun-sweep7-node1-29500-"
    assert json.loads(_decision(lock, token, 0).read_text())["reuse"] is False
    # A second call in the same launch (a multirun's next job) reuses stage 1 and says so under
    # its own name, so no rank can read the first answer for it.
    second = stages.shared_stage1(cfg)
    assert trained == [first.directory] and second.val == {"mIoU": 1.0}
    assert json.loads(_decision(lock, token, 1).read_text())["reuse"] is True
    assert json.loads(_decision(lock, token, 0).read_text())["reuse"] is False


def test_other_ranks_follow_rank0_not_the_directory(cfg, trained, monkeypatch):
    """Rank 1 starts while stage 1 is unfinished; its rank 0 then finds it finished (another sweep
    job completed it) and reuses it. Rank 1 must reuse it too instead of entering a stage-1 fit."""
    _launch(monkeypatch, 1, TORCHRUN)
    directory = Path(cfg.schedule.stage1_dir) / keys.stage1_key(cfg)
    lock = directory.with_suffix(".lock")
    assert not (directory / "done.json").exists()

    def rank0_of_this_launch() -> None:
        time.sleep(0.3)
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "checkpoints" / "stage1.ckpt").write_bytes(b"ckpt")
        (directory / "done.json").write_text(json.dumps({"val": {"mIoU": 2.0}}))
        _publish(_decision(lock, "torchrun-sweep7-node1-29500-"), True)

    other = threading.Thread(target=rank0_of_this_launch)
    other.start()
    result = stages.shared_stage1(cfg)
    other.join()
    assert trained == []
    assert result.val == {"mIoU": 2.0}


def test_other_ranks_train_when_rank0_trains(cfg, trained, monkeypatch):
    _launch(monkeypatch, 1, {"SLURM_JOB_ID": "812", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
    directory = Path(cfg.schedule.stage1_dir) / keys.stage1_key(cfg)
    lock = directory.with_suffix(".lock")
    _publish(_decision(lock, "slurm-812-0-"), False)
    stages.shared_stage1(cfg)
    assert trained == [directory]
    # Only rank 0 writes the shared files.
    assert not (directory / "stage1_config.yaml").exists()
    assert not (directory / "done.json").exists()


def test_ddp_launcher_children_decide_from_the_directory(cfg, trained, monkeypatch):
    """Lightning's own launcher starts rank 1 after rank 0 decided: no token, no waiting."""
    _launch(monkeypatch, 1, None)
    assert ranks.launch_token() is None
    directory = Path(cfg.schedule.stage1_dir) / keys.stage1_key(cfg)
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "checkpoints" / "stage1.ckpt").write_bytes(b"ckpt")
    (directory / "done.json").write_text(json.dumps({"val": {"mIoU": 3.0}}))
    assert stages.shared_stage1(cfg).val == {"mIoU": 3.0}
    assert trained == []


def test_a_decision_left_by_an_earlier_launch_with_the_same_token_is_not_taken(
    cfg, trained, monkeypatch
):
    """torchrun with a fixed port and no rendezvous id repeats its token across launches: an old
    'train' decision on disk must not send rank 1 into a stage-1 fit its rank 0 will skip."""
    _launch(monkeypatch, 1, TORCHRUN)
    directory = Path(cfg.schedule.stage1_dir) / keys.stage1_key(cfg)
    lock = directory.with_suffix(".lock")
    path = _decision(lock, "torchrun-sweep7-node1-29500-")
    _publish(path, False, started=ranks._PROCESS_START - 7200)  # the earlier launch

    def rank0_of_this_launch() -> None:
        time.sleep(0.5)
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "checkpoints" / "stage1.ckpt").write_bytes(b"ckpt")
        (directory / "done.json").write_text(json.dumps({"val": {"mIoU": 4.0}}))
        _publish(path, True)

    other = threading.Thread(target=rank0_of_this_launch)
    other.start()
    result = stages.shared_stage1(cfg)
    other.join()
    assert trained == [] and result.val == {"mIoU": 4.0}


def test_stage1_key_ignores_plot_colours_but_not_the_augmentation_version(cfg, monkeypatch):
    """A palette only colours plots: stage 1 is shared across it. Another version of the
    augmentation draws trains another stage 1: it must not be reused."""
    key = keys.stage1_key(cfg)
    recoloured = cfg.copy()
    recoloured.data.palette = [[i, i, i] for i in range(int(cfg.data.num_classes))]
    assert keys.stage1_key(recoloured) == key
    monkeypatch.setattr(keys, "AUGMENTATION_VERSION", keys.AUGMENTATION_VERSION + 1)
    assert keys.stage1_key(cfg) != key
