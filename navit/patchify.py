"""Cut one image into patches at (a resized version of) its own resolution.

Sides are resized to the nearest multiple of the patch size, never cropped; an image with more
patches than a token budget is downscaled, aspect ratio preserved, until it fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PatchedImage:
    """One image as a list of tokens, before packing.

    ``coords`` holds one integer coordinate per axis for each patch, (row, col) for images; a
    time axis for video is a leading extra column. ``grid`` is the full patch grid, also after
    token dropping, so fractional positions stay those of the whole image.
    """

    patches: torch.Tensor  # [n, patch_dim]
    coords: torch.Tensor  # [n, 2] long: (row, col)
    grid: tuple[int, int]  # (rows, cols) of the full patch grid

    @property
    def num_tokens(self) -> int:
        return self.patches.shape[0]


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
    """Resize ``image`` [C, H, W] so that it is exactly ``grid`` patches (antialiased)."""
    size = (grid[0] * patch_size, grid[1] * patch_size)
    if tuple(image.shape[-2:]) == size:
        return image
    mode = "bilinear" if image.is_floating_point() else "nearest"
    resized = F.interpolate(
        image[None].float(), size=size, mode=mode, antialias=mode == "bilinear", align_corners=False
    )
    return resized[0].to(image.dtype)


def patchify(image: torch.Tensor, patch_size: int) -> PatchedImage:
    """Split ``image`` [C, H, W] (H, W multiples of ``patch_size``) into row-major patches.

    Each patch is flattened in (patch_row, patch_col, channel) order.
    """
    channels, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image of size {height}x{width} is not a multiple of patch_size={patch_size}; "
            "resize it with resize_to_grid first"
        )
    rows, cols = height // patch_size, width // patch_size
    patches = (
        image.reshape(channels, rows, patch_size, cols, patch_size)
        .permute(1, 3, 2, 4, 0)  # [rows, cols, p, p, C]
        .reshape(rows * cols, patch_size * patch_size * channels)
    )
    return PatchedImage(patches=patches, coords=grid_coords(rows, cols), grid=(rows, cols))


def grid_coords(rows: int, cols: int) -> torch.Tensor:
    """[rows·cols, 2] (row, col) of every patch in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1)


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


def image_to_tokens(
    image: torch.Tensor, patch_size: int, max_tokens: int | None, *, index: int = 0
) -> PatchedImage:
    """Resize ``image`` to its native patch grid (within ``max_tokens``) and patchify it."""
    image = check_image(image, index)
    _, height, width = image.shape
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"image {index} is {height}x{width}, smaller than patch_size={patch_size} on a side; "
            "upsample it or use a smaller patch size"
        )
    grid = fit_grid(height, width, patch_size, max_tokens)
    return patchify(resize_to_grid(image, grid, patch_size), patch_size)
