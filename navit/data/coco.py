"""COCO detection data: a COCO instances JSON and its images, as a source of ``{"image", "boxes",
"box_labels", "box_ids"}`` items.

Two layouts: ``ROOT/annotations.json`` with the pictures in ``ROOT/images/``, or the path of any
instances JSON whose ``file_name`` entries are relative to the JSON's folder or to an
``images/`` folder beside it. Boxes are COCO's ``[x, y, width, height]`` in the pixels of the
image as it is shown (its EXIF orientation applied); items hold them as corners
``x1, y1, x2, y2``. Class names come from ``categories`` in id order; ``box_labels`` index them.
Crowd boxes (``iscrowd: 1``) are left out; an image without boxes is a negative.

Problems never become silently wrong targets. A box outside its image, a box of zero or negative
size, an unknown category id, an annotation of an unknown image and a missing image file are
each reported with the file and the annotation id: :meth:`CocoDetection.problems` lists them all
(``navit data check``), and reading a bad image's item raises, which the training loader counts
by cause and skips (or stops on with ``--fail-fast``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from navit.data.stream import IndexedSource
from navit.media.image import load_rgb


@dataclass(frozen=True)
class Problem:
    """One bad annotation or image: the image file, the annotation id (None: the image itself),
    and the cause (a short phrase, the same for every problem of its kind)."""

    file: str
    annotation: int | None
    cause: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: annotation {self.annotation}" if self.annotation is not None else self.file
        return f"{where}: {self.cause}{f' ({self.detail})' if self.detail else ''}"


def coco_json_path(path: str) -> str:
    """The instances JSON of a COCO spec: a folder's ``annotations.json``, or the file itself."""
    return os.path.join(path, "annotations.json") if os.path.isdir(path) else path


def _load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"COCO annotations {path} do not exist: give a folder with annotations.json and "
                                "images/, or an instances JSON file") from error  # fmt: skip
    except json.JSONDecodeError as error:
        raise ValueError(f"COCO annotations {path}: invalid JSON at line {error.lineno}: {error.msg}") from error
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"COCO annotations {path} need lists 'images' and 'categories' (and 'annotations'); "
                         "is it an instances JSON?")  # fmt: skip
    return data


