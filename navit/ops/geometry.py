"""Geometric ops over item dicts: a random crop and a horizontal flip that move every geometric key
of an item together, and the record of where the item's pixels went.

Keys they know: pictures (``image``, ``mask``: PIL images, cut and mirrored alike), clips
(``video``: the op is added to ``frame_op``, run on every frame as it decodes), and coordinates in
pixels (``boxes`` [n, 4] as x1, y1, x2, y2; ``points`` [n, 2] as x, y; numpy arrays). A box a crop
cuts keeps its part inside; ``box_visible`` records the share of each box's area still in the
picture (a task drops boxes below its own threshold), and the rows of :data:`BOX_ROWS` follow
the boxes that remain. Every op also updates ``item["geometry"]``, the :class:`Affine` map from
the input's own pixels to the item's current ones, so a key no op knows (a task's own) can be
carried by applying it, and predictions made on the example can be mapped back to the input's
pixels with its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

PICTURE_KEYS = ("image", "mask")


@dataclass(frozen=True)
class Affine:
    """``x -> sx·x + tx``, ``y -> sy·y + ty`` (a negative ``sx`` mirrors)."""

    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def then(self, other: "Affine") -> "Affine":
        """This map followed by ``other``."""
        return Affine(other.sx * self.sx, other.sy * self.sy, other.sx * self.tx + other.tx, other.sy * self.ty + other.ty)

    def inverse(self) -> "Affine":
        return Affine(1 / self.sx, 1 / self.sy, -self.tx / self.sx, -self.ty / self.sy)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """[n, 2] points mapped."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.stack([xy[:, 0] * self.sx + self.tx, xy[:, 1] * self.sy + self.ty], 1)

    def boxes(self, xyxy: np.ndarray) -> np.ndarray:
        """[n, 4] boxes mapped, corners re-ordered so that x1 <= x2 and y1 <= y2 (after a mirror)."""
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        a, b = self.points(xyxy[:, :2]), self.points(xyxy[:, 2:])
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1)


def picture_size(item: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the item's picture as it stands: its image, or its clip's frames after
    the ops so far."""
    if "image" in item:
        return item["image"].size
    if "frame_size" in item:
        return item["frame_size"]
    info = item["video"].info()
    return info.width, info.height


#: Keys with one row per box (labels, ids, the visible share): cut and dropped with the boxes.
BOX_ROWS = ("box_labels", "box_ids", "box_visible")


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    return np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height),
                     boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)], 1)  # fmt: skip


def move(item: dict[str, Any], picture: Callable[[Image.Image], Image.Image], geometry: Affine,
         size: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    """``item`` with ``picture`` applied to its pictures and frames, ``geometry`` to its
    coordinates (boxes cut to the new ``size`` (width, height); a box left empty is dropped with
    its row of ``box_labels``) and recorded in ``item["geometry"]``."""
    out = dict(item)
    for key in PICTURE_KEYS:
        if key in out:
            out[key] = picture(out[key])
    if "video" in out:
        before = out.get("frame_op")
        out["frame_op"] = picture if before is None else _Then(before, picture)
        out["frame_size"] = size
    if "points" in out:
        out["points"] = geometry.points(out["points"])
    if "boxes" in out:
        moved = geometry.boxes(out["boxes"])
        boxes = clip_boxes(moved, *size)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        # The share of each box's area still in the picture, over every cut so far.
        visible = np.asarray(out.get("box_visible", np.ones(len(boxes))), dtype=np.float64)
        out["box_visible"] = visible * _area(boxes) / np.maximum(_area(moved), 1e-12)
        out["boxes"] = boxes[keep]
        for key in BOX_ROWS:
            if key in out:
                out[key] = np.asarray(out[key])[keep]
    out["geometry"] = out.get("geometry", Affine()).then(geometry)
    return out


@dataclass(frozen=True)
class _Then:
    first: Callable[[Image.Image], Image.Image]
    second: Callable[[Image.Image], Image.Image]

    def __call__(self, frame: Image.Image) -> Image.Image:
        return self.second(self.first(frame))


@dataclass(frozen=True)
class _Cut:
    box: tuple[int, int, int, int]

    def __call__(self, picture: Image.Image) -> Image.Image:
        return picture.crop(self.box)


def _mirror(picture: Image.Image) -> Image.Image:
    return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


@dataclass(frozen=True)
class RandomCrop:
    """In training, a crop of a random share of the area in ``[min_area, max_area]`` with the
    picture's own aspect ratio, at a random place; nothing at evaluation or with ``min_area`` 1."""

    min_area: float = 1.0
    max_area: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_area <= self.max_area <= 1:
            raise ValueError(f"crop areas must satisfy 0 < min <= max <= 1, got ({self.min_area}, {self.max_area})")

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        if rng is None or self.min_area >= 1.0:
            return item
        width, height = picture_size(item)
        area = rng.uniform(self.min_area, self.max_area)
        w, h = max(1, round(width * math.sqrt(area))), max(1, round(height * math.sqrt(area)))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return move(item, _Cut((left, top, left + w, top + h)), Affine(tx=-left, ty=-top), (w, h))


@dataclass(frozen=True)
class RandomFlip:
    """In training, a horizontal mirror with probability ``p``; nothing at evaluation."""

    p: float = 0.5

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        if rng is None or not rng.uniform() < self.p:
            return item
        width, height = picture_size(item)
        return move(item, _mirror, Affine(sx=-1.0, tx=float(width)), (width, height))
