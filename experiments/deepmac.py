"""Deep-MAC driver (``schedule=deepmac``): trains a class-agnostic mask head on ground-truth boxes,
then scores mask AP with ground-truth boxes given, separately for seen and unseen classes.

``run.py`` dispatches here on ``schedule.name == "deepmac"``. One fit of
``schedule.total_epochs`` epochs; the final weights (``final.ckpt``, written by the shared
:class:`~lightning_modules.callbacks.StageEnd`) are evaluated once more in this process on one
device, so the scores are those of all validation images whatever the launcher.

The head-architecture comparison of the paper is one multirun::

    python run.py -m experiment=deepmac_coco_voc2nonvoc \\
        model=deepmac_hourglass10,deepmac_hourglass20,deepmac_hourglass52,deepmac_hourglass100,deepmac_resnet,deepmac_maskrcnn
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import ConfigError
from datamodules.instances import InstanceDataModule, network_images
from experiments.build import build_datamodule, build_trainer, trainer_device
from experiments.checkpoints import load_module_weights, resume_checkpoint
from experiments.results import checkpoint_paths
from lightning_modules.deepmac import DeepMACLitModule
from lightning_modules.deepmac_metrics import MaskAPAccumulator, flat_scores
from lightning_modules.nets.deepmac import DeepMAC
from losses.mask import resolve_classes

log = logging.getLogger(__name__)


def _is_subclass(target: Any, base: type) -> bool:
    """Whether the class a ``_target_`` names is ``base`` or derives from it."""
    try:
        cls = hydra.utils.get_class(str(target))
    except Exception:  # noqa: BLE001 - no such class: not a subclass
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def validate_deepmac(cfg: DictConfig) -> None:
    """Checks the Deep-MAC keys; raises :class:`ConfigError` naming the key."""
    model = cfg.get("model") or {}
    if not _is_subclass(model.get("_target_"), DeepMAC):
        raise ConfigError(
            f"schedule=deepmac needs a Deep-MAC model (model=deepmac_*), got {model.get('_target_')}"
        )
    if int(model.get("mask_size", 32)) < 2:
        raise ConfigError(f"model.mask_size={model.get('mask_size')}: must be >= 2")
    if not _is_subclass(cfg.data.get("_target_"), InstanceDataModule):
        raise ConfigError(
            "schedule=deepmac needs an instance datamodule (data=coco_instances, ...)"
        )
    module = cfg.get("module") or {}
    holdout = cfg.data.get("holdout") or 0
    prefix = module.get("val_prefix", "val")
    if bool(holdout) != (prefix == "holdout"):
        raise ConfigError(
            f"data.holdout={holdout} with module.val_prefix={prefix}: fit's validation scores the "
            "held-out training images exactly when data.holdout > 0; set module.val_prefix=holdout "
            "with a holdout, val without one"
        )
    metric = str(cfg.get("optimized_metric") or "")
    if metric.partition("/")[0] not in (prefix, ""):
        raise ConfigError(
            f"optimized_metric={metric}: fit logs its validation scores as {prefix}/..., so the "
            f"checkpoint monitor needs a {prefix}/ key (e.g. {prefix}/AP_seen)"
        )
    centre = module.get("centre_loss")
    num_centre = int(model.get("num_centre_classes", 0) or 0)
    if centre is not None:
        ids = resolve_classes(centre.get("class_ids", "coco_all"))
        if num_centre != len(ids or ()):
            raise ConfigError(
                f"module.centre_loss.class_ids has {len(ids or ())} classes but "
                f"model.num_centre_classes={num_centre}: set them to agree"
            )


def build_deepmac_module(cfg: DictConfig) -> DeepMACLitModule:
    """The LightningModule of ``cfg`` with the config needed to rebuild its net for inference."""
    net = hydra.utils.instantiate(cfg.model)
    loss = hydra.utils.instantiate(cfg.loss, _convert_="all")
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    # The build config goes to the partial: through instantiate, Hydra would build the nets its
    # model entry names.
    factory = hydra.utils.instantiate(cfg.module, _partial_=True, _convert_="all")
    return factory(
        net=net,
        loss=loss,
        optimizer=optimizer,
        build_config={
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": {"image_size": int(cfg.data.image_size)},
        },
    )


@torch.no_grad()
def evaluate(module: DeepMACLitModule, loader: Any, device: torch.device) -> dict[str, Any]:
    """Mask AP / IoU of ``module`` over ``loader`` (ground-truth boxes given), on one device."""
    module = module.to(device).eval()
    acc = MaskAPAccumulator()
    for batch in loader:
        image = network_images(batch["image"].to(device), batch["size"])
        boxes = [b.to(device) for b in batch["boxes"]]
        sizes = [tuple(m.shape[-2:]) for m in batch["orig_masks"]]
        probs = module.predict_masks(
            image, boxes, [b.to(device) for b in batch["orig_boxes"]], sizes
        )
        module.accumulate(acc, batch, probs)
    present = acc.present_classes()
    module.cpu()
    return acc.compute(module.groups(present))


def run_one_deepmac(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Trains (``train=true``) and evaluates the Deep-MAC run of ``cfg`` (no controls).

    Returns:
        The results.json entry: ``{"task_name", "schedule": "deepmac", "head", "val": {"AP_seen",
        "AP_unseen", "AP_all", "mIoU_seen", ..., "AP50_*", "AP75_*", "APs_*", ...},
        "val_detail": per-group scores with instance counts and per-class IoU, "checkpoints"}``
        (AP and IoU in percent).
    """
    validate_deepmac(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    module = build_deepmac_module(cfg)
    results: dict[str, Any] = {
        "task_name": cfg.task_name,
        "schedule": "deepmac",
        "head": cfg.model.head,
    }
    final = out_dir / "final.ckpt"
    if cfg.get("init_from"):
        load_module_weights(module, cfg.init_from)
    if cfg.train:
        trainer = build_trainer(
            cfg, out_dir, max_epochs=int(cfg.schedule.total_epochs), final_checkpoint=final
        )
        ckpt = cfg.get("ckpt_path") or resume_checkpoint(cfg, out_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        # Spawn launchers train in child processes: the weights come back through final.ckpt.
        load_module_weights(module, final)
        results["checkpoints"] = {**checkpoint_paths(trainer), "final": str(final)}
    elif not cfg.get("init_from") and not cfg.get("ckpt_path"):
        raise ConfigError("train=false needs init_from=<a Deep-MAC checkpoint> to evaluate")
    elif cfg.get("ckpt_path"):
        load_module_weights(module, cfg.ckpt_path)
    device = trainer_device(cfg)
    if datamodule.holdout:
        # The selection split, scored with the final weights: what a sweep's objective reads.
        held = evaluate(module, datamodule.val_dataloader(), device)
        results["holdout"] = {**flat_scores(held)}
        results["holdout_detail"] = held
    scores = evaluate(module, datamodule.report_dataloader(), device)
    results["val"] = {**flat_scores(scores)}
    results["val_detail"] = scores
    print(
        format_mask_table(
            scores, f"\n{cfg.task_name}: mask AP with ground-truth boxes ({cfg.model.head})"
        )
    )
    return results


def run_deepmac(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """:func:`run_one_deepmac`, then the controls of ``schedule.controls`` and their table.

    ``proposal_crops``: the same run with the head trained on proposal-like boxes
    (``model.box_jitter_mode=proposal``) instead of jittered ground-truth boxes, in
    ``<out_dir>/proposal_crops``: the seed article's first finding (cropping with ground-truth
    boxes is what lets unseen classes work) as an ablation. Results: the main run's, with
    ``controls: {name: that run's results}``.
    """
    results = run_one_deepmac(cfg, out_dir)
    controls = list(cfg.schedule.get("controls") or [])
    if not controls:
        return results
    known = {"proposal_crops": {"box_jitter_mode": "proposal"}}
    results["controls"] = {}
    rows = [("ground-truth boxes", results["val"])]
    for name in controls:
        if name not in known:
            raise ConfigError(
                f"schedule.controls: unknown control {name!r}; known: {sorted(known)}"
            )
        sub = cfg.copy()
        with open_dict(sub):
            for key, value in known[name].items():
                sub.model[key] = value
            sub.task_name = f"{cfg.task_name}/{name}"
            sub.ckpt_path = None
            sub.schedule.controls = []
        sub_dir = out_dir / name
        sub_dir.mkdir(parents=True, exist_ok=True)
        res = run_one_deepmac(sub, sub_dir)
        results["controls"][name] = res
        rows.append((name.replace("_", " "), res["val"]))
    print(format_control_table(rows, f"\n{cfg.task_name}: cropping ablation (seed {cfg.seed})"))
    return results


def format_control_table(rows: list[tuple[str, dict[str, float]]], title: str) -> str:
    """One row per run: AP / AP50 / mIoU of the seen and unseen classes."""
    lines = [
        title,
        f"{'training crops':<20} {'AP seen':>8} {'AP unseen':>10} {'AP50 uns':>9} "
        f"{'mIoU seen':>10} {'mIoU uns':>9}",
    ]
    for name, v in rows:
        lines.append(
            f"{name:<20} {v.get('AP_seen', float('nan')):8.1f} "
            f"{v.get('AP_unseen', float('nan')):10.1f} {v.get('AP50_unseen', float('nan')):9.1f} "
            f"{v.get('mIoU_seen', float('nan')):10.1f} {v.get('mIoU_unseen', float('nan')):9.1f}"
        )
    return "\n".join(lines)


def format_mask_table(scores: dict[str, Any], title: str) -> str:
    """A small text table: one row per class group."""
    rows = [title, f"{'group':<8} {'AP':>6} {'AP50':>6} {'AP75':>6} {'mIoU':>6} {'N':>6}"]
    for group, s in scores.items():
        if group == "per_class_IoU":
            continue
        rows.append(
            f"{group:<8} {s['AP']:6.1f} {s['AP50']:6.1f} {s['AP75']:6.1f} {s['mIoU']:6.1f} {s['num_instances']:6d}"
        )
    return "\n".join(rows)
