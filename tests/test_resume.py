"""Exact resume: a RIM run SIGKILLed at several points, then requeued by SLURM's signal, and resumed
equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cfg_utils import ROOT, SMALL_IMAGES, TINY

RUN = [
    "experiment=quickstart",
    *TINY,
    *SMALL_IMAGES,
    "schedule.total_epochs=4",
    "schedule.stage1_epochs=2",
    "schedule.cpa_epoch=1",
    "schedule.baseline=false",
    "trainer.deterministic=true",
]
# Paths inside results.json differ between the two folders; everything else must be equal.
PATH_KEYS = {"dir", "checkpoint", "checkpoints"}


def _run(
    run_dir: Path, logs: Path, data: Path, extra: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *RUN,
        f"paths.log_dir={logs}",
        f"paths.data_dir={data}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _slurm(tmp_path: Path, restart: int) -> dict[str, str]:
    """A one-task SLURM job's environment, with an ``scontrol`` that logs its arguments and then
    stops the job's process with SIGTERM, as SLURM does to the tasks of a requeued job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM $PPID\n')
    fake.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "rimlab-test",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_RESTART_COUNT": str(restart),
    }


def _strip_paths(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_paths(v) for k, v in obj.items() if k not in PATH_KEYS}
    if isinstance(obj, list):
        return [_strip_paths(v) for v in obj]
    return obj


def _kill(stage: int, epoch: int, where: str, batch: int = 0) -> list[str]:
    return [
        "+callbacks.kill._target_=faults.KillAt",
        f"+callbacks.kill.stage={stage}",
        f"+callbacks.kill.epoch={epoch}",
        f"+callbacks.kill.where={where}",
        f"+callbacks.kill.batch={batch}",
    ]


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    ref = _run(tmp_path / "ref", tmp_path / "ref_logs", data, [])
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "results.json").read_text())

    run_dir, logs = tmp_path / "killed", tmp_path / "killed_logs"
    stage2_last = run_dir / "stage2" / "checkpoints" / "last.ckpt"
    kills = [
        _kill(1, 1, "train", batch=2),  # stage 1, mid-epoch
        _kill(2, 0, "val", batch=1),  # stage 2, during validation
        _kill(2, 1, "save"),  # stage 2, halfway through a checkpoint write
    ]
    for i, kill in enumerate(kills):
        proc = _run(run_dir, logs, data, ["resume=true", *kill])
        assert proc.returncode == -9, f"kill {i} did not happen: {proc.stderr[-3000:]}"
        assert not (run_dir / "results.json").exists()
        if i == 2:
            # The interrupted write left the epoch-0 checkpoint intact (and loadable).
            assert torch.load(stage2_last, weights_only=False)["epoch"] == 0
            assert list(stage2_last.parent.glob(".*.tmp-*")), "the kill left no half-written file"
    # SLURM's warning signal before the time limit: rank 0 requeues the job (the fake scontrol
    # then stops it with SIGTERM, as SLURM would) and writes nothing.
    signal = [*_kill(2, 1, "train", batch=1), "+callbacks.kill.signal=SIGUSR1"]
    proc = _run(run_dir, logs, data, ["resume=true", *signal], env=_slurm(tmp_path, 0))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in proc.stdout + proc.stderr
    assert torch.load(stage2_last, weights_only=False)["epoch"] == 0
    # The requeued job (same command, SLURM_RESTART_COUNT=1, no resume=true) resumes by itself.
    proc = _run(run_dir, logs, data, [], env=_slurm(tmp_path, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(stage2_last.parent.glob(".*.tmp-*")), "stale temporary not cleaned up"
    assert "was requeued (restart 1)" in proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout + proc.stderr
    got = json.loads((run_dir / "results.json").read_text())
    assert _strip_paths(got) == _strip_paths(expected)
    # The weights, not only the scores, are those of the uninterrupted run.
    a = torch.load(got["checkpoints"]["last"], weights_only=False)["state_dict"]
    b = torch.load(expected["checkpoints"]["last"], weights_only=False)["state_dict"]
    for key in b:
        assert torch.equal(torch.nan_to_num(a[key]), torch.nan_to_num(b[key])), key
