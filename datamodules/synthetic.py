"""A procedurally generated miniature of LV-MHP-v2, written in the real on-disk layout.

The set is small enough to train a ResNet-18 PSPNet on a laptop CPU in minutes, yet keeps the traits
that make human parsing hard, so losses and samplers aimed at them have something to act on:

- 2-4 persons per image that overlap. Each per-person PNG holds that person's *full* body, also where
  a later person hides it, so the loader's merge rule (later person wins) decides the visible label,
  exactly as the image was painted.
- Frequent classes (face, hair, tops, pants, arms, legs) next to rare, tiny ones (watch, sunglasses,
  tie, glove, scarf): the pixel frequency ratio exceeds 100:1.
- Left/right parts (arms 5/6, hands 7/8, legs 30/31, shoes 24/25) that look identical. Only context
  tells them apart: a front-facing person (face with eyes and mouth) has their left side on the
  image's right; a back-facing person (head all hair, maybe a backpack) has it on the image's left.
- Look-alike garments: tee (12) and polo (13) share one colour distribution and differ only by a
  small collar patch and buttons.
- Textured backgrounds with distractor shapes, random colours per person, sensor noise, and image
  sizes that vary around ``image_size`` (so evaluation at original resolution is exercised).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SYNTHETIC_VERSION = 1
MARKER_NAME = ".synthetic_complete.json"

# MHP class ids used by the generator (names in datamodules.mhp.MHP_CLASSES).
BACKGROUND, HAT, FACE, HAIR = 0, 1, 3, 4
ARM, HAND, LEG, SHOE = (5, 6), (7, 8), (30, 31), (24, 25)  # (person's left, person's right)
JACKET, TEE, POLO, SWEATER, SINGLET, TORSO_SKIN = 11, 12, 13, 14, 15, 16
PANTS, SHORTS, SKIRT, DRESS = 17, 18, 19, 35
BACKPACK, BELT, SUNGLASSES, GLOVE, SCARF, WATCH, TIE = 40, 43, 47, 49, 50, 53, 55
RARE_CLASSES = (SUNGLASSES, GLOVE, SCARF, WATCH, TIE)

Region = tuple[slice, slice, np.ndarray]  # (rows, cols, bool mask over that window)


def ensure_synthetic_mhp(
    root: str | Path,
    num_train: int = 240,
    num_val: int = 60,
    num_test: int = 20,
    image_size: tuple[int, int] | list[int] = (112, 112),
    size_jitter: int = 16,
    seed: int = 0,
    test_labels: bool = False,
) -> Path:
    """Generate the synthetic set under ``root`` unless an identical one is already there.

    Generation happens in a temporary sibling folder that is renamed into place only when complete,
    so an interrupted run never leaves a half set; the marker file records the parameters.

    Args:
        root: target folder (laid out like ``LV-MHP-v2``).
        num_train, num_val, num_test: images per split.
        image_size: mean ``(H, W)``; each image's sides vary by up to ``size_jitter`` pixels.
        size_jitter: maximum deviation of each side from ``image_size``.
        seed: generation seed; same parameters give byte-identical files.
        test_labels: also write ``test/parsing_annos`` (the real test split has none).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    params: dict[str, Any] = {
        "version": SYNTHETIC_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": [int(v) for v in image_size],
        "size_jitter": int(size_jitter),
        "seed": int(seed),
        "test_labels": bool(test_labels),
    }
    if _marker_matches(root, params):
        return root
    if root.exists() and not (root / MARKER_NAME).is_file() and any(root.iterdir()):
        # Never delete a folder we did not generate (it may be a real dataset).
        raise FileExistsError(f"{root} exists, is not empty and holds no synthetic marker")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _generate(tmp, params)
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1))  # written last: set complete
        old = None
        if root.exists():
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if _marker_matches(root, params):  # another process finished the same set first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _marker_matches(root: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((root / MARKER_NAME).read_text()) == params
    except (OSError, ValueError):
        return False


