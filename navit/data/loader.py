"""The packing loader: lanes of workers turn a source's stream into examples, a first-fit packer
in the main process emits fixed-shape batches.

Each epoch a source cuts its data into parts (:mod:`navit.data.stream`); lane ``w`` of ``W``
(a worker process each, or the main process with no workers) reads parts ``w, w + W, ...`` in
order and runs each record through the ops (decode, augment, tokenize, drop: per-example Python
work, in parallel with training) and the task's targets, in chunks of ``chunk_size`` items. The
main process takes one chunk from each lane in turn, keeps a buffer of examples and packs it into
``num_seqs`` sequences whenever it holds ``buffer_size``; examples that do not fit wait.

Determinism: an item's randomness comes from (seed, epoch, key) alone; with an indexed source the
parts are chunks, so the order is the same for any number of workers. Resumption: the state is
the epoch, each lane's position (items taken; part and offset) and, for each example still in the
buffer, where it came from; a resumed loader rereads each lane from its oldest buffered example,
restores the buffer as it was and goes on exactly where the saved one stood.
"""

from __future__ import annotations

import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from navit.batch import Example, PackedBatch
from navit.data.stream import Part, Record, Source
from navit.packing import PackingConfig, pack

Targets = Callable[[dict[str, Any]], dict[str, Any]]
Chain = Callable[[dict[str, Any], "np.random.Generator | None"], dict[str, Any]]


def label_targets(item: dict[str, Any]) -> dict[str, Any]:
    """The default targets of an item: its class label."""
    return {"label": item["label"]}


class Where(NamedTuple):
    """Where an item sits in its lane's stream: its number there, its part and offset in it."""

    lane: int
    seq: int
    part: int
    offset: int


@dataclass
class LoadedItem:
    where: Where
    key: str
    example: Example | None
    targets: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # what went wrong, naming the item
    reason: str | None = None  # the same without the item's name, to count skips by cause


def collate_targets(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """Targets of a batch, key by key: numbers become a tensor [N], tensors of one shape are
    stacked, anything else (captions, masks of each image's size) stays a list."""
    out: dict[str, Any] = {}
    for key in targets[0] if targets else ():
        values = [t[key] for t in targets]
        if all(isinstance(v, (bool, int, float)) for v in values):
            out[key] = torch.tensor(values)
        elif all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


@dataclass
class LoaderBatch:
    """A packed batch plus its targets; every target's rows, and ``keys``, follow the model's output rows."""

    batch: PackedBatch
    targets: dict[str, Any]  # e.g. {"label": [N] long} or {"caption": [N] str}
    keys: list[str]  # each example's item key

    def to(self, device: torch.device | str) -> "LoaderBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.targets.items()}
        return LoaderBatch(self.batch.to(device), moved, self.keys)


@dataclass(frozen=True)
class Pipeline:
    """What a lane does to each record (picklable, so worker processes run it)."""

    chain: Chain
    targets: Targets
    seed: int
    train: bool

    def load(self, record: Record, where: Where, epoch: int, progress: float) -> LoadedItem:
        try:
            if record.item is None:
                raise record.error or ValueError("unreadable")
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(record.key.encode("utf-8", "surrogatepass"))]) \
                if self.train else None  # fmt: skip
            item = self.chain({**record.item, "__name__": record.name, "__progress__": progress}, rng)
            try:
                targets = self.targets(item)
            except KeyError as missing:
                raise ValueError(f"the item has no {missing} (it has {', '.join(sorted(record.item))})") from None
            return LoadedItem(where, record.key, item["example"], targets)
        except Exception as error:  # a long run must not die on one bad item
            return LoadedItem(where, record.key, None, error=f"{record.name}: {error}",
                              reason=str(error).replace(record.name, "<file>"))  # fmt: skip


