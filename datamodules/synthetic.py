"""A procedurally generated miniature of LV-MHP-v2, written in the real on-disk layout.

The set is small enough to train a ResNet-18 PSPNet on a laptop CPU in minutes, yet keeps the traits
that make human parsing hard, so losses and samplers aimed at them have something to act on:

- 2-4 persons per image that overlap. Each per-person PNG holds that person's *full* body, also
  where a later person hides it, so the loader's merge rule (later person wins) decides the
  visible label, exactly as the image was painted.
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

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.files import generated_folder

SYNTHETIC_VERSION = 2  # bump whenever the drawing changes: stale sets are regenerated
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

    Generation happens in a temporary sibling folder that is renamed into place only when complete
    (:func:`datamodules.files.generated_folder`), so an interrupted run never leaves a half set;
    the marker file records the parameters.

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
    return generated_folder(root, params, lambda out: _generate(out, params), MARKER_NAME)


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


# -- drawing primitives (pixel units; each returns a window and a boolean mask inside it) ---------


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
    lo, hi = np.minimum(p0, p1) - r, np.maximum(p0, p1) + r
    ys, xs = _window(h, w, lo[0], hi[0], lo[1], hi[1])
    y, x = _grid(ys, xs)
    d = p1 - p0
    t = np.clip(((y - p0[0]) * d[0] + (x - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
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

    Shapes are given in body units: ``y`` down from the top of the head and ``x`` right of the body
    axis, both as fractions of the person's height.

    Attributes:
        label: (H, W) uint8 class ids, 0 outside the person.
        rgb: (H, W, 3) float32 colour, valid where ``label > 0``.
    """

    def __init__(self, h: int, w: int, top: float, cx: float, height: float) -> None:
        self.h, self.w = h, w
        self.origin = np.array([top, cx])
        self.u = height
        self.label = np.zeros((h, w), dtype=np.uint8)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)

    def _px(self, p: Any) -> np.ndarray:
        return self.origin + self.u * np.asarray(p, dtype=float)

    def ellipse(self, y: float, x: float, ry: float, rx: float) -> Region:
        cy, cx = self._px((y, x))
        return ellipse(self.h, self.w, cy, cx, ry * self.u, rx * self.u)

    def capsule(self, p0: Any, p1: Any, r: float) -> Region:
        return capsule(self.h, self.w, self._px(p0), self._px(p1), r * self.u)

    def polygon(self, pts: Any) -> Region:
        return polygon(self.h, self.w, self._px(pts))

    def trapezoid(self, y0: float, y1: float, half0: float, half1: float) -> Region:
        """Symmetric about the body axis: half-width ``half0`` at ``y0``, ``half1`` at ``y1``."""
        return self.polygon([(y0, -half0), (y0, half0), (y1, half1), (y1, -half1)])

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
            return
        period, color2 = stripes
        second = (np.arange(ys.start, ys.stop)[:, None] // period) % 2 == 1  # (n, 1) row parity
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


def _shade(rng: np.random.Generator, color: np.ndarray) -> np.ndarray:
    # A visibly different tone of the same colour (lighter if dark, darker if light).
    factor = 1.45 if color.mean() < 128 else 0.62
    return np.clip(color * factor + rng.normal(0, 6, 3), 0, 255)


# Body geometry in body units (fractions of the person's height).
HEAD_Y, HEAD_RY, HEAD_RX = 0.09, 0.085, 0.068
SHOULDER_Y, HIP_Y = 0.215, 0.53


def draw_person(
    rng: np.random.Generator, h: int, w: int, cx: float, top: float, height: float
) -> PersonCanvas:
    """Draw one standing person, head top at row ``top``, body axis at column ``cx``.

    The person faces the camera or away from it, and that alone decides on which image side the
    person's left limbs are: left/right labels can be learnt only from the face/back cue.
    """
    c = PersonCanvas(h, w, top, cx, height)
    front = bool(rng.uniform() < 0.5)
    skin, hair = _skin(rng), _hair_color(rng)

    def side_cls(pair: tuple[int, int], s: int) -> int:
        # s = -1: image left. Facing the camera, the person's left is on the image right.
        person_left = s > 0 if front else s < 0
        return pair[0] if person_left else pair[1]

    tops = [TEE, POLO, JACKET, SWEATER, SINGLET, DRESS]
    top_cls = int(rng.choice(tops, p=[0.3, 0.25, 0.12, 0.1, 0.1, 0.13]))
    top_col = _garment_color(rng)
    top_tex = _garment_texture(rng, top_col)  # same law for every top, tee and polo included
    if top_cls == DRESS:
        bottom_cls, bottom_col = DRESS, top_col
    else:
        bottom_cls = int(rng.choice([PANTS, SHORTS, SKIRT], p=[0.55, 0.28, 0.17]))
        bottom_col = _garment_color(rng)
    sleeve = {TEE: 0.6, POLO: 0.6, JACKET: 1.0, SWEATER: 1.0}.get(top_cls, 0.0)

    # Legs: skin first, garments over them, then shoes.
    legs = []
    for s in (-1, 1):
        hip = np.array([HIP_Y, s * 0.055])
        knee = np.array([0.73, s * rng.uniform(0.04, 0.09)])
        foot = np.array([0.93, s * rng.uniform(0.04, 0.11)])
        c.paint(c.capsule(hip, knee, 0.042), side_cls(LEG, s), skin)
        c.paint(c.capsule(knee, foot, 0.042), side_cls(LEG, s), skin)
        legs.append((s, hip, knee, foot))
    for _, hip, knee, foot in legs:
        if bottom_cls == PANTS:
            ankle = foot - np.array([0.03, 0.0])
            c.paint(c.capsule(hip, knee, 0.05), PANTS, bottom_col)
            c.paint(c.capsule(knee, ankle, 0.05), PANTS, bottom_col)
        elif bottom_cls == SHORTS:
            c.paint(c.capsule(hip, hip + 0.55 * (knee - hip), 0.055), SHORTS, bottom_col)
    if bottom_cls in (SKIRT, DRESS):
        hem = rng.uniform(0.66, 0.8)
        tex = _garment_texture(rng, bottom_col)
        c.paint(c.trapezoid(HIP_Y - 0.02, hem, 0.1, 0.17), bottom_cls, bottom_col, tex)
    shoe_col = rng.uniform(10, 120, size=3)
    for s, _, _, foot in legs:
        c.paint(
            c.ellipse(foot[0] + 0.01, foot[1] + s * 0.01, 0.025, 0.045), side_cls(SHOE, s), shoe_col
        )

    # Neck, torso, belt.
    c.paint(c.capsule((HEAD_Y, 0.0), (SHOULDER_Y, 0.0), 0.035), TORSO_SKIN, skin)
    c.paint(c.trapezoid(SHOULDER_Y - 0.01, HIP_Y + 0.02, 0.13, 0.11), top_cls, top_col, top_tex)
    if top_cls == SINGLET:  # bare shoulders beside the straps
        for s in (-1, 1):
            c.paint(c.ellipse(SHOULDER_Y + 0.01, s * 0.105, 0.025, 0.03), TORSO_SKIN, skin)
    if bottom_cls == PANTS and rng.uniform() < 0.2:
        c.paint(c.trapezoid(HIP_Y - 0.01, HIP_Y + 0.015, 0.11, 0.11), BELT, rng.uniform(10, 90, 3))

    # Arms: each side posed independently, so the pose carries no left/right cue.
    glove_side = int(rng.choice([-1, 1])) if rng.uniform() < 0.06 else 0
    watch_side = int(rng.choice([-1, 1])) if rng.uniform() < 0.12 else 0
    for s in (-1, 1):
        shoulder = np.array([SHOULDER_Y + 0.01, s * 0.12])
        raised = rng.uniform() < 0.15
        a1 = np.deg2rad(rng.uniform(100, 160) if raised else rng.uniform(5, 35))
        a2 = a1 + np.deg2rad(rng.uniform(-20, 20) if raised else rng.uniform(-10, 40))
        # Angles are measured from straight down, opening away from the body on side s.
        elbow = shoulder + 0.17 * np.array([np.cos(a1), s * np.sin(a1)])
        wrist = elbow + 0.16 * np.array([np.cos(a2), s * np.sin(a2)])
        along = (wrist - elbow) / (np.linalg.norm(wrist - elbow) + 1e-6)
        c.paint(c.capsule(shoulder, elbow, 0.034), side_cls(ARM, s), skin)
        c.paint(c.capsule(elbow, wrist, 0.03), side_cls(ARM, s), skin)
        if sleeve >= 1:  # long sleeves cover the whole arm
            c.paint(c.capsule(shoulder, elbow, 0.04), top_cls, top_col)
            c.paint(c.capsule(elbow, wrist, 0.036), top_cls, top_col)
        elif sleeve > 0:  # short sleeves cover part of the upper arm
            c.paint(
                c.capsule(shoulder, shoulder + sleeve * (elbow - shoulder), 0.04), top_cls, top_col
            )
        hand = wrist + 0.03 * along
        if glove_side == s:
            c.paint(c.ellipse(*hand, 0.032, 0.032), GLOVE, rng.uniform(0, 80, 3))
        else:
            c.paint(c.ellipse(*hand, 0.028, 0.028), side_cls(HAND, s), skin * 0.95)
        if watch_side == s and sleeve < 1:
            band = wrist - 0.012 * along
            c.paint(c.ellipse(*band, 0.012, 0.02), WATCH, rng.uniform(150, 230, 3))

    # Head: a face (eyes, mouth) under a fringe when facing the camera, all hair from behind.
    if front:
        c.paint(c.ellipse(HEAD_Y - 0.45 * HEAD_RY, 0.0, 0.62 * HEAD_RY, 1.08 * HEAD_RX), HAIR, hair)
        c.paint(c.ellipse(HEAD_Y + 0.25 * HEAD_RY, 0.0, 0.78 * HEAD_RY, HEAD_RX), FACE, skin)
        eye_y = HEAD_Y + 0.05 * HEAD_RY
        dark, lips = np.array([20.0, 20, 30]), np.array([150.0, 50, 50])
        for s in (-1, 1):
            c.paint(c.ellipse(eye_y, s * 0.38 * HEAD_RX, 0.011, 0.011), None, dark, within=True)
        mouth = c.ellipse(HEAD_Y + 0.55 * HEAD_RY, 0.0, 0.06 * HEAD_RY, 0.3 * HEAD_RX)
        c.paint(mouth, None, lips, within=True)
        if rng.uniform() < 0.08:
            glasses = c.ellipse(eye_y, 0.0, 0.16 * HEAD_RY, 0.85 * HEAD_RX)
            c.paint(glasses, SUNGLASSES, rng.uniform(0, 40, 3))
    else:
        c.paint(c.ellipse(HEAD_Y - 0.03, 0.0, 1.05 * HEAD_RY, 1.08 * HEAD_RX), HAIR, hair)
        c.paint(c.ellipse(HEAD_Y, 0.0, HEAD_RY, HEAD_RX), HAIR, hair)
    if rng.uniform() < 0.18:
        hat = c.ellipse(HEAD_Y - 0.8 * HEAD_RY, 0.0, 0.4 * HEAD_RY, 1.2 * HEAD_RX)
        c.paint(hat, HAT, _garment_color(rng))

    # Small details on the torso.
    neck = SHOULDER_Y
    if top_cls == POLO:
        collar = _shade(rng, top_col)
        if front:  # collar patch and two buttons: the only tee/polo difference
            patch = c.polygon([(neck - 0.015, -0.05), (neck - 0.015, 0.05), (neck + 0.05, 0.0)])
            c.paint(patch, POLO, collar)
            for j in (1, 2):
                button = c.ellipse(neck + 0.05 + 0.035 * j, 0.0, 0.011, 0.011)
                c.paint(button, None, 255 - top_col, within=True)
        else:  # a collar band across the back of the neck
            c.paint(c.trapezoid(neck - 0.02, neck + 0.01, 0.06, 0.06), POLO, collar)
    if front and top_cls in (TEE, POLO, JACKET) and rng.uniform() < 0.07:
        c.paint(c.trapezoid(neck + 0.01, neck + 0.2, 0.012, 0.02), TIE, _garment_color(rng))
    if rng.uniform() < 0.06:
        scarf = c.capsule((neck - 0.01, -0.07), (neck - 0.01, 0.07), 0.018)
        c.paint(scarf, SCARF, _garment_color(rng))
    if not front and rng.uniform() < 0.2:
        pack = c.trapezoid(SHOULDER_Y + 0.03, HIP_Y - 0.06, 0.09, 0.085)
        c.paint(pack, BACKPACK, rng.uniform(20, 200, 3))
    return c


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth coloured noise, a floor and a few distractor shapes, (H, W, 3) float32."""
    base = rng.uniform(40, 215, size=3)
    small = rng.normal(128, rng.uniform(10, 40), size=(max(h // 12, 2), max(w // 12, 2), 3))
    small = np.clip(small, 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float32)
    bg = base + (smooth - 128)
    horizon = int(h * rng.uniform(0.5, 0.85))
    bg[horizon:] = bg[horizon:] * 0.6 + rng.uniform(40, 200, size=3) * 0.4
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(4, h / 4), rng.uniform(4, w / 4)
        if rng.uniform() < 0.5:
            ys, xs, m = ellipse(h, w, cy, cx, ry, rx)
        else:
            ys, xs = _window(h, w, cy - ry, cy + ry, cx - rx, cx + rx)
            m = np.ones((ys.stop - ys.start, xs.stop - xs.start), dtype=bool)
        bg[ys, xs][m] = rng.uniform(0, 255, size=3)
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
        on = person.label > 0
        image[on] = np.clip(person.rgb[on] * rng.uniform(0.8, 1.15), 0, 255)
        persons.append(person.label)
    image += rng.normal(0, rng.uniform(2, 8), size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), persons
