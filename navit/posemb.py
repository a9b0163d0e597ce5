"""Factorized positional embeddings (paper §2.1, §3.4) and 2-D rotary embeddings.

Both turn integer patch coordinates into continuous positions first:

- ``absolute``: the patch index itself; must stay below ``max_len``.
- ``fractional``: index / side length · ``max_len``; the same relative position at every
  resolution, so a model trained at one resolution range transfers to another.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def axis_positions(coords: torch.Tensor, grid: torch.Tensor, mode: str, max_len: int) -> torch.Tensor:
    """Continuous positions in [0, max_len) for integer ``coords`` [..., A] in grids ``grid``."""
    if mode == "absolute":
        check_absolute_range(coords, max_len)
        return coords.float()
    return coords.float() / grid.float() * max_len


@torch.compiler.disable  # reads a value: under torch.compile, a quiet break between graphs
def check_absolute_range(coords: torch.Tensor, max_len: int) -> None:
    largest = int(coords.max()) if coords.numel() else 0
    if largest >= max_len:
        raise ValueError(
            f"a patch grid has {largest + 1} patches along a side, beyond the absolute "
            f"position table of {max_len}; raise pos_max_len or use pos_mode='fractional'"
        )


def sincos_frequencies(num: int, axis: int, base: float = 10_000.0) -> torch.Tensor:
    """``num`` geometric frequencies; the second axis is offset by half a step.

    With identical frequencies, summing the row and column embeddings would make (r, c) and
    (c, r) collide; the offset keeps them apart.
    """
    exponent = (torch.arange(num, dtype=torch.float64) + 0.5 * axis) / num
    return base ** (-exponent)


class AxisEmbedding(nn.Module):
    """Embeds one axis' continuous positions [...] into [..., dim]."""

    def __init__(self, dim: int, kind: str, max_len: int, axis: int, fourier_bands: int) -> None:
        super().__init__()
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        elif kind == "sincos":
            if dim % 2:
                raise ValueError(f"sincos embeddings need an even dimension per axis, got {dim}")
            self.register_buffer("freqs", sincos_frequencies(dim // 2, axis).float(), persistent=False)
        elif kind == "fourier":
            bands = (2.0 ** torch.arange(fourier_bands)) * math.pi
            self.register_buffer("bands", bands, persistent=False)
            self.proj = nn.Linear(2 * fourier_bands, dim)
        else:
            raise ValueError(f"unknown positional embedding kind {kind!r}")

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.kind == "learned":
            index = pos.floor().long().clamp(0, self.max_len - 1)
            return self.table[index]
        if self.kind == "sincos":
            angles = pos[..., None] * self.freqs
            return torch.cat([angles.sin(), angles.cos()], dim=-1)
        # NeRF-style Fourier features of the position in [0, 1), then a learned projection.
        angles = (pos / self.max_len)[..., None] * self.bands
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


class FactorizedPosEmbed(nn.Module):
    """Separate row and column embeddings combined by sum, stack (concatenate) or product."""

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "learned",
        mode: str = "fractional",
        combine: str = "sum",
        max_len: int = 64,
        fourier_bands: int = 16,
    ) -> None:
        super().__init__()
        if combine not in ("sum", "stack", "product"):
            raise ValueError(f"unknown combine {combine!r}; expected sum, stack or product")
        self.mode, self.combine, self.max_len = mode, combine, max_len
        axis_dim = dim // 2 if combine == "stack" else dim
        self.axes = nn.ModuleList(
            AxisEmbedding(axis_dim, kind, max_len, axis, fourier_bands) for axis in range(2)
        )

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """coords, grid: [B, L, 2] (row, col) and full grid size -> [B, L, dim]."""
        pos = axis_positions(coords, grid, self.mode, self.max_len)
        rows, cols = (embed(pos[..., a]) for a, embed in enumerate(self.axes))
        if self.combine == "sum":
            return rows + cols
        if self.combine == "stack":
            return torch.cat([rows, cols], dim=-1)
        return rows * cols


class Rope2D(nn.Module):
    """2-D rotary embedding: half of each head's pairs rotate with the row, half with the column."""

    def __init__(self, head_dim: int, *, mode: str, max_len: int, theta: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.mode, self.max_len = mode, max_len
        quarter = head_dim // 4
        freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each [B, L, 1, head_dim / 2], shared by every layer."""
        pos = axis_positions(coords, grid, self.mode, self.max_len)
        angles = torch.cat([pos[..., 0:1] * self.freqs, pos[..., 1:2] * self.freqs], dim=-1)
        return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles whose cos/sin are [B, L, 1, D/2] (split-half pairing)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)
