"""What the sets of several objects share (``synthetic-seg``, ``synthetic-det``): a light gradient
picture of any aspect ratio, and dark shapes whose class is their kind and *true* proportions."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from PIL import Image

from navit.synthetic.base import Generated
from navit.synthetic.shapes import CLASS_NAMES, CLASS_SPECS, LIGHT_MIN, RATIO_RANGES, gradient


class Scenes(Generated):
    """``num_images`` pictures with sides in ``[min_side, max_side]`` (at least ``smallest`` px)
    and aspect ratios log-uniform in 1:4 .. 4:1, independent of the objects drawn on them."""

    smallest: ClassVar[int] = 8

    def __init__(self, num_images: int = 2000, seed: int = 0, min_side: int = 48, max_side: int = 192) -> None:
        if num_images < 1 or seed < 0 or not self.smallest <= min_side <= max_side:
            raise ValueError(f"need num_images >= 1, seed >= 0 and {self.smallest} <= min_side <= max_side, got "
                             f"{num_images}, {seed}, {min_side}, {max_side}")  # fmt: skip
        self.num_images = self.count = num_images
        self.seed, self.min_side, self.max_side = seed, min_side, max_side

    def background(self, rng: np.random.Generator) -> Image.Image:
        """A picture of a drawn size and aspect ratio: a light gradient."""
        aspect = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))  # width / height
        elong = max(aspect, 1 / aspect)
        long_side = rng.uniform(min(self.max_side, self.min_side * elong), self.max_side)
        width, height = (long_side, long_side / elong) if aspect >= 1 else (long_side / elong, long_side)
        width, height = max(self.smallest, round(width)), max(self.smallest, round(height))
        start = rng.integers(LIGHT_MIN, 256, size=3)
        end = np.clip(start + rng.integers(-40, 41, size=3), LIGHT_MIN, 255)
        return gradient(width, height, tuple(start), tuple(end), rng.uniform(0, 2 * math.pi))

    @staticmethod
    def draw_object(rng: np.random.Generator, size: tuple[int, int], share: tuple[float, float]) -> tuple[int, str, float, float]:
        """A drawn object: its class, shape, width and height (``share`` of the largest that fits)."""
        width, height = size
        cls = int(rng.integers(len(CLASS_NAMES)))
        shape, proportion = CLASS_SPECS[cls]
        ratio = math.exp(rng.uniform(*(math.log(r) for r in RATIO_RANGES[proportion])))  # height / width
        w = rng.uniform(*share) * min(width, height / ratio)
        return cls, shape, w, w * ratio
