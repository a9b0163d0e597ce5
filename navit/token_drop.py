"""Continuous token dropping (paper §3.3): a drop rate per example, applied before packing.

Dropping before packing means dropped tokens never take sequence space, which is where the
speed-up comes from. The number of kept tokens is rounded stochastically, so the kept fraction
matches ``1 - rate`` in expectation, and at least one token is always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from navit.batch import Example


class DropRate(Protocol):
    """A distribution of per-example drop rates in [0, 1)."""

    def sample(self, num_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One rate per example; ``num_tokens`` [N] lets rates depend on resolution."""
        ...


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def truncated_normal(
    mean: torch.Tensor, std: float, low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    """Samples of N(mean, std²) truncated to [low, high], by inverting the normal CDF."""
    mean = mean.double()
    if std <= 0:
        return mean.clamp(low, high).float()
    cdf_low = torch.special.ndtr((low - mean) / std)
    cdf_high = torch.special.ndtr((high - mean) / std)
    u = torch.rand(mean.shape, generator=generator, dtype=torch.float64)
    p = (cdf_low + u * (cdf_high - cdf_low)).clamp(1e-12, 1 - 1e-12)
    return (mean + std * torch.special.ndtri(p)).clamp(low, high).float()


@dataclass(frozen=True)
class ConstantRate:
    rate: float

    def __post_init__(self) -> None:
        _check_rate("rate", self.rate)

    def sample(self, num_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.full(num_tokens.shape, self.rate)


@dataclass(frozen=True)
class UniformRate:
    low: float
    high: float

    def __post_init__(self) -> None:
        _check_rate("low", self.low)
        _check_rate("high", self.high)
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")

    def sample(self, num_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(num_tokens.shape, generator=generator)
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class BetaRate:
    """``rate = max_rate · Beta(a, b)`` with mean ``mean``; ``concentration = a + b``.

    A Beta skewed towards low rates keeps most images nearly whole while some are heavily
    dropped, which the paper found better than one constant rate.
    """

    mean: float
    max_rate: float
    concentration: float = 4.0

    def __post_init__(self) -> None:
        _check_rate("max_rate", self.max_rate)
        if not 0.0 < self.mean < self.max_rate:
            raise ValueError(f"mean={self.mean} must be in (0, max_rate={self.max_rate})")
        if self.concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")

    def sample(self, num_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fraction = self.mean / self.max_rate
        a = self.concentration * fraction
        b = self.concentration * (1 - fraction)
        # Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); torch's Gamma takes no
        # generator, so draw through a seeded fork of the global RNG.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = torch._standard_gamma(torch.full(num_tokens.shape, a, dtype=torch.float64))
            y = torch._standard_gamma(torch.full(num_tokens.shape, b, dtype=torch.float64))
        return (self.max_rate * x / (x + y)).float()


@dataclass(frozen=True)
class ResolutionRate:
    """Truncated normal whose mean grows linearly with the image's token count.

    High-resolution images have more redundant tokens, so they are dropped more: the mean goes
    from ``rate_at_min`` at ``min_tokens`` to ``rate_at_max`` at ``max_tokens`` (clamped outside).
    """

    rate_at_min: float
    rate_at_max: float
    min_tokens: int
    max_tokens: int
    std: float = 0.1
    max_rate: float = 0.9

    def __post_init__(self) -> None:
        for name in ("rate_at_min", "rate_at_max", "max_rate"):
            _check_rate(name, getattr(self, name))
        if not 1 <= self.min_tokens < self.max_tokens:
            raise ValueError(
                f"need 1 <= min_tokens < max_tokens, got {self.min_tokens}, {self.max_tokens}"
            )

    def sample(self, num_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = (num_tokens.double() - self.min_tokens) / (self.max_tokens - self.min_tokens)
        mean = self.rate_at_min + t.clamp(0, 1) * (self.rate_at_max - self.rate_at_min)
        return truncated_normal(mean, self.std, 0.0, self.max_rate, generator)


def num_kept(num_tokens: torch.Tensor, rates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Tokens to keep per example: stochastic rounding of (1 - rate)·n, at least 1."""
    expected = (1.0 - rates.double()) * num_tokens.double()
    u = torch.rand(expected.shape, generator=generator, dtype=torch.float64)
    return torch.floor(expected + u).long().clamp(min=1, max=None).minimum(num_tokens)


class TokenDropper:
    """Drops a random subset of each example's tokens during training; a no-op in eval mode.

    Mirrors ``nn.Module``'s ``train()`` / ``eval()`` so a training loop can switch it with the
    model; kept tokens keep their original coordinates and the example keeps its full grid.
    With ``tube``, a clip (an example whose first axis is time) loses whole tubes: the same
    (row, col) at every time, so no position can be read from a neighbouring frame.
    """

    def __init__(self, rate: DropRate | float, *, seed: int = 0, tube: bool = False) -> None:
        self.rate = ConstantRate(rate) if isinstance(rate, (int, float)) else rate
        self.generator = torch.Generator().manual_seed(seed)
        self.training = True
        self.tube = tube

    def train(self, mode: bool = True) -> "TokenDropper":
        self.training = mode
        return self

    def eval(self) -> "TokenDropper":
        return self.train(False)

    def __call__(
        self,
        examples: list[Example],
        *,
        generator: torch.Generator | None = None,
        scale: float = 1.0,
    ) -> list[Example]:
        """Drop tokens of each example; ``scale`` multiplies the sampled rates (for schedules).

        ``generator`` overrides the dropper's own, so a data-loader worker can draw from a
        per-example seed and stay deterministic whatever the worker count.
        """
        if not self.training or not examples:
            return examples
        generator = generator if generator is not None else self.generator
        lengths = torch.tensor([example.num_tokens for example in examples])
        rates = self.rate.sample(lengths, generator) * scale
        if not torch.all((rates >= 0) & (rates < 1)):
            raise ValueError(f"drop-rate distribution {self.rate} produced a rate outside [0, 1)")
        keep = num_kept(lengths, rates, generator).tolist()
        out = []
        for example, k in zip(examples, keep):
            if k == example.num_tokens:
                out.append(example)
            elif self.tube and example.num_axes == 3:
                out.append(example.select(self._tubes(example, k, generator)))
            else:
                out.append(example.select(torch.randperm(example.num_tokens, generator=generator)[:k].sort().values))
        return out

    @staticmethod
    def _tubes(example: Example, k: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the tokens of the kept tubes: the share ``k / n`` of the (row, col) cells
        present (stochastically rounded, at least one), every time step of each."""
        cell = example.coords[:, 1] * example.grid[2] + example.coords[:, 2]
        cells, owner = torch.unique(cell, return_inverse=True)
        share = cells.numel() * k / example.num_tokens
        count = min(cells.numel(), max(1, int(share + float(torch.rand((), generator=generator, dtype=torch.float64)))))
        chosen = torch.zeros(cells.numel(), dtype=torch.bool)
        chosen[torch.randperm(cells.numel(), generator=generator)[:count]] = True
        return torch.nonzero(chosen[owner]).squeeze(1)


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
