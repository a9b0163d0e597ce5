"""SyntheticShapes: determinism, sizes, balance, and that labels match the drawn proportions."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest

from navit.data.registry import open_source
from navit.data.stream import Subset
from navit.synthetic.shapes import CLASS_NAMES, SyntheticShapes
from navit.synthetic.shapes import CLASS_SPECS, DARK_MAX, LIGHT_MIN, RATIO_RANGES


def _pixels(img) -> np.ndarray:
    return np.asarray(img)


def test_same_seed_and_index_give_identical_pixels_in_any_order():
    a = SyntheticShapes(50, seed=7)
    b = SyntheticShapes(50, seed=7)
    forward = [_pixels(a.load(i)) for i in range(10)]
    backward = [_pixels(b.load(i)) for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert x.shape == y.shape and np.array_equal(x, y)
    # A pickled copy (what a DataLoader worker gets) generates the same pixels too.
    c = pickle.loads(pickle.dumps(a))
    assert np.array_equal(_pixels(c.load(3)), forward[3])
    # The dataset length does not change image i.
    assert np.array_equal(_pixels(SyntheticShapes(10_000, seed=7).load(3)), forward[3])


def test_different_index_or_seed_gives_different_images():
    s = SyntheticShapes(50, seed=0)
    imgs = [_pixels(s.load(i)) for i in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert imgs[i].shape != imgs[j].shape or not np.array_equal(imgs[i], imgs[j])
    other = SyntheticShapes(50, seed=1)
    assert any(
        _pixels(other.load(i)).shape != imgs[i].shape or not np.array_equal(_pixels(other.load(i)), imgs[i])
        for i in range(10)
    )
    assert [s.params(i) for i in range(20)] != [other.params(i) for i in range(20)]


def test_sizes_and_aspect_ratios_within_bounds_and_spread():
    s = SyntheticShapes(3000, seed=2)
    aspects = []
    for i in range(3000):
        p = s.params(i)
        assert 32 <= p.width <= 512 and 32 <= p.height <= 512, p
        aspect = p.width / p.height
        # Rounding a side to an integer may nudge the ratio by a pixel's worth.
        assert 1 / 4 - 0.02 <= aspect <= 4 + 0.02, p
        aspects.append(math.log(aspect))
    aspects = np.array(aspects)
    # Log-uniform over [-log 4, log 4]: both extremes reached, symmetric around square.
    assert aspects.min() < math.log(1 / 3.5) and aspects.max() > math.log(3.5)
    assert 0.45 < (aspects > 0).mean() < 0.55
    assert abs(np.mean(np.abs(aspects)) - math.log(4) / 2) < 0.06
    # Rendered images have the sizes from params.
    for i in range(0, 3000, 300):
        img = s.load(i)
        p = s.params(i)
        assert img.mode == "RGB" and img.size == (p.width, p.height)


def test_custom_side_limits_respected():
    s = SyntheticShapes(500, seed=3, min_side=48, max_side=96)
    for i in range(500):
        p = s.params(i)
        assert 48 <= p.width <= 96 and 48 <= p.height <= 96
    assert min(s.params(i).width / s.params(i).height for i in range(500)) < 0.6


def test_labels_balanced_and_consistent():
    s = SyntheticShapes(600, seed=4)
    counts = Counter(s.label(i) for i in range(600))
    assert counts == {c: 100 for c in range(len(CLASS_NAMES))}
    # Exact balance within every block of num_classes consecutive images.
    k = len(CLASS_NAMES)
    for start in range(0, 600, k):
        assert sorted(s.label(i) for i in range(start, start + k)) == list(range(k))
    # Not simply i % k: the per-block order is shuffled, so strided shards stay balanced too.
    assert [s.label(i) for i in range(12)] != [i % k for i in range(12)]
    big = SyntheticShapes(6000, seed=4)
    for rank in range(k):
        sub = Subset(big, range(rank, 6000, k))  # 1000 images each, ~167 +- 12 per class if shuffled
        c = Counter(sub.label(i) for i in range(len(sub)))
        assert len(c) == k and max(c.values()) - min(c.values()) < 90, c
    assert all(s.params(i).label == s.label(i) for i in range(60))
    assert s.class_names == list(CLASS_NAMES) == sorted(CLASS_NAMES)


def test_image_aspect_is_independent_of_the_label():
    s = SyntheticShapes(3000, seed=5)
    by_prop: dict[str, list[float]] = {"tall": [], "round": [], "wide": []}
    for i in range(3000):
        p = s.params(i)
        by_prop[CLASS_SPECS[p.label][1]].append(math.log(p.width / p.height))
    for prop, vals in by_prop.items():
        assert abs(np.mean(vals)) < 0.12, prop  # each class sees tall and wide images alike
        assert 0.4 < np.mean(np.array(vals) > 0) < 0.6, prop


def test_squashing_makes_apparent_proportions_overlap_across_classes():
    # After resizing W x H to a square, an object's apparent h/w is ratio * W / H.
    s = SyntheticShapes(3000, seed=6)
    apparent: dict[str, list[float]] = {"tall": [], "round": [], "wide": []}
    for i in range(3000):
        p = s.params(i)
        apparent[CLASS_SPECS[p.label][1]].append(p.ratio * p.width / p.height)
    # Objects that look roughly square after squashing come from every proportion class...
    for prop, vals in apparent.items():
        vals = np.array(vals)
        assert ((vals > 0.6) & (vals < 1.7)).mean() > 0.15, prop
    # ...and tall objects often look wide, wide objects often look tall.
    assert (np.array(apparent["tall"]) < 1.0).mean() > 0.1
    assert (np.array(apparent["wide"]) > 1.0).mean() > 0.1
    # Yet true ratios are perfectly separated by class.
    for i in range(300):
        p = s.params(i)
        lo, hi = RATIO_RANGES[CLASS_SPECS[p.label][1]]
        assert lo <= p.ratio <= hi


def _measure_object(s: SyntheticShapes, index: int):
    """Find the object's pixels (drawn in an exact colour without noise) and measure them."""
    p = s.params(index)
    img = _pixels(s.render(p, noise=False)).astype(int)
    mask = np.all(img == np.array(p.color), axis=-1)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0
    # Object frame: undo the rotation about the centre (angle counter-clockwise on screen).
    t = math.radians(p.angle)
    dx, dy = xs + 0.5 - p.cx, ys + 0.5 - p.cy
    u = dx * math.cos(t) - dy * math.sin(t)
    v = dx * math.sin(t) + dy * math.cos(t)
    width = u.max() - u.min() + 1
    height = v.max() - v.min() + 1
    fill = len(xs) / (width * height)
    # Rotation-free measure from second moments (principal axes of the pixel cloud).
    cov = np.cov(np.stack([xs, ys]).astype(float))
    evals, evecs = np.linalg.eigh(cov)
    major = evecs[:, 1]
    moment_ratio = math.sqrt(evals[1] / max(evals[0], 1e-9))
    major_is_vertical = abs(major[1]) > abs(major[0])
    return p, mask, width, height, fill, moment_ratio, major_is_vertical


