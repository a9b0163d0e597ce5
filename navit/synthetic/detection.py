"""SyntheticDetection (``synthetic-det``): the built-in detection set, several shapes per image with
a box and a class each, and its writer in the COCO layout (``navit data synth-det``)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import ImageDraw

from navit.synthetic.scenes import Scenes
from navit.synthetic.shapes import CLASS_NAMES, DARK_MAX, grain, shape_polygon


class SyntheticDetection(Scenes):
    """Procedural detection set: 1 to 4 ellipses and rectangles per image that do not overlap,
    each with its box (the extent of the drawn polygon, x1, y1, x2, y2 in pixels) and its class:
    its shape and its *true* proportions (tall, round/square, wide), as in
    :class:`~navit.synthetic.shapes.SyntheticShapes`.

    Image aspect ratios are log-uniform in 1:4 .. 4:1, independent of the objects, so a model that
    squashes images to squares sees distorted proportions and confuses the classes, while one at
    native aspect ratio reads them. Item ``i`` is a pure function of ``(seed, i)``.
    """

    kind = "synthetic-det"
    provides = frozenset({"image", "boxes", "box_labels"})

    smallest = 16

    def __init__(self, num_images: int = 2000, seed: int = 0, min_side: int = 48, max_side: int = 192) -> None:
        super().__init__(num_images, seed, min_side, max_side)
        self.class_names: list[str] = list(CLASS_NAMES)

    def item(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        rng = np.random.default_rng([self.seed, index, 11])
        image = self.background(rng)
        width, height = image.size
        paint = ImageDraw.Draw(image)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, 5))):
            cls, shape, w, h = self.draw_object(rng, (width, height), (0.25, 0.5))
            for _try in range(8):  # a place that overlaps no earlier object, or none
                cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
                polygon = shape_polygon(shape, w, h, cx, cy, rng.uniform(-5, 5))
                xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
                box = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))]
                if not any(_overlap(box, other) for other in boxes):
                    break
            else:
                continue
            paint.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, DARK_MAX + 1, size=3)))
            boxes.append(box)
            labels.append(cls)
        image = grain(image, 3.0, rng)
        return {"image": image, "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                "box_labels": np.asarray(labels, dtype=np.int64), "box_ids": np.arange(len(labels))}  # fmt: skip


def _overlap(a: list[float], b: list[float], margin: float = 2.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def write_coco_folder(source: Any, out: str | os.PathLike[str]) -> None:
    """Write every item of ``source`` (items with ``image``, ``boxes`` and ``box_labels``) as
    ``out/images/<i>.png`` and ``out/annotations.json`` in the COCO instances format (boxes as
    ``[x, y, width, height]``, category ids 1.. in class order): the layout
    :class:`~navit.data.coco.CocoDetection` reads."""
    out = os.fspath(out)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    digits = max(6, len(str(len(source) - 1)))
    images, annotations = [], []
    for i in range(len(source)):
        item = source.item(i)
        name = f"{i:0{digits}d}.png"
        item["image"].save(os.path.join(out, "images", name), compress_level=1)
        width, height = item["image"].size
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for (x1, y1, x2, y2), label in zip(item["boxes"].tolist(), item["box_labels"].tolist()):
            box = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0})  # fmt: skip
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(source.class_names)]
    with open(os.path.join(out, "annotations.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
