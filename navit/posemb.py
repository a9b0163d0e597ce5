"""Factorized positional embeddings (paper §2.1, §3.4) and rotary embeddings, over any number of axes.

An example's tokens have one integer coordinate per axis: (row, col) for images, (time, row,
col) for clips. Both embeddings turn them into continuous positions first:

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


def sincos_frequencies(num: int, axis: int, num_axes: int, base: float = 10_000.0) -> torch.Tensor:
    """``num`` geometric frequencies; axis ``a`` of ``A`` is offset by ``a / A`` of a step.

    With identical frequencies, summing the row and column embeddings would make (r, c) and
    (c, r) collide; the offsets keep them apart (for images: half a step for the columns).
    """
    exponent = (torch.arange(num, dtype=torch.float64) + axis / num_axes) / num
    return base ** (-exponent)


class AxisEmbedding(nn.Module):
    """Embeds one axis' continuous positions [...] into [..., dim]."""

    def __init__(self, dim: int, kind: str, max_len: int, axis: int, num_axes: int, fourier_bands: int) -> None:
        super().__init__()
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        elif kind == "sincos":
            if dim % 2:
                raise ValueError(f"sincos embeddings need an even dimension per axis, got {dim}")
            freqs = sincos_frequencies(dim // 2, axis, num_axes)
            self.register_buffer("freqs", freqs.float(), persistent=False)
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
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


class FactorizedPosEmbed(nn.Module):
    """One embedding per axis, combined by sum, stack (concatenate: ``dim / A`` each) or product."""

    def __init__(
        self,
        dim: int,
        *,
        num_axes: int = 2,
        kind: str = "learned",
        mode: str = "fractional",
        combine: str = "sum",
        max_len: int = 64,
        fourier_bands: int = 16,
    ) -> None:
        super().__init__()
        if combine not in ("sum", "stack", "product"):
            raise ValueError(f"unknown combine {combine!r}; expected sum, stack or product")
        if combine == "stack" and dim % num_axes:
            raise ValueError(f"combine='stack' needs dim divisible by the {num_axes} axes, got {dim}")
        self.mode, self.combine, self.max_len = mode, combine, max_len
        axis_dim = dim // num_axes if combine == "stack" else dim
        self.axes = nn.ModuleList(
            AxisEmbedding(axis_dim, kind, max_len, axis, num_axes, fourier_bands) for axis in range(num_axes)
        )

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """coords, grid: [B, L, A] coordinates and full grid sizes -> [B, L, dim]."""
        pos = axis_positions(coords, grid, self.mode, self.max_len)
        per_axis = [embed(pos[..., a]) for a, embed in enumerate(self.axes)]
        if self.combine == "stack":
            return torch.cat(per_axis, dim=-1)
        out = per_axis[0]
        for more in per_axis[1:]:
            out = out + more if self.combine == "sum" else out * more
        return out


def rope_pairs_per_axis(head_dim: int, num_axes: int) -> int:
    """Rotated (x1, x2) pairs per axis: the head's ``head_dim / 2`` pairs split evenly over the
    axes; pairs left over by the division are not rotated."""
    return (head_dim // 2) // num_axes


class Rope(nn.Module):
    """Rotary embedding over A axes: each axis rotates its own share of each head's pairs.

    For images (A = 2) half of the pairs rotate with the row and half with the column; for
    clips (A = 3) a third each with time, row and column.
    """

    def __init__(self, head_dim: int, *, num_axes: int = 2, mode: str, max_len: int, theta: float = 100.0) -> None:
        super().__init__()
        pairs = rope_pairs_per_axis(head_dim, num_axes)
        if head_dim % 2 or pairs < 1:
            raise ValueError(
                f"RoPE over {num_axes} axes needs an even head_dim of at least {2 * num_axes}, got {head_dim}"
            )
        self.mode, self.max_len, self.num_axes = mode, max_len, num_axes
        self.unrotated = head_dim // 2 - pairs * num_axes
        freqs = theta ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords, grid [B, L, A] -> (cos, sin), each [B, L, 1, head_dim / 2], shared by every layer."""
        pos = axis_positions(coords, grid, self.mode, self.max_len)
        angles = [pos[..., a : a + 1] * self.freqs for a in range(self.num_axes)]
        angles.append(pos.new_zeros(*pos.shape[:-1], self.unrotated))
        angles = torch.cat(angles, dim=-1)
        return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles whose cos/sin are [B, L, 1, D/2] (split-half pairing)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


def _filter(x: torch.Tensor, interp: str) -> torch.Tensor:
    """The interpolation kernel at offsets ``x``: triangle (bilinear) or Keys cubic with a = -0.5."""
    x = x.abs()
    if interp == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(index: torch.Tensor, size: torch.Tensor, grid: int, interp: str) -> torch.Tensor:
    """[..., grid] weights that resizing a ``grid``-long axis to ``size`` gives output ``index``:
    the weights of ``F.interpolate(..., align_corners=False, antialias=True)`` (the kernel
    stretched by the downscaling factor, then normalised), for every element at once."""
    scale = grid / size.float()
    stretch = scale.clamp(min=1)[..., None]
    center = ((index.float() + 0.5) * scale - 0.5)[..., None]  # in source-index units
    source = torch.arange(grid, device=index.device, dtype=torch.float32)
    weights = _filter((source - center).abs() / stretch, interp)
    return weights / weights.sum(-1, keepdim=True)


class GridPosEmbed(nn.Module):
    """A learned ``grid`` × ``grid`` table resized to each image's own patch grid (SigLIP2 NaFlex
    with ``bilinear``, timm NaFlexViT with ``bicubic``, both antialiased), computed per token from
    its coordinates and its image's grid size: no loop over images, one matmul for the batch.
    ``keep_aspect``: the table is resized to a square of the longer side and cropped to the
    image's grid (timm's ``pos_embed_ar_preserving``), so it is never stretched."""

    def __init__(self, dim: int, grid: int = 16, interp: str = "bilinear", keep_aspect: bool = False) -> None:
        super().__init__()
        self.grid, self.interp, self.keep_aspect = grid, interp, keep_aspect
        self.table = nn.Parameter(torch.randn(grid, grid, dim) * 0.02)

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """coords, grid: [B, L, 2] (row, col) and the image's grid -> [B, L, dim]."""
        if self.keep_aspect:
            grid = grid.amax(-1, keepdim=True).expand_as(grid)
        rows = resize_weights(coords[..., 0], grid[..., 0], self.grid, self.interp)
        cols = resize_weights(coords[..., 1], grid[..., 1], self.grid, self.interp)
        weights = (rows[..., :, None] * cols[..., None, :]).flatten(-2)  # [B, L, grid²]
        return weights.to(self.table.dtype) @ self.table.flatten(0, 1)


class TablePosEmbed(nn.Module):
    """One learned ``max_len`` × ``max_len`` table indexed by each token's (row, col) position
    (Pix2Struct's 2-D absolute embedding): not factorized, so every cell is learned on its own and
    cells that training never reached stay at their initialisation."""

    def __init__(self, dim: int, *, mode: str = "absolute", max_len: int = 64) -> None:
        super().__init__()
        self.mode, self.max_len = mode, max_len
        self.table = nn.Parameter(torch.randn(max_len, max_len, dim) * 0.02)

    def forward(self, coords: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """coords, grid: [B, L, 2] (row, col) and the image's grid -> [B, L, dim]."""
        index = axis_positions(coords, grid, self.mode, self.max_len).floor().long().clamp(0, self.max_len - 1)
        return self.table[index[..., 0], index[..., 1]]
