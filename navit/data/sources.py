"""Data sources: indexable collections of items (image, label, ...) that decode on demand.

Every source implements :class:`ImageSource`: ``len``, ``item(i)`` (a dict: the decoded RGB PIL
``"image"``, EXIF orientation applied, its ``"label"`` and whatever else the source has, such as
a ``"caption"``), ``label(i)`` (cheap, no decoding), ``load(i)`` (the image alone),
``describe(i)`` (for error messages) and a ``class_names`` list. Tasks take from an item the keys
they need. Sources hold only plain Python data (paths, offsets, ints), so they pickle cheaply into
DataLoader workers.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from navit.media.image import IMAGE_EXTENSIONS, load_rgb
from navit.data.files import walk
from navit.data.segmentation import SegmentationFolder, SegmentationManifest, manifest_has_masks
from navit.synthetic.segmentation import SyntheticSegmentation
from navit.synthetic.shapes import SyntheticShapes
from navit.synthetic.hard import SyntheticLargest
from navit.synthetic.video import SyntheticMotion
from navit.media.video import VIDEO_EXTENSIONS, VideoFile, is_video_name, require_av

MANIFEST_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl", ".ndjson")


@runtime_checkable
class ImageSource(Protocol):
    """What the training / evaluation pipeline needs from a dataset."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def item(self, index: int) -> dict[str, Any]:
        """Item ``index`` as a dict: ``"image"``, ``"label"`` and any further keys."""
        ...

    def label(self, index: int) -> int:
        """Class index of item ``index``, without decoding the image."""
        ...

    def load(self, index: int) -> Image.Image:
        """The decoded image: mode RGB, EXIF orientation applied."""
        ...

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from (path, shard:member), for error messages."""
        ...


def _check_index(index: int, length: int, owner: object) -> int:
    if isinstance(index, bool) or not hasattr(index, "__index__"):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    index = index.__index__()
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {owner!r} ({length} items)")
    return index


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_media_name(name: str) -> bool:
    """Whether ``name`` has an image or video extension (case-insensitive)."""
    return _is_image_name(name) or is_video_name(name)


def media_item(path: str, label: int, name: str) -> dict[str, Any]:
    """The item of an image or video file: ``{"image": PIL}`` or ``{"video": VideoFile}``, and its label."""
    if is_video_name(path):
        return {"video": VideoFile(path, name=name), "label": label}
    return {"image": load_rgb(path, name=name), "label": label}


def load_media(path: str, name: str) -> Image.Image:
    """An image file, or the first frame of a video file."""
    if is_video_name(path):
        return VideoFile(path, name=name).read(num_frames=1)[0][0].convert("RGB")
    return load_rgb(path, name=name)


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------
class ImageFolder:
    """``root/<class_name>/**/<image or video>``: one sub-folder per class.

    Class names are the sorted sub-folder names (hidden ones, starting with ``.``, are skipped).
    Inside each class folder, image and video files (see :data:`IMAGE_EXTENSIONS` and
    :data:`~navit.media.video.VIDEO_EXTENSIONS`, case-insensitive) are collected recursively, in
    sorted order of their relative paths, through symbolic links (a folder reached twice is read
    once); a class may hold images, videos or both. Files with other extensions, and folders
    named like files, are ignored; an image or video directly in ``root`` has no class and is refused.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"ImageFolder root {self.root} does not exist")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"ImageFolder root {self.root} is not a directory")
        with os.scandir(self.root) as entries:
            visible = [e for e in entries if not e.name.startswith(".")]
        classes = sorted(e.name for e in visible if e.is_dir())
        if not classes:
            raise ValueError(
                f"ImageFolder root {self.root} has no class sub-folders "
                "(expected root/<class_name>/<image files>)"
            )
        loose = sorted(e.name for e in visible if not e.is_dir() and is_media_name(e.name))
        if loose:
            raise ValueError(
                f"ImageFolder root {self.root} holds {len(loose)} image or video file(s) outside the class "
                f"folders ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}): they have no class; "
                "move them into root/<class_name>/"
            )
        self.class_names: list[str] = classes
        self._paths: list[str] = []  # relative to root
        self._labels: list[int] = []
        for label, name in enumerate(classes):
            files = self._scan(name)
            if not files:
                raise ValueError(
                    f"ImageFolder class folder {os.path.join(self.root, name)} (class {name!r}) "
                    f"contains no images or videos with extensions {' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}"
                )
            self._paths.extend(files)
            self._labels.extend([label] * len(files))
        if self.has_video:
            require_av(f"ImageFolder {self.root}, which holds video files,")

    def _scan(self, class_name: str) -> list[str]:
        found = []
        for folder, files in walk(os.path.join(self.root, class_name)):
            rel = os.path.relpath(folder, self.root)
            found.extend(os.path.join(rel, f) for f in files if is_media_name(f))
        # Sort on path components so the order does not depend on the OS separator.
        return sorted(found, key=lambda p: p.split(os.sep))

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r})"

    def path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[_check_index(index, len(self), self)])

    def label(self, index: int) -> int:
        return self._labels[_check_index(index, len(self), self)]

    @property
    def has_video(self) -> bool:
        return any(is_video_name(p) for p in self._paths)

    def load(self, index: int) -> Image.Image:
        return load_media(self.path(index), self.path(index))

    def item(self, index: int) -> dict[str, Any]:
        return media_item(self.path(index), self.label(index), self.path(index))

    def describe(self, index: int) -> str:
        return self.path(index)


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
_INT_RE = re.compile(r"^[+-]?\d+$")


