"""The packing loader: workers turn items into examples, a streaming first-fit packer emits batches.

Workers decode, augment, resize, patchify and drop tokens, and take the task's targets from each
item (all per-example Python work, in parallel with training). The main process keeps a buffer
of examples and packs it into a fixed number of sequences per batch; examples that do not fit
wait for the next batch.

Determinism: every example's randomness comes from (seed, epoch, index) alone, so batches do not
depend on the number of workers. Resumption: the loader state is the epoch, how many items of
the epoch's order entered the buffer, and the buffer's contents; re-tokenizing the buffer on
resume reproduces it exactly.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from navit.data.transforms import ExampleTransform
from navit.batch import PackedBatch
from navit.packing import pack
from navit.batch import Example
from navit.token_drop import TokenDropper

Targets = Callable[[dict[str, Any]], dict[str, Any]]


def label_targets(item: dict[str, Any]) -> dict[str, Any]:
    """The default targets of an item: its class label."""
    return {"label": item["label"]}


class ItemKey(NamedTuple):
    index: int  # dataset index
    epoch: int
    progress: float  # fraction of training done when this item was drawn (for schedules)


@dataclass
class LoadedItem:
    key: ItemKey
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
    """A packed batch plus its targets; every target's rows follow the model's output rows."""

    batch: PackedBatch
    targets: dict[str, Any]  # e.g. {"label": [N] long} or {"caption": [N] str}
    indices: torch.Tensor  # [N] dataset index of each example

    def to(self, device: torch.device | str) -> "LoaderBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.targets.items()}
        return LoaderBatch(self.batch.to(device), moved, self.indices)


@dataclass(frozen=True)
class DropSchedule:
    """Multiplier of the per-image drop rates over training progress in [0, 1].

    ``sigmoid`` (the paper's) moves from ``start`` to ``end`` along a logistic curve centred
    mid-training; ``linear`` moves straight; ``constant`` stays at ``start``.
    """

    KINDS = ("constant", "linear", "sigmoid")

    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    steepness: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"drop schedule {self.kind!r}; expected one of {self.KINDS}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"drop schedule {name} must be in [0, 1], got {getattr(self, name)}")

    def __call__(self, progress: float) -> float:
        t = min(max(progress, 0.0), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "sigmoid":
            squash = lambda x: 1.0 / (1.0 + math.exp(-self.steepness * (x - 0.5)))  # noqa: E731
            t = (squash(t) - squash(0.0)) / (squash(1.0) - squash(0.0))
        return self.start + (self.end - self.start) * t


class _TokenizeDataset(Dataset):
    """Runs in workers: a chunk of keys in, a list of examples with targets (or errors) out."""

    def __init__(self, source, transform: ExampleTransform, targets: Targets, train: bool, seed: int,
                 dropper: TokenDropper | None, schedule: DropSchedule) -> None:
        self.source, self.transform, self.targets, self.train, self.seed = source, transform, targets, train, seed
        self.dropper, self.schedule = dropper, schedule

    def __len__(self) -> int:  # unused: keys come from the sampler
        return 0

    def tokenize(self, key: ItemKey) -> LoadedItem:
        try:
            item = self.source.item(key.index)
            rng = np.random.default_rng([self.seed, key.epoch, key.index]) if self.train else None
            example = self.transform(
                item, rng, dropper=self.dropper, drop_scale=self.schedule(key.progress),
                name=self.source.describe(key.index),
            )  # fmt: skip
            targets = self.targets(item)
        except Exception as error:  # a long run must not die on one bad item
            name = self.source.describe(key.index)
            return LoadedItem(key, None, error=f"{name}: {error}", reason=str(error).replace(name, "<file>"))
        return LoadedItem(key, example, targets)

    def __getitem__(self, keys: list[ItemKey]) -> list[LoadedItem]:
        return [self.tokenize(key) for key in keys]


def _as_is(chunk: list[LoadedItem]) -> list[LoadedItem]:
    return chunk


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; avoid oversubscribing cores


@dataclass
class PackedLoader:
    """Streams fixed-shape ``LoaderBatch``es of ``num_seqs`` × ``seq_len`` tokens.

    Each ``iter()`` runs one epoch (continuing a resumed one); ``epoch`` advances at its end.
    ``total_examples`` (the examples of the whole training run) turns stream position into the
    training progress that drop-rate schedules read.
    """

    source: Any
    transform: ExampleTransform
    targets: Targets = label_targets  # item -> the task's targets (picklable)
    seq_len: int = 256
    num_seqs: int = 8
    max_examples_per_seq: int = 32
    buffer_size: int = 256
    train: bool = True
    seed: int = 0
    num_workers: int = 2
    chunk_size: int = 16
    strategy: str = "first_fit"
    dropper: TokenDropper | None = None
    drop_schedule: DropSchedule = field(default_factory=DropSchedule)
    total_examples: int | None = None
    fail_fast: bool = False

    epoch: int = 0
    _consumed: int = 0
    _buffer: list[LoadedItem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if len(self.source) == 0:
            raise ValueError("the dataset is empty: there is nothing to load")
        tokens = max(self.transform.processor.max_tokens, self.transform.budget or 0)
        if tokens > self.seq_len:
            raise ValueError(
                f"an example may have {tokens} tokens, which exceeds seq_len={self.seq_len}: "
                "it could never be packed; raise seq_len"
            )
        for name in ("seq_len", "num_seqs", "max_examples_per_seq", "buffer_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dropper is not None:
            self.dropper.train(self.train)

    @property
    def at_epoch_start(self) -> bool:
        """True unless the current epoch is partly consumed (e.g. after resuming mid-epoch)."""
        return self._consumed == 0 and not self._buffer

    def _order(self, epoch: int) -> list[int]:
        n = len(self.source)
        if not self.train:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n).tolist()

    def _key(self, index: int, position: int) -> ItemKey:
        done = self.epoch * len(self.source) + position
        progress = done / self.total_examples if self.total_examples else 0.0
        return ItemKey(index, self.epoch, progress)

    def _emit(self) -> LoaderBatch:
        result = pack(
            [item.example for item in self._buffer],
            self.seq_len,
            max_examples_per_seq=self.max_examples_per_seq,
            num_seqs=self.num_seqs,
            strategy=self.strategy,
        )
        items = [self._buffer[i] for i in result.packed]
        self._buffer = [self._buffer[i] for i in result.leftover]
        return LoaderBatch(
            batch=result.batch,
            targets=collate_targets([item.targets for item in items]),
            indices=torch.tensor([item.key.index for item in items], dtype=torch.long),
        )

    def _accept(self, item: LoadedItem) -> None:
        if item.example is not None:
            self._buffer.append(item)
            return
        if self.fail_fast:
            raise ValueError(f"could not load an item (fail_fast is on): {item.error}")
        self.skipped[item.reason.split("\n")[0][:120]] += 1
        if sum(self.skipped.values()) <= 10:
            warnings.warn(f"skipping {item.error}", stacklevel=2)

    def __iter__(self) -> Iterator[LoaderBatch]:
        order = self._order(self.epoch)
        keys = [self._key(index, pos) for pos, index in enumerate(order)][self._consumed :]
        chunks = [keys[i : i + self.chunk_size] for i in range(0, len(keys), self.chunk_size)]
        dataset = self._dataset()
        loader = DataLoader(
            dataset,
            sampler=chunks,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            worker_init_fn=_worker_init if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False,
        )
        for chunk in loader:
            for item in chunk:
                self._accept(item)
            self._consumed += len(chunk)
            while len(self._buffer) >= self.buffer_size:
                yield self._emit()
        while self._buffer:
            yield self._emit()
        self.epoch += 1
        self._consumed = 0

    def _dataset(self) -> _TokenizeDataset:
        return _TokenizeDataset(
            self.source, self.transform, self.targets, self.train, self.seed, self.dropper, self.drop_schedule
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands between two batches, as plain JSON-able values."""
        return {
            "epoch": self.epoch,
            "consumed": self._consumed,
            "buffer": [list(item.key) for item in self._buffer],
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._consumed = int(state["epoch"]), int(state["consumed"])
        self.skipped = Counter(state.get("skipped", {}))
        dataset = self._dataset()
        self._buffer = []
        for raw in state["buffer"]:
            key = ItemKey(int(raw[0]), int(raw[1]), float(raw[2]))
            self._accept(dataset.tokenize(key))  # a file gone bad since the save is skipped and counted
