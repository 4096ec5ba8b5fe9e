"""rimlab's single entry point: ``python run.py [experiment=NAME] [overrides ...]``.

Hydra composes ``conf/run.yaml`` with the chosen groups; :func:`run` hands the config to the driver
of ``schedule.name`` (:data:`DRIVERS`), which checks its own keys, and writes what it returns to
``results.json``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import ConfigError, run_command
from experiments.deepmac import run_deepmac, validate_deepmac
from experiments.launch import check_launch, resume_if_requeued
from experiments.pose import run_pose, validate_cascade
from experiments.ranks import launcher_rank
from experiments.results import write_results
from experiments.rim import run_rim
from experiments.single import check_parsing_config, run_single

# Config paths are relative to the repository, wherever the command is started from.
os.environ.setdefault("RIMLAB_ROOT", str(Path(__file__).resolve().parent))

log = logging.getLogger("rimlab")


class Driver(NamedTuple):
    """A schedule's driver: ``check(cfg)`` raises ConfigError for its own keys before anything is
    built; ``run(cfg, out_dir)`` returns the results."""

    check: Callable[[DictConfig], Any]
    run: Callable[[DictConfig, Path], dict[str, Any]]


#: ``schedule.name`` -> its driver.
DRIVERS: dict[str, Driver] = {
    # one parsing run (optionally continuing a shared stage 1)
    "single": Driver(check_parsing_config, run_single),
    "rim": Driver(check_parsing_config, run_rim),  # RIM's two stages
    "cascade": Driver(validate_cascade, run_pose),  # DeepPose cascades
    "deepmac": Driver(validate_deepmac, run_deepmac),  # Deep-MAC mask heads
}


def check_config(cfg: DictConfig) -> Driver:
    """Checks the composed config for mistakes that would otherwise surface hours into a run;
    returns the driver of its schedule.

    Raises:
        ConfigError: the config does not resolve, names no known schedule or no epochs, or the
            driver's own check fails (naming the key).
    """
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation to a missing key, a bad resolver, ...
        raise ConfigError(f"the config does not resolve: {err}") from err
    schedule = cfg.get("schedule") or {}
    driver = DRIVERS.get(schedule.get("name"))
    if driver is None:
        raise ConfigError(
            f"schedule.name={schedule.get('name')!r}: expected one of {', '.join(DRIVERS)}"
        )
    total = int(schedule.get("total_epochs", 0))
    if total < 1:
        raise ConfigError(f"schedule.total_epochs={total}: must be >= 1")
    driver.check(cfg)
    return driver


def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains and/or evaluates as configured; returns the results written to results.json."""
    driver = check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        results = driver.run(cfg, out_dir)
    finally:
        # Multirun jobs share a process: each must close its own W&B run.
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
    # Under DDP every rank runs the driver; rank 0 alone writes (the ranks' temporary files would
    # race on the same name).
    if launcher_rank() == 0:
        write_results(out_dir / "results.json", results)
        log.info("results written to %s", out_dir / "results.json")
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> float | None:
    """Runs one job; returns the optimised metric for hyper-parameter sweepers."""
    # Lightning installs its own console handler; Hydra's root handlers already print and file its
    # records, so without this every Lightning message appears twice.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    hydra_cfg = HydraConfig.get()

    def job() -> dict:
        check_launch(cfg, hydra_cfg.mode == RunMode.MULTIRUN, hydra_cfg.launcher.get("_target_"))
        resume_if_requeued(cfg)
        try:
            return run(cfg)
        except SIGTERMException:
            # SLURM stops the tasks of a job it requeues (or cancels) with SIGTERM; Lightning
            # stopped the fit at the next step and the epoch-boundary checkpoint is intact.
            log.warning(
                "stopped by SIGTERM: a requeued SLURM job resumes from its last completed epoch; "
                "elsewhere continue with resume=true in the same run folder"
            )
            sys.exit(143)

    # A mistake the user can fix (a dataset file, a config value, a checkpoint) reads as one
    # paragraph, on the console and in the run's log file; a debug preset or HYDRA_FULL_ERROR=1
    # shows the traceback. Every other exception keeps its traceback.
    results = run_command(job, traceback=bool(hydra_cfg.runtime.choices.get("debug")), log=log)
    stage, _, name = str(cfg.get("optimized_metric") or "").partition("/")
    value = (results.get(stage) or {}).get(name)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


if __name__ == "__main__":
    main()
