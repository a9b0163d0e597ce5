"""SyntheticMotion: the built-in video set, whose classes can only be read from motion.

Each clip shows one dark ellipse or rectangle on a light gradient, as :class:`SyntheticShapes`
does, doing one of six things over the clip: ``moves_horizontally``, ``moves_vertically``,
``grows``, ``shrinks``, ``spins`` or stays ``still``. Position, size, angle and elongation are
drawn from the same ranges for every class, and a moving or resizing object sweeps its range
linearly, so a frame at a random time says little about the class; two frames already say it.
One caveat: such a clip starts (and ends) at an end of its range, so its first frame alone is a
cue a model could learn. The classes survive a horizontal flip,
so flip augmentation is safe. Clips have 2 to 32 frames at 6 to 24 frames per second, sides of
``min_side`` to ``max_side`` pixels and aspect ratios from 1:3 to 3:1.

Clip ``i`` is a pure function of ``(seed, i)``: frames are rendered on demand at the times asked
for, in any worker; ``write_video_folder`` encodes the set as real video files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from navit.synthetic.shapes import DARK_MAX, LIGHT_MIN, balanced_label, draw_scene, shape_polygon
from navit.media.video import ClipInfo, FrameOp, FramePicker, write_video
from navit.synthetic.base import Generated

MOTION_CLASSES: tuple[str, ...] = ("grows", "moves_horizontally", "moves_vertically", "shrinks", "spins", "still")


@dataclass(frozen=True)
class MotionParams:
    """Everything that determines one clip. Geometry is in pixels; ``u`` in [0, 1] is the time
    through the clip, and the object goes from its ``*0`` to its ``*1`` state linearly in u."""

    index: int
    label: int
    width: int
    height: int
    num_frames: int
    fps: float
    shape: str
    elongation: float  # object height / width
    size0: float  # object width at u = 0
    size1: float
    cx0: float
    cy0: float
    cx1: float
    cy1: float
    angle0: float
    angle1: float
    bg_start: tuple[int, int, int]
    bg_end: tuple[int, int, int]
    gradient_angle: float
    color: tuple[int, int, int]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def polygon(self, u: float) -> list[tuple[float, float]]:
        size = self.size0 + u * (self.size1 - self.size0)
        return shape_polygon(self.shape, size, size * self.elongation, self.cx0 + u * (self.cx1 - self.cx0),
                             self.cy0 + u * (self.cy1 - self.cy0), self.angle0 + u * (self.angle1 - self.angle0))  # fmt: skip


class SyntheticClip:
    """One clip of :class:`SyntheticMotion`, rendered frame by frame as it is read."""

    def __init__(self, params: MotionParams, seed: int, noise_std: float) -> None:
        self.params, self.seed, self.noise_std = params, seed, noise_std

    def info(self) -> ClipInfo:
        p = self.params
        return ClipInfo(p.width, p.height, p.duration, p.fps)

    def frame(self, k: int) -> Image.Image:
        p = self.params
        u = k / max(1, p.num_frames - 1)
        rng = np.random.default_rng([self.seed, p.index, 2, k])
        return draw_scene(p.width, p.height, p.bg_start, p.bg_end, p.gradient_angle, p.polygon(u), p.color,
                          self.noise_std, rng)  # fmt: skip

    def read(self, *, start: float = 0.0, num_frames: int, fps: float | None = None, stride: int = 1,
             frame_op: FrameOp | None = None) -> tuple[list[Image.Image], list[float]]:  # fmt: skip
        p = self.params
        picker = FramePicker(start, fps, stride)
        chosen = [k for k in range(p.num_frames) if picker.wants(k / p.fps)][:num_frames] or [0]
        frames = [self.frame(k) for k in chosen]
        return [frame_op(f) if frame_op else f for f in frames], [k / p.fps for k in chosen]


class SyntheticMotion(Generated):
    """Procedural video source (see the module docstring); items are ``{"video", "label"}``."""

    kind = "synthetic-video"
    provides = frozenset({"video", "label"})

    def __init__(self, num_clips: int = 3000, seed: int = 0, min_side: int = 48, max_side: int = 160, *,
                 min_frames: int = 2, max_frames: int = 32, noise_std: float = 3.0) -> None:  # fmt: skip
        if int(num_clips) != num_clips or num_clips < 0:
            raise ValueError(f"num_clips must be a non-negative integer, got {num_clips!r}")
        if not 16 <= min_side <= max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
        if not 1 <= min_frames <= max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        self.num_clips = self.count = int(num_clips)
        self.seed = int(seed)
        self.min_side, self.max_side = min_side, max_side
        self.min_frames, self.max_frames, self.noise_std = min_frames, max_frames, noise_std
        self.class_names: list[str] = list(MOTION_CLASSES)

    def label(self, index: int) -> int:
        return balanced_label(self.seed ^ 0x51DE0, self._check(index), len(MOTION_CLASSES))

    def item(self, index: int) -> dict[str, Any]:
        params = self.params(index)
        return {"video": SyntheticClip(params, self.seed, self.noise_std), "label": params.label}

    def load(self, index: int) -> Image.Image:
        """The clip's first frame (what a single-image view of it shows)."""
        return SyntheticClip(self.params(index), self.seed, self.noise_std).frame(0)

    def params(self, index: int) -> MotionParams:
        label = self.label(index)
        motion = MOTION_CLASSES[label]
        rng = np.random.default_rng([self.seed, index, 0x7])
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
        side = math.exp(rng.uniform(math.log(self.min_side), math.log(self.max_side)))
        width = max(16, round(side * math.sqrt(aspect)))
        height = max(16, round(side / math.sqrt(aspect)))
        num_frames = round(math.exp(rng.uniform(math.log(self.min_frames), math.log(self.max_frames + 0.999))))
        num_frames = min(self.max_frames, max(self.min_frames, num_frames))
        fps = float(rng.uniform(6, 24))
        short = min(width, height)
        elongation = rng.uniform(1.6, 2.4)
        # Sizes, positions and angles come from the same ranges for every class; the class only
        # decides which of them change over the clip, and how.
        small, large = 0.2 * short, 0.45 * short
        size0 = size1 = rng.uniform(small, large)
        angle0 = angle1 = rng.uniform(0, 180)
        cx0 = cx1 = rng.uniform(0.3, 0.7) * width
        cy0 = cy1 = rng.uniform(0.3, 0.7) * height
        sign = 1 if rng.uniform() < 0.5 else -1
        if motion == "moves_horizontally":
            cx0, cx1 = (0.5 - sign * 0.2) * width, (0.5 + sign * 0.2) * width
        elif motion == "moves_vertically":
            cy0, cy1 = (0.5 - sign * 0.2) * height, (0.5 + sign * 0.2) * height
        elif motion in ("grows", "shrinks"):
            size0, size1 = (small, large) if motion == "grows" else (large, small)
        elif motion == "spins":
            angle1 = angle0 + sign * rng.uniform(50, 130)  # far from a half turn, which looks still
        bg_start = rng.integers(LIGHT_MIN, 256, size=3)
        bg_end = np.clip(bg_start + rng.integers(-40, 41, size=3), LIGHT_MIN, 255)
        return MotionParams(
            index=int(index), label=label, width=width, height=height, num_frames=num_frames, fps=fps,
            shape="rectangle" if rng.uniform() < 0.5 else "ellipse", elongation=float(elongation),
            size0=float(size0), size1=float(size1), cx0=float(cx0), cy0=float(cy0), cx1=float(cx1), cy1=float(cy1),
            angle0=float(angle0), angle1=float(angle1), bg_start=tuple(int(v) for v in bg_start),
            bg_end=tuple(int(v) for v in bg_end), gradient_angle=float(rng.uniform(0, 2 * math.pi)),
            color=tuple(int(v) for v in rng.integers(0, DARK_MAX + 1, size=3)),
        )  # fmt: skip


def write_video_folder(source: SyntheticMotion, out_dir: str | os.PathLike[str], *, ext: str = ".mp4",
                       progress: bool = True) -> None:  # fmt: skip
    """Encode every clip of ``source`` as ``out_dir/<class_name>/<index><ext>`` (real video files
    that :class:`navit.data.ImageFolder` reads back with the same labels)."""
    indices = range(len(source))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"writing {out_dir}", unit="clip")
    for i in indices:
        item = source.item(i)
        clip = item["video"]
        folder = os.path.join(out_dir, source.class_names[item["label"]])
        os.makedirs(folder, exist_ok=True)
        frames, _ = clip.read(num_frames=clip.params.num_frames)
        write_video(os.path.join(folder, f"{i:06d}{ext}"), frames, clip.params.fps)
