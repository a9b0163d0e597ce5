"""SyntheticShapes: the built-in default dataset (no files, no downloads, deterministic).

Each image shows one dark filled ellipse or rectangle on a light, smooth gradient background. The six classes
are ``{ellipse, rectangle} x {tall, round/square, wide}`` where *tall/round/wide* is the TRUE
height/width ratio of the object in pixels:

=============  ======================  =====================
proportion     object height / width   classes
=============  ======================  =====================
tall           2 .. 3                  tall_ellipse, tall_rectangle
round/square   0.85 .. 1.15            round_ellipse, square_rectangle
wide           1/3 .. 1/2              wide_ellipse, wide_rectangle
=============  ======================  =====================

Why squashing the image to a square destroys the label
------------------------------------------------------
The image's own aspect ratio ``a = W/H`` is drawn log-uniformly from 1:4 .. 4:1, independently of
the label. Resizing a ``W x H`` image to ``S x S`` scales heights by ``S/H`` and widths by ``S/W``,
so an object with true ratio ``r = h/w`` appears with ratio ``r * a``. With ``a`` spread over a
factor of 16, the apparent ratios of the classes overlap heavily: a tall object (r = 2.5) in a wide
image (a = 0.4) becomes a perfect square after squashing, exactly like a round object in a square
image or a wide object (r = 0.4) in a 2.5:1 image. Nothing else in the image gives ``a`` away:
the object's size is drawn relative to whichever side limits it, the background is a smooth
linear gradient (no shapes of known proportions), and the only texture is faint per-pixel noise.
Only the shape family (ellipse vs rectangle) survives squashing, since both are preserved by an
axis-aligned stretch. A model that sees the image at its native aspect ratio (NaViT) can read the
ratio directly; a square-input ViT has to guess among proportions compatible with what it sees.

Image ``i`` is a pure function of ``(seed, i)`` and the constructor arguments, so any index can be
generated in any worker, in any order. Labels are balanced exactly within every block of
``num_classes`` consecutive indices (a seeded permutation of the classes per block), so strided
sharding and contiguous ranges stay balanced too.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from navit.synthetic.base import Generated

#: Class names, in sorted order so that ``write_image_folder`` + ``ImageFolder`` keep the indices.
CLASS_NAMES: tuple[str, ...] = (
    "round_ellipse",
    "square_rectangle",
    "tall_ellipse",
    "tall_rectangle",
    "wide_ellipse",
    "wide_rectangle",
)

#: True object height/width ranges, per proportion.
RATIO_RANGES: dict[str, tuple[float, float]] = {
    "tall": (2.0, 3.0),
    "round": (0.85, 1.15),
    "wide": (1.0 / 3.0, 0.5),
}


def _class_spec(name: str) -> tuple[str, str]:
    proportion, shape = name.split("_")
    return shape, ("round" if proportion in ("round", "square") else proportion)


#: (shape, proportion) of each class index.
CLASS_SPECS: tuple[tuple[str, str], ...] = tuple(_class_spec(n) for n in CLASS_NAMES)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def balanced_label(seed: int, index: int, num_classes: int) -> int:
    """A class per index, exactly balanced within each block of ``num_classes`` consecutive
    indices (a seeded permutation of the classes per block), so strided shards and contiguous
    ranges stay balanced too."""
    block, offset = divmod(index, num_classes)
    state = _splitmix64(_splitmix64(seed) ^ block)
    perm = list(range(num_classes))
    for j in range(num_classes - 1, 0, -1):  # seeded Fisher-Yates shuffle of the classes
        state = _splitmix64(state)
        r = state % (j + 1)
        perm[j], perm[r] = perm[r], perm[j]
    return perm[offset]


#: Background channels are at least LIGHT_MIN, object channels at most DARK_MAX.
LIGHT_MIN, DARK_MAX = 150, 90


@dataclass(frozen=True)
class ShapeParams:
    """Everything that determines one synthetic image (see :meth:`SyntheticShapes.params`).

    Geometry is in pixels of the ``width x height`` image, origin at the top-left corner, y down.
    The object is ``obj_w x obj_h`` in its own frame, centred at ``(cx, cy)``, then rotated by
    ``angle`` degrees (counter-clockwise as displayed). ``ratio == obj_h / obj_w``.
    """

    index: int
    label: int
    class_name: str
    shape: str  # "ellipse" | "rectangle"
    width: int
    height: int
    ratio: float
    obj_w: float
    obj_h: float
    cx: float
    cy: float
    angle: float
    bg_start: tuple[int, int, int]
    bg_end: tuple[int, int, int]
    gradient_angle: float  # radians
    color: tuple[int, int, int]

    def polygon(self) -> list[tuple[float, float]]:
        """Outline of the object in image coordinates (the polygon that gets filled)."""
        return shape_polygon(self.shape, self.obj_w, self.obj_h, self.cx, self.cy, self.angle)


def shape_polygon(shape: str, obj_w: float, obj_h: float, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    """Outline of an ``obj_w`` x ``obj_h`` ellipse or rectangle centred at (cx, cy), turned by
    ``angle`` degrees counter-clockwise as displayed (image coordinates, y down)."""
    if shape == "rectangle":
        local = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        pts = [(u * obj_w, v * obj_h) for u, v in local]
    else:
        a, b = obj_w / 2.0, obj_h / 2.0
        perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
        n = int(min(256, max(32, perimeter / 2)))
        pts = [(a * math.cos(2 * math.pi * k / n), b * math.sin(2 * math.pi * k / n)) for k in range(n)]
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    return [(cx + u * c + v * s, cy - u * s + v * c) for u, v in pts]


def draw_scene(width: int, height: int, bg_start: tuple[int, int, int], bg_end: tuple[int, int, int],
               gradient_angle: float, polygon: list[tuple[float, float]], color: tuple[int, int, int],
               noise_std: float, noise_rng: np.random.Generator | None) -> Image.Image:  # fmt: skip
    """A filled polygon on a linear gradient background, with optional grey pixel noise."""
    img = gradient(width, height, bg_start, bg_end, gradient_angle)
    ImageDraw.Draw(img).polygon(polygon, fill=color)
    return grain(img, noise_std, noise_rng)


def gradient(width: int, height: int, start: tuple[int, int, int], end: tuple[int, int, int], angle: float) -> Image.Image:
    """A linear gradient from colour ``start`` to ``end`` along direction ``angle`` (radians)."""
    gx, gy = math.cos(angle), math.sin(angle)
    proj = np.arange(width, dtype=np.float32)[None, :] * gx + np.arange(height, dtype=np.float32)[:, None] * gy
    proj -= proj.min()
    span = float(proj.max())
    t = proj / span if span > 0 else proj
    first = np.asarray(start, dtype=np.float32)
    background = first + t[:, :, None] * (np.asarray(end, dtype=np.float32) - first)
    return Image.fromarray(np.clip(background + 0.5, 0, 255).astype(np.uint8))


def grain(img: Image.Image, noise_std: float, noise_rng: np.random.Generator | None) -> Image.Image:
    """``img`` with grey per-pixel noise of ``noise_std`` levels (unchanged without ``noise_rng``)."""
    if noise_rng is None or noise_std <= 0:
        return img
    noise = noise_rng.standard_normal((img.height, img.width, 1), dtype=np.float32) * noise_std
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8))


#: Colour words of :func:`color_name`, for dark RGB colours (every channel <= DARK_MAX).
COLOR_NAMES: tuple[str, ...] = (
    "black", "gray", "dark red", "brown", "olive", "dark green", "teal", "navy", "purple",
)

#: Hue sectors (degrees, upper bound exclusive) of the chromatic colour words.
_HUE_NAMES: tuple[tuple[float, str], ...] = (
    (15.0, "dark red"),
    (45.0, "brown"),
    (75.0, "olive"),
    (165.0, "dark green"),
    (200.0, "teal"),
    (260.0, "navy"),
    (335.0, "purple"),
    (360.0, "dark red"),
)

#: Size words by the object's share of the image area: below 0.08, below 0.16, the rest
#: (roughly thirds of the default SyntheticShapes distribution).
SIZE_THRESHOLDS: tuple[tuple[float, str], ...] = ((0.08, "small"), (0.16, "medium"), (math.inf, "large"))

#: Caption templates; a caption's template is a function of (seed, index).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_size} {size} {color} {prop} {shape}.",
    "a photo of {a_prop} {prop} {color} {shape}, {size} in the frame.",
    "{a_prop} {prop} {shape} in {color}, {size}, on a light gradient.",
    "{a_color} {color} {shape} that is {prop} and {size}.",
)


def color_name(rgb: tuple[int, int, int]) -> str:
    """A basic colour word for a dark RGB colour (channels 0..255, meant for <= DARK_MAX).

    Brightness ``v = max channel`` below 30 is black; chroma ``max - min`` below ``v / 4`` (or
    below 12) is gray; otherwise the HSV hue picks the word from :data:`_HUE_NAMES`.
    """
    r, g, b = (int(c) for c in rgb)
    v, lo = max(r, g, b), min(r, g, b)
    chroma = v - lo
    if v < 30:
        return "black"
    if chroma < max(12, v / 4):
        return "gray"
    if v == r:
        hue = 60.0 * (((g - b) / chroma) % 6)
    elif v == g:
        hue = 60.0 * ((b - r) / chroma + 2)
    else:
        hue = 60.0 * ((r - g) / chroma + 4)
    for upper, name in _HUE_NAMES:
        if hue < upper:
            return name
    return "dark red"  # pragma: no cover - hue < 360 always


def area_fraction(p: ShapeParams) -> float:
    """Share of the image area covered by the object (exact for the ideal shape)."""
    area = p.obj_w * p.obj_h * (math.pi / 4 if p.shape == "ellipse" else 1.0)
    return area / (p.width * p.height)


def size_word(fraction: float) -> str:
    """small / medium / large for an object covering ``fraction`` of the image."""
    for upper, name in SIZE_THRESHOLDS:
        if fraction < upper:
            return name
    return SIZE_THRESHOLDS[-1][1]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption_of(p: ShapeParams, template: int = 0) -> str:
    """The caption of the image described by ``p`` with template ``template``.

    Words: the proportion word of the class name (tall / round / square / wide), the shape
    (ellipse / rectangle), :func:`color_name` of the object and :func:`size_word` of its area.
    """
    prop = p.class_name.split("_")[0]
    color, size = color_name(p.color), size_word(area_fraction(p))
    return CAPTION_TEMPLATES[template].format(
        prop=prop,
        shape=p.shape,
        color=color,
        size=size,
        a_prop=_article(prop),
        a_color=_article(color),
        a_size=_article(size),
    )


class SyntheticShapes(Generated):
    """Procedural ImageSource: ellipses and rectangles whose class is their true proportions.

    ``SyntheticShapes(num_images, seed, min_side, max_side)`` holds ``num_images`` images with
    sides in ``[min_side, max_side]`` and aspect ratios W:H log-uniform in 1:4 .. 4:1 (narrowed if
    the side limits do not allow it). See the module docstring for the task and for why squashing
    the image to a square loses the label.

    Keyword-only knobs: ``max_rotation`` (degrees, < 10 keeps tall/wide meaningful), ``noise_std``
    (per-pixel grey noise, in 8-bit levels), ``fill_range`` (object size as a fraction of the
    largest size that fits).
    """

    kind = "synthetic"
    provides = frozenset({"image", "label", "caption"})

    def __init__(
        self,
        num_images: int = 10_000,
        seed: int = 0,
        min_side: int = 32,
        max_side: int = 512,
        *,
        max_rotation: float = 8.0,
        noise_std: float = 3.0,
        fill_range: tuple[float, float] = (0.4, 0.85),
    ) -> None:
        if int(num_images) != num_images or num_images < 0:
            raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not (8 <= min_side <= max_side):
            raise ValueError(f"need 8 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
        if not (0 <= max_rotation < 45):
            raise ValueError(f"max_rotation must be in [0, 45) degrees, got {max_rotation}")
        if not (0 < fill_range[0] <= fill_range[1] <= 1):
            raise ValueError(f"fill_range must satisfy 0 < lo <= hi <= 1, got {fill_range}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_images = self.count = int(num_images)
        self.seed = int(seed)
        self.min_side = int(min_side)
        self.max_side = int(max_side)
        self.max_rotation = float(max_rotation)
        self.noise_std = float(noise_std)
        self.fill_range = (float(fill_range[0]), float(fill_range[1]))
        self.class_names: list[str] = list(CLASS_NAMES)
        # Aspect-ratio range that the side limits allow.
        self.min_aspect = max(0.25, self.min_side / self.max_side)
        self.max_aspect = min(4.0, self.max_side / self.min_side)

    def label(self, index: int) -> int:
        """Class of image ``index``: exact balance within each block of ``num_classes`` indices."""
        return balanced_label(self.seed, self._check(index), len(CLASS_NAMES))

    def item(self, index: int) -> dict:
        p = self.params(index)
        return {"image": self.render(p), "label": p.label, "caption": self._caption_of(p)}

    def caption(self, index: int) -> str:
        """A short English caption of image ``index``, from its generation parameters.

        It names the proportion (tall / round / square / wide, as in the class name), the shape,
        the object's colour (:func:`color_name`) and its size relative to the image
        (:func:`size_word`), with one of :data:`CAPTION_TEMPLATES` chosen deterministically from
        ``(seed, index)``. Like the pixels, it depends on nothing else.
        """
        return self._caption_of(self.params(index))

    def _caption_of(self, p: ShapeParams) -> str:
        template = _splitmix64(_splitmix64(self.seed ^ 0xCA9710) ^ p.index) % len(CAPTION_TEMPLATES)
        return caption_of(p, template)

    # -- generation ---------------------------------------------------------------------
    def params(self, index: int) -> ShapeParams:
        """The generation parameters of image ``index`` (no pixels are drawn)."""
        label = self.label(index)
        shape, proportion = CLASS_SPECS[label]
        rng = np.random.default_rng([self.seed, index, 0])

        # Image size: aspect ratio log-uniform, then the long side log-uniform in what fits.
        aspect = math.exp(rng.uniform(math.log(self.min_aspect), math.log(self.max_aspect)))
        elong = max(aspect, 1.0 / aspect)
        long_lo = min(self.max_side, self.min_side * elong)
        long_side = math.exp(rng.uniform(math.log(long_lo), math.log(self.max_side)))
        short_side = long_side / elong
        clamp = lambda v: int(min(self.max_side, max(self.min_side, round(v))))  # noqa: E731
        if aspect >= 1.0:
            width, height = clamp(long_side), clamp(short_side)
        else:
            width, height = clamp(short_side), clamp(long_side)

        # Object: true ratio from the class range, size relative to the limiting side.
        lo, hi = RATIO_RANGES[proportion]
        ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        angle = rng.uniform(-self.max_rotation, self.max_rotation)
        c, s = math.cos(math.radians(angle)), abs(math.sin(math.radians(angle)))
        margin = max(1.0, 0.02 * min(width, height))
        # Largest object width k (height k * ratio) whose rotated bounding box fits.
        k_max = min((width - 2 * margin) / (c + ratio * s), (height - 2 * margin) / (s + ratio * c))
        k = rng.uniform(*self.fill_range) * k_max
        obj_w, obj_h = k, k * ratio
        box_w, box_h = obj_w * c + obj_h * s, obj_w * s + obj_h * c
        cx = rng.uniform(margin + box_w / 2, width - margin - box_w / 2)
        cy = rng.uniform(margin + box_h / 2, height - margin - box_h / 2)

        # Colours: a light gradient background and a dark object. Fixing the sign of the contrast
        # makes "which patches are object" a linear feature of the pixels, so a small ViT learns
        # the task in minutes; the label still lives only in the object's true proportions.
        bg_start = rng.integers(LIGHT_MIN, 256, size=3)
        bg_end = np.clip(bg_start + rng.integers(-40, 41, size=3), LIGHT_MIN, 255)
        gradient_angle = rng.uniform(0.0, 2.0 * math.pi)
        color = rng.integers(0, DARK_MAX + 1, size=3)

        return ShapeParams(
            index=int(index),
            label=label,
            class_name=CLASS_NAMES[label],
            shape=shape,
            width=width,
            height=height,
            ratio=ratio,
            obj_w=obj_w,
            obj_h=obj_h,
            cx=cx,
            cy=cy,
            angle=angle,
            bg_start=tuple(int(v) for v in bg_start),
            bg_end=tuple(int(v) for v in bg_end),
            gradient_angle=gradient_angle,
            color=tuple(int(v) for v in color),
        )

    def render(self, p: ShapeParams, *, noise: bool = True) -> Image.Image:
        """Draw the image described by ``p`` (``noise=False`` leaves out the pixel noise)."""
        rng = np.random.default_rng([self.seed, p.index, 1]) if noise else None
        return draw_scene(p.width, p.height, p.bg_start, p.bg_end, p.gradient_angle, p.polygon(), p.color,
                          self.noise_std, rng)  # fmt: skip


def write_image_folder(source, out_dir, *, progress: bool = True) -> None:
    """Write every image of ``source`` as ``out_dir/<class_name>/<index>.png``.

    Reading the tree back with :class:`navit.data.ImageFolder` gives the same images; the labels
    keep their indices when ``source.class_names`` is sorted and every class has an image (true for
    :class:`SyntheticShapes` with at least ``num_classes`` images), since ImageFolder numbers
    the class folders in sorted order. Only classes that have images get a folder.
    """
    names = list(source.class_names)
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
            raise ValueError(f"class name {name!r} cannot be used as a folder name")
    n = len(source)
    digits = max(6, len(str(max(n - 1, 0))))
    os.makedirs(out_dir, exist_ok=True)
    if names != sorted(names):
        warnings.warn(
            "class_names are not sorted; ImageFolder will number the written classes differently",
            stacklevel=2,
        )
    indices = range(n)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"writing {out_dir}", unit="img")
        except ImportError:  # pragma: no cover - tqdm is a dependency, but keep this optional
            pass
    made: set[int] = set()
    for i in indices:
        label = source.label(i)
        folder = os.path.join(out_dir, names[label])
        if label not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(label)
        source.load(i).save(os.path.join(folder, f"{i:0{digits}d}.png"), compress_level=1)
    missing = [names[c] for c in range(len(names)) if c not in made]
    if n and missing:
        warnings.warn(
            f"no images for classes {missing}; ImageFolder will renumber the classes it finds",
            stacklevel=2,
        )
