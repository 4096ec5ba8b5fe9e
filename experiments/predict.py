"""Parse images, folders, videos or a camera stream with any rimlab parsing checkpoint.

    python -m experiments.predict ckpt=<file.ckpt> input=<image|folder|video|camera index> \\
        output=<dir> [device=auto|cpu|cuda] [save_logits=true] [eval=flip] [eval.scales=[..]] \\
        [size=original|[h,w]] [keep_ratio=true|false] [weights=auto|net|schp] [alpha=0.5] \\
        [show=auto|true|false] [max_frames=N] [save_frames=false] \\
        [prediction_format=class_ids|dataset_ids]

Per image: ``<name>.png`` (class ids as a palette PNG at the original size, the format SCHP's
``simple_extractor.py`` writes; a 16-bit grey PNG for label sets of more than 256 classes), ``<name>_overlay.jpg`` (colours blended on the photo) and, with
``save_logits=true``, ``<name>_logits.npy`` (``(C, H, W)`` float32 scores at the original size).
A video file gives ``<name>_parsing.mp4`` (the overlay per frame); a camera index shows a live
window when a display exists, and writes ``camera<idx>_parsing.mp4`` otherwise. Frames per
second are reported for videos and cameras.

The network is rebuilt from the checkpoint alone (``rimlab_config``, written by every training run
since this command exists). Older checkpoints need ``model=<conf/model name>
data=<conf/data name>`` to say what was trained.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from datamodules.batch import make_palette, normalize_image, save_label_png
from datamodules.errors import FixableError, run_command
from datamodules.transforms import build_eval_transform, check_base_resize, eval_input
from lightning_modules import mmseg_weights, official_weights
from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.inference import scores_to_original
from lightning_modules.nets.heads import logits_align_corners

log = logging.getLogger("rimlab.predict")

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


class PredictError(FixableError, RuntimeError):
    """A missing or unusable input or argument, explained for the command line (checkpoints that
    cannot be used raise :class:`~lightning_modules.checkpoint_io.CheckpointError`)."""


# ---------------------------------------------------------------------- the parser


@dataclass
class Parser:
    """A trained parsing net ready for inference on RGB uint8 images.

    Attributes:
        net: the network in eval mode on ``device``; ``net(x)["out"]`` gives ``(B, C, h, w)``.
        num_classes: C.
        class_names: C names.
        palette: ``(C, 3)`` uint8 RGB colours.
        flip_pairs: left/right class pairs (used by flip test-time augmentation).
        eval_size: network input ``(h, w)``; None runs each image at its own size.
        keep_ratio: fit each image into ``eval_size`` with its aspect ratio kept (centred, black
            padding) and crop the scores back to it (``data.eval_keep_ratio`` of validation).
        base_size: instead of ``eval_size``: fit each image as training did before its random
            scale (``data.base_size``; ``datamodules.transforms.build_eval_transform``).
        base_side: ``"long"`` or ``"short"`` (``data.base_side``).
        inference: evaluation protocol ``(net_forward, image) -> scores`` or None (one pass).
        device: where the net runs.
        config: the checkpoint's build config (``model`` / ``eval`` / ``data``).
        dataset_ids: None writes the class ids; else ``ids -> (dataset ids, palette)`` of the
            training datamodule (Cityscapes: labelIds), ``prediction_format=dataset_ids``.
    """

    net: nn.Module
    num_classes: int
    class_names: list[str]
    palette: np.ndarray
    flip_pairs: list[list[int]] = field(default_factory=list)
    eval_size: tuple[int, int] | None = None
    keep_ratio: bool = False
    base_size: int | None = None
    base_side: str = "long"
    inference: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: dict[str, Any] = field(default_factory=dict)
    dataset_ids: Any = None
    bf16: bool = False
    channels_last: bool = False
    #: :meth:`labels` resizes at most this many score elements at a time (classes x pixels)
    argmax_chunk_elements: int = 1 << 26

    def __post_init__(self) -> None:
        # The same resize + normalisation as validation (datamodules.transforms), so a prediction
        # here equals the validation prediction of the same image.
        self._transform = build_eval_transform(
            self.eval_size,
            keep_ratio=self.keep_ratio,
            base_size=self.base_size,
            base_side=self.base_side,
        )

    def write_ids(self, path: Path, ids: np.ndarray) -> None:
        """Writes predicted ``(H, W)`` class ids as a PNG: the class ids, or the dataset's ids."""
        if self.dataset_ids is None:
            save_ids_png(path, ids, self.palette, self.num_classes)
        else:
            dataset_ids, colours = self.dataset_ids(ids)
            save_label_png(path, dataset_ids, colours)

    def prepare(self, image: np.ndarray) -> tuple[Tensor, list[int] | None]:
        """``(H, W, 3)`` uint8 RGB -> ``(1, 3, h, w)`` normalised float32 on ``device``, and the
        image's ``(top, left, height, width)`` inside it (None unless ``keep_ratio`` or
        ``base_size``)."""
        item = self._transform({"image": image})
        box = item.get("valid_box")
        return normalize_image(item["image"].unsqueeze(0).to(self.device)), (
            box.tolist() if box is not None else None
        )

    def preprocess(self, image: np.ndarray) -> Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(1, 3, h, w)`` normalised float32 on ``device``."""
        return self.prepare(image)[0]

    @torch.inference_mode()
    def scores(self, image: np.ndarray) -> Tensor:
        """Class scores of one image at its original size.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.

        Returns:
            ``(C, H, W)`` float32 on ``device``: logits for a single pass, averaged probabilities
            under flip / multi-scale protocols (see ``lightning_modules.inference``).
        """
        x, box = self.prepare(image)
        out = self._network_scores(x)
        # (1, C, h, w) -> (1, C, H, W): back to the photo's resolution (cropped to the image's
        # box first when it was letterboxed), as validation scores it
        out = scores_to_original(
            out,
            image.shape[:2],
            valid_box=box,
            input_size=x.shape[-2:],
            align_corners=logits_align_corners(self.net),
        )
        return out[0]

    def _network_scores(self, x: Tensor) -> Tensor:
        """``(1, C, h, w)`` float32 scores of the prepared input ``x`` at the network's resolution.

        The network runs under bf16 autocast and in channels-last when ``bf16`` /
        ``channels_last`` are set (``load_parser`` sets both on CUDA); its scores are resized in
        float32 either way, as validation resizes them.
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.inference is None:
                out = self.net(x)["out"]
            else:
                out = self.inference(
                    lambda t: self.net(t)["out"], x, align_corners=logits_align_corners(self.net)
                )
        return out.float()

    @torch.inference_mode()
    def labels(self, image: np.ndarray) -> Tensor:
        """``(H, W)`` int64 class ids of an ``(H, W, 3)`` RGB image, on ``device``.

        The same ids as ``scores(image).argmax(0)`` (bilinear resizing treats every class on its
        own, and the running arg-max keeps the first of equal scores, as ``argmax`` does), but
        the full-resolution scores are made ``argmax_chunk_elements // (H * W)`` classes at a
        time: a 4K frame's 59 classes would take 2 GB in float32 at once.
        """
        x, box = self.prepare(image)
        low = self._network_scores(x)  # (1, C, h, w)
        height, width = image.shape[:2]
        chunk = max(1, self.argmax_chunk_elements // (height * width))
        best_score = best_id = None
        for start in range(0, low.shape[1], chunk):
            # (1, K, h, w) -> (K, H, W) for classes start .. start + K - 1
            up = scores_to_original(
                low[:, start : start + chunk],
                (height, width),
                valid_box=box,
                input_size=x.shape[-2:],
                align_corners=logits_align_corners(self.net),
            )[0]
            ids = up.argmax(0, keepdim=True)  # (1, H, W)
            score = up.gather(0, ids)[0]
            if best_score is None:
                best_score, best_id = score, ids[0] + start
                continue
            better = score > best_score  # strictly: an earlier class keeps a tie
            best_score = torch.where(better, score, best_score)
            best_id = torch.where(better, ids[0] + start, best_id)
        return best_id

    def predict(
        self, image: np.ndarray, with_scores: bool = True
    ) -> tuple[np.ndarray, Tensor | None]:
        """``(H, W)`` class ids and the ``(C, H, W)`` scores of an ``(H, W, 3)`` RGB image (None
        without ``with_scores``: the ids then come from :meth:`labels`, class chunk by chunk).

        The ids are uint8 for up to 256 classes, uint16 beyond (:func:`ids_dtype`).
        """
        scores = self.scores(image) if with_scores else None
        # argmax on the device, then the smallest integer type that holds every id
        labels = scores.argmax(0) if scores is not None else self.labels(image)
        ids = labels.to(torch.int32).cpu().numpy()
        return ids.astype(ids_dtype(self.num_classes)), scores

    def colorize(self, ids: np.ndarray) -> np.ndarray:
        """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 RGB colours."""
        return self.palette[ids]

    def overlay(self, image: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Class colours blended over ``image`` ``(H, W, 3)`` RGB; background (id 0) stays as is."""
        blend = (1.0 - alpha) * image.astype(np.float32) + alpha * self.colorize(ids)
        out = np.where((ids > 0)[..., None], blend, image.astype(np.float32))
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


MAX_PALETTE_CLASSES = 256  # an 8-bit palette PNG holds ids 0..255
MAX_CLASSES = 65536  # a 16-bit PNG holds ids 0..65535


def ids_dtype(num_classes: int) -> type[np.integer]:
    """uint8 for up to 256 classes, uint16 up to 65536.

    Raises:
        PredictError: for more classes than a 16-bit PNG can hold.
    """
    if num_classes <= MAX_PALETTE_CLASSES:
        return np.uint8
    if num_classes <= MAX_CLASSES:
        return np.uint16
    raise PredictError(f"{num_classes} classes: class-id PNGs hold at most {MAX_CLASSES}")


def save_ids_png(path: Path, ids: np.ndarray, palette: np.ndarray, num_classes: int) -> None:
    """Writes ``(H, W)`` class ids as a PNG whose pixel values are the ids.

    Up to 256 classes: an 8-bit palette PNG (``mode "P"``, coloured for viewers, what SCHP
    writes). More: a 16-bit greyscale PNG (``mode "I;16"``; PNG palettes stop at 256 entries),
    so that the ids survive a round trip (``np.asarray(Image.open(path))``); the colours are
    in the overlay image only.
    """
    if num_classes <= MAX_PALETTE_CLASSES:
        save_label_png(path, ids, palette)
        return
    ids = np.asarray(ids)
    if ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() >= MAX_CLASSES)):
        raise PredictError(f"{path}: expected (H, W) ids in 0..{MAX_CLASSES - 1}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint16))  # uint16 (H, W) -> mode "I;16"
    if image.mode != "I;16":
        raise PredictError(f"{path}: Pillow made a {image.mode!r} image of uint16 ids")
    image.save(path)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:1`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"device={device}: CUDA is not available on this machine (use cpu)")
    return torch.device(device)


def _compose_fallback(model: str | None, data: str | None) -> dict[str, Any]:
    """Build config of a checkpoint without ``rimlab_config``, from conf/ group names."""
    from omegaconf import OmegaConf

    if not model or not data:
        raise CheckpointError(
            "this checkpoint does not say how its network was built (it predates the "
            "'rimlab_config' entry): pass model=<conf/model name> data=<conf/data name>, e.g. "
            "model=pspnet_r101 data=lip"
        )
    files = {"model": ROOT / "conf" / "model" / f"{model}.yaml"}
    files["data"] = ROOT / "conf" / "data" / f"{data}.yaml"
    for group, path in files.items():
        if not path.is_file():
            raise PredictError(f"{group}={model if group == 'model' else data}: no {path}")
    cfg = OmegaConf.create(
        {
            "model": OmegaConf.load(files["model"]),
            "data": OmegaConf.load(files["data"]),
            "paths": {"data_dir": "."},
        }
    )
    keys = (
        "num_classes",
        "class_names",
        "flip_pairs",
        "palette",
        "eval_size",
        "crop_size",
        "eval_keep_ratio",
        "base_size",
        "base_side",
    )
    data_cfg = {k: cfg.data.get(k) for k in keys if k in cfg.data}
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "eval": None,
        "data": OmegaConf.to_container(OmegaConf.create(data_cfg), resolve=True),
    }


def eval_protocol(
    config: dict[str, Any], name: str | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    """The inference protocol: ``conf/eval/<name>.yaml`` (or the checkpoint's), plus overrides.

    Args:
        config: the checkpoint's build config (its ``data`` entry resolves ``${data.*}``).
        name: an eval group name (``default``, ``flip``, ``ms_flip``, ``slide``) or None for the
            protocol the checkpoint was validated with.
        overrides: ``{"flip": True, ...}`` from ``eval.<key>=<value>`` arguments.

    Returns:
        An ``InferenceProtocol``, or None for one plain forward pass.
    """
    import hydra
    from omegaconf import OmegaConf

    if name is not None:
        path = ROOT / "conf" / "eval" / f"{name}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (ROOT / "conf" / "eval").glob("*.yaml"))
            raise PredictError(f"eval={name}: no {path} (choose one of {choices})")
        eval_cfg = OmegaConf.load(path)
        if "eval" in eval_cfg:
            # A protocol that also sets data keys is a global-package file (schp_official sets
            # data.eval_affine): predict runs its inference part, with rimlab's input geometry.
            eval_cfg = eval_cfg.eval
    elif config.get("eval"):
        eval_cfg = OmegaConf.create(config["eval"])
    else:
        eval_cfg = None
    if eval_cfg is None and not overrides:
        return None
    if eval_cfg is None:
        eval_cfg = OmegaConf.load(ROOT / "conf" / "eval" / "default.yaml")
    data = dict(config.get("data") or {})
    data.setdefault("flip_pairs", [])
    root = OmegaConf.create({"data": data, "eval": eval_cfg})
    for key, value in (overrides or {}).items():
        OmegaConf.update(root, f"eval.{key}", value, merge=False, force_add=True)
    return hydra.utils.instantiate(OmegaConf.to_container(root, resolve=True)["eval"])


def checkpoint_keep_ratio(checkpoint: dict[str, Any], data_cfg: dict[str, Any]) -> bool:
    """Whether validation letterboxed its inputs (``data.eval_keep_ratio``): the build config's
    value (``ParsingLitModule`` adds it when saving), else the datamodule's saved
    hyper-parameters (``datamodule_hyper_parameters``, written by Lightning), else false."""
    if data_cfg.get("eval_keep_ratio") is not None:
        return bool(data_cfg["eval_keep_ratio"])
    datamodule = checkpoint.get("datamodule_hyper_parameters") or {}
    return bool(datamodule.get("eval_keep_ratio", False))


def load_parser(
    ckpt: str | os.PathLike,
    device: str | torch.device = "cpu",
    eval_name: str | None = None,
    eval_overrides: dict[str, Any] | None = None,
    size: Sequence[int] | str | None = "checkpoint",
    weights: str = "auto",
    model: str | None = None,
    data: str | None = None,
    keep_ratio: bool | str | None = "checkpoint",
    prediction_format: str = "class_ids",
) -> Parser:
    """Rebuilds the net of a rimlab checkpoint for inference.

    Args:
        ckpt: a Lightning checkpoint written by a rimlab training run, a published SCHP
            ``.pth`` (rebuilt as ``model=ce2p_r101_schp`` unless ``model`` says otherwise, with
            the data config its class count names, 20 ``lip``, 18 ``atr``, 7
            ``pascal_person_part``, unless ``data`` does), or an mmsegmentation checkpoint
            (rebuilt as the ``<net>_r<depth>_mmseg`` model config its decode head and depth
            name unless ``model`` says otherwise; 19 classes: ``data=cityscapes`` unless
            ``data`` says otherwise).
        device: ``cpu``, ``cuda``, ``auto`` or a ``torch.device``.
        eval_name: eval protocol name (see :func:`eval_protocol`); None: the checkpoint's.
        eval_overrides: ``eval.<key>`` values.
        size: network input ``(h, w)``; ``"checkpoint"``: the input validation used
            (``datamodules.transforms.eval_input``: ``data.eval_size``, else the
            ``data.base_size`` fit, else ``data.crop_size`` or, for full-resolution datasets,
            each image's own size); None or ``"original"``: each image's own.
        weights: ``net`` (the trained weights), ``schp`` (the self-corrected average of a SCHP
            run) or ``auto`` (``schp`` when the checkpoint has an average, else ``net``).
        model: conf/model name, only for checkpoints without ``rimlab_config``.
        data: conf/data name, idem.
        keep_ratio: fit images into the input size with their aspect ratio kept (black padding,
            scores cropped back); ``"checkpoint"`` or None: as validation did
            (``data.eval_keep_ratio`` of the build config, else of the datamodule's saved
            hyper-parameters, else false).

    Raises:
        CheckpointError: missing file, not a rimlab checkpoint, no build config, or weights that
            do not fit the net.
        PredictError: an argument that cannot work (device, weights, size, format).
    """
    import hydra

    path = Path(ckpt)
    # weights_only: a checkpoint from elsewhere cannot run code; rimlab's hold plain values.
    checkpoint = read_checkpoint(path)
    official = official_weights.official_state_dict(checkpoint)
    mmseg = mmseg_weights.mmseg_state_dict(checkpoint) if official is None else None
    if official is not None:
        # A published SCHP .pth: SCHP's own network, the dataset named by its class count
        # unless data= says otherwise (the shapes are checked against it when mapping).
        num = official_weights.official_num_classes(official)
        data = data or official_weights.DATASET_BY_CLASSES.get(num)
        if data is None:
            raise PredictError(f"{path}: a {num}-class SCHP checkpoint: say data=<conf/data name>")
        config = _compose_fallback(model or "ce2p_r101_schp", data)
        checkpoint = {"state_dict": {}}
    elif mmseg is not None:
        # An mmsegmentation checkpoint: the *_mmseg model config its decode head and depth name
        # unless model= says otherwise, the dataset from data= (19 classes: cityscapes).
        model = model or mmseg_weights.mmseg_model_config(mmseg)
        num = mmseg_weights.mmseg_num_classes(mmseg)
        data = data or ("cityscapes" if num == 19 else None)
        if model is None or data is None:
            raise PredictError(
                f"{path}: an mmsegmentation checkpoint ({num} classes): say model=<conf/model "
                "name, e.g. pspnet_r50_mmseg> data=<conf/data name>"
            )
        config = _compose_fallback(model, data)
        checkpoint = {"state_dict": {}}
    elif not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    else:
        config = checkpoint.get("rimlab_config") or _compose_fallback(model, data)

    model_cfg = dict(config["model"])
    if "pretrained" in model_cfg:
        # The checkpoint holds every weight: ImageNet files need not be in the hub cache.
        model_cfg["pretrained"] = False
    net = hydra.utils.instantiate(model_cfg)
    if official is not None:
        checkpoint["state_dict"] = {
            f"net.{k}": v
            for k, v in official_weights.map_official_state(official, net, path).items()
        }
    elif mmseg is not None:
        checkpoint["state_dict"] = {
            f"net.{k}": v for k, v in mmseg_weights.map_mmseg_state(mmseg, net, path).items()
        }
    state = checkpoint["state_dict"]
    has_schp = (
        any(k.startswith("schp_net.") for k in state)
        and int(state.get("schp_cycles", torch.zeros(())).item()) > 0
    )
    if weights not in ("auto", "net", "schp"):
        raise PredictError(f"weights={weights!r}: expected auto, net or schp")
    if weights == "schp" and not has_schp:
        raise PredictError(f"{path}: weights=schp but the checkpoint has no SCHP average yet")
    prefix = "schp_net." if (weights == "schp" or (weights == "auto" and has_schp)) else "net."
    net_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(net_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the weights do not fit the rebuilt network ({str(err).splitlines()[0]} ...)"
        ) from err
    device = device if isinstance(device, torch.device) else pick_device(device)
    net.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:  # weights and inputs channels-last, under bf16 autocast (CPU runs stay float32)
        net.to(memory_format=torch.channels_last)

    data_cfg = config.get("data") or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    num_classes = int(data_cfg.get("num_classes") or hparams.get("num_classes"))
    names = data_cfg.get("class_names") or hparams.get("class_names")
    names = list(names) if names else [str(i) for i in range(num_classes)]
    palette = data_cfg.get("palette")
    palette = (
        np.asarray(palette, dtype=np.uint8) if palette is not None else make_palette(num_classes)
    )
    base_size, base_side = None, "long"
    if size == "checkpoint":
        # Validation's own input, by the datamodules' rule; checkpoints from before the scale
        # protocol have no base_size and keep their eval_size / crop_size / own-size input.
        try:
            base, base_side = check_base_resize(
                data_cfg.get("base_size"), data_cfg.get("base_side") or "long"
            )
        except ValueError as err:
            raise PredictError(f"{path}: {err}") from err
        eval_size, base_size = eval_input(
            data_cfg.get("eval_size"),
            data_cfg.get("crop_size"),
            base,
            bool(data_cfg.get("full_resolution_eval")),
        )
    else:
        eval_size = None if size in (None, "original") else tuple(int(v) for v in size)
    if keep_ratio in ("checkpoint", None):
        keep_ratio = checkpoint_keep_ratio(checkpoint, data_cfg)
    elif not isinstance(keep_ratio, bool):
        raise PredictError(f"keep_ratio={keep_ratio!r}: expected true or false")
    log.info("loaded %s (%s weights, %d classes) on %s", path, prefix[:-1], num_classes, device)
    if num_classes > MAX_PALETTE_CLASSES:
        log.info(
            "%d classes do not fit an 8-bit palette PNG: class ids are written as 16-bit "
            "greyscale PNGs (mode I;16, no colours; see the overlay images for colours)",
            num_classes,
        )
    ids_dtype(num_classes)  # fails now, not after the first image, beyond 65536 classes
    dataset_ids = None
    if prediction_format == "dataset_ids":
        target = data_cfg.get("datamodule")
        cls = hydra.utils.get_class(str(target)) if target else None
        dataset_ids = getattr(cls, "to_dataset_ids", None)
        if dataset_ids is None:
            raise PredictError(
                f"prediction_format=dataset_ids: {target or 'this checkpoint'}'s dataset has no ids "
                "of its own beyond the class ids (or the checkpoint predates the key)"
            )
    elif prediction_format != "class_ids":
        raise PredictError(f"prediction_format={prediction_format}: use class_ids or dataset_ids")
    return Parser(
        net=net,
        num_classes=num_classes,
        class_names=names,
        palette=palette,
        flip_pairs=[list(p) for p in data_cfg.get("flip_pairs") or []],
        eval_size=eval_size,
        keep_ratio=keep_ratio,
        base_size=base_size,
        base_side=base_side,
        inference=eval_protocol(config, eval_name, eval_overrides),
        device=device,
        config=config,
        dataset_ids=dataset_ids,
        bf16=cuda,
        channels_last=cuda,
    )


# ---------------------------------------------------------------------- writing results


def read_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of an image file (any mode is converted).

    Raises:
        PredictError: if the file cannot be decoded as an image.
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise PredictError(f"{path}: not a readable image ({err})") from err


def predict_image(
    parser: Parser,
    image: np.ndarray,
    stem: Path,
    save_logits: bool = False,
    alpha: float = 0.5,
) -> np.ndarray:
    """Writes ``<stem>.png``, ``<stem>_overlay.jpg`` (and ``<stem>_logits.npy``); returns the ids."""
    ids, scores = parser.predict(image, with_scores=save_logits)
    stem.parent.mkdir(parents=True, exist_ok=True)
    parser.write_ids(stem.with_name(stem.name + ".png"), ids)
    overlay = parser.overlay(image, ids, alpha)
    Image.fromarray(overlay).save(stem.with_name(stem.name + "_overlay.jpg"), quality=92)
    if save_logits:
        np.save(stem.with_name(stem.name + "_logits.npy"), scores.cpu().numpy().astype(np.float32))
    return ids


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def has_display() -> bool:
    """Whether a window can be opened (an X11/Wayland display on Linux; assumed elsewhere)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def gui_available() -> bool:
    """Whether OpenCV can open a window (headless builds raise on ``namedWindow``)."""
    try:
        cv2.namedWindow("rimlab")
        cv2.destroyWindow("rimlab")
    except cv2.error:
        return False
    return True


def _frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[np.ndarray]:
    """RGB frames of an opened capture until it ends or ``max_frames`` frames were read."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def predict_stream(
    parser: Parser,
    source: str | int,
    output: Path,
    name: str,
    show: bool = False,
    write_video: bool = True,
    max_frames: int | None = None,
    save_frames: bool = False,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Parses a video file or camera stream frame by frame.

    Args:
        parser: the loaded parser.
        source: a video file path or a camera index.
        output: output folder.
        name: base name of the outputs (``<name>_parsing.mp4``, ``<name>/<frame>.png``).
        show: show the overlay in a window (``q`` or Esc stops).
        write_video: write the overlay video.
        max_frames: stop after this many frames (None: until the stream ends or Ctrl-C).
        save_frames: also write the class-id PNG of every frame.
        alpha: overlay opacity.

    Returns:
        ``{"frames": n, "fps": parsing frames per second, "video": path or None}``.
    """
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else f"video {source}"
        raise PredictError(f"cannot open {what}")
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    source_fps = source_fps if source_fps and np.isfinite(source_fps) and source_fps > 0 else 25.0
    output.mkdir(parents=True, exist_ok=True)
    if show and not gui_available():
        log.warning(
            "this OpenCV build has no GUI (opencv-python-headless): writing %s_parsing.mp4 "
            "instead of a live window (pip install opencv-python for windows)",
            name,
        )
        show, write_video = False, True
    writer = None
    video_path = output / f"{name}_parsing.mp4" if write_video else None
    frames = 0
    elapsed = 0.0
    try:
        for frame in _frames(capture, max_frames):
            start = time.perf_counter()
            ids, _ = parser.predict(frame, with_scores=False)
            if parser.device.type == "cuda":
                torch.cuda.synchronize(parser.device)
            elapsed += time.perf_counter() - start
            frames += 1
            overlay = cv2.cvtColor(parser.overlay(frame, ids, alpha), cv2.COLOR_RGB2BGR)
            if save_frames:
                (output / name).mkdir(exist_ok=True)
                parser.write_ids(output / name / f"{frames - 1:06d}.png", ids)
            if video_path is not None:
                if writer is None:
                    h, w = overlay.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(video_path), fourcc, source_fps, (w, h))
                    if not writer.isOpened():
                        raise PredictError(f"cannot write {video_path} (no mp4v encoder?)")
                writer.write(overlay)
            if show:
                fps = frames / elapsed if elapsed > 0 else 0.0
                cv2.putText(
                    overlay,
                    f"{fps:.1f} fps",
                    (8, 24),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.7,
                    (255, 255, 255),
                    2,
                )
                cv2.imshow(f"rimlab parsing: {name}", overlay)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
    except KeyboardInterrupt:
        log.info("interrupted: closing the outputs")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    if frames == 0:
        raise PredictError(f"no frame could be read from {source}")
    fps = frames / elapsed if elapsed > 0 else float("inf")
    log.info(
        "%s: %d frames, %.2f frames/s (network + protocol, %s)", name, frames, fps, parser.device
    )
    return {"frames": frames, "fps": fps, "video": str(video_path) if video_path else None}


# ---------------------------------------------------------------------- command line


PREDICT_KEYS = (
    "ckpt",
    "input",
    "output",
    "device",
    "save_logits",
    "eval",
    "size",
    "keep_ratio",
    "prediction_format",
    "weights",
    "alpha",
    "show",
    "max_frames",
    "save_frames",
    "model",
    "data",
)


def parse_args(
    argv: Sequence[str],
    known: Sequence[str] = PREDICT_KEYS,
    required: Sequence[str] = ("ckpt", "input", "output"),
) -> dict[str, Any]:
    """``key=value`` arguments -> dict.

    Values are parsed as YAML (``true``, ``[473,473]``, ``null``) except paths (``ckpt``,
    ``input``, ``output``), which stay strings; ``eval.<key>`` arguments are collected in
    ``args["eval_overrides"]``.

    Raises:
        PredictError: a malformed, unknown or missing argument.
    """
    args: dict[str, Any] = {"eval_overrides": {}}
    for token in argv:
        key, sep, raw = token.partition("=")
        if not sep:
            raise PredictError(f"argument {token!r}: expected key=value")
        if key.startswith("eval."):
            args["eval_overrides"][key[len("eval.") :]] = yaml.safe_load(raw) if raw else None
            continue
        if key not in known:
            raise PredictError(f"unknown argument {key!r}; known: {sorted(known)}")
        args[key] = (
            raw if key in ("ckpt", "input", "output") else (yaml.safe_load(raw) if raw else None)
        )
    for key in required:
        if not args.get(key):
            raise PredictError(f"missing {key}=...")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command; returns a summary (files written, frames per second)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parser = load_parser(
        args["ckpt"],
        device=str(args.get("device") or "auto"),
        eval_name=args.get("eval"),
        eval_overrides=args["eval_overrides"],
        size=args.get("size", "checkpoint"),
        weights=str(args.get("weights") or "auto"),
        model=args.get("model"),
        data=args.get("data"),
        keep_ratio=args.get("keep_ratio", "checkpoint"),
        prediction_format=str(args.get("prediction_format") or "class_ids"),
    )
    output = Path(args["output"])
    output.mkdir(parents=True, exist_ok=True)
    alpha = float(args.get("alpha", 0.5))
    save_logits = bool(args.get("save_logits", False))
    source = str(args["input"])
    show_arg = args.get("show", "auto")
    summary: dict[str, Any] = {"output": str(output)}

    if source.isdigit():  # a camera index
        show = has_display() if show_arg == "auto" else bool(show_arg)
        if not show:
            log.info("no display: writing the camera stream to %s instead of a window", output)
        summary |= predict_stream(
            parser,
            int(source),
            output,
            f"camera{source}",
            show=show,
            write_video=not show,
            max_frames=args.get("max_frames"),
            save_frames=bool(args.get("save_frames")),
            alpha=alpha,
        )
    else:
        path = Path(source)
        if not path.exists():
            raise PredictError(f"input not found: {path}")
        if path.is_dir():
            from tqdm import tqdm

            files = list_images(path)
            if not files:
                raise PredictError(f"{path}: no image files ({sorted(IMAGE_SUFFIXES)})")
            failed = []
            for file in tqdm(files, desc="parsing", unit="img"):
                try:
                    image = read_rgb(file)
                except PredictError as err:
                    log.warning("skipped: %s", err)
                    failed.append(str(file))
                    continue
                stem = output / file.relative_to(path).with_suffix("")
                predict_image(parser, image, stem, save_logits, alpha)
            summary |= {"images": len(files) - len(failed), "failed": failed}
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            show = bool(show_arg) if show_arg != "auto" else False
            summary |= predict_stream(
                parser,
                str(path),
                output,
                path.stem,
                show=show,
                write_video=True,
                max_frames=args.get("max_frames"),
                save_frames=bool(args.get("save_frames")),
                alpha=alpha,
            )
        else:
            image = read_rgb(path)
            predict_image(parser, image, output / path.stem, save_logits, alpha)
            summary["images"] = 1
    if "fps" in summary:
        print(f"{summary['frames']} frames at {summary['fps']:.2f} frames/s -> {summary['video']}")
    else:
        print(f"{summary['images']} image(s) parsed -> {output}")
    return summary


def run_cli(entry: Callable[[], Any]) -> None:
    """Runs a command's ``entry()`` with INFO logging; a fixable error (a bad argument, input or
    checkpoint, a dataset file) ends it as one paragraph with exit status 1
    (``datamodules.errors.run_command``)."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    run_command(entry)


if __name__ == "__main__":
    run_cli(main)
