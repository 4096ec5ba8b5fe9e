"""Parse images, folders, videos or a camera stream with any rimlab parsing checkpoint.

    python -m experiments.predict ckpt=<file.ckpt> input=<image|folder|video|camera index> \\
        output=<dir> [device=auto|cpu|cuda] [save_logits=true] [eval=flip] \\
        [size=original|[h,w]] [keep_ratio=true|false] [weights=auto|net|schp] [alpha=0.5] \\
        [show=auto|true|false] [max_frames=N] [save_frames=true] \\
        [prediction_format=class_ids|dataset_ids]

The options are ``conf/predict.yaml`` (``--help`` lists them), composed by Hydra as ``run.py``'s
are (:mod:`datamodules.cli`). Per image: ``<name>.png`` (class ids as a palette PNG at the
original size, the format SCHP's ``simple_extractor.py`` writes; a 16-bit grey PNG for label sets
of more than 256 classes), ``<name>_overlay.jpg`` (colours blended on the photo) and, with
``save_logits=true``, ``<name>_logits.npy`` (``(C, H, W)`` float32 scores at the original size).
A video file gives ``<name>_parsing.mp4`` (the overlay per frame); a camera index shows a live
window when a display exists, and writes ``camera<idx>_parsing.mp4`` otherwise. Frames per
second are reported for videos and cameras.

The network is rebuilt from the checkpoint alone (``rimlab_config``; the library is
:mod:`lightning_modules.parser`). Checkpoints without it need ``model=<conf/model name>
data=<conf/data name>`` to say what was trained.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from datamodules.cli import command
from datamodules.files import atomic_path
from lightning_modules.parser import Parser, PredictError, load_parser

log = logging.getLogger("rimlab.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


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
    parser.write_ids(stem.with_name(stem.name + ".png"), ids)
    overlay = parser.overlay(image, ids, alpha)
    with atomic_path(stem.with_name(stem.name + "_overlay.jpg")) as tmp:
        Image.fromarray(overlay).save(tmp, quality=92)
    if save_logits:
        with atomic_path(stem.with_name(stem.name + "_logits.npy")) as tmp:
            np.save(tmp, scores.cpu().numpy().astype(np.float32))
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


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """``frames`` in lists of up to ``size`` frames of one shape (a stream whose resolution
    changes starts a new list there)."""
    batch: list[np.ndarray] = []
    for frame in frames:
        if batch and frame.shape != batch[0].shape:
            yield batch
            batch = []
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


#: ``batch_frames=auto`` on CUDA: this many frames of up to 1920x1080 per pass, fewer when larger.
AUTO_BATCH_FRAMES, AUTO_BATCH_PIXELS = 8, 8 * 1920 * 1080


def frame_batch_size(
    batch_frames: int | str | None, device: torch.device, live: bool, pixels: int = 0
) -> int:
    """Frames per network pass: ``batch_frames``, or for ``auto`` / None on CUDA 8 frames of up
    to 1920x1080 (``pixels`` per frame; fewer for larger frames, whose activations grow with
    them), and 1 on a CPU or for a live stream (a camera, a window: a batch would delay every
    frame by the others). A batch spreads the per-pass launch and transfer overheads over its
    frames.

    Raises:
        PredictError: not a positive integer or ``auto``.
    """
    if batch_frames in (None, "auto"):
        if device.type != "cuda" or live:
            return 1
        return max(1, min(AUTO_BATCH_FRAMES, AUTO_BATCH_PIXELS // max(1, pixels)))
    try:
        size = int(batch_frames)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(size) != str(batch_frames).strip():
        raise PredictError(f"batch_frames={batch_frames!r}: expected a positive integer or auto")
    return size


def _video_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """An mp4v writer of ``size`` ``(h, w)`` frames (the video grows frame by frame, so it is
    written in place: a stream stopped by Ctrl-C keeps what it parsed)."""
    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
    writer = cv2.VideoWriter(str(path), fourcc, fps, (size[1], size[0]))
    if not writer.isOpened():
        raise PredictError(f"cannot write {path} (no mp4v encoder?)")
    return writer


def _show(overlay: np.ndarray, name: str, fps: float) -> bool:
    """Shows a BGR overlay frame with its frames per second; True when ``q`` or Esc was pressed."""
    cv2.putText(overlay, f"{fps:.1f} fps", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255,) * 3, 2)
    cv2.imshow(f"rimlab parsing: {name}", overlay)
    return cv2.waitKey(1) & 0xFF in (ord("q"), 27)


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
    batch_frames: int | str | None = 1,
) -> dict[str, Any]:
    """Parses a video file or camera stream, ``batch_frames`` frames per network pass.

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
        batch_frames: frames per network pass (``Parser.predict_batch``), or ``auto``
            (:func:`frame_batch_size` from the device, ``show`` and the stream's frame size).

    Returns:
        ``{"frames": n, "fps": parsing frames per second, "video": path or None}``.
    """
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else f"video {source}"
        raise PredictError(f"cannot open {what}")
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    source_fps = source_fps if source_fps and np.isfinite(source_fps) and source_fps > 0 else 25.0
    pixels = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) * capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    live = show or isinstance(source, int)
    try:
        batch_frames = frame_batch_size(batch_frames, parser.device, live, pixels)
    except PredictError:
        capture.release()
        raise
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
        stop = False
        for batch in _batches(_frames(capture, max_frames), batch_frames):
            start = time.perf_counter()
            # the ids reach the host in one copy, which waits for the device: no sync is missing
            batch_ids = parser.predict_batch(batch)
            elapsed += time.perf_counter() - start
            for frame, ids in zip(batch, batch_ids, strict=True):
                frames += 1
                overlay = cv2.cvtColor(parser.overlay(frame, ids, alpha), cv2.COLOR_RGB2BGR)
                if save_frames:
                    parser.write_ids(output / name / f"{frames - 1:06d}.png", ids)
                if video_path is not None:
                    writer = writer or _video_writer(video_path, source_fps, overlay.shape[:2])
                    writer.write(overlay)
                if show and _show(overlay, name, frames / elapsed if elapsed > 0 else 0.0):
                    stop = True
                    break
            if stop:
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


def options(cfg: DictConfig, required: tuple[str, ...]) -> dict[str, Any]:
    """A command's composed ``cfg`` as plain values, with the conf/ groups it chose.

    ``model`` / ``data`` are the composed configs of the groups chosen (None when unset);
    ``eval_config`` is the chosen ``eval`` group, else ``eval_overrides`` holds the
    ``+eval.<key>=<value>`` values for the checkpoint's own protocol.

    Raises:
        PredictError: a required key without a value, or ``+model.<key>=`` / ``+data.<key>=``
            without ``model=`` / ``data=``.
    """
    from hydra.core.hydra_config import HydraConfig

    for key in required:
        if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise PredictError(f"missing {key}=...")
    groups = ("model", "data", "eval")
    # the groups stay configs: their ${data.*} interpolations resolve against the checkpoint's
    args: dict[str, Any] = {}
    for key in (k for k in cfg if k not in groups):
        value = None if OmegaConf.is_missing(cfg, key) else cfg[key]
        args[key] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    chosen = {g: cfg.get(g) if HydraConfig.get().runtime.choices.get(g) else None for g in groups}
    for group in ("model", "data"):
        given = cfg.get(group)
        if chosen[group] is None and given:
            # Without a chosen group the keys would have nothing to override and be dropped.
            keys = ", ".join(f"{group}.{k}" for k in given)
            raise PredictError(
                f"{keys} given without {group}=<conf/{group} name>: name the group whose keys "
                f"they override (e.g. {group}=<name> {group}.<key>=<value>)"
            )
    args |= {"model": chosen["model"], "data": chosen["data"], "eval_config": chosen["eval"]}
    unchosen_eval = chosen["eval"] is None and cfg.get("eval") is not None
    args["eval_overrides"] = OmegaConf.to_container(cfg.eval) if unchosen_eval else None
    return args


def _predict_folder(parser: Parser, folder: Path, output: Path, args: dict[str, Any]) -> dict:
    """Every image below ``folder`` into the same tree below ``output``; unreadable files are
    skipped with a warning and listed."""
    from tqdm import tqdm

    files = list_images(folder)
    if not files:
        raise PredictError(f"{folder}: no image files ({sorted(IMAGE_SUFFIXES)})")
    failed = []
    for file in tqdm(files, desc="parsing", unit="img"):
        try:
            image = read_rgb(file)
        except PredictError as err:
            log.warning("skipped: %s", err)
            failed.append(str(file))
            continue
        stem = output / file.relative_to(folder).with_suffix("")
        predict_image(parser, image, stem, bool(args["save_logits"]), float(args["alpha"]))
    return {"images": len(files) - len(failed), "failed": failed}


def _predict_source(parser: Parser, source: str, output: Path, args: dict[str, Any]) -> dict:
    """Dispatches ``input``: a camera index, a folder, a video file or one image."""
    stream = {
        "max_frames": args["max_frames"],
        "save_frames": bool(args["save_frames"]),
        "alpha": float(args["alpha"]),
    }
    batch_frames = args.get("batch_frames", "auto")
    show_arg = args["show"]
    if source.isdigit():  # a camera index
        show = has_display() if show_arg == "auto" else bool(show_arg)
        if not show:
            log.info("no display: writing the camera stream to %s instead of a window", output)
        name = f"camera{source}"
        return predict_stream(
            parser, int(source), output, name, show, not show, batch_frames=batch_frames, **stream
        )
    path = Path(source)
    if not path.exists():
        raise PredictError(f"input not found: {path}")
    if path.is_dir():
        return _predict_folder(parser, path, output, args)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        show = bool(show_arg) if show_arg != "auto" else False
        return predict_stream(
            parser, str(path), output, path.stem, show, True, batch_frames=batch_frames, **stream
        )
    image = read_rgb(path)
    predict_image(
        parser, image, output / path.stem, bool(args["save_logits"]), float(args["alpha"])
    )
    return {"images": 1}


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The command on a composed ``conf/predict.yaml``; returns a summary (files written,
    frames per second)."""
    args = options(cfg, ("ckpt", "input", "output"))
    parser = load_parser(
        str(args["ckpt"]),
        device=str(args["device"] or "auto"),
        eval_config=args["eval_config"],
        eval_overrides=args["eval_overrides"],
        size=args["size"],
        weights=str(args["weights"] or "auto"),
        model=args["model"],
        data=args["data"],
        keep_ratio=args["keep_ratio"],
        prediction_format=str(args["prediction_format"] or "class_ids"),
    )
    output = Path(str(args["output"]))
    output.mkdir(parents=True, exist_ok=True)
    summary = {"output": str(output)} | _predict_source(parser, str(args["input"]), output, args)
    if "fps" in summary:
        print(f"{summary['frames']} frames at {summary['fps']:.2f} frames/s -> {summary['video']}")
    else:
        print(f"{summary['images']} image(s) parsed -> {output}")
    return summary


main = command("predict", predict)

if __name__ == "__main__":
    main()
