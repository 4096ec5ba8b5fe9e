"""Shared stage-1 runs: the first ``stage1_epochs`` epochs of the baseline, trained once per config.

The RIM paper starts every stage-2 variant, and the baseline's last 30 epochs, from the baseline's
epoch-70 checkpoint. A sweep over samplers and losses therefore trains stage 1 once: its directory is
keyed by a hash of everything that influences stage 1 (data, model, module, main loss, optimizer,
schedule length, seed, trainer numerics), and later runs find it there. A stage 1 that was killed
resumes from its ``last.ckpt``; a file lock keeps parallel sweep jobs from training it twice.

Under an external launcher (torchrun, SLURM) every rank of a job starts at once, but only rank 0
takes the lock: the other ranks follow the decision rank 0 made under it (reuse or train), which it
publishes in a small file named after the launch. Deciding on their own, they could see a different
state of the shared directory (another sweep job finishing stage 1 in between) and enter a
different ``fit`` than their rank 0, which hangs or crashes the job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import FixableError
from datamodules.transforms import AUGMENTATION_VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")

# Stage 1 trains the whole network on the natural distribution with the main loss only.
STAGE1_OVERRIDES: dict[str, Any] = {
    "sampler": None,
    "loss.ilm": None,
    "module.freeze_encoder": False,
    "module.scheduler.start_epoch": 0,
}


def stage1_overrides(cfg: DictConfig) -> dict[str, Any]:
    """:data:`STAGE1_OVERRIDES`, plus side outputs on the full target when the loss has them.

    ``loss.side_target`` (and ``loss.main_normalizer``) only choose how stage 2 scores; stage 1
    and the baseline train as the network's paper does, so variants that differ in them share
    stage 1.
    """
    overrides = dict(STAGE1_OVERRIDES)
    if "side_target" in (cfg.get("loss") or {}):
        overrides["loss.side_target"] = "full"
    return overrides


# Keys that do not change what stage 1 computes.
# Data keys that never change what stage 1 computes (loader speed, error policy, plot colours).
_DATA_IGNORED = (
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "eval_batch_size",
    "skip_bad",
    "palette",
    "pixel_cache",  # the same pixels, stored instead of decoded
)
_TRAINER_KEPT = (
    "precision",
    "devices",
    "num_nodes",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "deterministic",
    "limit_train_batches",
    "limit_val_batches",
    "check_val_every_n_epoch",
    "overfit_batches",
    "fast_dev_run",
    "max_steps",
    "sync_batchnorm",
)
# Module keys that change what stage 1 computes (speed switches and guards do not).
_MODULE_KEPT = ("num_classes", "ignore_index", "scheduler")


@dataclass
class Stage1:
    """A finished shared run (stage 1, or the baseline continued from it)."""

    directory: Path
    checkpoint: Path
    val: dict[str, Any] | None


def stage1_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of ``cfg`` that determines stage 1, with the stage-1 overrides applied."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in stage1_overrides(cfg).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    data = {
        k: v
        for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
        if k not in _DATA_IGNORED
    }
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {
        "data": data,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "module": {
            k: v
            for k, v in OmegaConf.to_container(cfg.module, resolve=True).items()
            if k in _MODULE_KEPT
        },
        # ARBS needs the CPA snapshot: a stage 1 trained without it cannot serve an ARBS stage 2.
        "cpa_snapshot": OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=True).get(
            "cpa_snapshot"
        ),
        # ILM knobs only act in stage 2: variants that differ in them share stage 1.
        "loss": {
            k: v
            for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items()
            if k not in ("ilm", "ilm_weight", "ilm_region", "main_normalizer", "side_target")
        },
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "seed": cfg.seed,
        # The same seed draws other augmentations in another version of the transforms.
        "augmentation": AUGMENTATION_VERSION,
        "trainer": {k: trainer.get(k) for k in _TRAINER_KEPT},
        "schedule": {
            k: cfg.schedule.get(k) for k in ("total_epochs", "stage1_epochs", "cpa_epoch")
        },
    }


def stage1_key(cfg: DictConfig) -> str:
    """A short stable hash of :func:`stage1_config`."""
    blob = json.dumps(stage1_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def launcher_rank() -> int:
    """Global rank of this process as launched (0 for the process a user started).

    Under the ``ddp`` subprocess launcher, torchrun or SLURM every rank runs this driver; only rank
    0 takes the file lock, or the others would wait on it while rank 0 waits for them to join.
    """
    from lightning.fabric.utilities.rank_zero import _get_rank

    return int(_get_rank() or 0)


def launch_token() -> str | None:
    """An id shared by all ranks of one external launch (torchrun, multi-task SLURM), else None.

    Under Lightning's own ``ddp`` launcher the other ranks are started from inside rank 0's
    ``fit``, after rank 0 has decided, so they need no token.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
        prefix = "torchrun"
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
        prefix = "slurm"
    else:
        return None
    raw = "-".join([prefix, *(env.get(k, "") for k in keys)])
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


