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
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from navit.media.image import IMAGE_EXTENSIONS, load_rgb
from navit.data.files import walk
from navit.data.stream import IndexedSource

IGNORE = 255
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


class _MaskPairs(IndexedSource):
    """A list of (image path, mask path) pairs with class names: the shared part of the sources."""

    provides = frozenset({"image", "mask", "label"})

    def __init__(self, pairs: list[tuple[str, str]], classes_file: str, where: str) -> None:
        if not pairs:
            raise ValueError(f"{where} lists no images")
        self.pairs, self.base = pairs, os.path.dirname(classes_file)
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

    def key(self, index: int) -> str:
        return "/".join(os.path.relpath(self.pairs[index][0], self.base).split(os.sep))

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.pairs[index][0], name=self.describe(index))

    def item(self, index: int) -> dict[str, Any]:
        image, mask = self.pairs[index]
        return segmentation_item(image, mask, len(self.class_names), self.describe(index))

    def fields(self, index: int) -> dict[str, bytes]:
        """The item as WebDataset fields: the image file's own bytes under its extension, ``cls``
        0, and the mask file's bytes as ``mask.png`` (a mask stored in another format is written
        as a PNG of the same values)."""
        image, mask = self.pairs[index]
        data = Path(mask).read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            with Image.open(io.BytesIO(data)) as stored:
                buffer = io.BytesIO()
                stored.save(buffer, format="PNG")
                data = buffer.getvalue()
        return {os.path.splitext(image)[1][1:].lower(): Path(image).read_bytes(), "cls": b"0", "mask.png": data}


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
