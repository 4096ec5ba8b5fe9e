"""Start-up checks of how a run is launched, and the trainer's determinism setting.

- :func:`check_launch` refuses ``python run.py -m ... trainer=ddp`` on one machine: Lightning's
  ``ddp`` launcher starts the other ranks by re-running the whole command line, sweep included, so
  every child would run a sweep of its own.
- :func:`determinism` turns ``trainer.deterministic=true`` into what works on every device.
- :func:`resume_if_requeued` and :func:`cluster_plugins` make a requeued SLURM job (pre-empted or
  timed out) continue exactly from its last epoch boundary (``last.ckpt``), never from a
  mid-epoch state; :class:`lightning_modules.callbacks.SlurmRequeue` requeues on the signal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import hydra
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, open_dict

from datamodules.errors import ConfigError

log = logging.getLogger(__name__)

#: ``trainer.strategy`` strings whose launcher re-executes ``sys.argv`` in child processes.
SUBPROCESS_STRATEGIES = (
    "ddp",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
)
#: Environment variables that say an external launcher (torchrun, SLURM tasks) started the ranks.
EXTERNAL_LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


def _process_count(trainer: Mapping[str, Any]) -> int:
    """Processes per node that ``trainer.devices`` asks for (``auto`` / -1 count as several)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return 2  # unknown until the machine is inspected: possibly several
        ids = [d for d in devices.split(",") if d.strip()]
        if "," in devices:
            return len(ids)  # "0,1": device ids
        try:
            return int(devices)
        except ValueError:
            return 1
    if isinstance(devices, int):
        return 2 if devices == -1 else devices
    try:
        return len(devices)  # a list of device ids
    except TypeError:
        return 1


#: The ``_target_`` of Hydra's own ``hydra/launcher=basic``, which runs a sweep's jobs one by one
#: in this process.
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _names_subclass(target: Any, base: type | str) -> bool:
    """Whether a ``_target_`` names the class ``base`` (a class or its dotted path) or a subclass.

    Compared by dotted path along the class's MRO: Hydra's plugin discovery imports its launcher
    modules afresh, so the class a ``_target_`` resolves to need not be the one imported here.
    """
    try:
        cls = hydra.utils.get_class(str(target))
    except Exception:  # noqa: BLE001 - no such class: not one of them
        return False
    name = base if isinstance(base, str) else f"{base.__module__}.{base.__qualname__}"
    return any(f"{k.__module__}.{k.__qualname__}" == name for k in cls.__mro__)


