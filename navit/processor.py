"""The preprocessing that travels with a model: files and images in, the model's ``PackedBatch`` out.

A :class:`Processor` describes, once, everything that turns an input into a model's tokens: patch
size (and temporal patch size), channels, the resize filter, the grid rule, the token budget and
the normalisation. It is plain data (``to_dict`` / ``from_dict``), saved in every checkpoint, and
used by training, evaluation, ``navit predict`` and the Python API alike, so a model always sees
at inference what it saw in training:

    model = navit.load_model("runs/<name>")
    batch = model.processor(["cat.jpg", pil_image, uint8_tensor])
    logits = model(batch)

Training adds augmentation and resolution sampling in front of it (the ops of ``navit.ops``);
the resize, patchify and normalise steps are these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from navit.config import NaViTConfig, reject_unknown_fields
from navit.media.image import load_rgb, to_rgb
from navit.media.video import ArrayClip, Clip, FrameOp, VideoFile, is_video_name
from navit.batch import PackedBatch
from navit.packing import pack
from navit.batch import Example
from navit.patchify import fit_grid, grid_coords, patchify

GRID_RULES = ("native", "square", "fill")
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}

@dataclass(frozen=True)
class Processor:
    """How inputs become tokens for one model.

    * ``grid_rule="native"``: each image keeps its aspect ratio; sides round to the nearest
      multiple of ``patch_size`` and images over ``max_tokens`` patches are scaled down to fit
      (:func:`navit.patchify.fit_grid`). ``"square"``: the ViT baseline, every image squashed to
      the largest square grid within ``max_tokens``. ``"fill"``: the rule of SigLIP2's image
      processor and timm's NaFlex evaluation, every image scaled (up or down) to the largest size
      whose sides, rounded up to patch multiples, have at most ``max_tokens`` patches.
    * ``budget`` (a call argument, not a field): tokens per example at inference; native images
      are scaled up or down, aspect kept, to as close to it as the grid allows, square ones to
      the largest square within it.
    * Pixels are resized with Pillow's ``resample`` filter (``reducing_gap``: Pillow's faster
      two-step downscale; None resizes in one step, as the Hugging Face and timm transforms do), scaled to
      [0, 1] and normalised per channel with ``mean`` and ``std``.
    * ``num_axes=3`` (a clip model): a clip is cut into tubelets of ``temporal_patch_size``
      frames; its frames are chosen at ``fps`` frames per second by the timestamps of decoded
      frames (every frame if None), then every ``frame_stride``-th, and at inference the first
      ``max_frames`` of them are used. ``max_tokens`` (or ``budget``) bounds the tokens of the
      whole clip: the frame size is chosen so that all its tubelets fit, aspect kept. A clip
      whose frames are not a multiple of ``temporal_patch_size`` repeats its last frame. An
      image is a one-tubelet clip, its frame repeated, at time 0 of a 1-long time axis.
    """

    patch_size: int = 16
    temporal_patch_size: int = 1
    num_axes: int = 2
    channels: int = 3
    max_tokens: int = 256
    grid_rule: str = "native"
    resample: str = "bicubic"
    reducing_gap: float | None = 3.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    fps: float | None = None
    frame_stride: int = 1
    max_frames: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for name in ("patch_size", "temporal_patch_size", "channels", "max_tokens", "frame_stride", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"Processor.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_axes not in (2, 3):
            raise ValueError(f"Processor.num_axes must be 2 (images) or 3 (clips), got {self.num_axes}")
        if self.temporal_patch_size > 1 and self.num_axes != 3:
            raise ValueError(f"Processor.temporal_patch_size={self.temporal_patch_size} needs num_axes=3")
        if self.channels not in (1, 3):
            raise ValueError(f"Processor.channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.grid_rule not in GRID_RULES:
            raise ValueError(f"Processor.grid_rule={self.grid_rule!r}; expected one of {GRID_RULES}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"Processor.resample={self.resample!r}; expected one of {tuple(RESAMPLE)}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"Processor.{name} needs one value per channel ({self.channels}), got {getattr(self, name)}")
        if min(self.std) <= 0:
            raise ValueError(f"Processor.std must be positive, got {self.std}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"Processor.fps must be > 0 (or None for every frame), got {self.fps}")

    # -- description --------------------------------------------------------------------------
    @staticmethod
    def can_feed(config: NaViTConfig) -> bool:
        """Whether a processor exists for models of ``config``: images or clips, grey or RGB."""
        return config.num_axes in (2, 3) and config.in_chans in (1, 3)

    @classmethod
    def for_model(cls, config: NaViTConfig, **overrides: Any) -> "Processor":
        """The default processor of a model config, with any field overridden."""
        geometry = dict(
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            num_axes=config.num_axes,
            channels=config.in_chans,
        )
        if config.in_chans != 3:
            geometry.update(mean=(0.5,) * config.in_chans, std=(0.5,) * config.in_chans)
        return cls(**{**geometry, **overrides})

    def check_model(self, config: NaViTConfig) -> None:
        """Raise if this processor cannot feed a model of ``config``."""
        pairs = [("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                 ("num_axes", "num_axes"), ("channels", "in_chans")]  # fmt: skip
        wrong = [f"{mine}={getattr(self, mine)} vs {theirs}={getattr(config, theirs)}"
                 for mine, theirs in pairs if getattr(self, mine) != getattr(config, theirs)]  # fmt: skip
        if wrong:
            raise ValueError(f"the processor does not fit the model: {', '.join(wrong)}")

    def replace(self, **overrides: Any) -> "Processor":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Processor":
        reject_unknown_fields(cls, values, "Processor field(s)", ValueError)
        return cls(**values)

    # -- one input -----------------------------------------------------------------------------
    def grid(self, height: int, width: int, budget: int | None = None, *, tubelets: int = 1) -> tuple[int, int]:
        """The (rows, cols) patch grid of an image of ``height`` × ``width`` pixels, or of each
        frame of a clip of ``tubelets`` tubelets (which share the token budget)."""
        if budget is not None and budget < 1:
            raise ValueError(f"the token budget must be >= 1, got {budget}")
        spatial = max(1, (budget or self.max_tokens) // tubelets)
        if self.grid_rule == "fill":
            return fill_grid(height, width, self.patch_size, spatial)
        if self.grid_rule == "square":
            side = max(1, math.isqrt(spatial))
            return side, side
        return fit_grid(height, width, self.patch_size, spatial, fill=budget is not None)

    def to_example(
        self,
        image: Any,
        *,
        size: tuple[int, int] | None = None,
        budget: int | None = None,
        dense: dict[str, Image.Image] | None = None,
        name: str | None = None,
    ) -> Example:
        """Resize, patchify and normalise one input (a path, a PIL image or a [C, H, W] tensor).

        ``size`` (height, width) sizes the grid as if the image had that size (resolution
        sampling in training); ``budget`` resizes it to about that many tokens (inference).
        ``dense`` maps field names to label images of the image's size (a segmentation mask):
        each is resized with nearest neighbour onto the same grid and cut into a per-token field
        [n, p·p] of integers, aligned with the patches.
        """
        if _is_clip(image):
            return self.clip_to_example(_as_clip(image, name), size=size, budget=budget, name=name)
        picture = self._decode(image, name)
        width, height = picture.size
        rows, cols = self.grid(*(size or (height, width)), budget)
        target = (cols * self.patch_size, rows * self.patch_size)
        patches, grid = self._patchify(_pixels(_resize(picture, target, self.resample, self.reducing_gap)))
        scale, offset = _normaliser(self.patch_size**2, self.mean, self.std)
        patches = patches.float().mul_(scale).sub_(offset)  # (x / 255 - mean) / std, per channel
        fields = {}
        for key, labels in (dense or {}).items():
            if labels.size != (width, height):
                raise ValueError(
                    f"{name or 'input'}: {key} is {labels.size[0]}x{labels.size[1]} pixels but the image is "
                    f"{width}x{height}; they must be the same size"
                )
            fields[key] = self._patchify(_pixels(_resize(labels, target, "nearest", None)))[0].long()
        return self._as_example(patches, grid, fields)

    def clip_to_example(
        self,
        clip: Clip,
        *,
        start: float = 0.0,
        num_frames: int | None = None,
        size: tuple[int, int] | None = None,
        budget: int | None = None,
        frame_op: FrameOp | None = None,
        name: str | None = None,
    ) -> Example:
        """Choose, resize, patchify and normalise the frames of ``clip`` (a :mod:`navit.media.video`
        clip). ``start`` (seconds) and ``num_frames`` (default ``max_frames``) choose the window;
        ``size``, ``budget`` as for images; ``frame_op`` (augmentation: crop, flip) runs on each
        full-size frame as it is decoded, and ``size`` is then the size of its output.

        Frames are first reduced to the grid a single tubelet would get, so memory stays small
        whatever the clip; once the number of frames is known (headers lie), they are reduced to
        the grid that all tubelets share. A one-frame clip gives exactly the image's patches.
        """
        if self.num_axes != 3:
            raise ValueError(f"{name or 'input'} is a clip, but this processor is for images (num_axes=2); "
                             "a clip model has num_axes=3")  # fmt: skip
        info = clip.info()
        height, width = size or (info.height, info.width)
        pt, p = self.temporal_patch_size, self.patch_size
        wanted = min(num_frames or self.max_frames, (budget or self.max_tokens) * pt)
        rows, cols = self.grid(height, width, budget)
        first = _resize_op((cols * p, rows * p), self.resample, self.reducing_gap)
        op = first if frame_op is None else (lambda frame: first(frame_op(frame)))
        frames, _ = clip.read(start=start, num_frames=wanted, fps=self.fps, stride=self.frame_stride, frame_op=op)
        tubelets = math.ceil(len(frames) / pt)
        rows, cols = self.grid(height, width, budget, tubelets=tubelets)
        frames = [_resize(self._decode(f, name), (cols * p, rows * p), self.resample, self.reducing_gap) for f in frames]
        frames += frames[-1:] * (tubelets * pt - len(frames))  # the last frame fills the last tubelet
        pixels = torch.stack([_pixels(f) for f in frames], 1)  # [C, T, H, W]
        patches, grid = patchify(pixels, (pt, p, p))
        scale, offset = _normaliser(pt * p * p, self.mean, self.std)
        return Example(patches.float().mul_(scale).sub_(offset), grid_coords(*grid), grid)

    def _patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """[C, H, W] pixels -> patches [n, p·p·C] and the (rows, cols) grid."""
        return patchify(pixels, (self.patch_size, self.patch_size))

    def _as_example(self, patches: torch.Tensor, grid: tuple[int, ...], fields: dict[str, torch.Tensor]) -> Example:
        """An image's patches as an example of this processor's axes (for clips: one tubelet)."""
        coords = grid_coords(*grid)
        if self.num_axes == 3:
            repeat = self.temporal_patch_size
            patches = patches.repeat(1, repeat)
            fields = {k: v.repeat(1, repeat) for k, v in fields.items()}
            coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1)
            grid = (1, *grid)
        return Example(patches, coords, grid, fields)

    def _decode(self, image: Any, name: str | None) -> Image.Image:
        """The input as an 8-bit PIL image in this processor's channels (RGB or L)."""
        if isinstance(image, (str, os.PathLike)):
            image = load_rgb(image, name=name)
        elif isinstance(image, torch.Tensor):
            image = _tensor_to_pil(image, self.channels, name or "input")
        if isinstance(image, Image.Image):
            wanted = "RGB" if self.channels == 3 else "L"
            if image.mode not in ("RGB", wanted):  # transparency, 16-bit, palettes: as files are read
                image = to_rgb(image, name or "input")
            return image if image.mode == wanted else image.convert(wanted)
        raise TypeError(
            f"{name or 'input'} is a {type(image).__name__}; expected a file path, a PIL image or a [C, H, W] tensor"
        )

    # -- many inputs ---------------------------------------------------------------------------
    def __call__(
        self,
        inputs: Sequence[Any] | Any,
        *,
        budget: int | None = None,
        seq_len: int | None = None,
        max_examples_per_seq: int | None = None,
    ) -> PackedBatch:
        """Pack a list of inputs (paths of images or videos, PIL images, [C, H, W] image tensors,
        [T, C, H, W] clip tensors) into one batch whose rows follow the input order; a single
        path, PIL image or image tensor may come alone. ``seq_len`` defaults to the largest of
        ``max_tokens``, ``budget`` and the longest example, so nothing is cut."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() != 3:
            raise TypeError(
                f"the processor takes a list of inputs, got one tensor of shape {tuple(inputs.shape)}: pass [clip] "
                "for a [T, C, H, W] clip, or list(images) for a stack of images"
            )
        if isinstance(inputs, (str, os.PathLike, Image.Image, torch.Tensor)):
            inputs = [inputs]
        examples = [self.to_example(x, budget=budget, name=_input_name(x, i)) for i, x in enumerate(inputs)]
        if not examples:
            raise ValueError("the processor got no inputs")
        longest = max(x.num_tokens for x in examples)
        seq_len = seq_len or max(self.max_tokens, budget or 0, longest)
        return pack(examples, seq_len, max_examples_per_seq=max_examples_per_seq).batch


@functools.lru_cache(maxsize=16)
def _normaliser(pixels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-value scale and offset of a flattened patch of ``pixels`` 8-bit pixels, channel last."""
    scale = torch.tensor([1 / (255 * s) for s in std]).repeat(pixels)
    offset = torch.tensor([m / s for m, s in zip(mean, std)]).repeat(pixels)
    return scale, offset


