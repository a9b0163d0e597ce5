"""Per-image preprocessing, run in data-loader workers: crop, flip, resolution, patchify, drop.

Aspect ratio is preserved everywhere except in the explicit square-resize ViT baseline.
Resolution sampling (paper §3.2) picks an effective side R per image and resizes the image so
that sqrt(H·W) = R: ``side`` draws R from the distribution, ``area`` draws R² (uniform in area
gives more weight to high resolutions than uniform in side length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from navit.patchify import PatchedImage, fit_grid, grid_coords
from navit.token_drop import TokenDropper

RESOLUTION_MODES = ("native", "side", "area")
DISTRIBUTIONS = ("uniform", "truncnorm")


@dataclass(frozen=True)
class ResolutionSampler:
    """Effective resolution per image. ``truncnorm`` centres a normal at ``mean`` (a fraction of
    the [min_res, max_res] range; 0 = biased to low resolution, the paper's best) with standard
    deviation ``std`` (also a fraction of the range), truncated to the range."""

    mode: str = "native"
    min_res: int = 64
    max_res: int = 256
    distribution: str = "truncnorm"
    mean: float = 0.0
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in RESOLUTION_MODES:
            raise ValueError(f"resolution mode {self.mode!r}; expected one of {RESOLUTION_MODES}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"resolution distribution {self.distribution!r}; expected one of {DISTRIBUTIONS}"
            )
        if self.min_res < 1 or self.max_res < self.min_res:
            raise ValueError(
                "resolution bounds must satisfy 1 <= min_res <= max_res, got "
                f"min_res={self.min_res}, max_res={self.max_res}"
            )
        if self.std <= 0:
            raise ValueError(f"resolution std must be > 0, got {self.std}")

    def _unit_sample(self, rng: np.random.Generator) -> float:
        """A draw in [0, 1] from the configured distribution."""
        if self.distribution == "uniform":
            return float(rng.uniform())
        while True:  # rejection sampling; acceptance is high for sensible parameters
            x = rng.normal(self.mean, self.std)
            if 0.0 <= x <= 1.0:
                return float(x)

    def sample_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        """Target (height, width) with the image's aspect ratio."""
        if self.mode == "native":
            return height, width
        u = self._unit_sample(rng)
        if self.mode == "side":
            side = self.min_res + u * (self.max_res - self.min_res)
        else:
            side = math.sqrt(self.min_res**2 + u * (self.max_res**2 - self.min_res**2))
        scale = side / math.sqrt(height * width)
        return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class ImagePipeline:
    """Turns a decoded PIL image into patch tokens. Picklable, so workers can run it.

    ``square_tokens`` switches to the ViT baseline: every image is resized (squashed) to a
    square grid of that many tokens. ``token_budget`` instead resizes each image, aspect kept,
    as close as possible to that many tokens (flexible inference).
    """

    patch_size: int = 16
    max_tokens: int = 256
    resolution: ResolutionSampler = field(default_factory=ResolutionSampler)
    square_tokens: int | None = None
    token_budget: int | None = None
    crop_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("square_tokens", "token_budget"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= self.max_tokens:
                raise ValueError(f"{name}={value} must be in [1, max_tokens={self.max_tokens}]")

    def grid_for(self, height: int, width: int, rng: np.random.Generator | None) -> tuple[int, int]:
        if self.square_tokens is not None:
            side = max(1, math.isqrt(self.square_tokens))
            return side, side
        if self.token_budget is not None:
            return fit_grid(height, width, self.patch_size, self.token_budget, fill=True)
        if rng is not None:
            height, width = self.resolution.sample_size(height, width, rng)
        return fit_grid(height, width, self.patch_size, self.max_tokens)

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Aspect-preserving random crop (a random fraction of the area) and horizontal flip."""
        low, high = self.crop_scale
        if low < 1.0:
            area = rng.uniform(low, high)
            w = max(1, round(image.width * math.sqrt(area)))
            h = max(1, round(image.height * math.sqrt(area)))
            left = int(rng.integers(0, image.width - w + 1))
            top = int(rng.integers(0, image.height - h + 1))
            image = image.crop((left, top, left + w, top + h))
        if self.flip and rng.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(
        self,
        image: Image.Image,
        rng: np.random.Generator | None = None,
        *,
        dropper: TokenDropper | None = None,
        drop_scale: float = 1.0,
    ) -> PatchedImage:
        """Pass ``rng`` for training (augmentation, sampled resolution, dropping), ``None`` for eval."""
        if rng is not None:
            image = self.augment(image, rng)
        rows, cols = self.grid_for(image.height, image.width, rng)
        p = self.patch_size
        if image.size != (cols * p, rows * p):
            image = image.resize((cols * p, rows * p), Image.Resampling.BICUBIC, reducing_gap=3.0)
        # Patchify in numpy on uint8 and normalise once: far cheaper than small torch ops.
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        patches = patches.astype(np.float32) * (1.0 / (255.0 * self.std)) - self.mean / self.std
        tokens = PatchedImage(torch.from_numpy(patches), grid_coords(rows, cols), (rows, cols))
        if dropper is not None and rng is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            tokens = dropper([tokens], generator=generator, scale=drop_scale)[0]
        return tokens