def test_drawn_object_has_the_labelled_proportions_and_shape():
    s = SyntheticShapes(400, seed=8, noise_std=0.0)
    checked = Counter()
    for i in range(400):
        p = s.params(i)
        if min(p.obj_w, p.obj_h) < 10:  # too few pixels to measure a ratio precisely
            continue
        p, mask, w, h, fill, moment_ratio, major_vertical = _measure_object(s, i)
        shape, prop = CLASS_SPECS[p.label]
        measured = h / w
        lo, hi = RATIO_RANGES[prop]
        slack = 1 + 3.0 / min(w, h)  # a pixel or so of rasterisation on each side
        assert lo / slack <= measured <= hi * slack, (i, p.class_name, measured)
        assert abs(math.log(measured / p.ratio)) < math.log(slack), (i, measured, p.ratio)
        # The pixel cloud alone (no params) gives the same answer for tall / wide objects.
        if prop == "tall":
            assert major_vertical and moment_ratio > 1.7, (i, moment_ratio)
        elif prop == "wide":
            assert not major_vertical and moment_ratio > 1.7, (i, moment_ratio)
        else:
            assert moment_ratio < 1.25, (i, moment_ratio)
        # Rectangles fill their frame; ellipses fill pi/4 of it.
        # (Rasterising a small rotated rectangle loses a little at the corners.)
        if shape == "rectangle":
            assert fill > 0.84, (i, fill)
        else:
            assert 0.68 < fill < 0.81, (i, fill)
        # Fully inside the image, not touching the border.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        # Big enough to matter at 16-pixel patches relative to the limiting side.
        checked[p.class_name] += 1
    assert set(checked) == set(CLASS_NAMES) and min(checked.values()) >= 20


