"""Box prompt: an image and boxes in, one mask per box (PNG) and an overlay out, with a trained Deep-MAC.

Usage (key=value arguments; boxes are xyxy in image pixels)::

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
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from datamodules.instances import InstanceTransform, save_mask_png
from lightning_modules.nets.deepmac import paste_masks

_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    np.uint8,
)  # fmt: skip


def load_deepmac(ckpt: str | Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The trained net of a Deep-MAC checkpoint and its network-frame side."""
    import hydra

    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    build = state.get("build_config")
    if build is None:
        raise ValueError(f"{ckpt} has no build_config: it was not written by a Deep-MAC run")
    net = hydra.utils.instantiate({**build["model"], "pretrained": False})
    weights = {k[len("net.") :]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return net.to(device).eval(), int(build["data"]["image_size"])


def read_boxes(boxes: Any = None, boxes_json: str | None = None) -> np.ndarray:
    """``(N, 4)`` float32 boxes from a nested list or a JSON file; checks x2 > x1 and y2 > y1."""
    if boxes_json:
        data = json.loads(Path(boxes_json).read_text())
        boxes = data["boxes"] if isinstance(data, dict) else data
    if boxes is None:
        raise ValueError("give boxes=[[x1,y1,x2,y2],...] or boxes_json=<file>")
    arr = np.asarray(boxes, np.float32).reshape(-1, 4)
    if ((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])).any():
        raise ValueError(f"boxes must be x1,y1,x2,y2 with x2 > x1 and y2 > y1: {arr.tolist()}")
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
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    net, size = load_deepmac(ckpt, dev)
    rgb = np.array(Image.open(image).convert("RGB"))
    h, w = rgb.shape[:2]
    item = {
        "image": rgb,
        "masks": np.zeros((0, h, w), np.uint8),
        "boxes": boxes,
        "labels": np.zeros(len(boxes)),
    }
    x = InstanceTransform(size, train=False)(item)
    logits = net(x["image"][None].to(dev), [x["boxes"].to(dev)])["mask_logits"]  # (N, M, M)
    probs = paste_masks(logits, torch.from_numpy(boxes).to(dev), (h, w))  # (N, H, W)
    masks = (probs >= threshold).to(torch.uint8).cpu().numpy()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(masks):
        save_mask_png(out / f"mask_{k:02d}.png", m)
    overlay(rgb, masks, boxes).save(out / "overlay.png")
    summary = [{"box": b.tolist(), "area": int(m.sum())} for b, m in zip(boxes, masks, strict=True)]
    (out / "masks.json").write_text(json.dumps({"image": str(image), "masks": summary}, indent=1))
    return masks


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    args = OmegaConf.to_container(
        OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    )
    for key in ("ckpt", "image", "output"):
        if not args.get(key):
            raise SystemExit(f"missing {key}=...\n{__doc__}")
    boxes = read_boxes(args.get("boxes"), args.get("boxes_json"))
    masks = box_prompt(
        args["ckpt"],
        args["image"],
        boxes,
        args["output"],
        str(args.get("device", "auto")),
        float(args.get("threshold", 0.5)),
    )
    print(f"{len(masks)} mask(s) written to {args['output']}")


if __name__ == "__main__":
    main()