class _Lane(IterableDataset):
    """One lane's stream of chunks, from ``start`` on (chunks end where the lane's item count is a
    multiple of ``chunk_size``, wherever the lane starts, so a resumed lane cuts them alike)."""

    def __init__(self, source: Source, pipeline: Pipeline, parts: list[Part], lane: int, start: Where,
                 epoch: int, epochs: float | None, chunk_size: int) -> None:  # fmt: skip
        self.source, self.pipeline, self.parts, self.lane, self.start = source, pipeline, parts, lane, start
        self.epoch, self.epochs, self.chunk_size = epoch, epochs, chunk_size

    def __iter__(self) -> Iterator[list[LoadedItem]]:
        seq, chunk = self.start.seq, []
        for p in range(self.start.part, len(self.parts)):
            part = self.parts[p]
            progress = (self.epoch + part.start) / self.epochs if self.epochs else 0.0
            first = self.start.offset if p == self.start.part else 0
            for offset, record in enumerate(self.source.read(part, first), first):
                chunk.append(self.pipeline.load(record, Where(self.lane, seq, p, offset), self.epoch, progress))
                seq += 1
                if seq % self.chunk_size == 0:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; avoid oversubscribing cores


@dataclass
class LaneState:
    next: Where  # the next item to take
    done: bool = False


