"""Segmentation data: images with a mask of class indices each, as sources of ``{"image", "mask"}`` items.

A mask is a single-channel or palette PNG of the image's size whose values are class indices
(``0`` first); :data:`IGNORE` (255) marks pixels that carry no loss and no score. Three sources:

* :class:`SegmentationFolder`: ``ROOT/images/<name>.<ext>`` with ``ROOT/masks/<name>.png``
  (same stem, sub-folders mirrored), and an optional ``ROOT/classes.txt`` (one class name per
  line, index 0 first);
* :class:`SegmentationManifest`: a ``.csv`` (columns ``path,mask``) or ``.jsonl`` (keys ``path``
  and ``mask``) manifest, paths relative to it, with an optional ``classes.txt`` beside it;
* :class:`SyntheticSegmentation`: the built-in set, several shapes per image, masks from geometry.

Bad masks never turn into silently misaligned targets: a missing mask, a mask of another size, a
colour mask, or a class index beyond the classes is an error naming the file (the training
loader skips and counts such items, or stops with ``--fail-fast``). Masks follow the image's
stored pixels: when the image has an EXIF orientation, the mask gets the same turn (unless the
mask already has the turned image's size).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from navit.data.decode import IMAGE_EXTENSIONS, load_rgb
from navit.data.files import walk
from navit.data.synthetic import CLASS_NAMES, CLASS_SPECS, DARK_MAX, LIGHT_MIN, RATIO_RANGES, gradient, grain, shape_polygon

IGNORE = 255
MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B")


def read_mask(path: str, num_classes: int | None, name: str | None = None) -> Image.Image:
    """A mask file as an 8-bit ``L`` image of class indices, checked: one channel (or a palette,
    whose indices are the classes) and every value a class index below ``num_classes`` or 255."""
    label = name or path
    try:
        with Image.open(path) as im:
            im.load()
            mask = im
    except FileNotFoundError as error:
        raise FileNotFoundError(f"mask {label} does not exist") from error
    except OSError as error:
        raise ValueError(f"cannot decode mask {label}: {error}") from error
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"mask {label} is a {mask.mode} image; masks must be single-channel or palette PNGs of class indices "
            "(convert colour masks to indices first)"
        )
    values = np.asarray(mask).astype(np.int64)
    unknown = np.unique(values[(values != IGNORE) & ((values < 0) | (values >= (num_classes or 255)))])
    if unknown.size:
        limit = f"the {num_classes} classes" if num_classes else "the 255 class indices a mask can hold"
        raise ValueError(f"mask {label} has values {unknown[:8].tolist()} beyond {limit} (255 = ignore)")
    return Image.fromarray(values.astype(np.uint8))


#: The turn of each EXIF orientation (as PIL's ``exif_transpose`` applies it).
TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}  # fmt: skip


def _orientation(path: str) -> int:
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: the image loader keeps the stored pixels too
        return 1


def segmentation_item(image_path: str, mask_path: str, num_classes: int | None, name: str) -> dict[str, Any]:
    """``{"image", "mask", "label": 0}`` of an image file and its mask file, aligned and checked."""
    image = load_rgb(image_path, name=name)  # EXIF orientation applied
    mask = read_mask(mask_path, num_classes, f"{mask_path} (mask of {name})")
    turn = TURNS.get(_orientation(image_path))
    if turn is not None:
        stored = image.size[::-1] if turn in (TURNS[5], TURNS[6], TURNS[7], TURNS[8]) else image.size
        if not (mask.size == image.size != stored):  # unless the mask was drawn on the turned image
            mask = mask.transpose(turn)
    if mask.size != image.size:
        raise ValueError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} pixels but its image {name} is "
                         f"{image.size[0]}x{image.size[1]}; they must be the same size")  # fmt: skip
    return {"image": image, "mask": mask, "label": 0}


def read_classes(path: str) -> list[str] | None:
    """The class names of a ``classes.txt`` (one per line, blank lines skipped), or None if absent."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no class names")
    if len(names) > 255:
        raise ValueError(f"{path} lists {len(names)} classes; masks of 8-bit indices hold at most 255 (255 = ignore)")
    return names


def _largest_index(masks) -> int:
    largest = 0
    for path in masks:
        values = np.asarray(read_mask(path, None))
        values = values[values != IGNORE]
        largest = max(largest, int(values.max()) if values.size else 0)
    return largest


class _MaskPairs:
    """A list of (image path, mask path) pairs with class names: the shared part of the sources."""

    has_masks = True
    has_video = False

    def __init__(self, pairs: list[tuple[str, str]], classes_file: str, where: str) -> None:
        if not pairs:
            raise ValueError(f"{where} lists no images")
        self.pairs = pairs
        names = read_classes(classes_file)
        if names is None:  # the classes are the indices the masks use
            names = [str(i) for i in range(_largest_index(m for _, m in pairs) + 1)]
        self.class_names: list[str] = names

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, index: int) -> int:
        return 0

    def describe(self, index: int) -> str:
        return self.pairs[index][0]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.pairs[index][0], name=self.describe(index))

    def item(self, index: int) -> dict[str, Any]:
        image, mask = self.pairs[index]
        return segmentation_item(image, mask, len(self.class_names), self.describe(index))


