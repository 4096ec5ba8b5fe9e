"""Every experiment and preset composes, resolves and instantiates its data, model and trainer."""

from __future__ import annotations

import hydra
import pytest
import torch
from cfg_utils import CONF, compose_cfg

from datamodules.errors import ConfigError
from experiments.build import build_module
from run import check_config as validate_config

# Deep-MAC experiments (boxes and instance masks, no per-pixel classes) have the same checks in
# tests/test_deepmac_data.py.
EXPERIMENTS = sorted(
    p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("deepmac_")
)
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml") if p.stem != "default")
GROUPS = ["loss", "sampler", "optimizer", "schedule", "trainer", "logger", "model"]


def test_top_level_keys(tmp_path):
    cfg = compose_cfg([], tmp_path)
    for key in ("seed", "task_name", "tags", "ckpt_path", "train", "test", "optimized_metric"):
        assert key in cfg
    for group in ("data", "model", "loss", "sampler", "schedule", "trainer", "callbacks", "paths"):
        assert group in cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path):
    # The GPU recipes are checked on the CPU trainer: composing them is what is tested here.
    cfg = compose_cfg([f"experiment={name}", "model.pretrained=false", "trainer=cpu"], tmp_path)
    validate_config(cfg)
    if cfg.schedule.name == "cascade":  # pose regression: joints, not classes
        from experiments.pose import build_pose_module, validate_cascade

        validate_cascade(cfg)
        hydra.utils.instantiate(cfg.data)
        s = int(cfg.model.input_size)
        out = build_pose_module(cfg, 1).net.eval()(torch.zeros(1, 3, s, s))
        assert out.shape == (1, cfg.data.num_joints, 2)
        return
    assert cfg.model.num_classes == cfg.data.num_classes
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.num_classes == cfg.data.num_classes
    module = build_module(cfg)
    out = module.net.eval()(torch.zeros(1, 3, 33, 33))["out"]
    assert out.shape == (1, cfg.data.num_classes, 33, 33)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.schedule.total_epochs


@pytest.mark.parametrize("name", DEBUG)
def test_debug_presets_compose(name, tmp_path):
    cfg = compose_cfg([f"debug={name}"], tmp_path)
    validate_config(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer is not None


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group, tmp_path):
    for path in sorted((CONF / group).glob("*.yaml")):
        overrides = [f"{group}={path.stem}"]
        if group == "sampler" and path.stem == "arbs":
            overrides.append("schedule=rim")
        # The pose and mask schedules check their own task's keys: compose them with one.
        tasks = {"cascade": "deeppose_quick", "deepmac": "deepmac_quick"}
        if group == "schedule" and path.stem in tasks:
            overrides.insert(0, f"experiment={tasks[path.stem]}")
        cfg = compose_cfg(overrides, tmp_path)
        validate_config(cfg)


def test_num_classes_mismatch_is_caught(tmp_path):
    cfg = compose_cfg(["model.num_classes=20"], tmp_path)
    with pytest.raises(
        ConfigError, match="model.num_classes=20 disagrees with data.num_classes=59"
    ):
        validate_config(cfg)


def test_arbs_without_cpa_source_is_caught(tmp_path):
    cfg = compose_cfg(["sampler=arbs", "schedule=single"], tmp_path)
    with pytest.raises(ConfigError, match="sampler=arbs has no CPA source"):
        validate_config(cfg)


def test_unknown_experiment_and_key_fail_at_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["experiment=does_not_exist"], tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["trainer.no_such_key=1"], tmp_path)


def test_optuna_search_composes(tmp_path):
    """hparams_search=rim_optuna: the Optuna sweeper over RIM's stage-2 knobs, maximising mIoU."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "run",
            overrides=["experiment=rim_pspnet", "hparams_search=rim_optuna"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"loss.ilm_weight", "loss.ilm.margin", "sampler.min_prob"}
    assert cfg.optimized_metric == "val/mIoU"


def test_slurm_launcher_preset_follows_the_trainer():
    """hydra/launcher=rimlab_slurm: one SLURM task per GPU of the job's DDP trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for overrides, gpus, nodes in (
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], 4, 2),
        (["trainer=gpu"], 1, 1),
    ):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "run",
                overrides=["experiment=rim_pspnet", *overrides, "hydra/launcher=rimlab_slurm"],
                return_hydra_config=True,
            )
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (
            gpus,
            gpus,
            nodes,
        )
        # requeued on time limits and pre-emption, warned early enough to stop cleanly
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
        assert launcher.additional_parameters.requeue is True