def uses_subprocess_launcher(trainer: Mapping[str, Any]) -> bool:
    """Whether ``trainer`` (the resolved ``cfg.trainer``) starts its ranks with Lightning's
    subprocess launcher, which re-runs ``sys.argv`` (``ddp``; not ``ddp_spawn``)."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        subprocess = strategy in SUBPROCESS_STRATEGIES
    elif isinstance(strategy, Mapping):
        subprocess = _names_subclass(strategy.get("_target_"), DDPStrategy) and strategy.get(
            "start_method", "popen"
        ) in (None, "popen")
    else:
        subprocess = False
    nodes = int(trainer.get("num_nodes", 1) or 1)
    return subprocess and _process_count(trainer) * nodes > 1


def check_launch(cfg: DictConfig, multirun: bool, launcher_target: str | None) -> None:
    """Refuses a multirun that Lightning's ``ddp`` launcher would run once per rank.

    Args:
        cfg: the job's config.
        multirun: whether Hydra runs in ``-m`` mode.
        launcher_target: ``hydra.launcher._target_`` (None outside Hydra).

    Raises:
        datamodules.errors.ConfigError: ``-m`` with the basic (local) launcher, a subprocess DDP
            trainer and no external launcher (torchrun, SLURM).
    """
    if not multirun or not uses_subprocess_launcher(cfg.get("trainer") or {}):
        return
    if any(os.environ.get(k) for k in EXTERNAL_LAUNCH_ENV):
        return  # torchrun or srun started every rank: each runs the same sweep in lockstep
    if launcher_target and not _names_subclass(launcher_target, BASIC_LAUNCHER):
        return  # e.g. hydra/launcher=rimlab_slurm: every job is its own SLURM job
    raise ConfigError(
        "python run.py -m with trainer=ddp on one machine cannot work: Lightning's ddp launcher "
        "starts the other ranks by re-running the whole command line, sweep included, so every "
        "child process would run a sweep of its own. Launch one job per command (without -m), "
        "submit the sweep with hydra/launcher=rimlab_slurm (every job its own SLURM job), or "
        "start the sweep under torchrun (torchrun --nproc_per_node=N run.py -m ...)."
    )


#: ``trainer.sync_batchnorm=auto`` synchronises BatchNorm across processes below this many
#: training images per process (``data.batch_size``): BatchNorm's statistics of 2-4 images are
#: noisy enough to cost accuracy (the mmseg recipes train 2 per GPU with SyncBatchNorm; Wu & He,
#: "Group Normalization", ECCV 2018, Fig. 1), while from 8 on the all-gather and host sync per
#: BatchNorm layer and step costs time for little.
SYNC_BATCHNORM_BELOW = 8


def batch_norm_sync(trainer: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """Trainer keyword overrides for ``trainer.sync_batchnorm=auto``.

    Returns:
        ``{"sync_batchnorm": batch_size < SYNC_BATCHNORM_BELOW}`` for ``auto``, else ``{}`` (the
        configured boolean stands).
    """
    if trainer.get("sync_batchnorm") != "auto":
        return {}
    return {"sync_batchnorm": int(batch_size) < SYNC_BATCHNORM_BELOW}


def determinism(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer keyword overrides for ``trainer.deterministic``.

    ``true`` becomes Lightning's ``"warn"``: deterministic algorithms everywhere they exist, and a
    warning (instead of Lightning's error at the first backward) for the CUDA kernels that have
    none in PyTorch (bilinear upsampling backward, adaptive average pooling backward,
    LocalResponseNorm). cuDNN autotuning (``benchmark``) is switched off with it, since it picks
    kernels by timing. CPU kernels are deterministic, so CPU runs are bit-exact either way.

    Returns:
        ``{}`` when ``deterministic`` is off, else ``{"deterministic": "warn", "benchmark": False}``.
    """
    value = trainer.get("deterministic")
    if not value:
        return {}
    if trainer.get("benchmark"):
        log.info("trainer.deterministic=true: cuDNN benchmark (autotuning) switched off")
    return {"deterministic": "warn", "benchmark": False}


def slurm_restart(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(job id, restart count)`` of a SLURM job that SLURM has restarted, else None.

    SLURM counts every requeue of a job (``scontrol requeue``, pre-emption with
    ``PreemptMode=REQUEUE``, a node failure) in ``SLURM_RESTART_COUNT`` and keeps its job id, so a
    requeued job can tell that it has run before.
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if not job:
        return None
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{job}_{env['SLURM_ARRAY_TASK_ID']}"
    try:
        count = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return None
    return (job, count) if count > 0 else None


def resume_if_requeued(cfg: DictConfig, env: Mapping[str, str] | None = None) -> bool:
    """Sets ``cfg.resume=true`` in a SLURM job that SLURM restarted; returns whether it did.

    The requeued job runs the same command in the same output folder (a sweep job's folder is
    fixed when the sweep is submitted; a plain ``sbatch`` script needs a ``hydra.run.dir`` that
    does not depend on the start time, see README "Pre-emption and requeue"), so resuming from the
    stage's ``last.ckpt`` continues the interrupted run exactly.
    """
    restart = slurm_restart(env)
    if restart is None or cfg.get("resume"):
        return False
    job, count = restart
    with open_dict(cfg):
        cfg.resume = True
    log.info(
        "SLURM job %s was requeued (restart %d): resuming from the last completed epoch "
        "(resume=true)",
        job,
        count,
    )
    return True


def cluster_plugins() -> list[SLURMEnvironment]:
    """Lightning plugins for the cluster the job runs in.

    Under SLURM: Lightning's SLURM environment without its auto-requeue. Lightning's requeue
    handler writes a mid-epoch ``hpc_ckpt`` and resumes from it, which is not an exact resume (the
    position inside the epoch's shuffled order is not restored); rimlab's
    :class:`~lightning_modules.callbacks.SlurmRequeue` requeues on the same signal and the requeued
    job resumes from the last epoch boundary instead.
    """
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []
