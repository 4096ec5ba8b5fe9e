"""Ctrl-C and a dying DataLoader worker end a run within seconds, with a checkpoint and a message.

(W&B without a network: tests/test_train.py::test_wandb_without_network_logs_offline_dashboard.)
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from cfg_utils import ROOT, SINGLE, SMALL_IMAGES, TINY, compose_cfg

from run import run

QUICKSTART = ["experiment=quickstart", *TINY, *SINGLE]
RUN = [*QUICKSTART, "schedule.total_epochs=3"]


@pytest.mark.slow
def test_ctrl_c_saves_state_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    base = [
        *QUICKSTART,
        *SMALL_IMAGES,
        "schedule.total_epochs=2",  # the resumed run finishes epoch 1
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
    ]
    ctrl_c = [
        "+callbacks.kill._target_=faults.KillAt",
        "+callbacks.kill.stage=1",
        "+callbacks.kill.epoch=1",
        "+callbacks.kill.where=train",
        "+callbacks.kill.batch=2",
        "+callbacks.kill.signal=SIGINT",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, str(ROOT / "run.py"), *base, *ctrl_c]
    start = time.monotonic()
    # A job started in the background of a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the child gets the default disposition.
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "run interrupted in epoch 1 at global step 6 by Ctrl-C" in out, out[-3000:]
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=False)["global_step"] == 6
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    assert not (run_dir / "results.json").exists()
    # The printed command (minus the test's fault injection) resumes and finishes the run.
    hint = out.split("Resume exactly with: ", 1)[1].splitlines()[0].split()
    assert hint[:2] == ["python", "run.py"] and "resume=true" in hint
    args = [a for a in shlex.split(" ".join(hint[2:])) if "callbacks.kill" not in a]
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "results.json").is_file()
    assert time.monotonic() - start < 240


def test_dead_dataloader_worker_ends_the_run_with_a_checkpoint(tmp_path, monkeypatch, caplog):
    from datamodules.mhp import MHPv2Dataset

    real_load = MHPv2Dataset.load
    calls = {"n": 0}

    def load(self, index, **kwargs):
        if torch.utils.data.get_worker_info() is not None:
            calls["n"] += 1  # per worker process (a forked copy)
            if calls["n"] == 10:  # in the second epoch's first batches
                os.kill(os.getpid(), signal.SIGKILL)
        return real_load(self, index, **kwargs)

    monkeypatch.setattr(MHPv2Dataset, "load", load)
    cfg = compose_cfg([*RUN, "data.num_workers=1", "data.persistent_workers=false"], tmp_path)
    start = time.monotonic()
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="DataLoader worker"):
        run(cfg)
    assert time.monotonic() - start < 120
    assert "run interrupted in epoch" in caplog.text and "Resume exactly with" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "interrupted.ckpt").is_file()