@dataclass
class PackedLoader:
    """Streams fixed-shape ``LoaderBatch``es of ``packing.num_seqs`` × ``packing.seq_len`` tokens.

    Each ``iter()`` runs one epoch (continuing a resumed one); ``epoch`` advances at its end.
    ``rank`` of ``world_size`` reads its own parts of each epoch. ``epochs`` (the run's length in
    passes) turns stream position into the training progress that drop-rate schedules read.
    """

    source: Source
    chain: Chain
    num_workers: int  # worker processes (lanes); 0 reads in the main process
    targets: Targets = label_targets  # item -> the task's targets (picklable)
    packing: PackingConfig = field(default_factory=PackingConfig)
    train: bool = True
    seed: int = 0
    chunk_size: int = 16
    rank: int = 0
    world_size: int = 1
    epochs: float | None = None
    fail_fast: bool = False
    strategy: str = "first_fit"

    epoch: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.num_workers < 0:
            raise ValueError(f"chunk_size must be >= 1 and num_workers >= 0, got {self.chunk_size}, {self.num_workers}")
        self._lanes: list[LaneState] = self._fresh_lanes()
        self._turn = 0
        self._buffer: list[LoadedItem] = []
        self._restore: list[Where] = []  # buffered examples to reread after a resume, in buffer order

    @property
    def num_lanes(self) -> int:
        return max(1, self.num_workers)

    def _fresh_lanes(self) -> list[LaneState]:
        return [LaneState(Where(w, 0, 0, 0)) for w in range(self.num_lanes)]

    @property
    def at_epoch_start(self) -> bool:
        """True unless the current epoch is partly consumed (e.g. after resuming mid-epoch)."""
        return not self._buffer and not self._restore and all(s.next.seq == 0 and not s.done for s in self._lanes)

    def _open(self, lane: int, parts: list[Part], start: Where) -> Iterator[list[LoadedItem]]:
        pipeline = Pipeline(self.chain, self.targets, self.seed, self.train)
        dataset = _Lane(self.source, pipeline, parts[lane :: self.num_lanes], lane, start, self.epoch, self.epochs,
                        self.chunk_size)  # fmt: skip
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=1, collate_fn=_as_is,
                               worker_init_fn=_worker_init, prefetch_factor=4))  # fmt: skip

    def _emit(self) -> LoaderBatch:
        packing = self.packing
        result = pack([item.example for item in self._buffer], packing.seq_len,
                      max_examples_per_seq=packing.max_examples_per_seq, num_seqs=packing.num_seqs,
                      strategy=self.strategy)  # fmt: skip
        items = [self._buffer[i] for i in result.packed]
        self._buffer = [self._buffer[i] for i in result.leftover]
        return LoaderBatch(result.batch, collate_targets([item.targets for item in items]), [item.key for item in items])

    def _accept(self, item: LoadedItem) -> None:
        if item.example is not None:
            if item.example.num_tokens > self.packing.seq_len:
                raise ValueError(f"an example of {item.example.num_tokens} tokens ({item.key}) cannot be packed into "
                                 f"seq_len={self.packing.seq_len}: raise seq_len or lower the token budget")  # fmt: skip
            self._buffer.append(item)
            return
        if self.fail_fast:
            raise ValueError(f"could not load an item (fail_fast is on): {item.error}")
        self.skipped[item.reason.split("\n")[0][:120]] += 1
        if sum(self.skipped.values()) <= 10:
            warnings.warn(f"skipping {item.error}", stacklevel=3)

    def _reread(self, lanes: list[Iterator[list[LoadedItem]] | None], parts: list[Part]) -> None:
        """After a resume: reread each lane from its oldest buffered example up to where it stood,
        and put the buffered examples back in their order (one gone bad meanwhile is skipped)."""
        found: dict[Where, LoadedItem] = {}
        wanted = set(self._restore)
        for lane, state in enumerate(self._lanes):
            mine = [w for w in self._restore if w.lane == lane]
            if not mine:
                continue
            oldest = min(mine, key=lambda w: w.seq)
            stream = self._open(lane, parts, oldest)
            taken = oldest.seq
            while taken < state.next.seq:
                chunk = next(stream, None)
                if chunk is None:
                    break
                for item in chunk:
                    if item.where in wanted:
                        found[item.where] = item
                taken = chunk[-1].where.seq + 1
            lanes[lane] = None if state.done else stream
        for where in self._restore:
            if where in found:
                self._accept(found[where])
        self._restore = []

    def __iter__(self) -> Iterator[LoaderBatch]:
        parts = self.source.parts(self.epoch, self.rank, self.world_size, shuffle=self.train, seed=self.seed,
                                  size=self.chunk_size)  # fmt: skip
        lanes: list[Iterator[list[LoadedItem]] | None] = [None] * self.num_lanes
        self._reread(lanes, parts)
        for lane, state in enumerate(self._lanes):
            if lanes[lane] is None and not state.done:
                lanes[lane] = self._open(lane, parts, state.next)
        while not all(state.done for state in self._lanes):
            lane = self._turn
            self._turn = (lane + 1) % self.num_lanes
            state = self._lanes[lane]
            if state.done:
                continue
            chunk = next(lanes[lane], None)
            if chunk is None:
                state.done = True
                continue
            for item in chunk:
                self._accept(item)
            last = chunk[-1].where
            state.next = Where(lane, last.seq + 1, last.part, last.offset + 1)
            while len(self._buffer) >= self.packing.buffer_size:
                yield self._emit()
        while self._buffer:
            yield self._emit()
        self.epoch += 1
        self._lanes, self._turn = self._fresh_lanes(), 0

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands between two batches, as plain JSON-able values."""
        return {
            "epoch": self.epoch,
            "lanes": [[*state.next, state.done] for state in self._lanes],
            "turn": self._turn,
            "buffer": [list(item.where) for item in self._buffer],
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["lanes"]) != self.num_lanes:
            raise ValueError(f"the saved loader ran {len(state['lanes'])} lane(s) (workers); this one runs "
                             f"{self.num_lanes}: resume with the same --workers")  # fmt: skip
        self.epoch, self._turn = int(state["epoch"]), int(state["turn"])
        self._lanes = [LaneState(Where(*map(int, lane[:4])), bool(lane[4])) for lane in state["lanes"]]
        self._restore = [Where(*map(int, where)) for where in state["buffer"]]
        self._buffer = []
        self.skipped = Counter(state.get("skipped", {}))


def _as_is(chunk: list[LoadedItem]) -> list[LoadedItem]:
    return chunk

