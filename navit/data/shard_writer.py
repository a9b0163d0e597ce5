"""Writing WebDataset shards: the samples of any indexed source as uncompressed ``.tar`` files.

A sample is consecutive tar members ``<key>.<ext>`` sharing a key (a zero-padded running number,
no dots): the file's own bytes under its own extension (``jpg``, ``png``, ``mp4``, ...; generated
pictures as ``png``), ``cls`` (the class index in ASCII), ``txt`` (a caption), ``mask.png`` (a
segmentation mask) and ``json`` (``{"source": <the item's key in its source>}``). Members carry no
time, owner or permission of their own (mtime 0, uid/gid 0, mode 0o444), so the same source, seed
and limits give the same bytes. Beside the shards, ``index.json`` lists them with their counts and
sizes, the class names and what the samples provide; ``classes.txt`` holds the class names.

Sources say what to copy with ``fields(index) -> {ext: bytes}`` (files are copied as stored,
never re-encoded); :func:`write_shards` adds the ``json`` member, shuffles, rolls shards over at a
size or count limit, and skips and counts items it cannot read.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from navit.data.webdataset import item_keys

FORMAT, VERSION = "navit-shards", 1
INDEX, CLASSES = "index.json", "classes.txt"
DEFAULT_MAX_SIZE = 10**9  # 1 GB: large enough for fast sequential reads, small enough to spread over workers
MIN_MAX_SIZE = tarfile.RECORDSIZE  # the smallest tar file there is (an empty one)
_ENCODING = "utf-8"
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_PREFIX = re.compile(r"^[\w-]+$")
_KEY = re.compile(r"^[^.]+$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``1GB``, ``500MB``, ``64kB`` (powers of 1000), ``1GiB`` (powers of 1024)
    or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    found = _SIZE.match(str(text))
    if found is None or (found.group(3) and not found.group(2)):
        raise ValueError(f"cannot read {text!r} as a size: expected e.g. 1GB, 500MB, 64kB, 1GiB or a number of bytes")
    number, unit, binary, _ = found.groups()
    scale = 1024 ** "kmgt".index(unit.lower()) * 1024 if binary else _UNITS[unit.lower()]
    return int(float(number) * scale)


def closed_tar_size(offset: int) -> int:
    """The size of a tar file whose members end at byte ``offset``, once closed (two zero blocks,
    then zeros up to a whole record, as :mod:`tarfile` writes)."""
    return math.ceil((offset + 2 * tarfile.BLOCKSIZE) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def member(name: str, size: int) -> tarfile.TarInfo:
    """A regular file's tar header with nothing of the writing machine in it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_bytes(info: tarfile.TarInfo) -> int:
    """What ``info`` and its data take in a tar: its header block(s) and the data padded to blocks."""
    header = len(info.tobuf(tarfile.PAX_FORMAT, _ENCODING, "surrogateescape"))
    return header + math.ceil(info.size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Samples into ``<out>/<prefix>-000000.tar``, ``-000001.tar``, ...: a shard is closed before a
    sample would take it past ``max_size`` bytes or ``max_count`` samples (a sample bigger than
    ``max_size`` goes alone into a shard of its own). A shard is written as ``.tar.part`` and
    renamed when closed, so a ``.tar`` file is always complete."""

    def __init__(self, out: str | os.PathLike[str], *, prefix: str = "shard", max_size: int = DEFAULT_MAX_SIZE,
                 max_count: int | None = None) -> None:  # fmt: skip
        if not _PREFIX.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-' (it names the files)")
        if max_size < MIN_MAX_SIZE:
            raise ValueError(f"max size {max_size} bytes is below {MIN_MAX_SIZE}, the size of an empty tar file")
        if max_count is not None and max_count < 1:
            raise ValueError(f"max count must be at least 1 sample per shard, got {max_count}")
        self.out, self.prefix, self.max_size, self.max_count = Path(out), prefix, max_size, max_count
        self.shards: list[dict[str, Any]] = []
        self.total = 0  # samples written, in all shards
        self._tar: tarfile.TarFile | None = None
        self._offset = self._count = 0

    @property
    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """One sample: each ``fields[ext]`` becomes the member ``<key>.<ext>``, in that order."""
        if not _KEY.match(key) or not fields or not all(ext and not ext.startswith(".") for ext in fields):
            raise ValueError(f"sample key {key!r} must be non-empty without dots, with non-empty extensions "
                             f"{list(fields)}")  # fmt: skip
        members = [(member(f"{key}.{ext}", len(data)), data) for ext, data in fields.items()]
        size = sum(member_bytes(info) for info, _ in members)
        full = self._count == self.max_count or closed_tar_size(self._offset + size) > self.max_size
        if self._tar is not None and full:
            self._close_shard()
        if self._tar is None:
            self._tar = tarfile.open(self.out / (self._name + ".part"), "w", format=tarfile.PAX_FORMAT,
                                     encoding=_ENCODING)  # fmt: skip
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._offset += size
        self._count += 1
        self.total += 1
        assert self._tar.offset == self._offset, "tar member sizes were predicted wrongly"

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        path = self.out / self._name
        os.replace(self.out / (self._name + ".part"), path)
        size = path.stat().st_size
        assert size == closed_tar_size(self._offset), "a closed shard's size was predicted wrongly"
        self.shards.append({"url": path.name, "count": self._count, "bytes": size})
        self._offset = self._count = 0

    def close(self) -> list[dict[str, Any]]:
        """Close the last shard; every shard's ``{"url", "count", "bytes"}``."""
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close and delete every file this writer made."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            (self.out / (self._name + ".part")).unlink(missing_ok=True)
        for shard in self.shards:
            (self.out / shard["url"]).unlink(missing_ok=True)
        self.shards = []


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def mp4_bytes(clip: Any) -> bytes:
    """A clip (``info()``, ``read()``) encoded as an H.264 ``.mp4`` file's bytes (needs PyAV)."""
    import tempfile

    from navit.media.video import write_video

    info = clip.info()
    count = max(1, round(info.duration * info.fps)) if info.duration and info.fps else 10**6
    frames, times = clip.read(num_frames=count)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        write_video(path, frames, info.fps or 25.0, None if info.fps else times)
        return Path(path).read_bytes()


def encode_item(item: dict[str, Any]) -> dict[str, bytes]:
    """The fields of a generated item, which has no file: pictures and masks as PNG, a clip as MP4."""
    fields: dict[str, bytes] = {}
    if "image" in item:
        fields["png"] = png_bytes(item["image"])
    if "video" in item:
        fields["mp4"] = mp4_bytes(item["video"])
    if "label" in item:
        fields["cls"] = str(int(item["label"])).encode("ascii")
    if "caption" in item:
        fields["txt"] = str(item["caption"]).encode("utf-8")
    if "mask" in item:
        fields["mask.png"] = png_bytes(item["mask"])
    return fields


def fields_method(source: Any) -> Callable[[int], dict[str, bytes]]:
    """``source.fields``, or an error saying why shards cannot be written from ``source``."""
    fields = getattr(source, "fields", None)
    if fields is None:
        raise ValueError(f"cannot write shards from {source!r}: it has no files to copy (a source needs a "
                         "fields(index) method returning {extension: bytes})")  # fmt: skip
    for needed in ("__len__", "key", "describe"):
        if not hasattr(source, needed):
            raise ValueError(f"cannot write shards from {source!r}: it has no random access ({needed}); "
                             "write shards from a folder, a manifest or a built-in set")  # fmt: skip
    return fields


def prepare_out(out: Path, prefix: str, overwrite: bool) -> None:
    """Make the folder ``out``, refusing one that holds shards or an index (``overwrite`` deletes
    this writer's files: the index, ``classes.txt`` and ``<prefix>-NNNNNN.tar``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar(\.part)?$")
    found = sorted(p.name for p in out.iterdir() if p.name == INDEX or ours.match(p.name) or p.suffix == ".tar")
    if found and not overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"output folder {out} already holds shards ({shown}); pass --overwrite to replace them "
                         "or choose another folder")  # fmt: skip
    foreign = [name for name in found if name != INDEX and not ours.match(name)]
    if foreign:
        raise ValueError(f"output folder {out} holds other .tar files ({', '.join(foreign[:3])}) that a reader of "
                         f"the folder would mix in; move them or choose another folder")  # fmt: skip
    for name in [*found, CLASSES]:
        (out / name).unlink(missing_ok=True)


def _read_fields(source: Any, fields: Callable[[int], dict[str, bytes]], index: int) -> dict[str, bytes]:
    read = dict(fields(index))
    meta = json.loads(read["json"]) if "json" in read else {}  # a source's own metadata (boxes), kept
    read["json"] = json.dumps({**meta, "source": source.key(index)}, ensure_ascii=False).encode("utf-8")
    return read


def write_shards(source: Any, out: str | os.PathLike[str], *, max_size: int | str = DEFAULT_MAX_SIZE,
                 max_count: int | None = None, seed: int = 0, shuffle: bool = True, prefix: str = "shard",
                 overwrite: bool = False, fail_fast: bool = False, spec: str | None = None,
                 progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write every sample of ``source`` (an indexed source with ``fields``) as shards in ``out``
    (see the module docstring), in a seeded shuffled order (``shuffle=False``: the source's order).

    An item that cannot be read is skipped and counted by the kind of error (``fail_fast``: the
    first one stops the run and the shards written so far are deleted). Returns ``{"count",
    "shards", "bytes", "out", "index", "skipped": {error kind: n}, "failures": [first few]}``."""
    fields = fields_method(source)
    writer = ShardWriter(out, prefix=prefix, max_size=parse_size(max_size), max_count=max_count)
    prepare_out(writer.out, prefix, overwrite)
    order = np.random.default_rng(seed).permutation(len(source)) if shuffle else np.arange(len(source))
    skipped: Counter[str] = Counter()
    failures: list[str] = []
    provides: set[str] = set()
    try:
        for index in tqdm(order.tolist(), desc=f"sharding {spec or repr(source)}", unit="sample", disable=not progress):
            try:
                sample = _read_fields(source, fields, index)
            except ImportError:
                raise  # a missing package is not a bad item
            except Exception as error:  # one bad item must not end a long run: count it
                if fail_fast:
                    raise ValueError(f"cannot read {source.describe(index)}: {error} (without --fail-fast "
                                     "unreadable items are skipped and counted)") from error  # fmt: skip
                skipped[type(error).__name__] += 1
                failures += [f"{source.describe(index)}: {error}"][: 3 - len(failures)]
                continue
            provides |= item_keys(sample, bool(source.class_names))
            writer.write(f"{writer.total:09d}", sample)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    if not shards:
        raise ValueError(f"no sample of {spec or source!r} could be read ({sum(skipped.values())} skipped: "
                         f"{'; '.join(failures) or 'the source is empty'})")  # fmt: skip
    index = {"format": FORMAT, "version": VERSION, "count": writer.total, "classes": list(source.class_names),
             "provides": sorted(provides), "shards": shards,
             "source": spec if spec is not None else repr(source)}  # fmt: skip
    (writer.out / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (writer.out / CLASSES).write_text("".join(f"{name}\n" for name in source.class_names), encoding="utf-8")
    return {"count": writer.total, "shards": len(shards), "bytes": sum(s["bytes"] for s in shards),
            "out": str(writer.out), "index": str(writer.out / INDEX), "skipped": dict(skipped),
            "failures": failures}  # fmt: skip
