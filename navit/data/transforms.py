"""From a data item to an ``Example``, in data-loader workers: augment, sample a resolution (and
for clips a duration), run the model's processor, drop tokens.

Aspect ratio is preserved everywhere except in the explicit square-resize ViT baseline (a
processor with ``grid_rule="square"``). Resolution sampling (paper §3.2) picks an effective side R
per image and sizes its grid as if ``sqrt(H·W) = R``: ``side`` draws R from the distribution,
``area`` draws R² (uniform in area gives more weight to high resolutions than uniform in side).
Duration sampling, its analogue for clips, draws the number of frames T uniformly from
[``frames_min``, the processor's ``max_frames``] and a random start; the frame size is then the
one at which the clip's tubelets fit the token budget.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from navit.media.video import Clip
from navit.batch import Example
from navit.processor import Processor
from navit.token_drop import TokenDropper

RES_MODES = ("native", "side", "area")
RES_DISTS = ("uniform", "truncnorm")


@dataclass(frozen=True)
class ResolutionSampler:
    """Effective resolution per image in training. ``truncnorm`` centres a normal at ``res_mean``
    (a fraction of the [res_min, res_max] range; 0 = biased to low resolution, the paper's best)
    with standard deviation ``res_std`` (also a fraction of the range), truncated to the range."""

    res_mode: str = "native"
    res_min: int = 64
    res_max: int = 256
    res_dist: str = "truncnorm"
    res_mean: float = 0.0
    res_std: float = 0.5

    def __post_init__(self) -> None:
        if self.res_mode not in RES_MODES:
            raise ValueError(f"res_mode={self.res_mode!r}; expected one of {RES_MODES}")
        if self.res_dist not in RES_DISTS:
            raise ValueError(f"res_dist={self.res_dist!r}; expected one of {RES_DISTS}")
        if self.res_min < 1 or self.res_max < self.res_min:
            raise ValueError(
                "resolution bounds must satisfy 1 <= res_min <= res_max, got "
                f"res_min={self.res_min}, res_max={self.res_max}"
            )
        if self.res_std <= 0:
            raise ValueError(f"res_std must be > 0, got {self.res_std}")
        if not 0.0 <= self.res_mean <= 1.0:
            raise ValueError(f"res_mean must be in [0, 1] (a share of the resolution range), got {self.res_mean}")

    def _unit_sample(self, rng: np.random.Generator) -> float:
        """A draw in [0, 1] from the configured distribution."""
        if self.res_dist == "uniform":
            return float(rng.uniform())
        while True:  # rejection sampling; acceptance is high for sensible parameters
            x = rng.normal(self.res_mean, self.res_std)
            if 0.0 <= x <= 1.0:
                return float(x)

    def sample_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        """Target (height, width) with the image's aspect ratio."""
        if self.res_mode == "native":
            return height, width
        u = self._unit_sample(rng)
        if self.res_mode == "side":
            side = self.res_min + u * (self.res_max - self.res_min)
        else:
            side = math.sqrt(self.res_min**2 + u * (self.res_max**2 - self.res_min**2))
        scale = side / math.sqrt(height * width)
        return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class ExampleTransform:
    """Turns a data item (a dict with an ``"image"``) into an :class:`Example`. Picklable, so
    loader workers run it.

    With ``rng`` (training): an aspect-preserving random crop of ``crop_scale`` of the area, a
    horizontal flip with ``flip``, a sampled resolution, then token dropping. Without (eval):
    the processor alone, at native resolution or at ``budget`` tokens; or with ``keep``, at native
    resolution with all but ``keep`` tokens dropped (a random choice seeded by the example's
    name, the same in every run: token dropping at inference). Keys in ``dense_keys``
    (label images such as segmentation masks) get the same crop, flip and grid, with nearest
    neighbour resizing, and become per-token fields of the example.
    """

    processor: Processor
    resolution: ResolutionSampler = field(default_factory=ResolutionSampler)
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    budget: int | None = None
    keep: int | None = None
    dense_keys: tuple[str, ...] = ()
    frames_min: int = 1
    max_frames: int | None = None  # frames of a clip at evaluation (default: the processor's)

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("budget", "keep"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget is not None and self.keep is not None:
            raise ValueError("give budget (resize to it) or keep (drop tokens to it), not both")
        if not 1 <= self.frames_min <= self.processor.max_frames:
            raise ValueError(f"frames_min={self.frames_min} must be in [1, max_frames={self.processor.max_frames}]")

    def augment_op(self, width: int, height: int, rng: np.random.Generator) -> tuple[Callable | None, tuple[int, int]]:
        """A random aspect-preserving crop and horizontal flip of a ``width`` x ``height`` picture,
        as one operation on PIL images, and the (height, width) it leaves."""
        ops = []
        low, high = self.crop_scale
        if low < 1.0:
            area = rng.uniform(low, high)
            w = max(1, round(width * math.sqrt(area)))
            h = max(1, round(height * math.sqrt(area)))
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            ops.append(lambda im: im.crop((left, top, left + w, top + h)))
            width, height = w, h
        if self.flip and rng.uniform() < 0.5:
            ops.append(lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        if not ops:
            return None, (height, width)

        def op(image: Image.Image) -> Image.Image:
            for each in ops:
                image = each(image)
            return image

        return op, (height, width)

    def augment(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The same random crop and flip for the image and its dense keys."""
        op, _ = self.augment_op(item["image"].width, item["image"].height, rng)
        if op is None:
            return item
        return {**item, **{key: op(item[key]) for key in ("image", *self.dense_keys)}}

    def clip(self, clip: Clip, rng: np.random.Generator | None, name: str | None) -> Example:
        """A clip's example: in training a random duration, start, crop, flip and resolution;
        in evaluation the first ``max_frames`` frames at native resolution (or ``budget``)."""
        processor = self.processor
        if rng is None:
            return processor.clip_to_example(clip, num_frames=self.max_frames, budget=self.budget, name=name)
        info = clip.info()
        frames = int(rng.integers(self.frames_min, processor.max_frames + 1))
        # The window starts on a frame of the sampling grid, each start equally likely (a start
        # between two frames would never pick the first one).
        rate = min(processor.fps or math.inf, info.fps or 25.0) / processor.frame_stride
        slots = math.floor((info.duration or 0.0) * rate + 1e-6) - frames + 1
        start = int(rng.integers(0, max(1, slots))) / rate
        op, (height, width) = self.augment_op(info.width, info.height, rng)
        size = self.resolution.sample_size(height, width, rng)
        return processor.clip_to_example(clip, start=start, num_frames=frames, size=size, frame_op=op, name=name)

    def __call__(
        self,
        item: dict[str, Any],
        rng: np.random.Generator | None = None,
        *,
        dropper: TokenDropper | None = None,
        drop_scale: float = 1.0,
        name: str | None = None,
    ) -> Example:
        """Pass ``rng`` for training (augmentation, sampled resolution, dropping), ``None`` for eval."""
        if "video" in item:
            example = self.clip(item["video"], rng, name)
        else:
            size = None
            if rng is not None:
                item = self.augment(item, rng)
                image = item["image"]
                size = self.resolution.sample_size(image.height, image.width, rng)
            dense = {k: item[k] for k in self.dense_keys}
            example = self.processor.to_example(item["image"], size=size, budget=self.budget, dense=dense, name=name)
        if dropper is not None and rng is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            example = dropper([example], generator=generator, scale=drop_scale)[0]
        if self.keep is not None and rng is None and example.num_tokens > self.keep:
            generator = torch.Generator().manual_seed(zlib.crc32((name or "").encode()))
            example = example.select(torch.randperm(example.num_tokens, generator=generator)[: self.keep].sort().values)
        return example
