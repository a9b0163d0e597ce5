"""``TarShards``: WebDataset-style ``.tar`` shards of images and labels, read by offset."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable
from typing import Any

from PIL import Image

from navit.data.manifest import _INT_RE
from navit.data.stream import IndexedSource, check_index
from navit.media.image import IMAGE_EXTENSIONS, load_rgb

_IMAGE_EXTS_NO_DOT = {e[1:] for e in IMAGE_EXTENSIONS}
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(spec: str) -> list[str]:
    """Expand WebDataset-style numeric ranges: ``shard-{000..009}.tar`` (zero padding kept)."""
    m = BRACE_RANGE.search(spec)
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


class TarShards(IndexedSource):
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

    def key(self, index: int) -> str:
        index = check_index(index, len(self), self)
        return f"{os.path.basename(self.shards[self._shard[index]])}:{self._member[index]}"

    def label(self, index: int) -> int:
        return self._labels[check_index(index, len(self), self)]

    def describe(self, index: int) -> str:
        index = check_index(index, len(self), self)
        return f"{self.shards[self._shard[index]]}:{self._member[index]}"

    def read_bytes(self, index: int) -> bytes:
        """The encoded image bytes of item ``index``, read straight from its shard."""
        index = check_index(index, len(self), self)
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


