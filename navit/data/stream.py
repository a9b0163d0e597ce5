"""Sources as streams of item dicts: what every data source gives the loader.

A source cuts each epoch of its data into :class:`Part`\\ s (a block of an indexed source's seeded
permutation, a shard, a generator's partition), given the epoch, the rank and the world size, and
reads a part as a stream of :class:`Record`\\ s (a key, a name for messages, and the item dict or
the error that reading it raised) from any position within it. Parts are pure functions of
(seed, epoch, rank, world size), and reading is sequential, so:

* loader lanes (worker processes) take whole parts, with no overlap between ranks or lanes;
* a position is (part, offset): the loader saves it, and a resumed run reads on from there;
* nothing needs random access, a length or a pass over the labels first (streams of shards or a
  Python generator work the same way as folders).

Sources with random access and a length get all of it from :class:`IndexedSource` by giving
``__len__``, ``item(i)``, ``key(i)`` and ``describe(i)``. Items are dicts keyed by what they hold
(``image``, ``video``, ``label``, ``caption``, ``mask``, ``boxes``, ...); ``provides`` says which
keys a source's items have, so a task can refuse data that lacks what it needs before training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Part:
    """A piece of one epoch that one loader lane reads in order.

    ``name`` says what it is in messages; ``start`` is where it begins in its rank's epoch, a
    fraction in [0, 1) (drop-rate schedules read training progress from it); ``spec`` is what the
    source needs to read it (indices, a shard's path, ...), plain data that pickles cheaply."""

    name: str
    start: float
    spec: Any


class Record(NamedTuple):
    """One element of a stream: ``item`` is the item dict, or None when reading it failed with ``error``."""

    key: str  # stable identity of the item: seeds its augmentation, decides its holdout side
    name: str  # where it comes from (a path, shard:member), for messages
    item: dict[str, Any] | None
    error: Exception | None = None


@runtime_checkable
class Source(Protocol):
    """What the loader needs from a data source."""

    class_names: list[str]
    provides: frozenset[str]  # keys of its items

    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        """This rank's parts of ``epoch`` (in order; ``shuffle`` permutes with ``seed``); ``size``
        is the loader's preferred number of items per part where the source can choose."""
        ...

    def read(self, part: Part, start: int = 0) -> Iterator[Record]:
        """The records of ``part`` from its ``start``-th on."""
        ...


def check_index(index: int, length: int, owner: object) -> int:
    """``index`` as an int in ``[0, length)``, or an error naming ``owner``."""
    if isinstance(index, bool) or not hasattr(index, "__index__"):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    index = index.__index__()
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {owner!r} ({length} items)")
    return index


def holdout_side(key: str, fraction: float, seed: int) -> bool:
    """Whether the item ``key`` belongs to the validation holdout of ``fraction``: a hash of the
    key and ``seed``, so the split needs no pass over the data, is the same on every machine and
    keeps an item on its side when others are added or removed."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def epoch_order(length: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which an epoch visits ``length`` indexed items: a seeded permutation, or as stored."""
    if not shuffle:
        return np.arange(length)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(length)


class IndexedSource:
    """Base of the sources with random access: subclasses give ``__len__``, ``item(i)``,
    ``describe(i)`` and (by default the index as text) ``key(i)``; parts are blocks of ``size``
    items of a seeded permutation, dealt to ranks item by item, so ranks differ by at most one
    item."""

    class_names: list[str]
    provides: frozenset[str] = frozenset({"image", "label"})

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{self!r}[{index}]"

    def key(self, index: int) -> str:
        return str(index)

    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        mine = epoch_order(len(self), epoch, seed, shuffle)[rank::world_size].tolist()
        return [Part(f"items {start}..{start + len(mine[start:start + size]) - 1} of epoch {epoch}",
                     start / max(1, len(mine)), mine[start:start + size])
                for start in range(0, len(mine), size)]  # fmt: skip

    def read(self, part: Part, start: int = 0) -> Iterator[Record]:
        for index in part.spec[start:]:
            yield self.record(index)

    def record(self, index: int) -> Record:
        """Item ``index`` as a record (an unreadable item becomes a record with its error)."""
        key, name = self.key(index), self.describe(index)
        try:
            return Record(key, name, self.item(index))
        except Exception as error:  # a long run must not die on one bad item: the loader counts it
            return Record(key, name, None, error)


class Subset(IndexedSource):
    """The items ``indices`` of an indexed ``source``, in that order (a Subset of a Subset is flattened)."""

    def __init__(self, source: IndexedSource, indices: Sequence[int]) -> None:
        if isinstance(source, Subset):
            indices, source = [source.indices[i] for i in indices], source.source
        self.source, self.indices = source, [int(i) for i in indices]
        self.class_names, self.provides = source.class_names, source.provides

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self.indices)} items)"

    def __getattr__(self, name: str) -> Any:
        """A source's own extras: values as they are, methods of an item index (``caption(i)``,
        ``path(i)``, ``load(i)``) with the index mapped to the source's."""
        if name.startswith("_") or name in ("source", "indices"):
            raise AttributeError(name)
        value = getattr(self.source, name)
        if not callable(value):
            return value
        return lambda index, *args, **kwargs: value(self.indices[check_index(index, len(self), self)], *args, **kwargs)

    def item(self, index: int) -> dict[str, Any]:
        return self.source.item(self.indices[check_index(index, len(self), self)])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[check_index(index, len(self), self)])

    def key(self, index: int) -> str:
        return self.source.key(self.indices[check_index(index, len(self), self)])


