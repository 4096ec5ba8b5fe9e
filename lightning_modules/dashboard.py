"""W&B dashboard of a parsing run: per-class tables, confusion matrix, sampler statistics, masks.

Does nothing unless a ``WandbLogger`` is attached, so it sits in the default callbacks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

log = logging.getLogger(__name__)

_MEAN = np.array([0.485, 0.456, 0.406])
_STD = np.array([0.229, 0.224, 0.225])


def _wandb_run(trainer: pl.Trainer) -> Any | None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def palette(num_classes: int) -> np.ndarray:
    """A fixed (C, 3) uint8 colour table (the PASCAL VOC bit pattern), class 0 black."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def class_colours(
    trainer: pl.Trainer, pl_module: pl.LightningModule, num_classes: int
) -> np.ndarray:
    """The (C, 3) uint8 RGB colours of the classes in plots: the dataset's palette when given.

    Looked up on the trainer's datamodule (``palette``, e.g. ``data.palette`` of conf/data/*.yaml),
    then in the module's saved build config (``build_config["data"]["palette"]``, set by the
    training driver and restored from checkpoints); without either, :func:`palette`.

    Raises:
        ValueError: the palette is not ``num_classes`` RGB triples in 0..255.
    """
    colours, source = getattr(getattr(trainer, "datamodule", None), "palette", None), "datamodule"
    if colours is None:
        build = getattr(pl_module, "build_config", None) or {}
        colours, source = (build.get("data") or {}).get("palette"), "build_config data"
    if colours is None:
        return palette(num_classes)
    pal = np.asarray(colours)
    if (
        pal.ndim != 2
        or pal.shape != (num_classes, 3)
        or not np.issubdtype(pal.dtype, np.number)
        or pal.min() < 0
        or pal.max() > 255
    ):
        raise ValueError(
            f"the {source} palette must be {num_classes} RGB triples in 0..255 (one per class of "
            f"the module's {num_classes} class_names), got shape {pal.shape}"
        )
    return pal.astype(np.uint8)


def mask_labels(names: list[str], ignore_index: int = 255) -> dict[int, str]:
    """``{class id: name}`` for W&B masks, the ignore label included so its pixels are named."""
    labels = dict(enumerate(names))
    labels[ignore_index] = "ignore"
    return labels


def _mask(ids: np.ndarray) -> np.ndarray:
    # W&B stores masks as 8-bit PNGs: ids up to 255 (ignore included) fit.
    return ids.astype(np.uint8) if ids.max(initial=0) <= 255 else ids.astype(np.int32)


def _heatmap(matrix: np.ndarray, names: list[str]) -> np.ndarray:
    """Renders a (C, C) matrix as an RGB image (H, W, 3) uint8 with class names on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.14 * len(names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def validation_example(
    pl_module: pl.LightningModule, batch: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first image of an evaluation batch, its label and its prediction at the original size.

    The prediction goes through the module's protocol (``predict_logits``) and
    :func:`~lightning_modules.inference.scores_to_original`, as scoring does: with ``valid_box``
    (``data.eval_keep_ratio``) the scores and the de-normalised input are cropped to the image's
    box before being resized to ``orig_size``, so the black padding never shows.

    Returns:
        ``(H, W, 3)`` uint8 RGB image, ``(H, W)`` label and ``(H, W)`` predicted ids.
    """
    from PIL import Image

    from lightning_modules.inference import scores_to_original

    image = batch["image"][:1]
    with torch.no_grad():
        logits = pl_module.predict_logits(image)
    h, w = (int(s) for s in batch["orig_size"][0]) if "orig_size" in batch else logits.shape[-2:]
    box = batch["valid_box"][0].tolist() if "valid_box" in batch else None
    pred = (
        scores_to_original(logits, (h, w), valid_box=box, input_size=image.shape[-2:])
        .argmax(1)[0]
        .cpu()
        .numpy()
    )
    gt = batch["mask"][0, :h, :w].cpu().numpy()
    img = image[0].float().cpu().permute(1, 2, 0).numpy()  # (3, h, w) -> (h, w, 3)
    if box is not None:
        top, left, box_h, box_w = box
        img = img[top : top + box_h, left : left + box_w]
    img = ((img * _STD + _MEAN) * 255).clip(0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return img, gt, pred


class WandbDashboard(pl.Callback):
    """Logs per-class IoU / CPA tables, a confusion matrix, the sampler's distribution and keep
    probabilities, and a few validation images with ground truth and prediction as W&B
    segmentation masks (``wandb.Image(..., masks=...)``, class names attached).

    Args:
        num_images: validation images logged each validation epoch.
        every_n_epochs: log the images and the confusion matrix every n validation epochs.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)
        self._images: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._sampler_logged = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if (
            len(self._images) >= self.num_images
            or _wandb_run(trainer) is None
            or not trainer.is_global_zero
        ):
            return
        self._images.append(validation_example(pl_module, batch))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's epoch end, which computes the scores this reads.
        run = _wandb_run(trainer)
        if run is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        import wandb

        scores = pl_module.last_scores.get("val")
        names = pl_module.class_names
        payload: dict[str, Any] = {}
        if scores is not None:
            # Both readings of the paper's CPA, each named (never a bare "CPA" column).
            columns = ("IoU", "precision", "recall")
            rows = []
            for i, name in enumerate(names):
                values = [float(scores[key][i]) for key in columns]
                rows.append([i, name, *(None if math.isnan(v) else v for v in values)])
            payload["val/per_class"] = wandb.Table(columns=["id", "class", *columns], data=rows)
            epoch = trainer.current_epoch
            if epoch % self.every_n_epochs == 0:
                confusion = scores["confusion"].numpy().astype(np.float64)
                # Row-normalised: each ground-truth class's pixels spread over the predictions.
                normed = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
                payload["val/confusion"] = wandb.Image(
                    _heatmap(normed, names), caption="rows: ground truth, cols: prediction"
                )
        if self._images:
            # W&B segmentation masks rather than blended pictures: the app toggles each class (and
            # ground truth vs prediction) and shows their names on hover.
            ignore = int(getattr(pl_module, "ignore_index", 255))
            labels = mask_labels(names, ignore)
            payload["val/examples"] = [
                wandb.Image(
                    img,
                    masks={
                        "prediction": {"mask_data": _mask(pred), "class_labels": labels},
                        "ground_truth": {"mask_data": _mask(gt), "class_labels": labels},
                    },
                    caption="toggle prediction / ground truth",
                )
                for img, gt, pred in self._images
            ]
        sampler = getattr(pl_module, "sampler", None)
        if sampler is not None and sampler.is_ready and not self._sampler_logged:
            stats = sampler.stats.cpu().tolist()
            probs = sampler.probs.cpu().tolist()
            table = wandb.Table(
                columns=["class", "statistic", "keep_probability"],
                data=[[n, s, p] for n, s, p in zip(names, stats, probs, strict=True)],
            )
            payload["sampler/distribution"] = wandb.plot.bar(
                table, "class", "statistic", title=f"{sampler.source} statistic"
            )
            payload["sampler/keep_probability"] = wandb.plot.bar(
                table, "class", "keep_probability", title="keep probability"
            )
            self._sampler_logged = True
        if payload:
            run.log(payload, commit=False)