class Manifest:
    """A CSV or JSON-lines file listing ``path`` and ``label`` per image.

    * ``.csv``: a header row with (at least) the columns ``path`` and ``label``.
    * ``.jsonl`` / ``.ndjson``: one object per line, ``{"path": ..., "label": ...}``; blank
      lines are skipped.

    Labels are class-name strings or integer class indices. With ``class_names`` given, strings
    must be one of them (a string of digits that is not a class name is read as an index) and
    indices must be in range. Without it: if every label is an integer, ``class_names`` is
    ``"0" .. str(max_label)``; otherwise every label is a class name and ``class_names`` is their
    sorted set (JSON integers mixed with names are an error). Relative paths are resolved against
    ``root``, by default the manifest's folder. Files are not checked at construction; loading a
    missing file raises an error naming the path and the manifest line.

    Captions (for image-text training) are optional: a ``caption`` column (CSV) or key (JSON
    lines). :attr:`has_captions` tells whether the manifest has them; :meth:`caption` returns one,
    and raises a ``ValueError`` naming the manifest (and line) if the manifest has no captions or
    that row's caption is missing, empty or not a string.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.manifest_path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(f"manifest {self.manifest_path} does not exist")
        base = root if root is not None else os.path.dirname(self.manifest_path)
        self.root = os.path.abspath(os.fspath(base))
        # Filled by the readers, one entry per row: the caption, or None where a row has none.
        self._captions: list[str | None] = []
        self.has_captions = False
        ext = os.path.splitext(self.manifest_path)[1].lower()
        if ext == ".csv":
            rows = self._read_csv()
        elif ext in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ValueError(
                f"manifest {self.manifest_path}: unknown format {ext!r} (expected .csv or .jsonl)"
            )
        if not rows:
            raise ValueError(f"manifest {self.manifest_path} lists no images")
        self._paths: list[str] = []
        self._lines: list[int] = []
        for line, p, _ in rows:
            p = os.path.expanduser(p)
            self._paths.append(p if os.path.isabs(p) else os.path.join(self.root, p))
            self._lines.append(line)
        self.class_names, self._labels = self._resolve_labels(rows, class_names)

    # Each row: (line number, path string, raw label: int or str).
    def _error(self, line: int, msg: str) -> ValueError:
        return ValueError(f"manifest {self.manifest_path}, line {line}: {msg}")

    def _read_csv(self) -> list[tuple[int, str, int | str]]:
        rows = []
        with open(self.manifest_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = None
            for record in reader:
                if header is None:
                    if not record or all(not c.strip() for c in record):
                        continue
                    header = [c.strip().lower() for c in record]
                    missing = [c for c in ("path", "label") if c not in header]
                    if missing:
                        raise self._error(
                            reader.line_num,
                            f"header {record} lacks column(s) {', '.join(missing)} "
                            "(expected a header row with columns path,label)",
                        )
                    ip, il = header.index("path"), header.index("label")
                    ic = header.index("caption") if "caption" in header else None
                    self.has_captions = ic is not None
                    continue
                if not record or all(not c.strip() for c in record):
                    continue
                if len(record) != len(header):
                    raise self._error(
                        reader.line_num, f"expected {len(header)} fields, found {len(record)}"
                    )
                p, lab = record[ip].strip(), record[il].strip()
                if not p:
                    raise self._error(reader.line_num, "empty path")
                if not lab:
                    raise self._error(reader.line_num, "empty label")
                rows.append((reader.line_num, p, lab))
                self._captions.append(record[ic].strip() or None if ic is not None else None)
        if header is None:
            raise ValueError(f"manifest {self.manifest_path} is empty (expected a header path,label)")
        return rows

    def _read_jsonl(self) -> list[tuple[int, str, int | str]]:
        rows = []
        with open(self.manifest_path, encoding="utf-8-sig") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise self._error(line_no, f"invalid JSON: {e.msg}") from e
                if not isinstance(obj, dict):
                    raise self._error(line_no, "expected a JSON object with keys path and label")
                missing = [k for k in ("path", "label") if k not in obj]
                if missing:
                    raise self._error(line_no, f"missing key(s) {', '.join(missing)}")
                p, lab = obj["path"], obj["label"]
                if not isinstance(p, str) or not p:
                    raise self._error(line_no, f"path must be a non-empty string, got {p!r}")
                if isinstance(lab, bool) or not isinstance(lab, (int, str)):
                    raise self._error(line_no, f"label must be an int or a class name, got {lab!r}")
                if isinstance(lab, str) and not lab.strip():
                    raise self._error(line_no, "empty label")
                rows.append((line_no, p, lab.strip() if isinstance(lab, str) else lab))
                cap = obj.get("caption")
                self.has_captions = self.has_captions or "caption" in obj
                self._captions.append(cap.strip() or None if isinstance(cap, str) else None)
        return rows

    def _resolve_labels(
        self, rows: list[tuple[int, str, int | str]], class_names: Sequence[str] | None
    ) -> tuple[list[str], list[int]]:
        labels: list[int] = []
        if class_names is not None:
            names = [str(c) for c in class_names]
            if not names:
                raise ValueError("class_names must not be empty")
            lookup = {n: i for i, n in enumerate(names)}
            for line, _, raw in rows:
                if isinstance(raw, str) and raw in lookup:
                    labels.append(lookup[raw])
                elif isinstance(raw, int) or _INT_RE.match(raw):
                    idx = int(raw)
                    if not 0 <= idx < len(names):
                        raise self._error(
                            line, f"label {idx} out of range for {len(names)} class_names"
                        )
                    labels.append(idx)
                else:
                    raise self._error(line, f"unknown class name {raw!r} (not in class_names)")
            return names, labels

        def is_int(raw: int | str) -> bool:
            return isinstance(raw, int) or bool(_INT_RE.match(raw))

        if all(is_int(raw) for _, _, raw in rows):
            for line, _, raw in rows:
                idx = int(raw)
                if idx < 0:
                    raise self._error(line, f"negative label {idx}")
                labels.append(idx)
            return [str(i) for i in range(max(labels) + 1)], labels
        for line, _, raw in rows:
            if isinstance(raw, int):
                raise self._error(
                    line,
                    f"integer label {raw} mixed with class-name labels; use one kind or pass class_names",
                )
        names = sorted({str(raw) for _, _, raw in rows})
        lookup = {n: i for i, n in enumerate(names)}
        return names, [lookup[str(raw)] for _, _, raw in rows]

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"Manifest({self.manifest_path!r})"

    def path(self, index: int) -> str:
        return self._paths[_check_index(index, len(self), self)]

    def label(self, index: int) -> int:
        return self._labels[_check_index(index, len(self), self)]

    @property
    def has_video(self) -> bool:
        return any(is_video_name(p) for p in self._paths)

    def load(self, index: int) -> Image.Image:
        return load_media(self.path(index), self.describe(index))

    def item(self, index: int) -> dict[str, Any]:
        item = media_item(self.path(index), self.label(index), self.describe(index))
        if self.has_captions:
            item["caption"] = self.caption(index)
        return item

    def describe(self, index: int) -> str:
        index = _check_index(index, len(self), self)
        return f"{self._paths[index]} ({self.manifest_path}, line {self._lines[index]})"

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (a ``caption`` column / key); see the class docstring."""
        index = _check_index(index, len(self), self)
        if not self.has_captions:
            raise ValueError(
                f"manifest {self.manifest_path} has no captions "
                "(add a 'caption' column to the CSV, or a \"caption\" key to each JSON line)"
            )
        text = self._captions[index]
        if text is None:
            raise ValueError(
                f"manifest {self.manifest_path}, line {self._lines[index]}: "
                "the caption is missing, empty or not a string"
            )
        return text


