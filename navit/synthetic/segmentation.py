"""SyntheticSegmentation (``synthetic-seg``): the built-in segmentation set, several shapes per image,
masks drawn from the same geometry."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from navit.data.segmentation import palette_mask
from navit.synthetic.shapes import CLASS_NAMES, DARK_MAX, grain, shape_polygon
from navit.synthetic.scenes import Scenes


class SyntheticSegmentation(Scenes):
    """Procedural segmentation set: 2 to 4 ellipses and rectangles per image, each pixel labelled
    with its object's class (its shape and its *true* proportions: tall, round/square, wide, as in
    :class:`~navit.synthetic.shapes.SyntheticShapes`) or background (0).

    Image aspect ratios are log-uniform in 1:4 .. 4:1, independent of the objects, so a model that
    squashes images to squares sees distorted proportions and confuses the classes, while one at
    native aspect ratio reads them. Objects may overlap; later ones are drawn (and labelled) on
    top. Item ``i`` is a pure function of ``(seed, i)``.
    """

    kind = "synthetic-seg"
    provides = frozenset({"image", "mask", "label"})

    def __init__(self, num_images: int = 2000, seed: int = 0, min_side: int = 48, max_side: int = 192) -> None:
        super().__init__(num_images, seed, min_side, max_side)
        self.class_names: list[str] = ["background", *CLASS_NAMES]

    def label(self, index: int) -> int:
        return 0

    def item(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        rng = np.random.default_rng([self.seed, index, 7])
        image = self.background(rng)
        width, height = image.size
        mask = Image.new("L", (width, height), 0)
        paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(2, 5))):
            cls, shape, w, h = self.draw_object(rng, (width, height), (0.3, 0.6))
            cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
            polygon = shape_polygon(shape, w, h, cx, cy, rng.uniform(-5, 5))
            paint.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, DARK_MAX + 1, size=3)))
            label.polygon(polygon, fill=cls + 1)
        image = grain(image, 3.0, rng)
        return {"image": image, "mask": mask, "label": 0}


def write_segmentation_folder(source: Any, out: str | os.PathLike[str]) -> None:
    """Write every item of ``source`` as ``out/images/<i>.png``, ``out/masks/<i>.png`` (palette
    PNGs) and ``out/classes.txt``: the layout :class:`SegmentationFolder` reads."""
    out = os.fspath(out)
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(source.class_names) + "\n")
    digits = max(6, len(str(len(source) - 1)))
    for i in range(len(source)):
        item = source.item(i)
        item["image"].save(os.path.join(out, "images", f"{i:0{digits}d}.png"), compress_level=1)
        palette_mask(item["mask"]).save(os.path.join(out, "masks", f"{i:0{digits}d}.png"))