def test_object_size_position_and_contrast():
    s = SyntheticShapes(1000, seed=9)
    for i in range(1000):
        p = s.params(i)
        xs, ys = zip(*p.polygon())
        assert min(xs) >= 0 and max(xs) <= p.width and min(ys) >= 0 and max(ys) <= p.height
        # Object spans 40..85% of the largest size that fits (so at least ~35% of a side).
        t = math.radians(abs(p.angle))
        box_w = p.obj_w * math.cos(t) + p.obj_h * math.sin(t)
        box_h = p.obj_w * math.sin(t) + p.obj_h * math.cos(t)
        assert max(box_w / p.width, box_h / p.height) >= 0.35, p
        assert abs(p.angle) <= 8.0
        # A dark object on a light background: every object channel below every background one.
        assert max(p.color) <= DARK_MAX < LIGHT_MIN <= min(*p.bg_start, *p.bg_end)


def test_noise_is_mild_and_background_is_not_flat():
    s = SyntheticShapes(20, seed=10)
    p = s.params(0)
    clean = _pixels(s.render(p, noise=False)).astype(int)
    noisy = _pixels(s.load(0)).astype(int)
    diff = noisy - clean
    assert 1.0 < diff.std() < 6.0
    assert np.array_equal(_pixels(s.load(0)), noisy)


def test_generation_speed():
    import time

    s = SyntheticShapes(200, seed=11)
    t0 = time.perf_counter()
    for i in range(200):
        s.load(i)
    per_image = (time.perf_counter() - t0) / 200
    assert per_image < 0.025, f"{per_image * 1e3:.1f} ms per image"


def test_validation_and_index_errors():
    with pytest.raises(ValueError):
        SyntheticShapes(-1)
    with pytest.raises(ValueError):
        SyntheticShapes(10, seed=-1)
    with pytest.raises(ValueError):
        SyntheticShapes(10, min_side=100, max_side=50)
    s = SyntheticShapes(5)
    with pytest.raises(IndexError):
        s.load(5)
    with pytest.raises(IndexError):
        s.label(-1)
    assert "3" in s.describe(3)


def test_open_source_synthetic_specs():
    assert len(open_source("synthetic:50")) == 50
    src = open_source("synthetic:40:3")
    assert isinstance(src, SyntheticShapes) and src.seed == 3 and len(src) == 40
    default = open_source("synthetic")
    assert isinstance(default, SyntheticShapes) and default.seed == 0 and len(default) > 0
    for bad in ("synthetic:", "synthetic:abc", "synthetic:0", "synthetic:1:2:3", "synthetic:-5"):
        with pytest.raises(ValueError, match="synthetic"):
            open_source(bad)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.replace(",", " ").replace(".", " ").split()