# ---------------------------------------------------------------------------------------------
# TarShards
# ---------------------------------------------------------------------------------------------
_IMAGE_EXTS_NO_DOT = {e[1:] for e in IMAGE_EXTENSIONS}
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(spec: str) -> list[str]:
    """Expand WebDataset-style numeric ranges: ``shard-{000..009}.tar`` (zero padding kept)."""
    m = _BRACE_RANGE.search(spec)
    if not m:
        return [spec]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    step = 1 if int(b) >= int(a) else -1
    out = []
    for k in range(int(a), int(b) + step, step):
        out.extend(_expand_braces(spec[: m.start()] + str(k).zfill(width) + spec[m.end() :]))
    return out


def _resolve_shard_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        spec = os.path.expanduser(os.fspath(paths))
        resolved: list[str] = []
        for pattern in _expand_braces(spec):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"no tar shards match {pattern!r}")
                resolved.extend(matches)
            else:
                resolved.append(pattern)
    else:
        resolved = [os.fspath(p) for p in paths]
    if not resolved:
        raise ValueError("TarShards needs at least one .tar file")
    out = []
    for p in resolved:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tar shard {p} does not exist")
        out.append(os.path.abspath(p))
    return out


class TarShards:
    """Images stored in WebDataset-style ``.tar`` shards, read by offset (no webdataset needed).

    A sample is the group of members sharing a key (the member path up to the first dot of its
    file name): ``<key>.<image ext>`` (jpg, jpeg, png, webp, bmp, gif, tif, tiff) plus a label,
    either ``<key>.cls`` holding an integer or ``<key>.json`` holding ``{"label": ...}`` (an int,
    or a class name listed in ``classes.txt``). Keys with neither an image nor a label (e.g. only
    a caption) are ignored; a key with only one of the two is an error.

    ``paths`` is a list of ``.tar`` files, or one string: a path, a glob (``shards/*.tar``) or a
    brace range (``shards/train-{000..015}.tar``). Every shard is indexed once at construction
    with the standard library ``tarfile`` (member data offsets and sizes, plus the small label
    members), so the source is indexable and shardable. Shards must be uncompressed.

    ``class_names``: the lines of an optional ``classes.txt`` in the folder of the first shard,
    else ``"0" .. "K-1"`` with K = largest label + 1.
    """

    def __init__(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> None:
        self.shards = _resolve_shard_paths(paths)
        classes_file = os.path.join(os.path.dirname(self.shards[0]), "classes.txt")
        names: list[str] | None = None
        if os.path.isfile(classes_file):
            with open(classes_file, encoding="utf-8-sig") as f:
                names = [line.strip() for line in f if line.strip()]
            if not names:
                raise ValueError(f"{classes_file} lists no class names")
        self.classes_file = classes_file if names is not None else None
        lookup = {n: i for i, n in enumerate(names)} if names is not None else None

        # Per sample: shard index, member name, data offset, size, label.
        self._shard: list[int] = []
        self._member: list[str] = []
        self._offset: list[int] = []
        self._size: list[int] = []
        self._labels: list[int] = []
        for si, shard_path in enumerate(self.shards):
            self._index_shard(si, shard_path, lookup)
        if not self._labels:
            raise ValueError(f"no labelled images found in tar shards {self.shards}")
        if names is None:
            names = [str(i) for i in range(max(self._labels) + 1)]
        else:
            for i, lab in enumerate(self._labels):
                if lab >= len(names):
                    raise ValueError(
                        f"{self.describe(i)}: label {lab} out of range for the "
                        f"{len(names)} classes in {classes_file}"
                    )
        self.class_names: list[str] = names

    def _index_shard(self, si: int, shard_path: str, lookup: dict[str, int] | None) -> None:
        images: dict[str, tuple[str, int, int]] = {}
        labels: dict[str, int] = {}
        order: dict[str, None] = {}
        unread: dict[str, list[str]] = {}  # image or label fields under a longer extension, by key
        try:
            tf = tarfile.open(shard_path, mode="r:")
        except tarfile.ReadError as e:
            raise ValueError(
                f"cannot read tar shard {shard_path}: {e} (shards must be uncompressed .tar files)"
            ) from e
        with tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name[2:] if m.name.startswith("./") else m.name
                head, base = os.path.split(name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = (head + "/" + stem if head else stem), ext.lower()
                where = f"{shard_path}:{m.name}"
                if ext in _IMAGE_EXTS_NO_DOT:
                    if key not in images:
                        images[key] = (m.name, m.offset_data, m.size)
                elif ext == "cls":
                    text = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                    if not _INT_RE.match(text) or int(text) < 0:
                        raise ValueError(f"{where}: expected a non-negative integer label, got {text[:40]!r}")
                    labels[key] = int(text)
                elif ext == "json":
                    raw = tf.extractfile(m).read()
                    try:
                        obj = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise ValueError(f"{where}: invalid JSON: {e}") from e
                    if not isinstance(obj, dict) or "label" not in obj:
                        raise ValueError(f'{where}: expected a JSON object with a "label" key')
                    lab = obj["label"]
                    if isinstance(lab, str) and lookup is not None and lab in lookup:
                        lab = lookup[lab]
                    elif isinstance(lab, str) and _INT_RE.match(lab):
                        lab = int(lab)
                    if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
                        hint = "" if lookup is not None else " (class-name labels need a classes.txt next to the shards)"
                        raise ValueError(f"{where}: cannot use label {obj['label']!r}{hint}")
                    labels[key] = lab
                else:
                    if ext.rsplit(".", 1)[-1] in (*_IMAGE_EXTS_NO_DOT, "cls", "json"):  # e.g. "v2.png": a dot in a key
                        unread.setdefault(key, []).append(ext)
                    continue
                order.setdefault(key, None)  # keys in order of first appearance
        dropped = [key for key in unread if key not in order]
        if dropped:
            key = dropped[0]
            raise ValueError(
                f"{shard_path}: {len(dropped)} sample(s) have no member navit reads, e.g. {key!r} with "
                f"{', '.join('.' + e for e in unread[key])}: a sample's key ends at the first dot of a member's "
                f"name (WebDataset's rule), so name members <key>.<ext> with no dot in <key>"
            )
        for key in order:
            if key not in images:
                raise ValueError(f"{shard_path}: sample {key!r} has a label but no image member")
            if key not in labels:
                raise ValueError(
                    f"{shard_path}: sample {key!r} has an image but no label (.cls or .json) member"
                )
            member, offset, size = images[key]
            self._shard.append(si)
            self._member.append(member)
            self._offset.append(offset)
            self._size.append(size)
            self._labels.append(labels[key])

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        return f"TarShards({len(self.shards)} shards, {len(self)} images)"

    def label(self, index: int) -> int:
        return self._labels[_check_index(index, len(self), self)]

    def describe(self, index: int) -> str:
        index = _check_index(index, len(self), self)
        return f"{self.shards[self._shard[index]]}:{self._member[index]}"

    def read_bytes(self, index: int) -> bytes:
        """The encoded image bytes of item ``index``, read straight from its shard."""
        index = _check_index(index, len(self), self)
        with open(self.shards[self._shard[index]], "rb") as f:
            f.seek(self._offset[index])
            data = f.read(self._size[index])
        if len(data) != self._size[index]:
            raise ValueError(
                f"{self.describe(index)}: shard truncated (read {len(data)} of {self._size[index]} bytes)"
            )
        return data

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.read_bytes(index), name=self.describe(index))

    def item(self, index: int) -> dict[str, Any]:
        return {"image": self.load(index), "label": self.label(index)}


# ---------------------------------------------------------------------------------------------
# Subset, splitting, sharding
# ---------------------------------------------------------------------------------------------
class Subset:
    """The items ``indices`` of ``source``, in that order (a Subset of a Subset is flattened)."""

    def __init__(self, source: ImageSource, indices: Iterable[int]) -> None:
        idx = [int(i) for i in indices]
        n = len(source)
        for i in idx:
            if not 0 <= i < n:
                raise IndexError(f"Subset index {i} out of range for {source!r} ({n} items)")
        if isinstance(source, Subset):
            idx = [source.indices[i] for i in idx]
            source = source.source
        self.source = source
        self.indices: list[int] = idx

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self.source.class_names

    @property
    def has_video(self) -> bool:
        return getattr(self.source, "has_video", False)

    @property
    def has_masks(self) -> bool:
        return getattr(self.source, "has_masks", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self.indices)} items)"

    def _base(self, index: int) -> int:
        return self.indices[_check_index(index, len(self), self)]

    def label(self, index: int) -> int:
        return self.source.label(self._base(index))

    def load(self, index: int) -> Image.Image:
        return self.source.load(self._base(index))

    def item(self, index: int) -> dict[str, Any]:
        return self.source.item(self._base(index))

    def describe(self, index: int) -> str:
        return self.source.describe(self._base(index))

    def caption(self, index: int) -> str:
        """The caption of item ``index`` of the underlying source (if that source has captions)."""
        base = self._base(index)
        if not callable(getattr(self.source, "caption", None)):
            raise ValueError(f"{self.source!r} has no captions")
        return self.source.caption(base)


