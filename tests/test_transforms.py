"""Resolution sampling and the training transform: aspect kept, bounds respected, masks aligned."""

import math

import torch

import numpy as np
import pytest
from PIL import Image

from navit.data.transforms import ExampleTransform, ResolutionSampler
from navit.processor import Processor
from navit.token_drop import TokenDropper


@pytest.mark.parametrize("mode", ["side", "area"])
@pytest.mark.parametrize("distribution", ["uniform", "truncnorm"])
def test_resolution_sampler_keeps_aspect_and_bounds(mode, distribution):
    sampler = ResolutionSampler(res_mode=mode, res_min=64, res_max=256, res_dist=distribution)
    rng = np.random.default_rng(0)
    for height, width in [(100, 400), (300, 300), (1000, 250), (37, 61)]:
        for _ in range(50):
            h, w = sampler.sample_size(height, width, rng)
            assert abs(math.log((h / w) / (height / width))) < 0.05
            side = math.sqrt(h * w)
            assert 64 * 0.97 <= side <= 256 * 1.03


def test_truncnorm_is_biased_to_low_resolution():
    rng = np.random.default_rng(1)
    low = ResolutionSampler(res_mode="side", res_dist="truncnorm", res_mean=0.0, res_std=0.5)
    flat = ResolutionSampler(res_mode="side", res_dist="uniform")
    low_sides = [low.sample_size(200, 200, rng)[0] for _ in range(2000)]
    flat_sides = [flat.sample_size(200, 200, rng)[0] for _ in range(2000)]
    assert np.mean(low_sides) < np.mean(flat_sides) - 15


def test_native_mode_leaves_size_alone():
    rng = np.random.default_rng(0)
    assert ResolutionSampler(res_mode="native").sample_size(123, 45, rng) == (123, 45)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(res_min=256, res_max=64), "res_min <= res_max"),
        (dict(res_min=0), "res_min"),
        (dict(res_mode="squash"), "res_mode='squash'"),
        (dict(res_dist="beta"), "res_dist='beta'"),
    ],
)
def test_resolution_sampler_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResolutionSampler(**kwargs)


def test_augmentation_crop_keeps_aspect_and_flip_mirrors():
    rng = np.random.default_rng(0)
    transform = ExampleTransform(Processor(), crop_scale=(0.3, 0.6), flip=False)
    image = Image.new("RGB", (300, 100))
    for _ in range(20):
        out = transform.augment({"image": image}, rng)["image"]
        assert abs(out.width / out.height - 3) < 0.1
        assert out.width * out.height <= 0.62 * 300 * 100
    flipper = ExampleTransform(Processor(), flip=True)
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255
    image = Image.fromarray(pixels)
    outs = {np.asarray(flipper.augment({"image": image}, np.random.default_rng(s))["image"])[0, 0, 0] for s in range(20)}
    assert outs == {0, 255}  # some draws flip, some do not


def test_sampled_resolution_sizes_the_grid_with_the_aspect_kept():
    transform = ExampleTransform(Processor(patch_size=16, max_tokens=256),
                                 ResolutionSampler(res_mode="side", res_min=64, res_max=64))  # fmt: skip
    example = transform({"image": Image.new("RGB", (400, 100))}, np.random.default_rng(0))
    assert example.grid == (2, 8)  # sqrt(H·W) = 64 px at 1:4 is 32 x 128 px


def test_dense_keys_follow_the_image_through_crop_flip_resize_and_dropping():
    # Each pixel's red value encodes its mask label (its column band): whatever the transform does,
    # every kept token's label field must match the red values of its own patch.
    labels = np.repeat(np.arange(7, dtype=np.uint8), 30)[None, :].repeat(90, 0)  # 90 x 210, bands of 30 px
    pixels = np.zeros((90, 210, 3), dtype=np.uint8)
    pixels[..., 0] = labels * 30
    item = {"image": Image.fromarray(pixels), "mask": Image.fromarray(labels)}
    transform = ExampleTransform(Processor(patch_size=8, max_tokens=64, resample="nearest"),
                                 ResolutionSampler(res_mode="side", res_min=40, res_max=120),
                                 crop_scale=(0.4, 0.9), flip=True, dense_keys=("mask",))  # fmt: skip
    dropper = TokenDropper(0.5)
    checked = 0
    for seed in range(12):
        example = transform(item, np.random.default_rng(seed), dropper=dropper)
        red = ((example.patches.view(example.num_tokens, -1, 3)[..., 0] + 1) / 2 * 255).round()
        mask = example.fields["mask"]
        assert mask.shape == (example.num_tokens, 64) and mask.dtype == torch.long
        assert torch.equal(red, mask.float() * 30), "the mask moved away from its pixels"
        assert example.num_tokens < example.grid[0] * example.grid[1], "tokens were dropped"
        checked += 1
    assert checked == 12
