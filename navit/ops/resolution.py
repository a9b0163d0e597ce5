"""Resolution sampling (paper §3.2): in training, each image gets an effective side R and its grid
is sized as if ``sqrt(H·W) = R``, aspect kept. ``side`` draws R from the distribution, ``area``
draws R² (uniform in area gives more weight to high resolutions than uniform in side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from navit.ops.geometry import picture_size

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
class SampleResolution:
    """The op: in training, ``item["size"]`` (height, width) becomes the size the item's grid is
    made for (:class:`ResolutionSampler`); nothing at evaluation or in ``native`` mode."""

    sampler: ResolutionSampler

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        if rng is None or self.sampler.res_mode == "native":
            return item
        width, height = picture_size(item)
        return {**item, "size": self.sampler.sample_size(height, width, rng)}
