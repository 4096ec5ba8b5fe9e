"""rimlab's single entry point: ``python run.py [experiment=NAME] [overrides ...]``.

Hydra composes ``conf/run.yaml`` with the chosen groups; :func:`experiments.train.run` does the rest.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Config paths are relative to the repository, wherever the command is started from.
os.environ.setdefault("RIMLAB_ROOT", str(Path(__file__).resolve().parent))

log = logging.getLogger("rimlab")


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> float | None:
    """Runs one job; returns the optimised metric for hyper-parameter sweepers."""
    from experiments.train import run

    # Lightning installs its own console handler; Hydra's root handlers already print and file its
    # records, so without this every Lightning message appears twice.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from datamodules.errors import run_command
    from experiments.launch import check_launch, resume_if_requeued

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