class CocoDetection(IndexedSource):
    """The images of a COCO instances JSON with their boxes (see the module's docstring)."""

    provides = frozenset({"image", "boxes", "box_labels"})

    def __init__(self, spec: str | os.PathLike[str]) -> None:
        self.json_path = os.path.abspath(coco_json_path(os.fspath(spec)))
        data = _load_json(self.json_path)
        base = os.path.dirname(self.json_path)
        images_dir = os.path.join(base, "images")
        self.base = images_dir if os.path.isdir(images_dir) else base
        categories = sorted(data["categories"], key=lambda c: c.get("id", 0))
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.images = [image for image in data["images"] if "id" in image and "file_name" in image]
        if not self.images:
            raise ValueError(f"COCO annotations {self.json_path} list no images (each needs an id and a file_name)")
        self.by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.orphans: list[dict[str, Any]] = []
        known = {int(image["id"]) for image in self.images}
        for annotation in data.get("annotations") or []:
            image_id = annotation.get("image_id")
            (self.by_image[int(image_id)] if image_id in known else self.orphans).append(annotation)

    def __repr__(self) -> str:
        return f"CocoDetection({self.json_path!r})"

    def __len__(self) -> int:
        return len(self.images)

    def path(self, index: int) -> str:
        return os.path.join(self.base, self.images[index]["file_name"])

    def describe(self, index: int) -> str:
        return self.path(index)

    def key(self, index: int) -> str:
        return str(self.images[index]["file_name"])

    def load(self, index: int):
        return load_rgb(self.path(index), name=self.describe(index))

    def _checked(self, index: int, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Problem]]:
        """(boxes, labels, ids) of image ``index``'s usable annotations and its problems; ``size``
        (width, height) is the image's own, else the JSON's."""
        image = self.images[index]
        width, height = size or (image.get("width"), image.get("height"))
        file, labels = self.describe(index), {c: i for i, c in enumerate(self.category_ids)}
        boxes, classes, ids, problems = [], [], [], []
        for annotation in self.by_image.get(int(image["id"]), []):
            if annotation.get("iscrowd"):
                continue
            ann_id, bbox = annotation.get("id"), annotation.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                problems.append(Problem(file, ann_id, "bbox is not [x, y, width, height]", f"got {bbox!r}"))
                continue
            x, y, w, h = (float(v) for v in bbox)
            if annotation.get("category_id") not in labels:
                problems.append(Problem(file, ann_id, "unknown category id", f"{annotation.get('category_id')!r}; "
                                        f"categories are {self.category_ids}"))  # fmt: skip
            elif w <= 0 or h <= 0:
                problems.append(Problem(file, ann_id, "box of zero or negative size", f"bbox {bbox}"))
            elif width and height and (x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5):
                problems.append(Problem(file, ann_id, "box outside its image", f"bbox {bbox} in a {width}x{height} image"))
            else:
                boxes.append([max(0.0, x), max(0.0, y), min(x + w, width or x + w), min(y + h, height or y + h)])
                classes.append(labels[annotation["category_id"]])
                ids.append(int(ann_id) if isinstance(ann_id, int) else len(ids))
        return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(classes, dtype=np.int64),
                np.asarray(ids, dtype=np.int64), problems)  # fmt: skip

    def item(self, index: int) -> dict[str, Any]:
        picture = self.load(index)
        image = self.images[index]
        stated = (image.get("width"), image.get("height"))
        if all(stated) and tuple(stated) != picture.size:
            raise ValueError(f"image is {picture.size[0]}x{picture.size[1]} pixels but {self.json_path} says "
                             f"{stated[0]}x{stated[1]}; fix its width and height there")  # fmt: skip
        boxes, labels, ids, problems = self._checked(index, picture.size)
        if problems:
            first = problems[0]
            raise ValueError(f"{first.cause}\nannotation {first.annotation}: {first.detail} (of "
                             f"{len(problems)} bad annotation(s) of this image; run navit data check)")  # fmt: skip
        return {"image": picture, "boxes": boxes, "box_labels": labels, "box_ids": ids}

    def fields(self, index: int) -> dict[str, bytes]:
        """The item as WebDataset fields (:mod:`navit.data.shard_writer`): the image file's own bytes
        under its extension and its usable boxes in ``json`` (``boxes`` in pixels, ``box_labels``,
        ``box_ids``); an image with a bad annotation is an error, as in training."""
        boxes, labels, ids, problems = self._checked(index, None)
        if problems:
            raise ValueError(f"{problems[0]} (run navit data check)")
        meta = {"boxes": boxes.tolist(), "box_labels": labels.tolist(), "box_ids": ids.tolist()}
        path = self.path(index)
        return {os.path.splitext(path)[1][1:].lower(): Path(path).read_bytes(), "json": json.dumps(meta).encode()}

    def problems(self, *, open_images: bool = True) -> list[Problem]:
        """Every problem of the data: annotations of unknown images, and for each image a missing
        or unreadable file, a size that differs from the JSON's and each bad annotation."""
        found = [Problem(self.json_path, a.get("id"), "annotation of an unknown image", f"image_id {a.get('image_id')!r}")
                 for a in self.orphans]  # fmt: skip
        for index in range(len(self)):
            size = None
            if open_images:
                try:
                    size = self.load(index).size
                except FileNotFoundError:
                    found.append(Problem(self.describe(index), None, "missing image"))
                except (ValueError, OSError) as error:
                    found.append(Problem(self.describe(index), None, "unreadable image", str(error)))
            found.extend(self._checked(index, size)[3])
        return found
