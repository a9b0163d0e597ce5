"""The packing loader: workers turn images into tokens, a streaming first-fit packer emits batches.

Workers decode, augment, resize, patchify and drop tokens (all per-image Python work, in
parallel with training). The main process keeps a buffer of tokenized images and packs it into
a fixed number of sequences per batch; images that do not fit wait for the next batch.

Determinism: every image's randomness comes from (seed, epoch, index) alone, so batches do not
depend on the number of workers. Resumption: the loader state is the epoch, how many images of
the epoch's order entered the buffer, and the buffer's contents; re-tokenizing the buffer on
resume reproduces it exactly.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from navit.data.transforms import ImagePipeline
from navit.packing import PackedBatch, pack
from navit.patchify import PatchedImage
from navit.token_drop import TokenDropper


class ItemKey(NamedTuple):
    index: int  # dataset index
    epoch: int
    progress: float  # fraction of training done when this image was drawn (for schedules)


@dataclass
class LoadedItem:
    key: ItemKey
    label: int
    tokens: PatchedImage | None
    error: str | None = None
    caption: str | None = None


@dataclass
class LoaderBatch:
    """A packed batch plus what the loss needs; rows of ``labels`` follow model output rows."""

    batch: PackedBatch
    labels: torch.Tensor  # [N] long
    indices: torch.Tensor  # [N] dataset index of each image
    captions: list[str] | None = None  # [N], when the loader was asked for captions

    def to(self, device: torch.device | str) -> "LoaderBatch":
        return LoaderBatch(self.batch.to(device), self.labels.to(device), self.indices, self.captions)


@dataclass(frozen=True)
class DropSchedule:
    """Multiplier of the per-image drop rates over training progress in [0, 1].

    ``sigmoid`` (the paper's) moves from ``start`` to ``end`` along a logistic curve centred
    mid-training; ``linear`` moves straight; ``constant`` stays at ``start``.
    """

    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    steepness: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "sigmoid"):
            raise ValueError(f"drop schedule {self.kind!r}; expected constant, linear or sigmoid")
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
    """Runs in workers: a chunk of keys in, a list of tokenized images (or errors) out."""

    def __init__(self, source, pipeline: ImagePipeline, train: bool, seed: int,
                 dropper: TokenDropper | None, schedule: DropSchedule, captions: bool) -> None:
        self.source, self.pipeline, self.train, self.seed = source, pipeline, train, seed
        self.dropper, self.schedule, self.captions = dropper, schedule, captions

    def __len__(self) -> int:  # unused: keys come from the sampler
        return 0

    def tokenize(self, key: ItemKey) -> LoadedItem:
        label = self.source.label(key.index)
        try:
            caption = self.source.caption(key.index) if self.captions else None
            image = self.source.load(key.index)
            rng = np.random.default_rng([self.seed, key.epoch, key.index]) if self.train else None
            tokens = self.pipeline(
                image, rng, dropper=self.dropper, drop_scale=self.schedule(key.progress)
            )
        except Exception as error:  # a long run must not die on one bad image
            return LoadedItem(key, label, None, f"{self.source.describe(key.index)}: {error}")
        return LoadedItem(key, label, tokens, caption=caption)

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
    ``total_images`` (the images of the whole training run) turns stream position into the
    training progress that drop-rate schedules read.
    """

    source: Any
    pipeline: ImagePipeline
    seq_len: int = 256
    num_seqs: int = 8
    max_images_per_seq: int = 32
    buffer_size: int = 256
    train: bool = True
    seed: int = 0
    num_workers: int = 2
    chunk_size: int = 16
    strategy: str = "first_fit"
    dropper: TokenDropper | None = None
    drop_schedule: DropSchedule = field(default_factory=DropSchedule)
    total_images: int | None = None
    fail_fast: bool = False
    captions: bool = False  # also load each image's caption (image-text training)

    epoch: int = 0
    _consumed: int = 0
    _buffer: list[LoadedItem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if len(self.source) == 0:
            raise ValueError("the dataset is empty: there is nothing to load")
        if self.pipeline.max_tokens > self.seq_len:
            raise ValueError(
                f"pipeline.max_tokens={self.pipeline.max_tokens} exceeds seq_len={self.seq_len}: "
                "an image could never be packed"
            )
        for name in ("seq_len", "num_seqs", "max_images_per_seq", "buffer_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dropper is not None:
            self.dropper.train(self.train)

    def images_per_batch_estimate(self) -> int:
        """Rough images per batch (for sizing runs); exact counts are known only after packing."""
        tokens = self.pipeline.square_tokens or self.pipeline.token_budget or self.pipeline.max_tokens / 2
        return max(1, int(self.num_seqs * min(self.max_images_per_seq, self.seq_len / tokens)))

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
        progress = done / self.total_images if self.total_images else 0.0
        return ItemKey(index, self.epoch, progress)

    def _emit(self) -> LoaderBatch:
        result = pack(
            [item.tokens for item in self._buffer],
            self.seq_len,
            max_images_per_seq=self.max_images_per_seq,
            num_seqs=self.num_seqs,
            strategy=self.strategy,
        )
        items = [self._buffer[i] for i in result.packed]
        self._buffer = [self._buffer[i] for i in result.leftover]
        return LoaderBatch(
            batch=result.batch,
            labels=torch.tensor([item.label for item in items], dtype=torch.long),
            indices=torch.tensor([item.key.index for item in items], dtype=torch.long),
            captions=[item.caption for item in items] if self.captions else None,
        )

    def _accept(self, item: LoadedItem) -> None:
        if item.tokens is not None:
            self._buffer.append(item)
            return
        if self.fail_fast:
            raise RuntimeError(f"could not load an image (fail_fast is on): {item.error}")
        reason = item.error.split(": ", 1)[-1].split("\n")[0][:120]
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= 10:
            warnings.warn(f"skipping image {item.error}", stacklevel=2)

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
            self.source, self.pipeline, self.train, self.seed, self.dropper, self.drop_schedule, self.captions
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
            self._buffer.append(dataset.tokenize(key))
