"""Box prompt: an image and boxes in, one mask per box (PNG) and an overlay out, with a trained Deep-MAC.

Usage (boxes are xyxy in image pixels; the options are ``conf/box_prompt.yaml``, ``--help`` lists
them, composed by Hydra as ``run.py``'s are, :mod:`datamodules.cli`)::

    python -m experiments.box_prompt ckpt=logs/.../final.ckpt image=street.jpg \\
        'boxes=[[10,20,200,380],[220,40,300,260]]' output=out/
    python -m experiments.box_prompt ckpt=... image=... boxes_json=boxes.json output=out/ device=cuda

``boxes_json`` holds ``[[x1, y1, x2, y2], ...]`` or ``{"boxes": [...]}``. Writes
``output/mask_<k>.png`` (0/255, image size), ``output/overlay.png`` and ``output/masks.json`` (box,
mask area). ``device``: ``auto`` (GPU when there is one), ``cpu`` or ``cuda``; ``threshold`` (0.5):
mask probability cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from datamodules.cli import command
from datamodules.errors import ConfigError
from datamodules.files import atomic_path, write_json
from datamodules.instances import InstanceTransform, network_images, save_mask_png
from experiments.predict import read_rgb
from lightning_modules.checkpoint_io import CheckpointError, read_checkpoint
from lightning_modules.nets.deepmac import paste_masks
from lightning_modules.parser import pick_device

_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    np.uint8,
)  # fmt: skip


def load_deepmac(ckpt: str | Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The trained net of a Deep-MAC checkpoint and its network-frame side."""
    import hydra

    state = read_checkpoint(ckpt)
    build = state.get("build_config") if isinstance(state, dict) else None
    if build is None:
        raise CheckpointError(f"{ckpt} has no build_config: it was not written by a Deep-MAC run")
    net = hydra.utils.instantiate({**build["model"], "pretrained": False})
    weights = {k[len("net.") :]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return net.to(device).eval(), int(build["data"]["image_size"])


def read_boxes(boxes: Any = None, boxes_json: str | None = None) -> np.ndarray:
    """``(N, 4)`` float32 boxes from a nested list or a JSON file; checks x2 > x1 and y2 > y1.

    Raises:
        ConfigError: no boxes, an unreadable file, or a box with x2 <= x1 or y2 <= y1.
    """
    if boxes_json:
        try:
            data = json.loads(Path(boxes_json).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"boxes_json={boxes_json}: not a readable JSON file ({err})") from err
        boxes = data["boxes"] if isinstance(data, dict) else data
    if boxes is None:
        raise ConfigError("give boxes=[[x1,y1,x2,y2],...] or boxes_json=<file>")
    arr = np.asarray(boxes, np.float32).reshape(-1, 4)
    if ((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])).any():
        raise ConfigError(f"boxes must be x1,y1,x2,y2 with x2 > x1 and y2 > y1: {arr.tolist()}")
    return arr


def overlay(
    image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """The image with each mask tinted in its colour and its box outlined."""
    out = image.astype(np.float32)
    for k, m in enumerate(masks):
        c = _COLOURS[k % len(_COLOURS)].astype(np.float32)
        out[m > 0] = (1 - alpha) * out[m > 0] + alpha * c
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for k, b in enumerate(boxes):
        draw.rectangle(
            [b[0], b[1], b[2] - 1, b[3] - 1],
            outline=tuple(int(v) for v in _COLOURS[k % len(_COLOURS)]),
        )
    return pil


@torch.no_grad()
def box_prompt(
    ckpt: str | Path,
    image: str | Path,
    boxes: np.ndarray,
    output: str | Path,
    device: str = "auto",
    threshold: float = 0.5,
) -> np.ndarray:
    """Segments ``boxes`` of ``image`` and writes the PNGs; returns ``(N, H, W)`` uint8 masks."""
    dev = pick_device(device)
    net, size = load_deepmac(ckpt, dev)
    rgb = np.array(read_rgb(Path(image)))
    h, w = rgb.shape[:2]
    item = {
        "image": rgb,
        "masks": np.zeros((0, h, w), np.uint8),
        "boxes": boxes,
        "labels": np.zeros(len(boxes)),
    }
    x = InstanceTransform(size, train=False)(item)
    image_in = network_images(x["image"][None].to(dev), x["size"][None])
    logits = net(image_in, [x["boxes"].to(dev)])["mask_logits"]  # (N, M, M)
    probs = paste_masks(logits, torch.from_numpy(boxes).to(dev), (h, w))  # (N, H, W)
    masks = (probs >= threshold).to(torch.uint8).cpu().numpy()
    out = Path(output)
    for k, m in enumerate(masks):
        with atomic_path(out / f"mask_{k:02d}.png") as tmp:
            save_mask_png(tmp, m)
    with atomic_path(out / "overlay.png") as tmp:
        overlay(rgb, masks, boxes).save(tmp)
    summary = [{"box": b.tolist(), "area": int(m.sum())} for b, m in zip(boxes, masks, strict=True)]
    write_json(out / "masks.json", {"image": str(image), "masks": summary}, indent=1)
    return masks


def box_prompt_command(cfg: DictConfig) -> np.ndarray:
    """The command on a composed ``conf/box_prompt.yaml``; returns the ``(N, H, W)`` masks."""
    args = OmegaConf.to_container(cfg, resolve=True)
    for key in ("ckpt", "image", "output"):
        if OmegaConf.is_missing(cfg, key) or not args[key]:
            raise ConfigError(f"missing {key}=... (python -m experiments.box_prompt --help)")
    boxes = read_boxes(args["boxes"], args["boxes_json"])
    masks = box_prompt(
        args["ckpt"],
        args["image"],
        boxes,
        args["output"],
        str(args["device"] or "auto"),
        float(args["threshold"]),
    )
    print(f"{len(masks)} mask(s) written to {args['output']}")
    return masks


main = command("box_prompt", box_prompt_command)

if __name__ == "__main__":
    main()
