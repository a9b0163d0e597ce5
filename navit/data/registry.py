"""Opening data sources by name: a registry of schemes (``synthetic:``, ``toy://``) and formats.

``open_source(spec)`` asks each registered entry in turn whether it takes ``spec`` (its scheme is
the text before the first ``:``, or it recognises the path) and opens it with the first that does.
A new source is a module plus one line::

    register_source("toy", ToySource.from_spec, scheme=True, form="toy://N")

Built-in sets are named by import path, so opening a folder never imports the generators.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from navit.data.stream import Source
from navit.data.urls import BRACE_RANGE, is_url

Opener = Callable[[str], Source]


@dataclass(frozen=True)
class SourceEntry:
    name: str
    opener: Opener | str  # a callable, or "module:attribute" imported on first use
    scheme: bool  # matched by the text before the first ":" of a spec
    match: Callable[[str], bool] | None  # otherwise matched by this test of the (user-expanded) path
    form: str  # how a spec of this kind looks, for messages and --help

    def open(self, spec: str) -> Source:
        opener = self.opener
        if isinstance(opener, str):
            module, attribute = opener.split(":")
            opener = getattr(importlib.import_module(module), attribute)
        return opener(spec)


SOURCES: list[SourceEntry] = []


def register_source(name: str, opener: Opener | str, *, scheme: bool = False,
                    match: Callable[[str], bool] | None = None, form: str = "") -> None:  # fmt: skip
    """Register a source: opened by specs ``name:...`` (``scheme=True``) or by paths that ``match``
    accepts (tried in registration order). Registering a name again replaces the old entry."""
    if scheme == (match is not None):
        raise ValueError(f"source {name!r}: give scheme=True or a match function, not both or neither")
    unregister_source(name)
    SOURCES.append(SourceEntry(name, opener, scheme, match, form or name))


def unregister_source(name: str) -> None:
    SOURCES[:] = [entry for entry in SOURCES if entry.name != name]


def source_forms() -> str:
    """The forms every registered source accepts, for help texts."""
    return "; ".join(entry.form for entry in SOURCES)


def open_source(spec: str | os.PathLike[str]) -> Source:
    """The source ``spec`` names (see :data:`SOURCES`), or one clear error listing the forms."""
    text = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else ""
    if not text:
        raise ValueError(f"empty data source spec {spec!r}")
    scheme = text.split(":", 1)[0]
    for entry in SOURCES:
        if entry.scheme and scheme == entry.name:
            return entry.open(text)
    path = os.path.expanduser(text)
    for entry in SOURCES:
        if entry.match is not None and entry.match(path):
            return entry.open(path)
    if not os.path.exists(path) and not glob.has_magic(path):
        raise FileNotFoundError(f"data source {text!r} does not exist (expected {source_forms()})")
    raise ValueError(f"cannot open data source {text!r}: expected {source_forms()}")


_SYNTHETIC_SPEC = re.compile(r"^[\w-]+(?::(\d+))?(?::(\d+))?$")


def synthetic_opener(target: str) -> Opener:
    """An opener of ``NAME[:N[:SEED]]`` specs for the generated set ``target`` ("module:Class")."""

    def open_synthetic(spec: str) -> Source:
        found = _SYNTHETIC_SPEC.match(spec)
        kind = spec.split(":", 1)[0]
        if found is None:
            raise ValueError(f"bad synthetic spec {spec!r}: expected '{kind}', '{kind}:N' or '{kind}:N:SEED' "
                             "with non-negative integers")  # fmt: skip
        module, attribute = target.split(":")
        cls: Any = getattr(importlib.import_module(module), attribute)
        count, seed = found.groups()
        if count is None:
            return cls()
        if int(count) < 1:
            raise ValueError(f"bad synthetic spec {spec!r}: need at least 1 example")
        return cls(int(count), seed=int(seed or 0))

    return open_synthetic


def _is_segmentation_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "masks"))


def _is_manifest(path: str) -> bool:
    return path.lower().endswith((".csv", ".jsonl", ".ndjson"))


def _is_segmentation_manifest(path: str) -> bool:
    from navit.data.segmentation import manifest_has_masks

    return _is_manifest(path) and os.path.isfile(path) and manifest_has_masks(path)


def _is_coco(path: str) -> bool:
    """A folder with an ``annotations.json``, or a ``.json`` file other than a shard ``index.json``."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "annotations.json"))
    return path.lower().endswith(".json") and not path.endswith("index.json") and os.path.isfile(path)


def _is_shards(path: str) -> bool:
    """URLs, ``.tar`` files (a path, a glob, a range), an ``index.json`` or a folder with one."""
    if is_url(path) or path.endswith("index.json"):
        return True
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "index.json"))
    return path.lower().endswith((".tar", ".tar.gz", ".tgz")) and (os.path.isfile(path) or glob.has_magic(path)
                                              or bool(BRACE_RANGE.search(path)))  # fmt: skip


register_source("synthetic", synthetic_opener("navit.synthetic.shapes:SyntheticShapes"), scheme=True,
                form="synthetic[:N[:SEED]] (built-in shapes)")  # fmt: skip
register_source("synthetic-hard", synthetic_opener("navit.synthetic.hard:SyntheticLargest"), scheme=True,
                form="synthetic-hard[:N[:SEED]]")  # fmt: skip
register_source("synthetic-video", synthetic_opener("navit.synthetic.video:SyntheticMotion"), scheme=True,
                form="synthetic-video[:N[:SEED]]")  # fmt: skip
register_source("synthetic-seg", synthetic_opener("navit.synthetic.segmentation:SyntheticSegmentation"), scheme=True,
                form="synthetic-seg[:N[:SEED]]")  # fmt: skip
register_source("synthetic-det", synthetic_opener("navit.synthetic.detection:SyntheticDetection"), scheme=True,
                form="synthetic-det[:N[:SEED]]")  # fmt: skip
register_source("coco", "navit.data.coco:CocoDetection", match=_is_coco,
                form="a COCO detection folder (annotations.json and images/) or a COCO instances .json")  # fmt: skip
register_source("shards", "navit.data.webdataset:Shards", match=_is_shards,
                form="WebDataset shards: .tar files (a path, glob or {000..009} range), http(s):// or s3:// URLs, "
                "or a folder or URL with an index.json")  # fmt: skip
register_source("segmentation-folder", "navit.data.segmentation:SegmentationFolder", match=_is_segmentation_folder,
                form="a folder with images/ and masks/ (segmentation)")  # fmt: skip
register_source("folder", "navit.data.folder:ImageFolder", match=os.path.isdir,
                form="a folder with one sub-folder per class")  # fmt: skip
register_source("segmentation-manifest", "navit.data.segmentation:SegmentationManifest",
                match=_is_segmentation_manifest, form="a .csv/.jsonl manifest of path,mask (segmentation)")  # fmt: skip
register_source("manifest", "navit.data.manifest:Manifest", match=_is_manifest,
                form="a .csv/.jsonl manifest of path,label[,caption]")  # fmt: skip
