"""The one table of config keys (experiments.keys): the hashes of existing runs stay what they were."""

from __future__ import annotations

from omegaconf import OmegaConf

from experiments import keys, pose, variants

# A config with a key of every kind the table names (plain, so conf/ edits leave it alone).
CFG = {
    "seed": 7,
    "task_name": "pin",
    "paths": {"output_dir": "/out", "data_dir": "/data"},
    "data": {
        "_target_": "datamodules.lip.LIPDataModule",
        "root": "/data/lip",
        "batch_size": 4,
        "num_workers": 2,
        "pin_memory": True,
        "palette": [[0, 0, 0]],
        "crop_size": [64, 64],
        "eval_size": None,
        "eval_keep_ratio": False,
        "sigma": 2.0,
        "input_size": 64,
        "rotate": 30,
        "num_classes": 3,
    },
    "model": {"_target_": "lightning_modules.nets.PSPNet", "num_classes": 3, "input_size": 64},
    "module": {
        "_target_": "lightning_modules.ParsingLitModule",
        "num_classes": 3,
        "ignore_index": 255,
        "freeze_encoder": True,
        "flip_test": True,
        "scheduler": {"total_epochs": 10, "start_epoch": 3, "power": 0.9},
    },
    "loss": {
        "_target_": "losses.RIMLoss",
        "ilm": {"margin": 0.1},
        "ilm_weight": 1.0,
        "side_target": "object",
        "main_normalizer": "valid",
        "aux_weight": 0.4,
    },
    "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.01},
    "sampler": {"_target_": "samplers.ARBS", "source": "arbs"},
    "callbacks": {"cpa_snapshot": {"_target_": "x.CPASnapshot"}, "ckpt": {"_target_": "y"}},
    "trainer": {
        "precision": 32,
        "devices": 1,
        "max_steps": -1,
        "log_every_n_steps": 5,
        "default_root_dir": "/x",
        "accelerator": "cpu",
    },
    "schedule": {
        "name": "rim",
        "total_epochs": 10,
        "stage1_epochs": 7,
        "cpa_epoch": 1,
        "stage1_dir": "/s1",
    },
    "cascade": {"num_stages": 2, "sigma": 1.0},
    "logger": {"csv": {}},
    "resume": False,
    "train": True,
}


def test_hashes_of_a_fixed_config_are_those_of_the_separate_key_lists(monkeypatch):
    """Values computed with the key lists of experiments/stages.py and pose.py at 1f1326d: a
    shared stage-1 folder or a cascade stage.json on disk keeps its name and hash."""
    monkeypatch.setattr(keys, "AUGMENTATION_VERSION", 4)
    cfg = OmegaConf.create(CFG)
    assert keys.stage1_key(cfg) == "6ad16304db9ddf5f"
    stage2 = pose.stage_record(cfg, 2, 5, 1.0, None, "abcdef0123456789")
    assert keys.config_hash(stage2) == "dc06a9837ce68f4f"
    assert keys.config_hash(pose.stage_record(cfg, 1, 5, 1.0, None, None)) == "135889bedd364cce"


def test_each_hash_keeps_its_own_rule_where_they_disagree(monkeypatch):
    cfg = OmegaConf.create(CFG)
    s1, stage = keys.stage1_config(cfg), keys.cascade_config(cfg)
    # data.root counts for both; palette only for a cascade stage; sigma only for stage 1.
    assert s1["data"]["root"] == stage["data"]["root"] == "/data/lip"
    assert "palette" not in s1["data"] and stage["data"]["palette"] == [[0, 0, 0]]
    assert s1["data"]["sigma"] == 2.0 and "sigma" not in stage["data"]
    # stage 1 keeps listed trainer keys (absent ones as None), a cascade stage drops listed ones.
    assert s1["trainer"]["gradient_clip_val"] is None and "accelerator" not in s1["trainer"]
    assert stage["trainer"] == {
        "precision": 32,
        "devices": 1,
        "max_steps": -1,
        "accelerator": "cpu",
    }
    assert set(s1["loss"]) == {"_target_", "aux_weight"}
    assert "flip_test" not in stage["module"] and "freeze_encoder" in stage["module"]


def test_checkpoints_record_the_inference_keys(tmp_path):
    from cfg_utils import compose_cfg

    cfg = compose_cfg(["data=cityscapes", "data.base_side=long"], tmp_path)
    data = keys.inference_config(cfg)["data"]
    assert data["base_side"] == "long" and data["full_resolution_eval"] is True
    assert set(data) == {k for k in keys.INFERENCE_DATA_KEYS if k in cfg.data} | {
        "full_resolution_eval",
        "datamodule",
    }


def test_derived_lists():
    assert set(keys.INFERENCE_DATA_KEYS) == {
        "num_classes",
        "class_names",
        "flip_pairs",
        "palette",
        "eval_size",
        "eval_keep_ratio",
        "crop_size",
        "base_size",
        "base_side",
    }
    assert keys.EVAL_INPUT_KEYS == (
        "eval_size",
        "eval_keep_ratio",
        "base_size",
        "base_side",
        "eval_affine",
    )
    assert [s.column for s in variants.SWITCHES] == [
        "backbone",
        "cpa",
        "eta",
        "nrbs_count",
        "min_prob",
        "main_loss",
        "ilm_weight",
        "margin",
        "ilm_region",
        "main_normalizer",
        "side_target",
        "cpa_epoch",
        "stage1_epochs",
        "total_epochs",
        "base_size",
        "augmentation",
        "flip_prob",
    ]
    assert [(s.column, s.key) for s in variants.INFO_SWITCHES] == [("mpa", "metrics.mpa")]