# When this process started (all ranks of one launch start within minutes of each other), and
# how many coordinated decisions it has made: every rank makes the same sequence of them (a Hydra
# multirun inside one launch makes several), so (token, call) names one decision of one launch.
_PROCESS_START = time.time()
_CALLS = itertools.count()
# A decision whose rank 0 started this much earlier or later belongs to another launch that
# happened to get the same token (torchrun with a fixed port and no rendezvous id).
_SAME_LAUNCH_S = 600.0


def _decision_path(lock: Path, token: str, call: int) -> Path:
    return lock.with_name(f"{lock.name}.{token}.{call}.decision")


def _read_decision(path: Path) -> bool | None:
    """Rank 0's decision at ``path`` if it was made in this launch, else None."""
    try:
        decision = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if abs(float(decision.get("started", 0.0)) - _PROCESS_START) > _SAME_LAUNCH_S:
        return None
    return bool(decision["reuse"])


def wait_for_rank0(read: Callable[[], T | None], what: str, poll_s: float = 0.5) -> T:
    """Polls ``read`` until it returns something other than None, logging every 10 minutes.

    For ranks that wait on a file rank 0 writes (rank 0 may itself wait hours for a lock, or run
    a long evaluation); ``read`` may raise to stop waiting.
    """
    started = last_log = time.monotonic()
    while (value := read()) is None:
        if time.monotonic() - last_log > 600:
            log.info(
                "still waiting for rank 0's %s (%.0f min)", what, (time.monotonic() - started) / 60
            )
            last_log = time.monotonic()
        time.sleep(poll_s)
    return value


def _await_decision(lock: Path, token: str, call: int, poll_s: float = 0.5) -> bool:
    """Waits for rank 0 of this launch to publish its reuse/train decision; returns reuse."""
    path = _decision_path(lock, token, call)
    return wait_for_rank0(
        lambda: _read_decision(path), f"decision on {lock.with_suffix('')}", poll_s
    )


class LockError(FixableError, OSError):
    """The shared runs' folder is on a filesystem whose ``flock`` does not work."""


#: Run in a second process: exit 0 when it could take the lock the first process holds.
_PROBE = (
    "import fcntl, sys\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    try:\n"
    "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    except BlockingIOError:\n"
    "        sys.exit(3)\n"
)


def exclusive_lock(handle: Any, lock: Path, probe: bool = True) -> None:
    """Takes ``flock(LOCK_EX)`` on ``handle`` (the open ``lock`` file) and checks that it excludes.

    Parallel sweep jobs rely on the lock to train a shared stage 1 once. Some filesystems (NFS
    without a lock daemon, some FUSE and object-store mounts) refuse ``flock``, and some accept it
    without excluding anyone; then two jobs would train into the same folder. The check asks a
    second process to take the same lock without waiting: it must be refused. (A second process,
    since NFS emulates ``flock`` with POSIX locks, which one process can always take twice.)

    Raises:
        LockError: ``flock`` fails, or a second process could take the lock.
    """
    what = (
        f"The shared runs' folder {lock.parent} is on a filesystem without working file locks "
        "(flock), which parallel jobs need to train a shared stage 1 once"
    )
    fix = (
        "Put the shared runs on a filesystem with working locks (schedule.stage1_dir=<a local or "
        "lock-capable folder>, or mount NFS with its lock daemon), or run the jobs one after "
        "another."
    )
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as err:
        raise LockError(f"{what}: flock failed ({err}). {fix}") from err
    if not probe:
        return
    try:
        rc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(lock)], capture_output=True, timeout=60
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return  # cannot ask a second process: the lock taken above is the best available
    if rc == 0:
        fcntl.flock(handle, fcntl.LOCK_UN)
        raise LockError(f"{what}: a second process took the lock this one holds. {fix}")