def _is_clip(item: Any) -> bool:
    if isinstance(item, (str, os.PathLike)):
        return is_video_name(item)
    if isinstance(item, torch.Tensor):
        return item.dim() == 4
    return callable(getattr(item, "read", None)) and callable(getattr(item, "info", None))


def _as_clip(item: Any, name: str | None) -> Clip:
    """A video path, a [T, C, H, W] tensor (uint8, or float in [0, 1]) or a clip object as a clip."""
    if isinstance(item, (str, os.PathLike)):
        return VideoFile(item, name=name)
    if isinstance(item, torch.Tensor):
        return ArrayClip([_tensor_to_pil(frame, frame.shape[0], name or "input") for frame in item])
    return item


def _resize_op(size: tuple[int, int], resample: str, reducing_gap: float | None) -> FrameOp:
    return lambda frame: _resize(frame, size, resample, reducing_gap)


def fill_grid(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """The grid rule of SigLIP2's image processor and of timm's NaFlex ``ResizeToSequence``: binary
    search for the largest scale at which both sides, rounded up to multiples of the patch size
    (at least one patch), give at most ``max_patches`` patches."""

    def side(scale: float, size: int) -> int:
        return max(1, math.ceil(size * scale / patch_size))

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        scale = (low + high) / 2
        if side(scale, height) * side(scale, width) <= max_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


def _input_name(item: Any, index: int) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"input {index}"


def _pixels(picture: Image.Image) -> torch.Tensor:
    """[C, H, W] uint8 tensor of a PIL image's values."""
    array = np.array(picture)  # a writable copy
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def _resize(band: Image.Image, size: tuple[int, int], resample: str, reducing_gap: float | None) -> Image.Image:
    if band.size == size:
        return band
    return band.resize(size, RESAMPLE[resample], reducing_gap=reducing_gap)


def _tensor_to_pil(image: torch.Tensor, channels: int, label: str) -> Image.Image:
    """A [C, H, W] tensor as an 8-bit PIL image: uint8 as it is, floating point (in [0, 1])
    rounded to 8 bits, so a tensor read from a file gives exactly the file's patches."""
    if image.dim() != 3 or image.shape[0] != channels:
        raise ValueError(f"{label} has shape {tuple(image.shape)}; expected a [{channels}, H, W] tensor")
    if min(image.shape[1:]) < 1:
        raise ValueError(f"{label} has an empty side: shape {tuple(image.shape)}")
    pixels = image.detach().cpu()
    if pixels.is_floating_point():
        pixels = (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8)
    elif pixels.dtype != torch.uint8:
        raise TypeError(f"{label} has dtype {pixels.dtype}; expected uint8 (0..255) or floating point (0..1)")
    hwc = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(hwc[:, :, 0] if channels == 1 else hwc)