def _generate(out: Path, params: dict[str, Any]) -> None:
    (out / "list").mkdir(parents=True)
    h0, w0 = params["image_size"]
    jitter = params["size_jitter"]
    splits = [
        ("train", "train.txt", params["num_train"], True),
        ("val", "val.txt", params["num_val"], True),
        ("test", "test_all.txt", params["num_test"], params["test_labels"]),
    ]
    next_id = 1
    for split_idx, (folder, list_name, count, labelled) in enumerate(splits):
        img_dir = out / folder / "images"
        img_dir.mkdir(parents=True)
        ann_dir = out / folder / "parsing_annos"
        if labelled:
            ann_dir.mkdir(parents=True)
        # Integer ids shared across splits like the real set; 7 and 70 both occur.
        ids = [str(next_id + i) for i in range(count)]
        next_id += count
        for i, name in enumerate(ids):
            # One generator per image: a sample does not depend on the split sizes.
            rng = np.random.default_rng([params["seed"], split_idx, i])
            h = int(rng.integers(h0 - jitter, h0 + jitter + 1))
            w = int(rng.integers(w0 - jitter, w0 + jitter + 1))
            image, persons = render_scene(rng, h, w)
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=92)
            if labelled:
                n = len(persons)
                for k, label in enumerate(persons, start=1):
                    # Released format: class id in R, G = B = 0.
                    rgb = np.zeros((h, w, 3), dtype=np.uint8)
                    rgb[..., 0] = label
                    Image.fromarray(rgb).save(
                        ann_dir / f"{name}_{n:02d}_{k:02d}.png", compress_level=1
                    )
        (out / "list" / list_name).write_text("".join(f"{name}\n" for name in ids))


# -- drawing primitives (each returns a window and a boolean mask inside it) ----------------------


def _window(h: int, w: int, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
    ys = slice(max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, h))
    xs = slice(max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, w))
    return ys, xs


