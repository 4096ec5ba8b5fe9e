"""What each config key means to rimlab: one table (:data:`KEYS`) and one hash (:func:`config_hash`).

Three records are hashed or stored from a run's config, and every key list they use is read from
:data:`KEYS`:

- the **stage-1 key** (:func:`stage1_config`): the folder of a shared stage-1 run. It keeps every
  ``data``, ``model``, ``loss`` and ``optimizer`` key the table does not mark ``stage1=False``, and
  of ``module``, ``trainer`` and ``schedule`` only those marked ``stage1=True``;
- the **cascade stage hash** (:func:`cascade_config`): a DeepPose stage's ``stage.json``. It keeps
  the whole config except the keys marked ``cascade=False``;
- the **inference config** (:func:`inference_config`): what every checkpoint records to rebuild its
  net (``model``, ``eval`` and the ``data`` keys of
  :data:`lightning_modules.parser.INFERENCE_DATA_KEYS`: the inference config belongs to the
  parser that rebuilds the net, which may not import ``experiments/``), and the ``data`` keys recorded with the evaluation protocol
  (``eval_input=True``).

The table also names the variant switches (``variant``: the column a RIM variant is told apart by,
read by :mod:`experiments.variants`), the keys with a closed set of values (``choices``) and the
``data`` keys one cascade stage may override (``stage_override``).

The two hashes disagree on some keys, and each keeps the rule its existing runs were hashed with
(changing either would orphan every stage-1 folder or ``stage.json`` on disk):
``data.skip_bad`` and ``data.palette`` count for a cascade stage but not for stage 1;
``data.sigma`` and ``data.input_size`` count for stage 1 but not for a cascade stage (the cascade
driver sets them per stage); ``data.root`` counts for both, though no variant is named after it;
the stage-1 key keeps only a listed subset of ``trainer`` and ``module`` keys, the cascade hash
drops a listed subset. ``tests/test_keys.py`` pins both hashes of a fixed config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.base import ParsingDataModule
from datamodules.transforms import AUGMENTATION_VERSION
from lightning_modules.metrics import MPA_DEFINITIONS
from lightning_modules.parser import INFERENCE_DATA_KEYS
from losses.modules import MAIN_NORMALIZERS, SIDE_TARGETS
from samplers.regional import CPA_READINGS, NRBS_COUNTS


@dataclass(frozen=True)
class Key:
    """What one dotted config key means.

    Attributes:
        stage1: True: part of the stage-1 key although its section keeps only listed keys
            (``module``, ``trainer``, ``schedule``); False: left out of it although its section
            keeps the rest (``data``, ``loss``); None: the section's rule.
        cascade: False: left out of a cascade stage's hash (which keeps everything else).
        eval_input: a ``data`` key that decides the evaluation input's geometry, recorded with the
            evaluation protocol in results.json.
        stage_override: a ``data`` key one cascade stage may override
            (``cascade.stages.<s>.data.<key>``): it changes only how that stage batches and
            augments.
        variant: the column that tells RIM variants apart by this key (tables, W&B columns,
            run names); None: not a variant switch.
        variant_default: config file below ``conf/`` (``{source}`` = the sampler source) whose
            value counts as the switch's default; None: no default.
        variant_needs: the variant parts the switch acts on ("sampler", "ilm", "stage2").
        variant_info: recorded as a column but never part of a run's name.
        choices: the values the key may take (checked before anything is built).
    """

    stage1: bool | None = None
    cascade: bool = True
    eval_input: bool = False
    stage_override: bool = False
    variant: str | None = None
    variant_default: str | None = None
    variant_needs: tuple[str, ...] = ()
    variant_info: bool = False
    choices: tuple[str, ...] | None = None


_SAMPLER_FILE = "sampler/{source}.yaml"
_LOSS_FILE = "loss/ce_ilm.yaml"
# Loader speed, error policy: never what a fit computes.
_LOADER = Key(stage1=False, cascade=False)

#: Every key that one of the records treats specially. The variant switches are listed in the order
#: their columns and name brackets appear, the keys with choices in the order they are checked.
KEYS: dict[str, Key] = {
    # Checked first: module.mpa defaults to metrics.mpa, whose name the message should give.
    "metrics.mpa": Key(
        variant="mpa", variant_default="run.yaml", variant_info=True, choices=MPA_DEFINITIONS
    ),
    "module.mpa": Key(choices=MPA_DEFINITIONS),
    "model.backbone": Key(variant="backbone"),
    "sampler.cpa": Key(
        variant="cpa",
        variant_default=_SAMPLER_FILE,
        variant_needs=("sampler",),
        choices=CPA_READINGS,
    ),
    "sampler.eta": Key(variant="eta", variant_default=_SAMPLER_FILE, variant_needs=("sampler",)),
    "sampler.nrbs_count": Key(
        variant="nrbs_count",
        variant_default=_SAMPLER_FILE,
        variant_needs=("sampler",),
        choices=NRBS_COUNTS,
    ),
    "sampler.min_prob": Key(
        variant="min_prob", variant_default=_SAMPLER_FILE, variant_needs=("sampler",)
    ),
    "loss.main._target_": Key(variant="main_loss", variant_default=_LOSS_FILE),
    # The ILM knobs and stage 2's scoring act only in stage 2: variants that differ in them share
    # stage 1.
    "loss.ilm": Key(stage1=False),
    "loss.ilm_weight": Key(
        stage1=False, variant="ilm_weight", variant_default=_LOSS_FILE, variant_needs=("ilm",)
    ),
    "loss.ilm.margin": Key(variant="margin", variant_default=_LOSS_FILE, variant_needs=("ilm",)),
    "loss.ilm_region": Key(
        stage1=False, variant="ilm_region", variant_default=_LOSS_FILE, variant_needs=("ilm",)
    ),
    "loss.main_normalizer": Key(
        stage1=False,
        variant="main_normalizer",
        variant_default=_LOSS_FILE,
        variant_needs=("stage2",),
        choices=MAIN_NORMALIZERS,
    ),
    "loss.side_target": Key(
        stage1=False,
        variant="side_target",
        variant_default=_LOSS_FILE,
        variant_needs=("stage2",),
        choices=SIDE_TARGETS,
    ),
    "schedule.cpa_epoch": Key(stage1=True, variant="cpa_epoch", variant_needs=("sampler",)),
    "schedule.stage1_epochs": Key(stage1=True, variant="stage1_epochs"),
    "schedule.total_epochs": Key(stage1=True, variant="total_epochs"),
    # Plot colours (recorded for inference), not what stage 1 computes.
    "data.palette": Key(stage1=False),
    "data.eval_size": Key(eval_input=True),
    "data.eval_keep_ratio": Key(eval_input=True),
    "data.base_size": Key(eval_input=True, variant="base_size"),
    "data.base_side": Key(eval_input=True),
    "data.eval_affine": Key(eval_input=True),
    "data.augmentation": Key(variant="augmentation"),
    "data.flip_prob": Key(variant="flip_prob"),
    "data.batch_size": Key(stage_override=True),
    "data.eval_batch_size": Key(stage1=False, cascade=False, stage_override=True),
    "data.num_workers": Key(stage1=False, cascade=False, stage_override=True),
    "data.pin_memory": _LOADER,
    "data.persistent_workers": _LOADER,
    "data.skip_bad": Key(stage1=False),
    # The same pixels, stored decoded instead of decoded on every read.
    "data.pixel_cache": Key(stage1=False),
    # Set by the cascade driver for each stage.
    "data.sigma": Key(cascade=False),
    "data.input_size": Key(cascade=False),
    "data.scale_jitter": Key(stage_override=True),
    "data.rotate": Key(stage_override=True),
    "data.rotate_prob": Key(stage_override=True),
    "data.flip": Key(stage_override=True),
    "data.min_diam": Key(stage_override=True),
    "data.translate": Key(stage_override=True),
    "data.noise": Key(stage_override=True),
    "data.jitter": Key(stage_override=True),
    "module.num_classes": Key(stage1=True),
    "module.ignore_index": Key(stage1=True),
    "module.scheduler": Key(stage1=True),
    # Evaluation only (the skeleton's pairs are hashed with data).
    "module.flip_test": Key(cascade=False),
    "module.flip_shift": Key(cascade=False),
    "module.flip_pairs": Key(cascade=False),
    "trainer.precision": Key(stage1=True),
    "trainer.devices": Key(stage1=True),
    "trainer.num_nodes": Key(stage1=True),
    "trainer.accumulate_grad_batches": Key(stage1=True),
    "trainer.gradient_clip_val": Key(stage1=True),
    "trainer.deterministic": Key(stage1=True),
    "trainer.limit_train_batches": Key(stage1=True),
    "trainer.limit_val_batches": Key(stage1=True),
    "trainer.check_val_every_n_epoch": Key(stage1=True),
    "trainer.overfit_batches": Key(stage1=True),
    "trainer.fast_dev_run": Key(stage1=True),
    "trainer.max_steps": Key(stage1=True),
    "trainer.sync_batchnorm": Key(stage1=True),
    # Where a run writes and how it reports.
    "trainer.default_root_dir": Key(cascade=False),
    "trainer.log_every_n_steps": Key(cascade=False),
    "trainer.enable_progress_bar": Key(cascade=False),
    "trainer.enable_model_summary": Key(cascade=False),
    "trainer.num_sanity_val_steps": Key(cascade=False),
    # ARBS needs the CPA snapshot: a stage 1 trained without it cannot serve an ARBS stage 2.
    "callbacks.cpa_snapshot": Key(stage1=True),
    # Top-level keys that say where a run writes, what it reports or which weights it starts from
    # (a cascade stage hashes the bytes of its init weights itself).
    **{
        key: Key(cascade=False)
        for key in (
            "paths",
            "hydra",
            "resume",
            "requeue_signal",
            "train",
            "test",
            "ckpt_path",
            "init_from",
            "save_predictions",
            "prediction_format",
            "logger",
            "callbacks",
            "task_name",
            "tags",
            "optimized_metric",
            "cascade",
        )
    },
}


def _keys(section: str, **match: Any) -> tuple[str, ...]:
    """The key names directly below ``section`` (``""``: top-level) whose :data:`KEYS` entry has
    the fields ``match``."""
    out = []
    for dotted, key in KEYS.items():
        head, _, name = dotted.rpartition(".")
        if head == section and all(getattr(key, f) == v for f, v in match.items()):
            out.append(name)
    return tuple(out)


#: ``data`` keys recorded with the evaluation protocol (the input geometry).
EVAL_INPUT_KEYS = _keys("data", eval_input=True)
#: ``data`` keys a cascade stage may override.
STAGE_DATA_KEYS = _keys("data", stage_override=True)
#: Keys of ``cascade.stages.<s>`` that are the stage's own knobs, not config overrides.
CASCADE_STAGE_KNOBS = ("epochs", "sigma", "init_from")
#: Dotted key -> allowed values.
CHOICES = {dotted: key.choices for dotted, key in KEYS.items() if key.choices is not None}

# Stage 1 trains the whole network on the natural distribution with the main loss only.
STAGE1_OVERRIDES: dict[str, Any] = {
    "sampler": None,
    "loss.ilm": None,
    "module.freeze_encoder": False,
    "module.scheduler.start_epoch": 0,
}


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able record (the stage-1 key, a cascade stage's hash)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


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


def stage1_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of ``cfg`` that determines stage 1, with the stage-1 overrides applied."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in stage1_overrides(cfg).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    dropped_data, dropped_loss = _keys("data", stage1=False), _keys("loss", stage1=False)
    trainer = _container(cfg.trainer)
    module = _container(cfg.module)
    return {
        "data": {k: v for k, v in _container(cfg.data).items() if k not in dropped_data},
        "model": _container(cfg.model),
        "module": {k: v for k, v in module.items() if k in _keys("module", stage1=True)},
        "cpa_snapshot": (_container(cfg.get("callbacks") or {}) or {}).get("cpa_snapshot"),
        "loss": {k: v for k, v in _container(cfg.loss).items() if k not in dropped_loss},
        "optimizer": _container(cfg.optimizer),
        "seed": cfg.seed,
        # The same seed draws other augmentations in another version of the transforms.
        "augmentation": AUGMENTATION_VERSION,
        # Listed keys that are absent count as None.
        "trainer": {k: trainer.get(k) for k in _keys("trainer", stage1=True)},
        "schedule": {k: cfg.schedule.get(k) for k in _keys("schedule", stage1=True)},
    }


def stage1_key(cfg: DictConfig) -> str:
    """The folder name of ``cfg``'s shared stage 1: :func:`config_hash` of :func:`stage1_config`."""
    return config_hash(stage1_config(cfg))