class Relabeled:
    """``source`` with its labels renumbered into ``class_names`` (matched by name)."""

    def __init__(self, source: ImageSource, class_names: Sequence[str], mapping: list[int]) -> None:
        self.source, self.class_names, self._mapping = source, list(class_names), mapping

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"Relabeled({self.source!r})"

    @property
    def has_video(self) -> bool:
        return getattr(self.source, "has_video", False)

    @property
    def has_masks(self) -> bool:
        return getattr(self.source, "has_masks", False)

    def label(self, index: int) -> int:
        return self._mapping[self.source.label(index)]

    def load(self, index: int) -> Image.Image:
        return self.source.load(index)

    def item(self, index: int) -> dict[str, Any]:
        item = self.source.item(index)
        return {**item, "label": self._mapping[item["label"]]}

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def caption(self, index: int) -> str:
        if not callable(getattr(self.source, "caption", None)):
            raise ValueError(f"{self.source!r} has no captions")
        return self.source.caption(index)


def with_class_names(source: ImageSource, class_names: Sequence[str], spec: str = "the data") -> ImageSource:
    """``source`` with labels that index ``class_names`` (a model's classes), matched by name.

    A source whose classes are those names in that order is returned as it is; one that lacks
    some classes (a validation folder without one class) is renumbered, so no label shifts; one
    with a class the model does not know is refused, naming it.
    """
    names, wanted = list(source.class_names), list(class_names)
    if names == wanted:
        return source
    index = {name: i for i, name in enumerate(wanted)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(
            f"{spec} has classes {unknown} that the model does not know; its classes are {wanted}"
        )
    return Relabeled(source, wanted, [index[name] for name in names])


def split_holdout(source: ImageSource, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``source`` into ``(rest, holdout)`` with ``holdout`` about ``fraction`` of it.

    Stratified by label: each class contributes its share (largest-remainder rounding, so the
    holdout has ``round(fraction * len(source))`` items overall, clamped so that neither part is
    empty). Which items go where is a seeded shuffle per class; both parts keep source order.
    The result depends only on the labels, ``fraction`` and ``seed``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    n = len(source)
    if n < 2:
        raise ValueError(f"cannot split a source with {n} item(s) into two non-empty parts")
    by_class: dict[int, list[int]] = {}
    for i in range(n):
        by_class.setdefault(source.label(i), []).append(i)
    classes = sorted(by_class)
    target = min(n - 1, max(1, round(fraction * n)))
    quotas = {c: int(fraction * len(by_class[c])) for c in classes}
    rng = random.Random(f"split_holdout:{seed}")
    # Hand out the remaining slots by largest fractional remainder (seeded tie break).
    tie = {c: rng.random() for c in classes}
    remainder_order = sorted(
        classes, key=lambda c: (-(fraction * len(by_class[c]) - quotas[c]), tie[c])
    )
    k = 0
    while sum(quotas.values()) < target:
        c = remainder_order[k % len(classes)]
        if quotas[c] < len(by_class[c]):
            quotas[c] += 1
        k += 1
    while sum(quotas.values()) > target:  # only when clamping to n - 1
        c = remainder_order[k % len(classes)]
        if quotas[c] > 0:
            quotas[c] -= 1
        k += 1
    holdout: list[int] = []
    for c in classes:
        members = list(by_class[c])
        random.Random(f"split_holdout:{seed}:{c}").shuffle(members)
        holdout.extend(members[: quotas[c]])
    held = set(holdout)
    rest = [i for i in range(n) if i not in held]
    return Subset(source, rest), Subset(source, sorted(holdout))


def shard(source: ImageSource, rank: int, world_size: int) -> Subset:
    """Items ``rank, rank + world_size, ...`` of ``source``: disjoint across ranks, covering all.

    Shard sizes differ by at most one; pad or drop at the sampler level if equal sizes matter.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return Subset(source, range(rank, len(source), world_size))


# ---------------------------------------------------------------------------------------------
# open_source
# ---------------------------------------------------------------------------------------------
SYNTHETIC = {"synthetic": SyntheticShapes, "synthetic-video": SyntheticMotion, "synthetic-seg": SyntheticSegmentation,
             "synthetic-hard": SyntheticLargest}  # fmt: skip


def open_source(spec: str | os.PathLike[str]) -> ImageSource:
    """Open a data source from a short string.

    * ``"synthetic"``: :class:`SyntheticShapes` with its default size, seed 0;
      ``"synthetic:N"``: N images, seed 0; ``"synthetic:N:S"``: N images, seed S.
    * ``"synthetic-video[:N[:S]]"``: :class:`SyntheticMotion` clips, likewise.
    * ``"synthetic-seg[:N[:S]]"``: :class:`~navit.data.segmentation.SyntheticSegmentation`
      images with masks, likewise.
    * ``"synthetic-hard[:N[:S]]"``: :class:`~navit.synthetic.hard.SyntheticLargest`, a
      harder set whose label does not depend on aspect ratio, likewise.
    * a directory with ``images/`` and ``masks/``: a
      :class:`~navit.data.segmentation.SegmentationFolder`; a manifest with a ``mask`` column:
      a :class:`~navit.data.segmentation.SegmentationManifest`.
    * an existing directory: :class:`ImageFolder`.
    * ``*.csv`` / ``*.jsonl`` / ``*.ndjson``: :class:`Manifest`.
    * ``*.tar``, a glob of tars (``shards/*.tar``) or a brace range (``s-{00..09}.tar``):
      :class:`TarShards`.
    """
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty data source spec {spec!r}")
    text = text.strip()
    kind = text.split(":")[0]
    if kind in SYNTHETIC:
        parts = text.split(":")[1:]
        if len(parts) > 2 or not all(_INT_RE.match(p) and int(p) >= 0 for p in parts):
            raise ValueError(
                f"bad synthetic spec {text!r}: expected '{kind}', '{kind}:N' or "
                f"'{kind}:N:SEED' with non-negative integers"
            )
        cls = SYNTHETIC[kind]
        if not parts:
            return cls()
        if int(parts[0]) < 1:
            raise ValueError(f"bad synthetic spec {text!r}: need at least 1 example")
        return cls(int(parts[0]), seed=int(parts[1]) if len(parts) == 2 else 0)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "masks")):
            return SegmentationFolder(path)
        return ImageFolder(path)
    lower = path.lower()
    if lower.endswith(MANIFEST_EXTENSIONS):
        return SegmentationManifest(path) if os.path.isfile(path) and manifest_has_masks(path) else Manifest(path)
    if lower.endswith(".tar") and (os.path.isfile(path) or glob.has_magic(path) or _BRACE_RANGE.search(path)):
        return TarShards(path)
    if not os.path.exists(path) and not glob.has_magic(path):
        raise FileNotFoundError(
            f"data source {text!r} does not exist (expected 'synthetic[:N]', 'synthetic-video[:N]', 'synthetic-seg[:N]', a "
            "directory of class folders, a .csv/.jsonl manifest, or .tar shards)"
        )
    raise ValueError(
        f"cannot open data source {text!r}: expected 'synthetic[:N]', a directory of class "
        "folders, a .csv/.jsonl manifest, or .tar shards (a file, a glob or a {000..009} range)"
    )
