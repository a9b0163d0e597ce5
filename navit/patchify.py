"""Examples as tokens: the ``Example`` an image (or clip) becomes, patch grids and patchifying.

Sides are resized to the nearest multiple of the patch size, never cropped; an image with more
patches than a token budget is downscaled, aspect ratio preserved, until it fits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from navit.batch import Example


def fit_grid(
    height: int, width: int, patch_size: int, max_tokens: int | None, *, fill: bool = False
) -> tuple[int, int]:
    """Patch grid (rows, cols) closest to the image's own size that has at most ``max_tokens``.

    Each side is rounded to the nearest multiple of ``patch_size`` (at least one patch). If that
    grid is over budget, the image is scaled down uniformly, so the aspect ratio is kept as well
    as integer grids allow. With ``fill``, smaller images are scaled up to the budget too (a
    fixed inference cost per image).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"the token budget must be >= 1, got {max_tokens}")

    def grid_at(scale: float) -> tuple[int, int]:
        return (
            max(1, math.floor(height * scale / patch_size + 0.5)),
            max(1, math.floor(width * scale / patch_size + 0.5)),
        )

    rows, cols = grid_at(1.0)
    if max_tokens is None or (rows * cols <= max_tokens and not fill):
        return rows, cols
    # Start at the scale that would hit the budget exactly, then shrink until rounding fits.
    scale = math.sqrt(max_tokens * patch_size**2 / (height * width))
    rows, cols = grid_at(scale)
    while rows * cols > max_tokens:
        scale *= 0.99
        rows, cols = grid_at(scale)
    return rows, cols


def resize_to_grid(image: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Resize ``image`` [C, H, W] so that it is exactly ``grid`` patches (antialiased bilinear)."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].to(image.dtype)


def patchify(pixels: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Cut ``pixels`` [C, S_1, ..., S_A] into patches of ``patch`` = (p_1, ..., p_A) pixels.

    Returns the flattened patches [n, p_1·…·p_A·C] in row-major grid order and the grid. Each
    patch is flattened in (axis 1, ..., axis A, channel) order: (row, col, channel) for images,
    (time, row, col, channel) for clips. Works on any dtype (the processor cuts uint8 pixels).
    """
    channels, *sizes = pixels.shape
    if len(sizes) != len(patch):
        raise ValueError(f"{len(sizes)}-axis pixels need {len(sizes)} patch sizes, got {tuple(patch)}")
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(
            f"pixels of size {'x'.join(map(str, sizes))} are not a multiple of the patch "
            f"{'x'.join(map(str, patch))}; resize them to the patch grid first"
        )
    grid = tuple(s // p for s, p in zip(sizes, patch))
    split = [channels] + [d for g, p in zip(grid, patch) for d in (g, p)]
    axes = len(grid)
    order = [1 + 2 * a for a in range(axes)] + [2 + 2 * a for a in range(axes)] + [0]
    patches = pixels.reshape(split).permute(order).reshape(math.prod(grid), -1)
    return patches, grid


def tubelet_differences(patches: torch.Tensor, frames: int, gain: float, mean_gain: float = 1.0) -> torch.Tensor:
    """Flattened tubelets [..., frames·P] (time first, as :func:`patchify` cuts them) as their
    mean frame times ``mean_gain`` followed by the differences of consecutive frames times
    ``gain`` [..., frames·P]: an invertible linear map, so nothing is lost, that hands the patch
    embedding frame-to-frame changes as inputs of their own instead of a small difference of two
    large ones."""
    x = patches.unflatten(-1, (frames, -1))
    moves = (x[..., 1:, :] - x[..., :-1, :]) * gain
    return torch.cat([x.mean(dim=-2, keepdim=True) * mean_gain, moves], dim=-2).flatten(-2)


def grid_coords(*sizes: int) -> torch.Tensor:
    """[prod(sizes), A] integer coordinates of every cell of a grid, in row-major order."""
    axes = torch.meshgrid(*(torch.arange(s) for s in sizes), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


def check_image(image: object, index: int) -> torch.Tensor:
    """Validate one user-supplied image tensor, naming it in any error."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image {index} is a {type(image).__name__}; expected a [C, H, W] tensor")
    if image.dim() != 3:
        raise ValueError(
            f"image {index} has shape {tuple(image.shape)}; expected a 3-D [C, H, W] tensor"
        )
    if not image.is_floating_point():
        raise TypeError(f"image {index} has dtype {image.dtype}; expected a floating-point tensor")
    if min(image.shape) < 1:
        raise ValueError(f"image {index} has an empty dimension: shape {tuple(image.shape)}")
    return image


def image_to_example(
    image: torch.Tensor, patch_size: int, max_tokens: int | None, *, index: int = 0
) -> Example:
    """The raw, differentiable path: resize a float ``image`` [C, H, W] to its native patch grid
    (within ``max_tokens``, torch bilinear) and patchify it, values as they are (no
    normalisation). A model's own preprocessing is ``model.processor`` (:mod:`navit.processor`)."""
    image = check_image(image, index)
    _, height, width = image.shape
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"image {index} is {height}x{width}, smaller than patch_size={patch_size} on a side; "
            "upsample it or use a smaller patch size"
        )
    grid = fit_grid(height, width, patch_size, max_tokens)
    patches, grid = patchify(resize_to_grid(image, grid, patch_size), (patch_size, patch_size))
    return Example(patches, grid_coords(*grid), grid)
