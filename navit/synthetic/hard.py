"""SyntheticLargest (``synthetic-hard``): a built-in set whose label has nothing to do with aspect
ratio, for measuring the paper's claims.

Each image shows dark filled shapes of six kinds (cross, diamond, ellipse, rectangle, star,
triangle) on a light gradient. The label is the kind of the *largest* one; two to four others
(fewer where a small image has no free room for them) are distractors of the other kinds, 45–70%
of its size, none overlapping another. Every shape is turned by any
angle and stretched by up to 1.4:1, and image aspect ratios are log-uniform in 1:4 .. 4:1,
independent of the label, so squashing an image to a square distorts every shape alike and loses
nothing the label needs. What the label does need is detail: telling a star from a cross or a
diamond from a rectangle a few patches wide, and comparing sizes, gets harder as resolution
drops, so resolution, compute and token budget all matter here, as they do on real images.

Item ``i`` is a pure function of ``(seed, i)``; labels are exactly balanced within every block of
six consecutive indices, as in :class:`~navit.synthetic.shapes.SyntheticShapes`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageDraw

from navit.synthetic.shapes import DARK_MAX, LIGHT_MIN, balanced_label, gradient, grain
from navit.synthetic.base import Generated

KINDS: tuple[str, ...] = ("cross", "diamond", "ellipse", "rectangle", "star", "triangle")


def _outline(kind: str) -> list[tuple[float, float]]:
    """The kind's outline in the unit disc (radius 1, centred at the origin)."""
    if kind == "ellipse":
        return [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if kind == "rectangle":
        return [(-0.75, -0.66), (0.75, -0.66), (0.75, 0.66), (-0.75, 0.66)]
    if kind == "diamond":
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.cos(math.pi * k / 5 - math.pi / 2),
                 (1.0 if k % 2 == 0 else 0.42) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]  # fmt: skip
    w = 0.3  # cross: a plus sign with arms 0.6 wide
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


OUTLINES = {kind: _outline(kind) for kind in KINDS}


def place(kind: str, radius: float, stretch: float, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """The polygon of a ``kind`` of ``radius`` px, stretched ``stretch``:1, turned by ``angle``
    radians, centred at (cx, cy)."""
    sx, sy = radius * math.sqrt(stretch), radius / math.sqrt(stretch)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * sx * c - y * sy * s, cy + x * sx * s + y * sy * c) for x, y in OUTLINES[kind]]


class SyntheticLargest(Generated):
    """Procedural image source: the label is the kind of the largest of several shapes. An item
    also lists the shapes drawn (kind, radius and centre in pixels), the labelled one first."""

    kind = "synthetic-hard"
    provides = frozenset({"image", "label"})

    def __init__(self, num_images: int = 6000, seed: int = 0, min_side: int = 48, max_side: int = 320,
                 *, noise_std: float = 3.0) -> None:  # fmt: skip
        if num_images < 1 or seed < 0 or not 16 <= min_side <= max_side:
            raise ValueError(f"need num_images >= 1, seed >= 0 and 16 <= min_side <= max_side, got "
                             f"{num_images}, {seed}, {min_side}, {max_side}")  # fmt: skip
        self.num_images = self.count = int(num_images)
        self.seed, self.min_side, self.max_side = int(seed), min_side, max_side
        self.noise_std = noise_std
        self.class_names: list[str] = list(KINDS)

    def label(self, index: int) -> int:
        return balanced_label(self.seed ^ 0x4A2D, self._check(index), len(KINDS))

    def item(self, index: int) -> dict:
        label = self.label(index)
        rng = np.random.default_rng([self.seed, int(index), 11])
        aspect = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))  # width / height
        elong = max(aspect, 1 / aspect)
        long_side = math.exp(rng.uniform(math.log(min(self.max_side, self.min_side * elong)), math.log(self.max_side)))
        width, height = (long_side, long_side / elong) if aspect >= 1 else (long_side / elong, long_side)
        width, height = max(16, round(width)), max(16, round(height))
        start = rng.integers(LIGHT_MIN, 256, size=3)
        end = np.clip(start + rng.integers(-40, 41, size=3), LIGHT_MIN, 255)
        image = gradient(width, height, tuple(int(v) for v in start), tuple(int(v) for v in end), rng.uniform(0, 2 * math.pi))
        short = min(width, height)
        largest = rng.uniform(0.26, 0.36) * short
        others = [k for k in KINDS if k != KINDS[label]]
        shapes = [(KINDS[label], largest)]
        shapes += [(others[int(rng.integers(len(others)))], largest * rng.uniform(0.45, 0.7))
                   for _ in range(int(rng.integers(2, 5)))]  # fmt: skip
        placed: list[tuple[float, float, float]] = []
        drawn: list[dict] = []
        draw = ImageDraw.Draw(image)
        for kind, radius in shapes:
            for _ in range(30):  # a spot that overlaps no shape drawn so far, if one is found
                cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
                if all(math.hypot(cx - x, cy - y) > radius + r for x, y, r in placed):
                    break
            else:
                if kind != KINDS[label]:
                    continue  # no room for this distractor; the largest shape always goes first
            placed.append((cx, cy, radius))
            drawn.append({"kind": kind, "radius": round(radius, 2), "center": (round(cx, 2), round(cy, 2))})
            stretch = math.exp(rng.uniform(-math.log(1.4), math.log(1.4)))
            polygon = place(kind, radius, stretch, rng.uniform(0, 2 * math.pi), cx, cy)
            draw.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, DARK_MAX + 1, size=3)))
        image = grain(image, self.noise_std, np.random.default_rng([self.seed, int(index), 12]))
        return {"image": image, "label": label, "shapes": drawn}
