"""Native-resolution patchification: rounding to the patch grid, downscaling to a token budget."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PATCH, random_images
from hypothesis import given, settings
from hypothesis import strategies as st

from navit import image_to_example, pack_images
from navit.patchify import fit_grid, grid_coords, patchify

EPS = 1e-9


def is_rounded_uniform_scaling(height, width, patch, rows, cols) -> bool:
    """True if some single scale s gives rows = round(height·s/patch) and cols = round(width·s/patch).

    That is what "aspect ratio preserved as well as integer grids allow" means. A side of one
    patch may come from anything below 1.5 patches (sides never drop below one patch).
    """

    def scales(side, n):
        low = 0.0 if n == 1 else (n - 0.5) * patch / side
        return low - EPS, (n + 0.5) * patch / side + EPS

    (lo_r, hi_r), (lo_c, hi_c) = scales(height, rows), scales(width, cols)
    return max(lo_r, lo_c) <= min(hi_r, hi_c)


def aspect_limited_sizes(max_aspect: float = 4.0):
    """(height, width) with the long side at most ``max_aspect`` times the short side."""
    return st.tuples(st.integers(1, 3000), st.floats(1 / max_aspect, max_aspect)).map(
        lambda hr: (hr[0], max(1, round(hr[0] * hr[1])))
    )


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    patch=st.integers(1, 32),
    budget=st.none() | st.integers(1, 2048),
)
def test_fit_grid_respects_the_budget(height, width, patch, budget):
    rows, cols = fit_grid(height, width, patch, budget)
    assert rows >= 1 and cols >= 1
    if budget is not None:
        assert rows * cols <= budget
    native = (max(1, math.floor(height / patch + 0.5)), max(1, math.floor(width / patch + 0.5)))
    if budget is None or native[0] * native[1] <= budget:
        assert (rows, cols) == native, "an image within budget keeps its native grid"
    else:
        assert rows <= native[0] and cols <= native[1], "over-budget images only shrink"


@settings(max_examples=300, deadline=None)
@given(
    size=aspect_limited_sizes(),
    patch=st.integers(1, 32),
    budget=st.integers(1, 1024),
    fill=st.booleans(),
)
def test_fit_grid_downscales_uniformly_and_uses_the_budget(size, patch, budget, fill):
    height, width = size
    rows, cols = fit_grid(height, width, patch, budget, fill=fill)
    assert rows * cols <= budget
    assert is_rounded_uniform_scaling(height, width, patch, rows, cols), (
        f"{rows}x{cols} grid does not keep the aspect of a {height}x{width} image"
    )
    native = (max(1, math.floor(height / patch + 0.5)), max(1, math.floor(width / patch + 0.5)))
    if fill or native[0] * native[1] > budget:
        # Scaled to the budget, not below it: one more patch per side would not fit.
        assert (rows + 1) * (cols + 1) > budget


@settings(max_examples=100, deadline=None)
@given(height=st.integers(PATCH, 12 * PATCH), width=st.integers(PATCH, 12 * PATCH))
def test_sides_go_to_the_nearest_multiple_of_the_patch_size(height, width):
    image = torch.rand(3, height, width)
    tokens = image_to_example(image, PATCH, None)
    rows, cols = tokens.grid
    assert abs(rows - height / PATCH) <= 0.5 and abs(cols - width / PATCH) <= 0.5
    assert tokens.num_tokens == rows * cols
    assert tokens.patches.shape == (rows * cols, 3 * PATCH * PATCH)
    # Coordinates are the row-major grid positions.
    expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    assert torch.equal(tokens.coords, expected.reshape(-1, 2))


def unpatchify(tokens, channels: int) -> torch.Tensor:
    """The [C, H, W] image a full (undropped) Example was cut from."""
    rows, cols = tokens.grid
    grid = tokens.patches.view(rows, cols, PATCH, PATCH, channels)
    return grid.permute(4, 0, 2, 1, 3).reshape(channels, rows * PATCH, cols * PATCH)


@pytest.mark.parametrize("height", [35, 44])  # 4.4 -> 4 patches (shrink), 5.5 -> 6 patches (grow)
def test_resizing_never_crops_or_pads(height):
    # A bright band in the bottom 2 rows must end up in the bottom row after resizing to a
    # multiple of 8: cropping would cut it off, padding would push it away from the edge.
    image = torch.zeros(1, height, 16)
    image[:, -2:] = 1.0
    tokens = image_to_example(image, PATCH, None)
    resized = unpatchify(tokens, 1)
    assert resized.shape[1] != height
    assert resized[:, -1].mean() > 0.5
    assert resized[:, 0].abs().max() < 1e-6
    assert resized.mean().item() == pytest.approx(2 / height, abs=0.02)


def test_an_image_already_on_the_grid_is_patchified_unchanged():
    image = random_images([(16, 24)])[0]
    tokens = image_to_example(image, PATCH, None)
    assert tokens.grid == (2, 3)
    assert torch.equal(unpatchify(tokens, 3), image)
    for t, (r, c) in enumerate(tokens.coords.tolist()):
        block = image[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
        # Each patch is flattened in (row, col, channel) order.
        assert torch.equal(tokens.patches[t], block.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("size", [(400, 120), (97, 333), (256, 256)])
def test_large_images_are_downscaled_to_fit_the_sequence(size):
    seq_len = 24
    image = torch.rand(3, *size)
    tokens = image_to_example(image, PATCH, seq_len)
    rows, cols = tokens.grid
    assert tokens.num_tokens == rows * cols <= seq_len
    assert is_rounded_uniform_scaling(*size, PATCH, rows, cols)
    assert abs(math.log(rows / cols) - math.log(size[0] / size[1])) < math.log(1.5)
    batch = pack_images([image], PATCH, seq_len)
    assert batch.num_seqs == 1 and batch.num_real_tokens == rows * cols


def test_integer_images_are_rejected_but_all_float_dtypes_work():
    with pytest.raises(TypeError, match="image 0 has dtype torch.uint8; expected a floating-point"):
        image_to_example(torch.zeros(3, 16, 16, dtype=torch.uint8), PATCH, None)
    tokens = image_to_example(torch.zeros(3, 20, 20, dtype=torch.float64), PATCH, None)
    assert tokens.patches.dtype == torch.float64


@pytest.mark.parametrize(
    "image, error, message",
    [
        (torch.zeros(3, 4, 32), ValueError, "image 2 is 4x32, smaller than patch_size=8"),
        (torch.zeros(32, 32), ValueError, r"image 2 has shape \(32, 32\); expected a 3-D"),
        (torch.zeros(1, 3, 32, 32), ValueError, "expected a 3-D"),
        (torch.zeros(3, 32, 32, dtype=torch.int64), TypeError, "expected a floating-point tensor"),
        (torch.zeros(3, 0, 32), ValueError, "empty dimension"),
        ([[0.0]], TypeError, "image 2 is a list"),
    ],
)
def test_bad_images_are_named_in_the_error(image, error, message):
    with pytest.raises(error, match=message):
        image_to_example(image, PATCH, 64, index=2)


def test_patchify_refuses_sides_off_the_grid():
    with pytest.raises(ValueError, match="12x16 are not a multiple of the patch 8x8"):
        patchify(torch.zeros(3, 12, 16), (PATCH, PATCH))
    with pytest.raises(ValueError, match="3-axis pixels need 3 patch sizes"):
        patchify(torch.zeros(3, 2, 16, 16), (PATCH, PATCH))


def test_patchify_cuts_clips_into_time_row_col_channel_tubelets():
    # A [C, T, H, W] clip with pixel value = its own (c, t, y, x) index, cut into 2x8x8 tubelets.
    c, t, h, w = 3, 4, 16, 24
    clip = torch.arange(c * t * h * w).view(c, t, h, w)
    patches, grid = patchify(clip, (2, PATCH, PATCH))
    assert grid == (2, 2, 3) and patches.shape == (12, 2 * PATCH * PATCH * c)
    coords = grid_coords(*grid)
    assert coords.tolist()[:4] == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    for k, (ti, yi, xi) in enumerate(coords.tolist()):
        block = clip[:, 2 * ti : 2 * ti + 2, PATCH * yi : PATCH * (yi + 1), PATCH * xi : PATCH * (xi + 1)]
        assert torch.equal(patches[k], block.permute(1, 2, 3, 0).reshape(-1)), "(time, row, col, channel) order"


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 10, 8, None), "image size must be positive"),
        ((10, 10, 0, None), "patch_size must be >= 1"),
        ((10, 10, 8, 0), "token budget must be >= 1"),
    ],
)
def test_fit_grid_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        fit_grid(*args)