def _grid(ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres of the window: (n, 1) and (1, m) for broadcasting.
    return np.arange(ys.start, ys.stop)[:, None] + 0.5, np.arange(xs.start, xs.stop)[None, :] + 0.5


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> Region:
    ys, xs = _window(h, w, cy - ry, cy + ry, cx - rx, cx + rx)
    y, x = _grid(ys, xs)
    return ys, xs, ((y - cy) / max(ry, 0.5)) ** 2 + ((x - cx) / max(rx, 0.5)) ** 2 <= 1.0


def capsule(h: int, w: int, p0: np.ndarray, p1: np.ndarray, r: float) -> Region:
    """Pixels within ``r`` of the segment ``p0 -> p1`` (points as (y, x))."""
    ys, xs = _window(
        h, w, min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r, min(p0[1], p1[1]) - r,
        max(p0[1], p1[1]) + r,
    )  # fmt: skip
    y, x = _grid(ys, xs)
    d = p1 - p0
    t = ((y - p0[0]) * d[0] + (x - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return ys, xs, (y - p0[0] - t * d[0]) ** 2 + (x - p0[1] - t * d[1]) ** 2 <= r * r


def polygon(h: int, w: int, pts: np.ndarray) -> Region:
    """Convex polygon given as (n, 2) (y, x) vertices in either winding order."""
    ys, xs = _window(h, w, pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
    y, x = _grid(ys, xs)
    pos = np.ones((ys.stop - ys.start, xs.stop - xs.start), dtype=bool)
    neg = pos.copy()
    for a, b in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        cross = (b[1] - a[1]) * (y - a[0]) - (b[0] - a[0]) * (x - a[1])
        pos &= cross >= 0
        neg &= cross <= 0
    # Inside a convex polygon means on the same side of every edge, whatever the winding.
    return ys, xs, pos | neg


class PersonCanvas:
    """A full-image label map and colour layer for one person (full body, nothing occluded).

    Attributes:
        label: (H, W) uint8 class ids, 0 outside the person.
        rgb: (H, W, 3) float32 colour, valid where ``label > 0``.
    """

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.label = np.zeros((h, w), dtype=np.uint8)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)

    def paint(
        self,
        region: Region,
        cls: int | None,
        color: np.ndarray,
        stripes: tuple[int, np.ndarray] | None = None,
        within: bool = False,
    ) -> None:
        """Set class ``cls`` (None: colour only) and colour over ``region``.

        Args:
            stripes: ``(period, second_colour)`` horizontal stripes (garment texture).
            within: restrict to pixels already on this person (details such as eyes or buttons).
        """
        ys, xs, m = region
        if within:
            m = m & (self.label[ys, xs] > 0)
        if not m.any():
            return
        if cls is not None:
            self.label[ys, xs][m] = cls
        win = self.rgb[ys, xs]
        if stripes is None:
            win[m] = color
        else:
            period, color2 = stripes
            rows = np.arange(ys.start, ys.stop)[:, None] + np.zeros((1, m.shape[1]), dtype=int)
            second = (rows // period) % 2 == 1
            win[m & ~second] = color
            win[m & second] = color2


def _skin(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform()
    return (1 - t) * np.array([240, 205, 175]) + t * np.array([105, 68, 45])


def _hair_color(rng: np.random.Generator) -> np.ndarray:
    base = [(25, 20, 18), (60, 40, 25), (110, 75, 40), (200, 165, 100), (150, 150, 150)]
    return np.array(base[rng.integers(len(base))], dtype=float) + rng.normal(0, 8, 3)


def _garment_color(rng: np.random.Generator) -> np.ndarray:
    # One distribution for every garment: tee vs polo must not be separable by colour.
    return rng.uniform(20, 235, size=3)


def _garment_texture(rng: np.random.Generator, color: np.ndarray) -> tuple[int, np.ndarray] | None:
    if rng.uniform() < 0.3:
        return int(rng.integers(2, 5)), np.clip(color + rng.normal(0, 60, 3), 0, 255)
    return None


def draw_person(
    rng: np.random.Generator, h: int, w: int, cx: float, top: float, height: float
) -> PersonCanvas:
    """Draw one person standing with its head at ``top`` and body ``height`` pixels tall.

    The person faces the camera or away from it; that alone decides on which image side the
    person's left limbs are, so left/right labels can be learnt only from the face/back cue.
    """
    c = PersonCanvas(h, w)
    u = height
    front = bool(rng.uniform() < 0.5)
    skin = _skin(rng)
    hair = _hair_color(rng)

    def side_cls(pair: tuple[int, int], image_side: int) -> int:
        # image_side -1 = image left. Front-facing: the person's left is on the image right.
        person_left = (image_side > 0) if front else (image_side < 0)
        return pair[0] if person_left else pair[1]

    # Clothes.
    top_cls = rng.choice(
        [TEE, POLO, JACKET, SWEATER, SINGLET, DRESS], p=[0.3, 0.25, 0.12, 0.1, 0.1, 0.13]
    )
    top_col = _garment_color(rng)
    top_tex = _garment_texture(rng, top_col)  # same law for every top, tee and polo included
    bottom_cls = (
        DRESS if top_cls == DRESS else rng.choice([PANTS, SHORTS, SKIRT], p=[0.55, 0.28, 0.17])
    )
    bottom_col = top_col if bottom_cls == DRESS else _garment_color(rng)
    sleeve = {TEE: 0.6, POLO: 0.6, JACKET: 1.0, SWEATER: 1.0}.get(int(top_cls), 0.0)

    head_c = np.array([top + 0.09 * u, cx])
    head_ry, head_rx = 0.085 * u, 0.068 * u
    shoulder_y = top + 0.215 * u
    hip_y = top + 0.53 * u

    # Legs (skin first; garments painted over them).
    feet = []
    for s in (-1, 1):
        hip = np.array([hip_y, cx + s * 0.055 * u])
        knee = np.array([top + 0.73 * u, cx + s * rng.uniform(0.04, 0.09) * u])
        foot = np.array([top + 0.93 * u, cx + s * rng.uniform(0.04, 0.11) * u])
        for a, b in ((hip, knee), (knee, foot)):
            c.paint(capsule(h, w, a, b, 0.042 * u), side_cls(LEG, s), skin)
        feet.append((s, hip, knee, foot))
    if bottom_cls == PANTS:
        for _, hip, knee, foot in feet:
            ankle = foot - np.array([0.03 * u, 0.0])
            for a, b in ((hip, knee), (knee, ankle)):
                c.paint(capsule(h, w, a, b, 0.05 * u), PANTS, bottom_col)
    elif bottom_cls == SHORTS:
        for _, hip, knee, _ in feet:
            c.paint(capsule(h, w, hip, hip + 0.55 * (knee - hip), 0.055 * u), SHORTS, bottom_col)
    hem = top + rng.uniform(0.66, 0.8) * u
    if bottom_cls in (SKIRT, DRESS):
        pts = np.array(
            [[hip_y - 0.02 * u, cx - 0.1 * u], [hip_y - 0.02 * u, cx + 0.1 * u],
             [hem, cx + 0.17 * u], [hem, cx - 0.17 * u]]
        )  # fmt: skip
        c.paint(polygon(h, w, pts), int(bottom_cls), bottom_col, _garment_texture(rng, bottom_col))
    shoe_col = rng.uniform(10, 120, size=3)
    for s, _, _, foot in feet:
        c.paint(ellipse(h, w, foot[0] + 0.01 * u, foot[1] + s * 0.01 * u, 0.025 * u, 0.045 * u),
                side_cls(SHOE, s), shoe_col)  # fmt: skip

    # Torso, neck.
    c.paint(capsule(h, w, head_c, np.array([shoulder_y, cx]), 0.035 * u), TORSO_SKIN, skin)
    torso = np.array(
        [[shoulder_y - 0.01 * u, cx - 0.13 * u], [shoulder_y - 0.01 * u, cx + 0.13 * u],
         [hip_y + 0.02 * u, cx + 0.11 * u], [hip_y + 0.02 * u, cx - 0.11 * u]]
    )  # fmt: skip
    c.paint(polygon(h, w, torso), int(top_cls), top_col, top_tex)
    if top_cls == SINGLET:  # bare shoulders next to the straps
        for s in (-1, 1):
            c.paint(ellipse(h, w, shoulder_y + 0.01 * u, cx + s * 0.105 * u, 0.025 * u, 0.03 * u),
                    TORSO_SKIN, skin)  # fmt: skip
    if bottom_cls == PANTS and rng.uniform() < 0.2:
        belt = np.array([[hip_y - 0.01 * u, cx - 0.11 * u], [hip_y - 0.01 * u, cx + 0.11 * u],
                         [hip_y + 0.015 * u, cx + 0.11 * u], [hip_y + 0.015 * u, cx - 0.11 * u]])  # fmt: skip
        c.paint(polygon(h, w, belt), BELT, rng.uniform(10, 90, size=3))

    # Arms: upper arm + forearm, each side posed independently (pose carries no left/right cue).
    glove_side = int(rng.choice([-1, 1])) if rng.uniform() < 0.06 else 0
    watch_side = int(rng.choice([-1, 1])) if rng.uniform() < 0.12 else 0
    for s in (-1, 1):
        shoulder = np.array([shoulder_y + 0.01 * u, cx + s * 0.12 * u])
        if rng.uniform() < 0.15:  # raised arm
            a1 = np.deg2rad(rng.uniform(100, 160))
            a2 = a1 + np.deg2rad(rng.uniform(-20, 20))
        else:
            a1 = np.deg2rad(rng.uniform(5, 35))
            a2 = a1 + np.deg2rad(rng.uniform(-10, 40))
        # Angles from straight down, opening away from the body on side s.
        elbow = shoulder + 0.17 * u * np.array([np.cos(a1), s * np.sin(a1)])
        wrist = elbow + 0.16 * u * np.array([np.cos(a2), s * np.sin(a2)])
        arm_cls = side_cls(ARM, s)
        c.paint(capsule(h, w, shoulder, elbow, 0.034 * u), arm_cls, skin)
        c.paint(capsule(h, w, elbow, wrist, 0.03 * u), arm_cls, skin)
        if sleeve >= 1:  # long sleeves cover the whole arm
            c.paint(capsule(h, w, shoulder, elbow, 0.04 * u), int(top_cls), top_col)
            c.paint(capsule(h, w, elbow, wrist, 0.036 * u), int(top_cls), top_col)
        elif sleeve > 0:  # short sleeves cover part of the upper arm
            end = shoulder + sleeve * (elbow - shoulder)
            c.paint(capsule(h, w, shoulder, end, 0.04 * u), int(top_cls), top_col)
        hand_c = wrist + 0.03 * u * (wrist - elbow) / (np.linalg.norm(wrist - elbow) + 1e-6)
        if glove_side == s:
            c.paint(ellipse(h, w, *hand_c, 0.032 * u, 0.032 * u), GLOVE, rng.uniform(0, 80, 3))
        else:
            c.paint(ellipse(h, w, *hand_c, 0.028 * u, 0.028 * u), side_cls(HAND, s), skin * 0.95)
        if watch_side == s and sleeve < 1:
            band = wrist - 0.012 * u * (wrist - elbow) / (np.linalg.norm(wrist - elbow) + 1e-6)
            c.paint(ellipse(h, w, *band, 0.012 * u, 0.02 * u), WATCH, rng.uniform(150, 230, 3))

    # Head: face + hair when facing the camera, all hair from behind.
    if front:
        c.paint(ellipse(h, w, *head_c, head_ry, head_rx), FACE, skin)
        c.paint(ellipse(h, w, head_c[0] - 0.45 * head_ry, head_c[1], 0.62 * head_ry,
                        1.08 * head_rx), HAIR, hair)  # fmt: skip
        # Re-open the face below the fringe, then draw eyes and mouth (colour-only details).
        lower = ellipse(h, w, head_c[0] + 0.25 * head_ry, head_c[1], 0.78 * head_ry, head_rx)
        c.paint(lower, FACE, skin)
        eye_y = head_c[0] + 0.05 * head_ry
        for s in (-1, 1):
            c.paint(ellipse(h, w, eye_y, head_c[1] + s * 0.38 * head_rx, 0.09 * u / 8, 0.09 * u / 8),
                    None, np.array([20.0, 20, 30]), within=True)  # fmt: skip
        c.paint(ellipse(h, w, head_c[0] + 0.55 * head_ry, head_c[1], 0.06 * head_ry, 0.3 * head_rx),
                None, np.array([150.0, 50, 50]), within=True)  # fmt: skip
        if rng.uniform() < 0.08:
            c.paint(ellipse(h, w, eye_y, head_c[1], 0.16 * head_ry, 0.85 * head_rx), SUNGLASSES,
                    rng.uniform(0, 40, 3))  # fmt: skip
    else:
        c.paint(ellipse(h, w, head_c[0] - 0.03 * u, head_c[1], 1.05 * head_ry, 1.08 * head_rx),
                HAIR, hair)  # fmt: skip
        c.paint(ellipse(h, w, *head_c, head_ry, head_rx), HAIR, hair)
    if rng.uniform() < 0.18:
        c.paint(ellipse(h, w, head_c[0] - 0.8 * head_ry, head_c[1], 0.4 * head_ry,
                        1.2 * head_rx), HAT, _garment_color(rng))  # fmt: skip

    # Front/back details on the torso.
    neck_y = shoulder_y
    if top_cls == POLO:
        collar = _shade(top_col, rng)
        if front:  # collar patch and two buttons: the only tee/polo difference
            pts = np.array([[neck_y - 0.015 * u, cx - 0.05 * u], [neck_y - 0.015 * u, cx + 0.05 * u],
                            [neck_y + 0.05 * u, cx]])  # fmt: skip
            c.paint(polygon(h, w, pts), POLO, collar)
            for j in (1, 2):
                by = neck_y + (0.05 + 0.035 * j) * u
                c.paint(ellipse(h, w, by, cx, 0.011 * u, 0.011 * u), None,
                        255 - top_col, within=True)  # fmt: skip
        else:  # a collar band across the back of the neck
            pts = np.array([[neck_y - 0.02 * u, cx - 0.06 * u], [neck_y - 0.02 * u, cx + 0.06 * u],
                            [neck_y + 0.01 * u, cx + 0.06 * u], [neck_y + 0.01 * u, cx - 0.06 * u]])  # fmt: skip
            c.paint(polygon(h, w, pts), POLO, collar)
    if front and top_cls in (TEE, POLO, JACKET) and rng.uniform() < 0.07:
        pts = np.array([[neck_y + 0.01 * u, cx - 0.012 * u], [neck_y + 0.01 * u, cx + 0.012 * u],
                        [neck_y + 0.2 * u, cx + 0.02 * u], [neck_y + 0.2 * u, cx - 0.02 * u]])  # fmt: skip
        c.paint(polygon(h, w, pts), TIE, _garment_color(rng))
    if rng.uniform() < 0.06:
        c.paint(capsule(h, w, np.array([neck_y - 0.01 * u, cx - 0.07 * u]),
                        np.array([neck_y - 0.01 * u, cx + 0.07 * u]), 0.018 * u),
                SCARF, _garment_color(rng))  # fmt: skip
    if not front and rng.uniform() < 0.2:
        pts = np.array([[shoulder_y + 0.03 * u, cx - 0.09 * u], [shoulder_y + 0.03 * u, cx + 0.09 * u],
                        [hip_y - 0.06 * u, cx + 0.085 * u], [hip_y - 0.06 * u, cx - 0.085 * u]])  # fmt: skip
        c.paint(polygon(h, w, pts), BACKPACK, rng.uniform(20, 200, 3))
    return c


def _shade(color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A visibly different tone of the same colour (lighter if dark, darker if light).
    factor = 1.45 if color.mean() < 128 else 0.62
    return np.clip(color * factor + rng.normal(0, 6, 3), 0, 255)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth coloured noise, a floor gradient and a few distractor shapes, (H, W, 3) float32."""
    base = rng.uniform(40, 215, size=3)
    small = rng.normal(0, rng.uniform(10, 40), size=(max(h // 12, 2), max(w // 12, 2), 3))
    small = np.clip(small + 128, 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float32)
    bg = base + (smooth - 128)
    horizon = int(h * rng.uniform(0.5, 0.85))
    bg[horizon:] = bg[horizon:] * 0.6 + rng.uniform(40, 200, size=3) * 0.4
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(4, h / 4), rng.uniform(4, w / 4)
        ys, xs, m = ellipse(h, w, cy, cx, ry, rx) if rng.uniform() < 0.5 else (
            *_window(h, w, cy - ry, cy + ry, cx - rx, cx + rx), None)  # fmt: skip
        win = bg[ys, xs]
        color = rng.uniform(0, 255, size=3)
        if m is None:
            win[...] = color
        else:
            win[m] = color
    return bg.astype(np.float32)


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image with 2-4 overlapping persons.

    Returns:
        image (H, W, 3) uint8 RGB and the per-person full label maps, each (H, W) uint8, in painting
        order (later persons occlude earlier ones, the loader's merge rule).
    """
    image = _background(rng, h, w)
    n = int(rng.integers(2, 5))
    heights = np.sort(rng.uniform(0.55, 0.95, size=n)) * h  # taller = closer = painted later
    # Centres spread over the width with jitter, so neighbours overlap often but not always.
    slots = (np.arange(n) + rng.uniform(0.1, 0.9, size=n)) / n
    centres = rng.permutation(slots) * w * 0.9 + 0.05 * w
    persons = []
    for k in range(n):
        top = rng.uniform(-0.02 * h, max(h - heights[k] * 0.95, 0.0))
        person = draw_person(rng, h, w, float(centres[k]), float(top), float(heights[k]))
        light = rng.uniform(0.8, 1.15)
        on = person.label > 0
        image[on] = np.clip(person.rgb[on] * light, 0, 255)
        persons.append(person.label)
    image += rng.normal(0, rng.uniform(2, 8), size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), persons