class SegmentationFolder(_MaskPairs):
    """``ROOT/images/**/<name>.<ext>`` with ``ROOT/masks/**/<name>.png`` and an optional
    ``ROOT/classes.txt``; without it the classes are ``0 .. largest index in any mask``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        images, masks = os.path.join(self.root, "images"), os.path.join(self.root, "masks")
        if not (os.path.isdir(images) and os.path.isdir(masks)):
            raise ValueError(f"{self.root} is not a segmentation folder: expected images/ and masks/ inside")
        pairs, missing = [], []
        for folder, files in sorted(walk(images)):
            for file in files:
                stem, ext = os.path.splitext(file)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                mask = os.path.join(masks, os.path.relpath(folder, images), stem + ".png")
                (pairs if os.path.isfile(mask) else missing).append((os.path.join(folder, file), mask))
        if missing:
            shown = ", ".join(m for _, m in missing[:3])
            raise ValueError(f"{len(missing)} image(s) of {self.root} have no mask (looked for {shown}"
                             f"{', ...' if len(missing) > 3 else ''})")  # fmt: skip
        super().__init__(pairs, os.path.join(self.root, "classes.txt"), f"segmentation folder {self.root}")

    def __repr__(self) -> str:
        return f"SegmentationFolder({self.root!r})"


class SegmentationManifest(_MaskPairs):
    """A ``.csv`` (header with ``path`` and ``mask``) or ``.jsonl`` (``{"path", "mask"}`` per line)
    manifest; relative paths are resolved against its folder, which may hold a ``classes.txt``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.manifest_path = os.path.abspath(os.fspath(path))
        base = os.path.dirname(self.manifest_path)
        pairs = []
        for line, row in _manifest_rows(self.manifest_path):
            for key in ("path", "mask"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"manifest {self.manifest_path}, line {line}: missing or empty {key!r}")
            pairs.append(tuple(os.path.join(base, os.path.expanduser(row[k].strip())) for k in ("path", "mask")))
        super().__init__(pairs, os.path.join(base, "classes.txt"), f"manifest {self.manifest_path}")

    def __repr__(self) -> str:
        return f"SegmentationManifest({self.manifest_path!r})"


def _manifest_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, {k.strip().lower(): v for k, v in row.items() if k}) for row in reader]
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                try:
                    rows.append((line, json.loads(text)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"manifest {path}, line {line}: invalid JSON: {error.msg}") from error
    return rows


def manifest_has_masks(path: str) -> bool:
    """Whether a manifest lists masks (a ``mask`` column or key in its first row)."""
    rows = _manifest_rows(path)[:1]
    return bool(rows) and "mask" in rows[0][1]


# ------------------------------------------------------------------------------------------------
# The built-in set


class SyntheticSegmentation:
    """Procedural segmentation set: 2 to 4 ellipses and rectangles per image, each pixel labelled
    with its object's class (its shape and its *true* proportions: tall, round/square, wide, as in
    :class:`~navit.data.synthetic.SyntheticShapes`) or background (0).

    Image aspect ratios are log-uniform in 1:4 .. 4:1, independent of the objects, so a model that
    squashes images to squares sees distorted proportions and confuses the classes, while one at
    native aspect ratio reads them. Objects may overlap; later ones are drawn (and labelled) on
    top. Item ``i`` is a pure function of ``(seed, i)``.
    """

    has_masks = True
    has_video = False

    def __init__(self, num_images: int = 2000, seed: int = 0, min_side: int = 48, max_side: int = 192) -> None:
        if num_images < 1 or seed < 0 or not 8 <= min_side <= max_side:
            raise ValueError(f"need num_images >= 1, seed >= 0 and 8 <= min_side <= max_side, got "
                             f"{num_images}, {seed}, {min_side}, {max_side}")  # fmt: skip
        self.num_images, self.seed, self.min_side, self.max_side = num_images, seed, min_side, max_side
        self.class_names: list[str] = ["background", *CLASS_NAMES]

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"SyntheticSegmentation(num_images={self.num_images}, seed={self.seed})"

    def label(self, index: int) -> int:
        return 0

    def describe(self, index: int) -> str:
        return f"synthetic-seg(seed={self.seed})[{index}]"

    def load(self, index: int) -> Image.Image:
        return self.item(index)["image"]

    def item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, index, 7])
        aspect = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))  # width / height
        elong = max(aspect, 1 / aspect)
        long_side = rng.uniform(min(self.max_side, self.min_side * elong), self.max_side)
        short_side = long_side / elong
        width, height = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
        width, height = max(8, round(width)), max(8, round(height))
        start = rng.integers(LIGHT_MIN, 256, size=3)
        end = np.clip(start + rng.integers(-40, 41, size=3), LIGHT_MIN, 255)
        image = gradient(width, height, tuple(start), tuple(end), rng.uniform(0, 2 * math.pi))
        mask = Image.new("L", (width, height), 0)
        paint, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(2, 5))):
            cls = int(rng.integers(len(CLASS_NAMES)))
            shape, proportion = CLASS_SPECS[cls]
            ratio = math.exp(rng.uniform(*(math.log(r) for r in RATIO_RANGES[proportion])))  # height / width
            w = rng.uniform(0.3, 0.6) * min(width, height / ratio)
            h = w * ratio
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


def palette(num_colors: int = 256) -> list[int]:
    """A fixed palette of distinct colours (index 0 black, 255 white) as a flat RGB list."""
    rng = np.random.default_rng(0)
    colors = rng.integers(40, 256, size=(256, 3))
    colors[0], colors[255] = (0, 0, 0), (255, 255, 255)
    return colors[:num_colors].flatten().tolist()


def palette_mask(mask: Image.Image) -> Image.Image:
    """An ``L`` mask of class indices as a palette PNG: the same indices, shown in colour."""
    out = mask.convert("P") if mask.mode != "P" else mask.copy()
    out.putpalette(palette())
    return out
