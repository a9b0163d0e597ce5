"""Ops that make an item's tokens: the processor's resize, patchify and normalise (``Tokenize``),
and token dropping in training (``DropTokens``) or to a budget at evaluation (``KeepTokens``).

``Tokenize`` puts the :class:`~navit.batch.Example` in ``item["example"]`` and its size in
pixels (the grid times the patch size) in ``item["canvas"]`` (width, height). Label images
(``mask``) are resized with nearest neighbour onto the same grid and become per-token fields;
coordinates (``boxes``, ``points``) and ``item["geometry"]`` move to the example's pixels (its
grid times the patch size), so ``geometry.inverse()`` maps a prediction back to the input's pixels.
For a clip it also chooses the frames: in training a number drawn from [``frames_min``,
``max_frames``] and a start drawn among the frames that leave room for them; at evaluation the
first ``max_frames`` (the processor's by default).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from navit.ops.geometry import BOX_ROWS, Affine, move, picture_size
from navit.processor import Processor
from navit.token_drop import TokenDropper

#: Keys holding label images aligned with the picture: they become per-token fields.
DENSE_KEYS = ("mask",)


def _same(picture: Any) -> Any:
    return picture


@dataclass(frozen=True)
class Tokenize:
    """The processor's part of the chain; ``budget`` (evaluation) resizes every input to about
    that many tokens, ``max_frames`` overrides the processor's frames per clip at evaluation."""

    processor: Processor
    budget: int | None = None
    frames_min: int = 1
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not 1 <= self.frames_min <= self.processor.max_frames:
            raise ValueError(f"frames_min={self.frames_min} must be in [1, max_frames={self.processor.max_frames}]")

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        name = item.get("__name__")
        width, height = picture_size(item)
        if "video" in item:
            example = self._clip(item, rng, name)
        else:
            dense = {key: item[key] for key in DENSE_KEYS if key in item}
            example = self.processor.to_example(item["image"], size=item.get("size"), budget=self.budget,
                                                dense=dense, name=name)  # fmt: skip
        p = self.processor.patch_size
        rows, cols = example.grid[-2:]
        scale = Affine(sx=cols * p / width, sy=rows * p / height)
        out = move({k: v for k, v in item.items() if k not in ("image", "video", *DENSE_KEYS)}, _same, scale,
                   (cols * p, rows * p))  # fmt: skip
        return {**item, **{k: out[k] for k in ("boxes", "points", "geometry", *BOX_ROWS) if k in out},
                "example": example, "canvas": (cols * p, rows * p)}  # fmt: skip

    def _clip(self, item: dict[str, Any], rng: np.random.Generator | None, name: str | None):
        processor, clip = self.processor, item["video"]
        if rng is None:
            return processor.clip_to_example(clip, num_frames=self.max_frames, budget=self.budget,
                                             frame_op=item.get("frame_op"), name=name)  # fmt: skip
        info = clip.info()
        frames = int(rng.integers(self.frames_min, processor.max_frames + 1))
        # The window starts on a frame of the sampling grid, each start equally likely (a start
        # between two frames would never pick the first one).
        rate = min(processor.fps or math.inf, info.fps or 25.0) / processor.frame_stride
        slots = math.floor((info.duration or 0.0) * rate + 1e-6) - frames + 1
        start = int(rng.integers(0, max(1, slots))) / rate
        return processor.clip_to_example(clip, start=start, num_frames=frames, size=item.get("size"),
                                         frame_op=item.get("frame_op"), name=name)  # fmt: skip


@dataclass(frozen=True)
class DropTokens:
    """In training, drop tokens of the example (``item["__progress__"]``, the share of training
    done, scales the rates through ``schedule``); targets computed from the item are untouched."""

    dropper: TokenDropper
    schedule: Any = None  # progress in [0, 1] -> multiplier of the rates

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        if rng is None:
            return item
        scale = self.schedule(item.get("__progress__", 0.0)) if self.schedule is not None else 1.0
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return {**item, "example": self.dropper([item["example"]], generator=generator, scale=scale)[0]}


@dataclass(frozen=True)
class KeepTokens:
    """At evaluation, all but ``keep`` of the example's tokens dropped (a random choice seeded by
    the item's name, the same in every run): token dropping at inference."""

    keep: int

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        example = item["example"]
        if rng is not None or example.num_tokens <= self.keep:
            return item
        generator = torch.Generator().manual_seed(zlib.crc32((item.get("__name__") or "").encode()))
        chosen = torch.randperm(example.num_tokens, generator=generator)[: self.keep].sort().values
        return {**item, "example": example.select(chosen)}
