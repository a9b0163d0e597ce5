"""Ops over item dicts: resolution sampling (aspect kept, bounds respected), crop and flip moving
every geometric key together (pictures, masks, boxes, points), tokenize, and the recorded geometry."""

import math

import torch

import numpy as np
import pytest
from PIL import Image

from navit.ops import Affine, OPS, ResolutionSampler, eval_chain, train_chain
from navit.ops.geometry import RandomCrop, RandomFlip
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


def test_crop_keeps_aspect_and_flip_mirrors():
    rng = np.random.default_rng(0)
    crop = RandomCrop(0.3, 0.6)
    image = Image.new("RGB", (300, 100))
    for _ in range(20):
        out = crop({"image": image}, rng)["image"]
        assert abs(out.width / out.height - 3) < 0.1
        assert out.width * out.height <= 0.62 * 300 * 100
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255
    image = Image.fromarray(pixels)
    outs = {np.asarray(RandomFlip()({"image": image}, np.random.default_rng(s))["image"])[0, 0, 0] for s in range(20)}
    assert outs == {0, 255}  # some draws flip, some do not
    assert RandomCrop(0.3)({"image": image}, None)["image"] is image, "no crop at evaluation"
    assert RandomFlip(1.0)({"image": image}, None)["image"] is image, "no flip at evaluation"


def test_sampled_resolution_sizes_the_grid_with_the_aspect_kept():
    chain = train_chain(Processor(patch_size=16, max_tokens=256), resolution=ResolutionSampler(res_mode="side", res_min=64, res_max=64))
    example = chain({"image": Image.new("RGB", (400, 100))}, np.random.default_rng(0))["example"]
    assert example.grid == (2, 8)  # sqrt(H·W) = 64 px at 1:4 is 32 x 128 px


def test_dense_keys_follow_the_image_through_crop_flip_resize_and_dropping():
    # Each pixel's red value encodes its mask label (its column band): whatever the ops do, every
    # kept token's label field must match the red values of its own patch.
    labels = np.repeat(np.arange(7, dtype=np.uint8), 30)[None, :].repeat(90, 0)  # 90 x 210, bands of 30 px
    pixels = np.zeros((90, 210, 3), dtype=np.uint8)
    pixels[..., 0] = labels * 30
    item = {"image": Image.fromarray(pixels), "mask": Image.fromarray(labels)}
    chain = train_chain(Processor(patch_size=8, max_tokens=64, resample="nearest"), crop_min=0.4, flip=True,
                        resolution=ResolutionSampler(res_mode="side", res_min=40, res_max=120), dropper=TokenDropper(0.5))
    for seed in range(12):
        example = chain(item, np.random.default_rng(seed))["example"]
        red = ((example.patches.view(example.num_tokens, -1, 3)[..., 0] + 1) / 2 * 255).round()
        mask = example.fields["mask"]
        assert mask.shape == (example.num_tokens, 64) and mask.dtype == torch.long
        assert torch.equal(red, mask.float() * 30), "the mask moved away from its pixels"
        assert example.num_tokens < example.grid[0] * example.grid[1], "tokens were dropped"


def white_box_item(width=200, height=120, box=(40, 24, 120, 72)):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return {"image": Image.fromarray(pixels), "boxes": np.array([box], float), "box_labels": np.array([3]),
            "points": np.array([[x1, y1], [x2, y2]], float)}


def coverage(box, grid, patch):
    """[rows, cols] share of each patch's area inside ``box`` (x1, y1, x2, y2 in pixels)."""
    rows, cols = grid
    edges_x, edges_y = np.arange(cols + 1) * patch, np.arange(rows + 1) * patch
    wide = np.clip(np.minimum(edges_x[1:], box[2]) - np.maximum(edges_x[:-1], box[0]), 0, None) / patch
    tall = np.clip(np.minimum(edges_y[1:], box[3]) - np.maximum(edges_y[:-1], box[1]), 0, None) / patch
    return tall[:, None] * wide[None, :]


def test_boxes_points_and_geometry_follow_crop_flip_and_resize():
    item = white_box_item()
    chain = train_chain(Processor(patch_size=8, max_tokens=400, resample="box"), crop_min=0.5, flip=True,
                        resolution=ResolutionSampler(res_mode="side", res_min=60, res_max=160))  # fmt: skip
    flips = set()
    for seed in range(16):
        out = chain(item, np.random.default_rng(seed))
        example, geometry = out["example"], out["geometry"]
        flips.add(geometry.sx < 0)
        brightness = ((example.patches.view(*example.grid, -1, 3).mean((-1, -2)) + 1) / 2).numpy()
        if len(out["boxes"]):
            box = out["boxes"][0]
            assert np.allclose(box, geometry.boxes(item["boxes"])[0].clip(0, [example.grid[1] * 8, example.grid[0] * 8] * 2))
            assert np.abs(coverage(box, example.grid, 8) - brightness).max() < 0.15, "the box left its pixels"
            assert out["box_labels"].tolist() == [3]
        else:
            assert brightness.max() < 0.15, "a box was dropped although its pixels are in the example"
        assert np.allclose(geometry.inverse().points(out["points"]), item["points"]), "the geometry does not map back"
    assert flips == {True, False}


def test_evaluation_ops_are_deterministic_and_map_back_to_the_input():
    item = white_box_item()
    chain = eval_chain(Processor(patch_size=8, max_tokens=64, resample="box"), budget=100)
    first, second = chain(item), chain(item)
    assert torch.equal(first["example"].patches, second["example"].patches)
    rows, cols = first["example"].grid
    assert rows * cols <= 100 and first["geometry"] == Affine(sx=cols * 8 / 200, sy=rows * 8 / 120)
    assert np.allclose(first["geometry"].inverse().boxes(first["boxes"]), item["boxes"])


def test_ops_register_by_name():
    assert {"crop", "flip", "resolution", "tokenize", "drop", "keep"} <= set(OPS)
