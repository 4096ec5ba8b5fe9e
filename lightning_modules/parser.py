"""A trained parsing network ready for inference, rebuilt from its checkpoint alone.

:func:`load_parser` is the whole recipe; each of its steps is a function of its own:

- :func:`read_inference_checkpoint`: the checkpoint and its build config (``rimlab_config``,
  written by every training run; published SCHP and mmsegmentation files, or older checkpoints,
  get theirs from the conf/ groups that :func:`conf_build_config` composes);
- :func:`build_net`: the network with the chosen weights (:func:`weights_prefix`);
- :func:`input_geometry` and :func:`keep_ratio_of`: the network input validation used;
- :func:`class_info` and :func:`dataset_id_writer`: class names, colours and the PNGs' ids;
- :func:`eval_protocol`: the test-time protocol.

``experiments.predict`` and ``experiments.export`` are the command lines over it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from datamodules.batch import make_palette, normalize_image, save_label_png
from datamodules.errors import FixableError
from datamodules.files import atomic_path
from datamodules.transforms import build_eval_transform, check_base_resize, eval_input
from lightning_modules import mmseg_weights, official_weights
from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.inference import InferenceProtocol, scores_to_original
from lightning_modules.nets.heads import logits_align_corners

log = logging.getLogger("rimlab.predict")

#: The data keys of the inference config: what a checkpoint's ``rimlab_config["data"]`` holds
#: besides ``full_resolution_eval`` and ``datamodule`` (``experiments.keys.inference_config``
#: writes them), and what :func:`conf_build_config` keeps of a conf/data config: the one list.
INFERENCE_DATA_KEYS = (
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


class PredictError(FixableError, RuntimeError):
    """A missing or unusable input or argument, explained for the command line (checkpoints that
    cannot be used raise :class:`~lightning_modules.checkpoint_io.CheckpointError`)."""


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
            with atomic_path(path) as tmp:
                save_label_png(tmp, dataset_ids, colours)

    def prepare(self, image: np.ndarray) -> tuple[Tensor, list[int] | None]:
        """``(H, W, 3)`` uint8 RGB -> ``(1, 3, h, w)`` normalised float32 on ``device``, and the
        image's ``(top, left, height, width)`` inside it (None unless ``keep_ratio`` or
        ``base_size``)."""
        return self.prepare_batch([image])

    def prepare_batch(self, images: Sequence[np.ndarray]) -> tuple[Tensor, list[int] | None]:
        """``B`` ``(H, W, 3)`` uint8 RGB images of one size (a video's frames) -> ``(B, 3, h, w)``
        normalised float32 on ``device``, and their common box inside it (see :meth:`prepare`).

        On CUDA the uint8 batch is stacked into pinned host memory and copied without blocking
        (a pageable copy waits for the device's queue); it is normalised on the device.

        Raises:
            PredictError: no images, or images of different sizes.
        """
        if not images:
            raise PredictError("prepare_batch: no images")
        shapes = sorted({tuple(im.shape) for im in images})
        if len(shapes) > 1:
            raise PredictError(f"a batch of frames must share one size, got {shapes}")
        items = [self._transform({"image": im}) for im in images]
        first = items[0]["image"]  # (3, h, w) uint8
        pinned = self.device.type == "cuda"
        host = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=pinned)
        torch.stack([item["image"] for item in items], out=host)
        box = items[0].get("valid_box")
        x = normalize_image(host.to(self.device, non_blocking=pinned))
        return x, (box.tolist() if box is not None else None)

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
        """``(B, C, h, w)`` float32 scores of the prepared input ``x`` at the network's resolution.

        The network runs under bf16 autocast and in channels-last when ``bf16`` /
        ``channels_last`` are set (:func:`load_parser` sets both on CUDA); its scores are resized in
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
        return self.labels_batch([image])[0]

    @torch.inference_mode()
    def labels_batch(self, images: Sequence[np.ndarray]) -> Tensor:
        """``(B, H, W)`` int64 class ids of ``B`` RGB images of one size, on ``device``: one
        network pass over the batch, then :meth:`labels`' class-chunked arg-max
        (``argmax_chunk_elements // (B * H * W)`` classes at a time)."""
        x, box = self.prepare_batch(images)
        low = self._network_scores(x)  # (B, C, h, w)
        height, width = images[0].shape[:2]
        chunk = max(1, self.argmax_chunk_elements // (len(images) * height * width))
        best_score = best_id = None
        for start in range(0, low.shape[1], chunk):
            # (B, K, h, w) -> (B, K, H, W) for classes start .. start + K - 1
            up = scores_to_original(
                low[:, start : start + chunk],
                (height, width),
                valid_box=box,
                input_size=x.shape[-2:],
                align_corners=logits_align_corners(self.net),
            )
            ids = up.argmax(1, keepdim=True)  # (B, 1, H, W)
            score = up.gather(1, ids)[:, 0]
            if best_score is None:
                best_score, best_id = score, ids[:, 0] + start
                continue
            better = score > best_score  # strictly: an earlier class keeps a tie
            best_score = torch.where(better, score, best_score)
            best_id = torch.where(better, ids[:, 0] + start, best_id)
        return best_id

    def predict(
        self, image: np.ndarray, with_scores: bool = True
    ) -> tuple[np.ndarray, Tensor | None]:
        """``(H, W)`` class ids and the ``(C, H, W)`` scores of an ``(H, W, 3)`` RGB image (None
        without ``with_scores``: the ids then come from :meth:`labels`, class chunk by chunk).

        The ids are uint8 for up to 256 classes, uint16 beyond (:func:`ids_dtype`).
        """
        if not with_scores:
            return self.predict_batch([image])[0], None
        scores = self.scores(image)
        return self._host_ids(scores.argmax(0)[None])[0], scores

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The ``(H, W)`` class ids of each of ``B`` RGB images of one size (a video's frames),
        from one network pass (:meth:`labels_batch`): on a CPU the same ids as :meth:`predict` of
        each (on CUDA, cuDNN may pick other kernels for another batch size: the last bits of
        the scores, and so ids at near-ties, can differ)."""
        return self._host_ids(self.labels_batch(images))

    def _host_ids(self, labels: Tensor) -> list[np.ndarray]:
        """``(B, H, W)`` ids on the device -> ``B`` host arrays of :func:`ids_dtype`: narrowed on
        the device, then one copy (into pinned memory on CUDA)."""
        dtype = ids_dtype(self.num_classes)
        narrow = labels.to(torch.uint8 if dtype == np.uint8 else torch.int32)
        if self.device.type == "cuda":
            host = torch.empty(narrow.shape, dtype=narrow.dtype, pin_memory=True)
            host.copy_(narrow, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            # copies: an array kept by the caller must not hold page-locked memory
            return [a.astype(dtype) for a in host.numpy()]
        return [a.astype(dtype, copy=False) for a in narrow.cpu().numpy()]

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
        with atomic_path(path) as tmp:
            save_label_png(tmp, ids, palette)
        return
    ids = np.asarray(ids)
    if ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() >= MAX_CLASSES)):
        raise PredictError(f"{path}: expected (H, W) ids in 0..{MAX_CLASSES - 1}")
    image = Image.fromarray(ids.astype(np.uint16))  # uint16 (H, W) -> mode "I;16"
    if image.mode != "I;16":
        raise PredictError(f"{path}: Pillow made a {image.mode!r} image of uint16 ids")
    with atomic_path(path) as tmp:
        image.save(tmp)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:1`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"device={device}: CUDA is not available on this machine (use cpu)")
    return torch.device(device)


# ---------------------------------------------------------------------- from a checkpoint


@dataclass
class InferenceCheckpoint:
    """A checkpoint as inference reads it.

    Attributes:
        path: the file.
        config: the build config ``{"model", "eval", "data"}`` that rebuilds the network.
        lightning: the Lightning checkpoint (``state_dict`` of ``net.*`` and, after SCHP cycles,
            ``schp_net.*`` weights, ``hyper_parameters``, ``datamodule_hyper_parameters``);
            ``{"state_dict": {}}`` for a published file, whose weights are in ``official`` or
            ``mmseg``.
        official: a published SCHP state dict (mapped onto the network by :func:`build_net`).
        mmseg: an mmsegmentation state dict, idem.
    """

    path: Path
    config: dict[str, Any]
    lightning: dict[str, Any]
    official: dict[str, Tensor] | None = None
    mmseg: dict[str, Tensor] | None = None


def _conf_group(group: str, value: str | Mapping[str, Any]) -> dict[str, Any]:
    """A ``conf/<group>`` config, interpolations unresolved: by name, or as composed already."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=False)
    if isinstance(value, Mapping):
        return dict(value)
    from hydra.errors import HydraException

    from datamodules.cli import compose

    try:
        return OmegaConf.to_container(compose(None, [f"+{group}={value}"])[group], resolve=False)
    except HydraException as err:
        raise PredictError(f"{group}={value}: {err}") from err


def conf_build_config(
    model: str | Mapping[str, Any] | None, data: str | Mapping[str, Any] | None
) -> dict[str, Any]:
    """The build config of a checkpoint that does not record one, from conf/ groups.

    Args:
        model: a conf/model name or a composed model config (a command's ``cfg.model``).
        data: a conf/data name or config, reduced to :data:`INFERENCE_DATA_KEYS`.

    Raises:
        CheckpointError: ``model`` or ``data`` missing.
    """
    from omegaconf import OmegaConf

    if not model or not data:
        raise CheckpointError(
            "this checkpoint does not say how its network was built (it predates the "
            "'rimlab_config' entry): pass model=<conf/model name> data=<conf/data name>, e.g. "
            "model=pspnet_r101 data=lip"
        )
    cfg = OmegaConf.create(
        {
            "model": _conf_group("model", model),
            "data": _conf_group("data", data),
            "paths": {"data_dir": "."},
        }
    )
    data_cfg = {k: cfg.data.get(k) for k in INFERENCE_DATA_KEYS if k in cfg.data}
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "eval": None,
        "data": OmegaConf.to_container(OmegaConf.create(data_cfg), resolve=True),
    }


def read_inference_checkpoint(
    ckpt: str | os.PathLike,
    model: str | Mapping[str, Any] | None = None,
    data: str | Mapping[str, Any] | None = None,
) -> InferenceCheckpoint:
    """Reads a checkpoint and says which network and data it was trained with.

    Args:
        ckpt: a Lightning checkpoint of a rimlab run (its ``rimlab_config``), a published SCHP
            ``.pth`` (``model=ce2p_r101_schp`` unless ``model`` says otherwise; the data config
            its class count names: 20 ``lip``, 18 ``atr``, 7 ``pascal_person_part``, unless
            ``data`` does) or an mmsegmentation checkpoint (the ``<net>_r<depth>_mmseg`` config
            of its decode head and depth unless ``model`` says otherwise; 19 classes:
            ``cityscapes`` unless ``data`` says otherwise).
        model: conf/model name or config for checkpoints without ``rimlab_config``.
        data: conf/data name or config, idem.

    Raises:
        CheckpointError: missing or unreadable file, not a checkpoint of a known kind.
        PredictError: a published file whose data (or model) must be named.
    """
    path = Path(ckpt)
    # weights_only: a checkpoint from elsewhere cannot run code; rimlab's hold plain values.
    checkpoint = read_checkpoint(path)
    official = official_weights.official_state_dict(checkpoint)
    mmseg = mmseg_weights.mmseg_state_dict(checkpoint) if official is None else None
    if official is not None:
        # the shapes are checked against the data config when mapping
        num = official_weights.official_num_classes(official)
        data = data or official_weights.DATASET_BY_CLASSES.get(num)
        if data is None:
            raise PredictError(f"{path}: a {num}-class SCHP checkpoint: say data=<conf/data name>")
        config = conf_build_config(model or "ce2p_r101_schp", data)
    elif mmseg is not None:
        model = model or mmseg_weights.mmseg_model_config(mmseg)
        num = mmseg_weights.mmseg_num_classes(mmseg)
        data = data or ("cityscapes" if num == 19 else None)
        if model is None or data is None:
            raise PredictError(
                f"{path}: an mmsegmentation checkpoint ({num} classes): say model=<conf/model "
                "name, e.g. pspnet_r50_mmseg> data=<conf/data name>"
            )
        config = conf_build_config(model, data)
    elif not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    else:
        config = checkpoint.get("rimlab_config") or conf_build_config(model, data)
        return InferenceCheckpoint(path, config, checkpoint)
    return InferenceCheckpoint(path, config, {"state_dict": {}}, official, mmseg)


def weights_prefix(state: Mapping[str, Tensor], weights: str, path: Path) -> str:
    """The state-dict prefix of the weights to run: ``schp_net.`` (the self-corrected average
    of a SCHP run) or ``net.`` (the trained net).

    Args:
        state: the Lightning state dict.
        weights: ``net``, ``schp``, or ``auto`` (``schp`` when the checkpoint has an average).
        path: the checkpoint, for messages.

    Raises:
        PredictError: an unknown choice, or ``schp`` without an average.
    """
    has_schp = (
        any(k.startswith("schp_net.") for k in state)
        and int(state.get("schp_cycles", torch.zeros(())).item()) > 0
    )
    if weights not in ("auto", "net", "schp"):
        raise PredictError(f"weights={weights!r}: expected auto, net or schp")
    if weights == "schp" and not has_schp:
        raise PredictError(f"{path}: weights=schp but the checkpoint has no SCHP average yet")
    return "schp_net." if (weights == "schp" or (weights == "auto" and has_schp)) else "net."


def build_net(ckpt: InferenceCheckpoint, weights: str = "auto") -> tuple[nn.Module, str]:
    """The checkpoint's network on the CPU with the chosen weights, and their prefix
    (:func:`weights_prefix`; a published file's mapped weights are ``net.``).

    Raises:
        CheckpointError: weights that do not fit the rebuilt network.
    """
    import hydra

    model_cfg = dict(ckpt.config["model"])
    if "pretrained" in model_cfg:
        # The checkpoint holds every weight: ImageNet files need not be in the hub cache.
        model_cfg["pretrained"] = False
    net = hydra.utils.instantiate(model_cfg)
    if ckpt.official is not None:
        mapped = official_weights.map_official_state(ckpt.official, net, ckpt.path)
        state = {f"net.{k}": v for k, v in mapped.items()}
    elif ckpt.mmseg is not None:
        mapped = mmseg_weights.map_mmseg_state(ckpt.mmseg, net, ckpt.path)
        state = {f"net.{k}": v for k, v in mapped.items()}
    else:
        state = ckpt.lightning["state_dict"]
    prefix = weights_prefix(state, weights, ckpt.path)
    net_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(net_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{ckpt.path}: the weights do not fit the rebuilt network "
            f"({str(err).splitlines()[0]} ...)"
        ) from err
    return net, prefix


def input_geometry(
    data_cfg: Mapping[str, Any], size: Sequence[int] | str | None = "checkpoint"
) -> tuple[tuple[int, int] | None, int | None, str]:
    """The network input: ``(eval_size, base_size, base_side)`` for :class:`Parser`.

    Args:
        data_cfg: the build config's ``data``.
        size: ``"checkpoint"``: the input validation used (``datamodules.transforms.eval_input``:
            ``data.eval_size``, else the ``data.base_size`` fit, else ``data.crop_size`` or, for
            full-resolution datasets, each image's own size; checkpoints from before the scale
            protocol have no ``base_size``); None or ``"original"``: each image's own; else
            ``(h, w)``.

    Raises:
        PredictError: an unusable ``base_size`` / ``base_side``.
    """
    if size != "checkpoint":
        eval_size = None if size in (None, "original") else tuple(int(v) for v in size)
        return eval_size, None, "long"
    try:
        base, base_side = check_base_resize(
            data_cfg.get("base_size"), data_cfg.get("base_side") or "long"
        )
    except ValueError as err:
        raise PredictError(str(err)) from err
    eval_size, base_size = eval_input(
        data_cfg.get("eval_size"),
        data_cfg.get("crop_size"),
        base,
        bool(data_cfg.get("full_resolution_eval")),
    )
    return eval_size, base_size, base_side


def keep_ratio_of(ckpt: InferenceCheckpoint, keep_ratio: bool | str | None = "checkpoint") -> bool:
    """Whether to letterbox images into the input size (aspect ratio kept, black padding, scores
    cropped back).

    ``"checkpoint"`` or None: as validation did, ``data.eval_keep_ratio`` of the build config
    (``ParsingLitModule`` adds it when saving), else of the datamodule's hyper-parameters that
    Lightning saves (``datamodule_hyper_parameters``), else false.

    Raises:
        PredictError: neither a bool nor ``"checkpoint"``.
    """
    if keep_ratio not in ("checkpoint", None):
        if not isinstance(keep_ratio, bool):
            raise PredictError(f"keep_ratio={keep_ratio!r}: expected true or false")
        return keep_ratio
    data_cfg = ckpt.config.get("data") or {}
    if data_cfg.get("eval_keep_ratio") is not None:
        return bool(data_cfg["eval_keep_ratio"])
    datamodule = ckpt.lightning.get("datamodule_hyper_parameters") or {}
    return bool(datamodule.get("eval_keep_ratio", False))


def class_info(ckpt: InferenceCheckpoint) -> tuple[int, list[str], np.ndarray]:
    """``(C, C class names, (C, 3) uint8 RGB palette)`` of the build config's data (else the
    module's hyper-parameters; names ``"0"``, ``"1"``, ... and the PASCAL-VOC colours when the
    checkpoint has none).

    Raises:
        PredictError: more classes than a class-id PNG holds (:func:`ids_dtype`).
    """
    data_cfg = ckpt.config.get("data") or {}
    hparams = ckpt.lightning.get("hyper_parameters") or {}
    num_classes = int(data_cfg.get("num_classes") or hparams.get("num_classes"))
    names = data_cfg.get("class_names") or hparams.get("class_names")
    names = list(names) if names else [str(i) for i in range(num_classes)]
    palette = data_cfg.get("palette")
    palette = (
        np.asarray(palette, dtype=np.uint8) if palette is not None else make_palette(num_classes)
    )
    ids_dtype(num_classes)  # fails now, not after the first image, beyond 65536 classes
    return num_classes, names, palette


def dataset_id_writer(
    data_cfg: Mapping[str, Any], prediction_format: str = "class_ids"
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """None for ``class_ids``; for ``dataset_ids``, the training datamodule's
    ``to_dataset_ids``: ``(H, W)`` class ids -> ``(dataset ids, palette)`` (Cityscapes:
    labelIds with the official colours).

    Raises:
        PredictError: an unknown format, or a dataset without ids of its own.
    """
    import hydra

    if prediction_format == "class_ids":
        return None
    if prediction_format != "dataset_ids":
        raise PredictError(f"prediction_format={prediction_format}: use class_ids or dataset_ids")
    target = data_cfg.get("datamodule")
    cls = hydra.utils.get_class(str(target)) if target else None
    dataset_ids = getattr(cls, "to_dataset_ids", None)
    if dataset_ids is None:
        raise PredictError(
            f"prediction_format=dataset_ids: {target or 'this checkpoint'}'s dataset has no ids "
            "of its own beyond the class ids (or the checkpoint predates the key)"
        )
    return dataset_ids


def eval_protocol(
    config: Mapping[str, Any],
    protocol: str | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> InferenceProtocol | None:
    """The inference protocol: a conf/eval one (or the checkpoint's), plus overrides.

    Args:
        config: the checkpoint's build config (its ``data`` resolves ``${data.*}``).
        protocol: a conf/eval name (``default``, ``flip``, ``ms_flip``, ``slide``,
            ``schp_official``: its inference part, with rimlab's input geometry), a composed
            eval config, or None for the protocol the checkpoint was validated with.
        overrides: ``{"flip": True, ...}`` set on top (on ``conf/eval/default.yaml`` when the
            checkpoint has no protocol).

    Returns:
        An ``InferenceProtocol``, or None for one plain forward pass.
    """
    import hydra
    from omegaconf import OmegaConf

    if protocol is not None:
        eval_cfg = _conf_group("eval", protocol)
    elif config.get("eval"):
        eval_cfg = dict(config["eval"])
    elif overrides:
        eval_cfg = _conf_group("eval", "default")
    else:
        return None
    data = dict(config.get("data") or {})
    data.setdefault("flip_pairs", [])
    root = OmegaConf.create({"data": data, "eval": eval_cfg})
    for key, value in (overrides or {}).items():
        OmegaConf.update(root, f"eval.{key}", value, merge=False, force_add=True)
    return hydra.utils.instantiate(OmegaConf.to_container(root, resolve=True)["eval"])


def load_parser(
    ckpt: str | os.PathLike,
    device: str | torch.device = "cpu",
    eval_config: str | Mapping[str, Any] | None = None,
    eval_overrides: Mapping[str, Any] | None = None,
    size: Sequence[int] | str | None = "checkpoint",
    weights: str = "auto",
    model: str | Mapping[str, Any] | None = None,
    data: str | Mapping[str, Any] | None = None,
    keep_ratio: bool | str | None = "checkpoint",
    prediction_format: str = "class_ids",
) -> Parser:
    """Rebuilds the net of a checkpoint for inference (the steps: the module docstring).

    Args:
        ckpt: a rimlab Lightning checkpoint, a published SCHP ``.pth`` or an mmsegmentation
            checkpoint (:func:`read_inference_checkpoint`).
        device: ``cpu``, ``cuda``, ``auto`` or a ``torch.device``; on CUDA the network runs
            channels-last under bf16 autocast.
        eval_config, eval_overrides: the protocol (:func:`eval_protocol`); None: the
            checkpoint's.
        size: network input (:func:`input_geometry`).
        weights: ``auto``, ``net`` or ``schp`` (:func:`weights_prefix`).
        model, data: conf/ names or configs, for checkpoints without ``rimlab_config``.
        keep_ratio: letterbox into the input size (:func:`keep_ratio_of`).
        prediction_format: ``class_ids`` or ``dataset_ids`` (:func:`dataset_id_writer`).

    Raises:
        CheckpointError: missing file, not a rimlab checkpoint, no build config, or weights that
            do not fit the net.
        PredictError: an argument that cannot work (device, weights, size, format).
    """
    checkpoint = read_inference_checkpoint(ckpt, model, data)
    net, prefix = build_net(checkpoint, weights)
    device = device if isinstance(device, torch.device) else pick_device(device)
    net.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:  # weights and inputs channels-last, under bf16 autocast (CPU runs stay float32)
        net.to(memory_format=torch.channels_last)
    data_cfg = checkpoint.config.get("data") or {}
    try:
        eval_size, base_size, base_side = input_geometry(data_cfg, size)
    except PredictError as err:
        raise PredictError(f"{checkpoint.path}: {err}") from err
    keep = keep_ratio_of(checkpoint, keep_ratio)
    num_classes, names, palette = class_info(checkpoint)
    log.info(
        "loaded %s (%s weights, %d classes) on %s",
        checkpoint.path,
        prefix[:-1],
        num_classes,
        device,
    )
    if num_classes > MAX_PALETTE_CLASSES:
        log.info(
            "%d classes do not fit an 8-bit palette PNG: class ids are written as 16-bit "
            "greyscale PNGs (mode I;16, no colours; see the overlay images for colours)",
            num_classes,
        )
    return Parser(
        net=net,
        num_classes=num_classes,
        class_names=names,
        palette=palette,
        flip_pairs=[list(p) for p in data_cfg.get("flip_pairs") or []],
        eval_size=eval_size,
        keep_ratio=keep,
        base_size=base_size,
        base_side=base_side,
        inference=eval_protocol(checkpoint.config, eval_config, eval_overrides),
        device=device,
        config=checkpoint.config,
        dataset_ids=dataset_id_writer(data_cfg, prediction_format),
        bf16=cuda,
        channels_last=cuda,
    )