@contextlib.contextmanager
def _coordinated(lock: Path, finished: Callable[[], bool]) -> Iterator[bool]:
    """Holds ``lock`` (rank 0 only) and yields whether the shared run can be reused.

    Rank 0 evaluates ``finished`` under the lock; the other ranks of an external launch use
    rank 0's published answer, so every rank enters the same ``fit``.
    """
    token = launch_token()
    call = next(_CALLS)
    if launcher_rank() != 0:
        yield _await_decision(lock, token, call) if token else finished()
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        exclusive_lock(handle, lock)
        try:
            reuse = finished()
            if token:
                decision = _decision_path(lock, token, call)
                tmp = decision.with_name(decision.name + ".tmp")
                tmp.write_text(json.dumps({"reuse": reuse, "started": _PROCESS_START}))
                os.replace(tmp, decision)
            yield reuse
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_shared(
    cfg: DictConfig,
    directory: Path,
    epochs: int,
    resume: str | None,
    final: Path,
    seed: int,
    role: str,
) -> dict[str, Any] | None:
    """Fits the stage-1 model of ``cfg`` to ``epochs`` in ``directory``; returns its val scores.

    ``final`` (a full checkpoint) and ``directory/scores.json`` are written at the end of fit from
    inside the training processes, so spawn launchers work too. ``role`` ("stage1" or
    "baseline") is the fit's W&B job type; its W&B run ends here, before the job's next fit.
    """
    from experiments.train import build_datamodule, build_module, build_trainer
    from lightning_modules.loggers import finish_wandb

    pl.seed_everything(seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, stage1_overrides(cfg))
    trainer = build_trainer(
        cfg, directory, max_epochs=epochs, final_checkpoint=final, seed=seed, role=role
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    trainer.strategy.barrier()
    scores = directory / "scores.json"
    val = json.loads(scores.read_text()).get("val") if scores.exists() else None
    finish_wandb(trainer.loggers, val)
    return val


def shared_stage1(cfg: DictConfig) -> Stage1:
    """Finds the finished stage 1 of ``cfg`` or trains (or resumes) it.

    Returns:
        The stage-1 run; ``checkpoint`` is a full Lightning checkpoint at the end of stage 1.
    """
    from experiments.train import write_results

    key = stage1_key(cfg)
    directory = Path(cfg.schedule.stage1_dir) / key
    done = directory / "done.json"
    final = directory / "checkpoints" / "stage1.ckpt"
    lock = directory.with_suffix(".lock")
    with _coordinated(lock, lambda: done.exists() and final.exists()) as reuse:
        if reuse:
            log.info("reusing shared stage 1 %s", directory)
            return Stage1(directory, final, json.loads(done.read_text()).get("val"))
        epochs = int(cfg.schedule.stage1_epochs)
        directory.mkdir(parents=True, exist_ok=True)
        if launcher_rank() == 0:
            (directory / "stage1_config.yaml").write_text(
                OmegaConf.to_yaml(OmegaConf.create(stage1_config(cfg)))
            )
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else None
        log.info(
            "training shared stage 1 (%d epochs) in %s%s",
            epochs,
            directory,
            f", resuming {last}" if resume else "",
        )
        val = _train_shared(cfg, directory, epochs, resume, final, cfg.seed, "stage1")
        if launcher_rank() == 0:
            write_results(done, {"key": key, "epochs": epochs, "val": val})
        return Stage1(directory, final, val)


def shared_baseline(cfg: DictConfig, stage1: Stage1) -> Stage1:
    """The baseline continued from the end of stage 1 to ``total_epochs``, trained once per stage 1.

    Same model, loss and optimizer as stage 1, resumed with its full optimizer, scheduler and loop
    state: exactly the uninterrupted ``total_epochs`` baseline. Lives in ``<stage-1 dir>/baseline``.
    """
    from experiments.train import eval_protocol, write_results

    directory = stage1.directory / "baseline"
    done = directory / "done.json"
    final = directory / "checkpoints" / "final.ckpt"
    protocol = eval_protocol(cfg)
    with _coordinated(directory.with_suffix(".lock"), done.exists) as reuse:
        if reuse:
            log.info("reusing the shared baseline %s", directory)
            record = json.loads(done.read_text())
            # The evaluation protocol is not part of the stage-1 key (it does not change training),
            # so a job scored under another protocol may have written these scores.
            if record.get("eval_protocol", protocol) != protocol:
                log.warning(
                    "the shared baseline %s was scored under another evaluation protocol (%s) than "
                    "this job's (%s): its scores are not comparable with this job's; rescore its "
                    "checkpoint %s with train=false ckpt_path=<it> under this protocol",
                    directory,
                    record.get("eval_protocol"),
                    protocol,
                    final,
                )
            return Stage1(directory, final, record.get("val"))
        total = int(cfg.schedule.total_epochs)
        last = directory / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() else str(stage1.checkpoint)
        log.info("training the baseline to epoch %d in %s from %s", total, directory, resume)
        # Every epoch is seeded from (seed, epoch): the continuation is the uninterrupted baseline.
        val = _train_shared(cfg, directory, total, resume, final, cfg.seed, "baseline")
        if launcher_rank() == 0:
            write_results(done, {"epochs": total, "val": val, "eval_protocol": protocol})
        return Stage1(directory, final, val)