def cascade_config(scfg: DictConfig) -> dict[str, Any]:
    """The resolved config of one cascade stage without the keys that do not change its weights."""
    full = OmegaConf.to_container(scfg, resolve=True)
    record = {k: v for k, v in full.items() if k not in _keys("", cascade=False)}
    for section in ("data", "trainer"):
        dropped = _keys(section, cascade=False)
        record[section] = {k: v for k, v in (record.get(section) or {}).items() if k not in dropped}
    if isinstance(record.get("module"), dict):
        dropped = _keys("module", cascade=False)
        record["module"] = {k: v for k, v in record["module"].items() if k not in dropped}
    return record


def inference_config(cfg: DictConfig) -> dict[str, Any]:
    """Plain, resolved ``{"model": ..., "eval": ..., "data": {...}}`` to rebuild a net for inference.

    Only plain values (no partials), so the checkpoint still loads with ``weights_only=True``.
    """
    data = {k: cfg.data.get(k) for k in INFERENCE_DATA_KEYS if k in cfg.data}
    target = cfg.data.get("_target_")
    if target:
        cls = hydra.utils.get_class(str(target))
        # eval_size null means "the crop size" for most datasets but "each image at its own size"
        # for those scored at full resolution (Cityscapes, NYUDv2): predict must know which.
        data["full_resolution_eval"] = issubclass(cls, ParsingDataModule) and bool(
            cls.full_resolution_eval
        )
        # predict's prediction_format=dataset_ids asks the datamodule class for its own ids
        data["datamodule"] = str(target)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None,
        "data": OmegaConf.to_container(OmegaConf.create(data), resolve=True),
    }


def eval_input(cfg: DictConfig) -> dict[str, Any]:
    """The :data:`EVAL_INPUT_KEYS` values of ``cfg.data``, resolved."""
    data = cfg.get("data") or {}
    return {k: _container(data[k]) for k in EVAL_INPUT_KEYS if k in data}