def test_captions_are_deterministic_and_vary():
    from navit.synthetic.shapes import CAPTION_TEMPLATES

    a, b = SyntheticShapes(300, seed=4), SyntheticShapes(5000, seed=4)
    caps = [a.caption(i) for i in range(300)]
    assert [b.caption(i) for i in reversed(range(300))][::-1] == caps
    assert pickle.loads(pickle.dumps(a)).caption(7) == caps[7]
    assert len(set(caps)) > 100
    # Every template is used, roughly evenly; another seed picks templates differently.
    templates = [_template_of(c) for c in caps]
    assert len(CAPTION_TEMPLATES) == 4 and min(Counter(templates).values()) > 40
    other = [_template_of(SyntheticShapes(300, seed=5).caption(i)) for i in range(300)]
    assert other != templates
    with pytest.raises(IndexError):
        a.caption(300)


def _template_of(caption: str) -> int:
    if caption.startswith("a photo of"):
        return 1
    if "gradient" in caption:
        return 2
    if "that is" in caption:
        return 3
    return 0


def test_caption_words_match_the_generation_parameters():
    from navit.synthetic.shapes import COLOR_NAMES, area_fraction, color_name, size_word

    s = SyntheticShapes(600, seed=6)
    seen_colors, seen_sizes = Counter(), Counter()
    for i in range(600):
        p, cap = s.params(i), s.caption(i)
        words = _words(cap)
        prop = p.class_name.split("_")[0]
        for word in ("tall", "round", "square", "wide"):
            assert (word in words) == (word == prop), (cap, p.class_name)
        for shape in ("ellipse", "rectangle"):
            assert (shape in words) == (shape == p.shape), (cap, p.shape)
        # Exactly one colour word, and it is the object's colour.
        named = [c for c in COLOR_NAMES if f" {c} " in f" {' '.join(words)} "]
        assert named == [color_name(p.color)], (cap, p.color)
        sizes = [w for w in ("small", "medium", "large") if w in words]
        assert sizes == [size_word(area_fraction(p))], cap
        # Size words follow the object's area: small < 8% of the image <= medium < 16% <= large.
        frac = area_fraction(p)
        assert sizes[0] == ("small" if frac < 0.08 else "medium" if frac < 0.16 else "large")
        seen_colors[named[0]] += 1
        seen_sizes[sizes[0]] += 1
        assert "_" not in cap and "  " not in cap
        for article, nxt in zip(words, words[1:]):  # "a" / "an" agree with the next word
            if article in ("a", "an"):
                assert (article == "an") == (nxt[0] in "aeiou"), cap
    assert set(seen_colors) == set(COLOR_NAMES)
    assert min(seen_sizes.values()) > 100


def test_area_fraction_matches_the_drawn_object():
    from navit.synthetic.shapes import area_fraction

    s = SyntheticShapes(30, seed=8)
    for i in range(30):
        p = s.params(i)
        mask = np.all(_pixels(s.render(p, noise=False)) == np.asarray(p.color), axis=-1)
        assert abs(mask.mean() - area_fraction(p)) < 0.15 * area_fraction(p) + 2.0 * (p.width + p.height) / (
            p.width * p.height
        ), (i, mask.mean(), area_fraction(p))


@pytest.mark.parametrize(
    "rgb, name",
    [
        ((0, 0, 0), "black"), ((25, 10, 29), "black"), ((60, 60, 60), "gray"), ((85, 80, 90), "gray"),
        ((85, 5, 5), "dark red"), ((85, 5, 25), "dark red"), ((85, 45, 5), "brown"), ((80, 80, 5), "olive"),
        ((5, 85, 5), "dark green"), ((5, 80, 75), "teal"), ((5, 5, 85), "navy"), ((40, 5, 85), "purple"),
        ((85, 5, 85), "purple"),
    ],
)
def test_color_name(rgb, name):
    from navit.synthetic.shapes import color_name

    assert color_name(rgb) == name
