"""Start-up refusals of launches that cannot work, and what trainer.deterministic=true means."""

from __future__ import annotations

import pytest
import torch
from cfg_utils import SINGLE, TINY, compose_cfg

from datamodules.errors import ConfigError
from experiments.launch import (
    check_launch,
    cluster_plugins,
    determinism,
    resume_if_requeued,
    slurm_restart,
    uses_subprocess_launcher,
)

BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"strategy": "ddp", "devices": 2}, True),
        ({"strategy": "ddp", "devices": "0,1"}, True),
        ({"strategy": "ddp", "devices": [0, 1]}, True),
        ({"strategy": "ddp", "devices": 1, "num_nodes": 2}, True),
        ({"strategy": "ddp", "devices": "auto"}, True),
        (
            {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "devices": 4},
            True,
        ),
        ({"strategy": "ddp", "devices": 1}, False),
        ({"strategy": "ddp_spawn", "devices": 2}, False),
        ({"strategy": {"_target_": "x.DDPStrategy", "start_method": "spawn"}, "devices": 2}, False),
        ({"devices": 1}, False),
    ],
)
def test_subprocess_launcher_detection(trainer, expected):
    assert uses_subprocess_launcher(trainer) is expected


def test_multirun_with_the_ddp_launcher_is_refused(tmp_path, monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose_cfg(["experiment=quickstart", *TINY, *SINGLE, "trainer=ddp"], tmp_path)
    with pytest.raises(ConfigError, match="hydra/launcher=rimlab_slurm") as err:
        check_launch(cfg, multirun=True, launcher_target=BASIC)
    assert "torchrun" in str(err.value) and "without -m" in str(err.value)
    check_launch(cfg, multirun=False, launcher_target=BASIC)  # one job per launch works
    check_launch(cfg, multirun=True, launcher_target=SLURM)  # every job its own SLURM job
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")  # torchrun started every rank
    check_launch(cfg, multirun=True, launcher_target=BASIC)
    spawn = compose_cfg(["experiment=quickstart", *TINY, *SINGLE, "trainer=ddp_cpu"], tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    check_launch(spawn, multirun=True, launcher_target=BASIC)  # ddp_spawn re-runs nothing


def test_deterministic_true_is_lightnings_warn_without_autotuning(tmp_path):
    """deterministic=true: deterministic algorithms on, warn_only (CUDA kernels without a
    deterministic version warn instead of failing at the first backward), cuDNN benchmark off."""
    from experiments.build import build_trainer

    assert determinism({"deterministic": False}) == {}
    cfg = compose_cfg(
        [
            "experiment=quickstart",
            *TINY,
            *SINGLE,
            "trainer.deterministic=true",
            "trainer.benchmark=true",
        ],
        tmp_path,
    )
    before = torch.backends.cudnn.benchmark
    try:
        trainer = build_trainer(cfg, tmp_path / "run", max_epochs=1)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert trainer is not None
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = before


@pytest.mark.slow
def test_refused_multirun_prints_one_paragraph_and_exits_1(tmp_path):
    """The real command: ``run.py -m ... trainer=ddp`` stops before any job with the message as one
    paragraph and exit status 1 (a ConfigError); HYDRA_FULL_ERROR=1 shows the traceback."""
    import os
    import subprocess
    import sys

    from cfg_utils import ROOT

    args = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "experiment=quickstart",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "seed=0,1",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "ConfigError: python run.py -m with trainer=ddp" in out
    assert "Traceback" not in out
    assert not (tmp_path / "data").exists()  # refused before any data was read


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "77"}, None),
        ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}, None),
        ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}, ("77", 2)),
        (
            {
                "SLURM_JOB_ID": "78",
                "SLURM_ARRAY_JOB_ID": "70",
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_RESTART_COUNT": "1",
            },
            ("70_3", 1),
        ),
        ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "x"}, None),
    ],
)
def test_slurm_restart_reads_the_requeue_count(env, expected):
    assert slurm_restart(env) == expected


def test_a_requeued_job_resumes_and_a_first_start_does_not(tmp_path):
    cfg = compose_cfg([*SINGLE, *TINY], tmp_path)
    assert cfg.resume is False
    assert not resume_if_requeued(cfg, {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "0"})
    assert cfg.resume is False
    assert resume_if_requeued(cfg, {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"})
    assert cfg.resume is True


def test_lightning_auto_requeue_is_off_under_slurm(monkeypatch):
    """Lightning's own requeue resumes from a mid-epoch checkpoint, which is not exact."""
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert cluster_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (env,) = cluster_plugins()
    assert env.auto_requeue is False


def test_shared_runs_refuse_a_filesystem_without_working_flock(tmp_path, monkeypatch):
    """flock failing (NFS without lockd) or not excluding a second process: a LockError that
    names the folder and the key to change; a working lock passes."""
    import errno
    import fcntl

    from datamodules.errors import FixableError
    from experiments import ranks

    lock = tmp_path / "shared" / "abc.lock"
    lock.parent.mkdir()
    with open(lock, "w") as handle:
        ranks.exclusive_lock(handle, lock)  # a local filesystem: works
    real = fcntl.flock

    def enolck(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ranks.fcntl, "flock", enolck)
    with open(lock, "w") as handle, pytest.raises(ranks.LockError) as err:
        ranks.exclusive_lock(handle, lock)
    assert isinstance(err.value, FixableError)
    assert str(lock.parent) in str(err.value) and "schedule.stage1_dir" in str(err.value)
    assert "No locks available" in str(err.value)

    # A flock that accepts without locking: the second process gets the lock too.
    monkeypatch.setattr(ranks.fcntl, "flock", lambda fd, op: None)
    with open(lock, "w") as handle, pytest.raises(ranks.LockError, match="second process"):
        ranks.exclusive_lock(handle, lock)
    monkeypatch.setattr(ranks.fcntl, "flock", real)


def test_a_subclass_of_the_basic_launcher_is_refused_like_it(tmp_path, monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = compose_cfg(["experiment=quickstart", *TINY, *SINGLE, "trainer=ddp"], tmp_path)
    with pytest.raises(ConfigError, match="hydra/launcher=rimlab_slurm"):
        check_launch(cfg, multirun=True, launcher_target=f"{__name__}._OwnBasicLauncher")
    # a name that does not resolve is some external launcher: not refused
    check_launch(cfg, multirun=True, launcher_target="no.such.module.BasicLauncher")


def _own_basic_launcher() -> type:
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    return type("_OwnBasicLauncher", (BasicLauncher,), {"__module__": __name__})


_OwnBasicLauncher = _own_basic_launcher()
