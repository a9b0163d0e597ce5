"""``ImageFolder``: a folder with one sub-folder per class, holding images and clips."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from PIL import Image

from navit.data.files import walk
from navit.data.stream import IndexedSource, check_index
from navit.media import is_media_name, load_media
from navit.media.image import IMAGE_EXTENSIONS, load_rgb
from navit.media.video import VIDEO_EXTENSIONS, VideoFile, is_video_name, require_av


def media_item(path: str, label: int, name: str) -> dict[str, Any]:
    """The item of an image or video file: ``{"image": PIL}`` or ``{"video": VideoFile}``, and its label."""
    if is_video_name(path):
        return {"video": VideoFile(path, name=name), "label": label}
    return {"image": load_rgb(path, name=name), "label": label}


class MediaFiles(IndexedSource):
    """Image and video files with a class label each (absolute ``_paths``, ``_labels``, and the
    ``root`` keys are relative to): the part :class:`ImageFolder` and manifests share."""

    root: str
    _paths: list[str]
    _labels: list[int]

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def provides(self) -> frozenset[str]:
        return frozenset({"label", *{"video" if is_video_name(p) else "image" for p in self._paths}})

    def path(self, index: int) -> str:
        return self._paths[check_index(index, len(self), self)]

    def key(self, index: int) -> str:
        return self._keys[check_index(index, len(self), self)]

    @functools.cached_property
    def _keys(self) -> list[str]:
        """Each file's path relative to ``root``, with ``/`` (made once: keys are asked per item)."""
        return ["/".join(os.path.relpath(path, self.root).split(os.sep)) for path in self._paths]

    def label(self, index: int) -> int:
        return self._labels[check_index(index, len(self), self)]

    def describe(self, index: int) -> str:
        return self.path(index)

    def load(self, index: int) -> Image.Image:
        return load_media(self.path(index), self.describe(index))

    def item(self, index: int) -> dict[str, Any]:
        return media_item(self.path(index), self.label(index), self.describe(index))

    def fields(self, index: int) -> dict[str, bytes]:
        """The item as WebDataset fields: the file's own bytes under its extension (lower case) and
        the class index as ``cls`` (see :mod:`navit.data.shard_writer`)."""
        path = self.path(index)
        return {os.path.splitext(path)[1][1:].lower(): Path(path).read_bytes(), "cls": str(self.label(index)).encode()}


class ImageFolder(MediaFiles):
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
        self._paths: list[str] = []
        self._labels: list[int] = []
        for label, name in enumerate(classes):
            files = self._scan(name)
            if not files:
                raise ValueError(
                    f"ImageFolder class folder {os.path.join(self.root, name)} (class {name!r}) "
                    f"contains no images or videos with extensions {' '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}"
                )
            self._paths.extend(os.path.join(self.root, f) for f in files)
            self._labels.extend([label] * len(files))
        if "video" in self.provides:
            require_av(f"ImageFolder {self.root}, which holds video files,")

    def _scan(self, class_name: str) -> list[str]:
        found = []
        for folder, files in walk(os.path.join(self.root, class_name)):
            rel = os.path.relpath(folder, self.root)
            found.extend(os.path.join(rel, f) for f in files if is_media_name(f))
        # Sort on path components so the order does not depend on the OS separator.
        return sorted(found, key=lambda p: p.split(os.sep))

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r})"