class Filtered:
    """A stream source with only the items whose key passes ``keep`` (a picklable callable),
    about ``share`` of them. A source whose ``read`` takes ``keep`` (``filters_keys``) filters
    before it decodes."""

    def __init__(self, source: Source, keep: Any, what: str, share: float) -> None:
        self.source, self.keep, self.what, self.share = source, keep, what, share
        self.class_names, self.provides = source.class_names, source.provides

    def __repr__(self) -> str:
        return f"{self.what} of {self.source!r}"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("source", "keep", "what", "share"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def parts(self, epoch: int, rank: int, world_size: int, *, shuffle: bool, seed: int, size: int) -> list[Part]:
        return self.source.parts(epoch, rank, world_size, shuffle=shuffle, seed=seed, size=size)

    def read(self, part: Part, start: int = 0) -> Iterator[Record]:
        if getattr(type(self.source), "filters_keys", False):  # the class's own (wrappers forward attributes)
            yield from self.source.read(part, start, keep=self.keep)
            return
        kept = (record for record in self.source.read(part) if self.keep(record.key))
        for _ in range(start):  # positions count kept items only
            next(kept, None)
        yield from kept


@dataclass(frozen=True)
class HoldoutRule:
    fraction: float
    seed: int
    validation: bool

    def __call__(self, key: str) -> bool:
        return holdout_side(key, self.fraction, self.seed) == self.validation


def split_holdout(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """``(training part, validation part)`` of ``source``, the validation part about ``fraction``
    of it, chosen by a hash of each item's key (:func:`holdout_side`): no pass over the data or
    its labels. An indexed source splits into two indexed subsets (an item with an unreadable
    key is an error here); a stream is filtered as it is read."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    if not isinstance(source, IndexedSource):
        return (Filtered(source, HoldoutRule(fraction, seed, False), "training part", 1.0 - fraction),
                Filtered(source, HoldoutRule(fraction, seed, True), "validation holdout", fraction))  # fmt: skip
    held = [holdout_side(source.key(i), fraction, seed) for i in range(len(source))]
    train, val = [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]
    if not train or not val:
        raise ValueError(
            f"holding out {fraction:.0%} of {len(source)} item(s) leaves "
            f"{'nothing to train on' if not train else 'no validation item'}: give more data or --val-data"
        )
    return Subset(source, train), Subset(source, val)


def first_items(source: Source, count: int, seed: int = 0) -> Iterator[Record]:
    """Up to ``count`` records from the start of epoch 0 (shuffled): a sample of the data."""
    produced = 0
    for part in source.parts(0, 0, 1, shuffle=True, seed=seed, size=max(1, count)):
        for record in source.read(part):
            yield record
            produced += 1
            if produced >= count:
                return


def num_items(source: Source) -> int | None:
    """How many items ``source`` holds, when it knows (``len``; for a hash-filtered part of a
    stream, its expected share), else None."""
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        pass
    whole = num_items(source.source) if isinstance(source, Filtered) else None
    return None if whole is None else round(whole * source.share)
