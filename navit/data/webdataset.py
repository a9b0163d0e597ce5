"""``Shards``: WebDataset ``.tar`` shards read as streams, from disk, HTTP or object storage.

A shard is read front to back (never by offset, no index kept), so memory stays bounded whatever
the number of shards, and a shard on a server is read as it arrives. WebDataset's conventions:

* a sample is the run of consecutive members sharing a key: the member's path up to the first
  dot of its file name (``a/b/0001.mask.png`` is field ``mask.png`` of key ``a/b/0001``);
* fields become item keys: an image (``jpg``, ``png``, ``webp``, ...) is ``image``, a clip
  (``mp4``, ``webm``, ...) is ``video``; ``cls`` (a class index, or a class name) is ``label``,
  as is ``json``'s ``"label"``, or a ``txt`` that is exactly one of the class names when the
  sample has neither; ``txt`` is ``caption``; ``mask.png`` (or ``seg.png``) is ``mask``;
  ``json``'s ``"boxes"`` ([x1, y1, x2, y2] in pixels) and ``"box_labels"`` are ``boxes`` and
  ``box_labels``. Other fields are ignored.

An epoch is one pass over the shards. Each epoch the shards are shuffled (seeded by the epoch)
and dealt to ranks, balancing their sample counts when an ``index.json`` gives them; the
loader's lanes (worker processes) take a rank's shards in turn. Within a shard, samples pass a
seeded shuffle buffer. A position is (shard, samples taken from it): a resumed reader reads the
shard again from its start and skips that many, which gives the same samples in the same order.

A damaged shard gives its good samples, then one record with the error naming the shard and
member; a shard that cannot be opened (after retries) or holds no sample gives one such record.
The loader counts them by cause, warns, and goes on (or stops with ``fail_fast``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from navit.data.segmentation import segmentation_item
from navit.data.stream import Part, Record
from navit.data.urls import Unavailable, expand, is_url, join, open_stream, read_bytes, read_if_there
from navit.media.image import IMAGE_EXTENSIONS, load_rgb
from navit.media.video import VIDEO_EXTENSIONS, VideoFile

IMAGE_FIELDS = frozenset(ext[1:] for ext in IMAGE_EXTENSIONS)
VIDEO_FIELDS = frozenset(ext[1:] for ext in VIDEO_EXTENSIONS)
MASK_FIELDS = ("mask.png", "seg.png")
INDEX = "index.json"


class Sample(NamedTuple):
    """A sample as stored: its key, where it is (for messages) and its fields' bytes, or the
    error that ended its shard."""

    key: str
    name: str
    fields: dict[str, bytes] | None
    error: Exception | None = None


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name by WebDataset's rule, or None for a name with no field."""
    head, base = posixpath.split(name[2:] if name.startswith("./") else name)
    if base.startswith(".") or "." not in base:
        return None
    stem, field = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), field.lower()


