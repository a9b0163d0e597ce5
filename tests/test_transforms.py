"""Resolution sampling and per-image preprocessing: aspect kept, bounds respected."""

import math

import numpy as np
import pytest
from PIL import Image

from navit.data.transforms import ImagePipeline, ResolutionSampler
from navit.patchify import patchify


@pytest.mark.parametrize("mode", ["side", "area"])
@pytest.mark.parametrize("distribution", ["uniform", "truncnorm"])
def test_resolution_sampler_keeps_aspect_and_bounds(mode, distribution):
    sampler = ResolutionSampler(mode=mode, min_res=64, max_res=256, distribution=distribution)
    rng = np.random.default_rng(0)
    for height, width in [(100, 400), (300, 300), (1000, 250), (37, 61)]:
        for _ in range(50):
            h, w = sampler.sample_size(height, width, rng)
            assert abs(math.log((h / w) / (height / width))) < 0.05
            side = math.sqrt(h * w)
            assert 64 * 0.97 <= side <= 256 * 1.03


def test_truncnorm_is_biased_to_low_resolution():
    rng = np.random.default_rng(1)
    low = ResolutionSampler(mode="side", distribution="truncnorm", mean=0.0, std=0.5)
    flat = ResolutionSampler(mode="side", distribution="uniform")
    low_sides = [low.sample_size(200, 200, rng)[0] for _ in range(2000)]
    flat_sides = [flat.sample_size(200, 200, rng)[0] for _ in range(2000)]
    assert np.mean(low_sides) < np.mean(flat_sides) - 15


def test_native_mode_leaves_size_alone():
    rng = np.random.default_rng(0)
    assert ResolutionSampler(mode="native").sample_size(123, 45, rng) == (123, 45)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_res=256, max_res=64), "min_res <= max_res"),
        (dict(min_res=0), "min_res"),
        (dict(mode="squash"), "resolution mode"),
        (dict(distribution="beta"), "distribution"),
    ],
)
def test_resolution_sampler_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResolutionSampler(**kwargs)


def test_pipeline_matches_patchify_and_keeps_aspect():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 160, 3), dtype=np.uint8))
    tokens = ImagePipeline(patch_size=16, max_tokens=64)(image)
    assert tokens.grid == (3, 10)
    import torch

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    reference = patchify((pixels - 0.5) / 0.5, 16)
    torch.testing.assert_close(tokens.patches, reference.patches)
    assert torch.equal(tokens.coords, reference.coords)


def test_pipeline_budget_and_square_baseline():
    image = Image.new("RGB", (400, 100))
    budget = ImagePipeline(patch_size=16, max_tokens=256, token_budget=64)(image)
    rows, cols = budget.grid
    assert rows * cols <= 64 and rows * cols >= 48 and cols / rows == pytest.approx(4, rel=0.35)
    square = ImagePipeline(patch_size=16, max_tokens=256, square_tokens=64)(image)
    assert square.grid == (8, 8)


def test_augmentation_crop_keeps_aspect_and_flip_mirrors():
    rng = np.random.default_rng(0)
    pipeline = ImagePipeline(crop_scale=(0.3, 0.6), flip=False)
    image = Image.new("RGB", (300, 100))
    for _ in range(20):
        out = pipeline.augment(image, rng)
        assert abs(out.width / out.height - 3) < 0.1
        assert out.width * out.height <= 0.62 * 300 * 100
    flipper = ImagePipeline(flip=True)
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255
    image = Image.fromarray(pixels)
    outs = {np.asarray(flipper.augment(image, np.random.default_rng(s)))[0, 0, 0] for s in range(20)}
    assert outs == {0, 255}  # some draws flip, some do not