def tar_samples(stream: Any, url: str) -> Iterator[Sample]:
    """The samples of a tar stream in order; a damaged one ends the stream with an error sample
    naming the member (the sample it was part of is dropped: it may lack fields)."""
    key, fields, member_name = None, {}, "its first member"
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # gzip, bz2 and xz too
            for member in tar:
                member_name = member.name
                split = split_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield Sample(key, f"{url}:{key}", fields)
                    key, fields = split[0], {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # a stream cut inside a member reads short, quietly
                    raise EOFError(f"truncated: {len(data)} of its {member.size} bytes")
                fields[split[1]] = data
            if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:  # the header after the last member was cut
                raise EOFError(f"truncated after member {member_name}")  # (tarfile ends quietly there)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        if isinstance(error, (Unavailable, FileNotFoundError)) and key is None:  # nothing could be read
            yield Sample(f"{url}#unreadable", url, None, ValueError(f"cannot read shard {url}: {error}"))
            return
        reason = str(error) or type(error).__name__
        yield Sample(f"{url}#{member_name}", f"{url}:{member_name}",
                     None, ValueError(f"shard damaged at {url}:{member_name} ({reason}); the rest of it is skipped"))  # fmt: skip
        return
    if key is not None:
        yield Sample(key, f"{url}:{key}", fields)


def shuffled(samples: Iterable[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    """``samples`` through a shuffle buffer of ``size`` (WebDataset's: once full, each new sample
    takes the place of a random one, which is given out)."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _index_file(spec: str) -> str | None:
    """The ``index.json`` a spec names: the file itself, or the one in a folder (local or URL)."""
    if spec.endswith(INDEX):
        return spec
    if not is_url(spec) and os.path.isdir(spec) and os.path.isfile(os.path.join(spec, INDEX)):
        return os.path.join(os.path.abspath(spec), INDEX)
    return None


def _read_index(url: str) -> dict[str, Any]:
    try:
        index = json.loads(read_bytes(url).decode("utf-8"))
        shards = [(join(url, entry["url"]), int(entry["count"])) for entry in index["shards"]]
        classes = index.get("classes")
        provides = index.get("provides")
    except (Unavailable, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the shard index {url}: {error}") from error
    return {"shards": shards, "classes": classes, "provides": provides}


class Shards:
    """WebDataset shards as a stream source (see the module docstring).

    ``spec``: a folder or URL holding an ``index.json`` (as ``navit data shard`` writes: shard
    names, sample counts, class names), that ``index.json`` itself, or shards without one: a
    path, glob or ``{000..009}`` range of ``.tar`` files or URLs, or a list of them.
    Class names: ``classes`` if given, else the index's, else a ``classes.txt`` beside the shards;
    without any, ``cls`` fields must be class indices and ``class_names`` is empty. The length is
    the index's total, else unknown (``len`` raises ``TypeError``).
    """

    filters_keys = True  # read() takes ``keep``: a holdout filters keys before decoding

    def __init__(self, spec: str | os.PathLike[str] | Iterable[str], *, classes: list[str] | None = None,
                 shuffle_buffer: int = 256, retries: int = 4, backoff: float = 0.5) -> None:  # fmt: skip
        self.spec = spec if isinstance(spec, (str, os.PathLike)) else list(spec)
        index = _index_file(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else None
        self.retries, self.backoff, self.shuffle_buffer = retries, backoff, max(1, shuffle_buffer)
        provides = None
        if index is not None:
            found = _read_index(index)
            self.urls, self.counts = [url for url, _ in found["shards"]], [count for _, count in found["shards"]]
            classes, provides = classes or found["classes"], found["provides"]
        else:
            self.urls, self.counts = expand(spec), None
        if not self.urls:
            raise ValueError(f"{self.spec}: no shards")
        if classes is None:
            listing = read_if_there(join(self.urls[0], "classes.txt"))
            if listing is not None:
                classes = [line.strip() for line in listing.decode("utf-8-sig").splitlines() if line.strip()]
        self.class_names: list[str] = list(classes or [])
        self._lookup = {name: i for i, name in enumerate(self.class_names)}
        self.provides = frozenset(provides) if provides else self._peek()

    def with_classes(self, names: list[str]) -> "Shards":
        """The same shards with labels read against ``names`` (``--classes``)."""
        other = copy.copy(self)
        other.class_names, other._lookup = list(names), {name: i for i, name in enumerate(names)}
        return other

    def __repr__(self) -> str:
        return f"Shards({len(self.urls)} shards from {self.urls[0]!r})"

    def __len__(self) -> int:
        if self.counts is None:
            raise TypeError(f"{self!r} has no index.json, so its length is unknown")
        return sum(self.counts)

    def _peek(self) -> frozenset[str]:
        """The item keys of the first readable sample (no index says what the samples hold)."""
        for url in self.urls[:3]:
            for sample in self._samples(url):
                if sample.fields is not None:
                    return frozenset(item_keys(sample.fields, bool(self._lookup)))
                break
        raise ValueError(f"none of the first shards of {self.spec} gives a sample (is the server up, are they tars?)")

    def _samples(self, url: str) -> Iterator[Sample]:
        with open_stream(url, self.retries, self.backoff) as stream:
            yield from tar_samples(stream, url)

    # -- the stream ---------------------------------------------------------------------------
    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        """This rank's shards of ``epoch``: a seeded shuffle of all, dealt so that ranks' sample
        counts are as even as the index allows (without one, in turn)."""
        count = len(self.urls)
        if count < world_size:
            raise ValueError(f"{count} shard(s) cannot be split over {world_size} ranks: every rank needs one; "
                             "write smaller shards (navit data shard --max-count)")  # fmt: skip
        order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(count) if shuffle else np.arange(count)
        owners = self._owners(order, world_size)
        mine = [int(i) for i in order if owners[int(i)] == rank]
        weights = [self.counts[i] if self.counts else 1 for i in mine]
        total, before = max(1, sum(weights)), np.cumsum([0, *weights])
        return [Part(f"shard {self.urls[i]}", float(before[k]) / total, (i, seed, epoch, shuffle))
                for k, i in enumerate(mine)]  # fmt: skip

    def _owners(self, order: np.ndarray, world_size: int) -> dict[int, int]:
        """Shard -> rank: in turn along ``order``, or with counts, largest first to the rank with
        the fewest samples so far (ties in ``order``), which evens the ranks' counts."""
        order = order.tolist()
        if self.counts is None:
            return {shard: position % world_size for position, shard in enumerate(order)}
        owners, load, held = {}, [0] * world_size, [0] * world_size
        for shard in sorted(order, key=lambda s: -self.counts[s]):  # a stable sort keeps ties shuffled
            rank = min(range(world_size), key=lambda r: (load[r], held[r], r))
            load[rank], held[rank], owners[shard] = load[rank] + self.counts[shard], held[rank] + 1, rank
        return owners

    def read(self, part: Part, start: int = 0, keep: Any = None) -> Iterator[Record]:
        """The records of a shard from the ``start``-th on (counting only the keys ``keep`` takes)."""
        shard, seed, epoch, shuffle = part.spec
        url = self.urls[shard]
        samples = (s for s in _or_empty(self._samples(url), url) if s.fields is None or keep is None or keep(s.key))
        if shuffle:
            samples = shuffled(samples, self.shuffle_buffer, np.random.default_rng([seed, epoch, shard, 0xB0F]))
        for position, sample in enumerate(samples):
            if position >= start:
                yield self.record(sample)

    def record(self, sample: Sample) -> Record:
        if sample.fields is None:
            return Record(sample.key, sample.name, None, sample.error)
        try:
            return Record(sample.key, sample.name, self.decode(sample))
        except Exception as error:  # one bad sample is the loader's to count
            return Record(sample.key, sample.name, None, error)

    def decode(self, sample: Sample) -> dict[str, Any]:
        """A sample's item dict (see the module docstring)."""
        fields, name = sample.fields, sample.name
        meta = _json(fields, name)
        item: dict[str, Any] = {}
        label = _label(fields, meta, self._lookup, name)
        if label is not None:
            if self.class_names and label >= len(self.class_names):
                raise ValueError(f"{name}: label {label} is outside the {len(self.class_names)} classes")
            item["label"] = label
        if "txt" in fields:
            item["caption"] = fields["txt"].decode("utf-8", "replace").strip()
        image = next((f for f in sorted(fields) if f in IMAGE_FIELDS), None)
        mask = next((f for f in MASK_FIELDS if f in fields), None)
        if image is not None and mask is not None:
            pair = segmentation_item(io.BytesIO(fields[image]), io.BytesIO(fields[mask]),
                                     len(self.class_names) or None, f"{name}.{image}")  # fmt: skip
            item.update(image=pair["image"], mask=pair["mask"])
        elif image is not None:
            item["image"] = load_rgb(fields[image], name=f"{name}.{image}")
        elif (clip := next((f for f in sorted(fields) if f in VIDEO_FIELDS), None)) is not None:
            item["video"] = VideoFile(fields[clip], name=f"{name}.{clip}")
        else:
            raise ValueError(f"{name}: the sample has no image or clip (fields: {', '.join(sorted(fields))})")
        if "boxes" in meta:
            item["boxes"] = np.asarray(meta["boxes"], dtype=np.float64).reshape(-1, 4)
            count = len(item["boxes"])
            item["box_labels"] = np.asarray(meta.get("box_labels", [0] * count), dtype=np.int64)
            item["box_ids"] = np.asarray(meta.get("box_ids", range(count)), dtype=np.int64)
        return item


def _or_empty(samples: Iterator[Sample], url: str) -> Iterator[Sample]:
    """``samples``, or one error sample for a shard that holds none."""
    empty = True
    for sample in samples:
        empty = False
        yield sample
    if empty:
        yield Sample(f"{url}#empty", url, None, ValueError(f"shard {url} holds no sample"))


def _json(fields: dict[str, bytes], name: str) -> dict[str, Any]:
    if "json" not in fields:
        return {}
    try:
        meta = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name}.json: invalid JSON ({error})") from error
    return meta if isinstance(meta, dict) else {}


def _label(fields: dict[str, bytes], meta: dict[str, Any], lookup: dict[str, int], name: str) -> int | None:
    """The class index of a sample, or None when it has no label field."""
    if "cls" in fields:
        raw, where = fields["cls"].decode("utf-8", "replace").strip(), f"{name}.cls"
    elif "label" in meta:
        raw, where = meta["label"], f"{name}.json"
    elif "txt" in fields and lookup:
        raw = fields["txt"].decode("utf-8", "replace").strip()
        return lookup.get(raw)
    else:
        return None
    if isinstance(raw, str) and raw in lookup:
        return lookup[raw]
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    hint = "" if lookup else " (labels given as class names need index.json, a classes.txt or --classes)"
    raise ValueError(f"{where}: {raw!r} is not a class index or a known class name{hint}")


def item_keys(fields: dict[str, bytes], classes: bool) -> set[str]:
    """The item keys a sample's fields give (without decoding its media); ``classes``: whether
    the reader knows class names (then a ``txt`` may be a label)."""
    try:
        meta = _json(fields, "")
    except ValueError:
        meta = {}
    keys = {"caption"} if "txt" in fields else set()
    if "cls" in fields or "label" in meta or ("txt" in fields and classes):
        keys.add("label")
    if "boxes" in meta:
        keys |= {"boxes", "box_labels"}
    if any(f in IMAGE_FIELDS for f in fields):
        keys.add("image")
        keys |= {"mask"} if any(f in MASK_FIELDS for f in fields) else set()
    elif any(f in VIDEO_FIELDS for f in fields):
        keys.add("video")
    return keys
