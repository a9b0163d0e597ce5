"""Clips: video files decoded with PyAV, frames in memory, and how frames are chosen from them.

Containers lie: nominal frame counts, durations and rates often differ from what decodes, and
frame rates vary within a file. So frames are chosen by the timestamps of the frames that
actually decode, never by nominal counts: the first decoded frame at or after each target time
``start + k / fps`` (every decoded frame when ``fps`` is None), then every ``stride``-th of those.
Decoding seeks to the key frame before ``start`` and stops as soon as enough frames are kept, and
each kept frame is reduced (cropped, flipped, resized) as it is decoded, so memory stays bounded
by one full-size frame plus the small kept ones, however long or large the file.

Every clip offers ``info()`` (size, duration and rate as far as known) and ``read(...)``, which
returns the chosen frames as PIL images with their times in seconds. Frames are as a player shows
them: non-square pixels stretched to square ones, the display rotation applied.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")

FrameOp = Callable[[Image.Image], Image.Image]


def is_video_name(name: str | os.PathLike[str]) -> bool:
    return os.path.splitext(os.fspath(name))[1].lower() in VIDEO_EXTENSIONS


def require_av(what: str):
    """The ``av`` module (PyAV), or an error that says how to install it."""
    try:
        import av
    except ImportError as error:
        raise ImportError(f"{what} needs PyAV: pip install 'torch-navit[video]' (or pip install av)") from error
    return av


@dataclass(frozen=True)
class ClipInfo:
    width: int
    height: int
    duration: float | None  # seconds, as far as the container says (it may lie)
    fps: float | None  # nominal frame rate (it may lie, or vary)


class Clip(Protocol):
    def info(self) -> ClipInfo: ...

    def read(self, *, start: float = 0.0, num_frames: int, fps: float | None = None, stride: int = 1,
             frame_op: FrameOp | None = None) -> tuple[list[Image.Image], list[float]]:  # fmt: skip
        """Up to ``num_frames`` frames (after ``frame_op``) and their times in seconds."""
        ...


class FramePicker:
    """Chooses frames by their times as they come: the first at or after each target time
    ``start + k / fps`` (each decoded frame at most once), then every ``stride``-th."""

    EPS = 1e-3  # seconds: container timestamps are rounded (to 1 ms in many), frames are >= 4 ms apart

    def __init__(self, start: float, fps: float | None, stride: int) -> None:
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.start, self.fps, self.stride = start, fps, stride
        self.target, self.candidates = start, 0

    def wants(self, time: float) -> bool:
        if time < self.start - self.EPS or time < self.target - self.EPS:
            return False
        if self.fps is not None:  # skip the targets this frame covers (sparser streams: no repeats)
            steps = math.floor((time - self.target) * self.fps + self.EPS) + 1
            self.target += steps / self.fps
        self.candidates += 1
        return (self.candidates - 1) % self.stride == 0


class VideoFile:
    """A video file, or a video file's bytes (a clip read from a shard), decoded lazily with
    PyAV. Holds its path or bytes and, once read, its info (picklable)."""

    def __init__(self, path: str | os.PathLike[str] | bytes, name: str | None = None, threads: int = 1) -> None:
        self.data = bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else None
        self.path = None if self.data is not None else os.fspath(path)
        self.name, self.threads = name or self.path or f"<{len(self.data or b'')} bytes>", threads
        self._info: ClipInfo | None = None  # read once (it decodes the first frame)

    def __repr__(self) -> str:
        return f"VideoFile({self.path or self.name!r})"

    def _open(self):
        av = require_av(f"decoding video {self.name}")
        if self.path is not None and os.path.isdir(self.path):
            raise ValueError(f"cannot decode video {self.name}: it is a folder")
        try:
            size = len(self.data) if self.data is not None else os.path.getsize(self.path)
        except OSError as e:
            raise FileNotFoundError(f"cannot read video {self.name}: {e.strerror or e}") from e
        if size == 0:
            raise ValueError(f"cannot decode video {self.name}: the file is empty (0 bytes)")
        try:
            container = av.open(io.BytesIO(self.data) if self.data is not None else self.path)
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode video {self.name}: {ffmpeg_reason(e)}") from e
        if not container.streams.video:
            container.close()
            raise ValueError(f"cannot decode video {self.name}: it has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg found no decoder for it (an unknown codec, or a damaged header)
            container.close()
            raise ValueError(f"cannot decode video {self.name}: its video stream has no decoder (an unknown "
                             "codec, or a damaged file)")  # fmt: skip
        return container, stream

    def info(self) -> ClipInfo:
        """The clip as a player shows it: its size after the pixel aspect ratio and the display
        rotation (read from the first frame), its duration and rate."""
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> ClipInfo:
        av = require_av(f"decoding video {self.name}")
        container, stream = self._open()
        with container:
            ctx = stream.codec_context
            if not ctx.width or not ctx.height:
                raise ValueError(f"cannot decode video {self.name}: the stream has no frame size")
            width, height = display_width(ctx.width, stream), ctx.height
            try:
                if quarter_turns(next(container.decode(stream))) % 2:
                    width, height = height, width
            except (StopIteration, av.error.FFmpegError):
                pass  # no frame decodes: read() says so
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            rate = stream.average_rate or stream.guessed_rate
            return ClipInfo(width, height, duration, float(rate) if rate else None)

    def read(self, *, start: float = 0.0, num_frames: int, fps: float | None = None, stride: int = 1,
             frame_op: FrameOp | None = None) -> tuple[list[Image.Image], list[float]]:  # fmt: skip
        frames, times = self._read(start, num_frames, fps, stride, frame_op)
        if not frames and start > 0:  # the header promised more than decodes: take the start
            frames, times = self._read(0.0, num_frames, fps, stride, frame_op)
        if not frames:
            raise ValueError(f"cannot decode video {self.name}: no frame decodes")
        return frames, times

    def _read(self, start: float, num_frames: int, fps: float | None, stride: int,
              frame_op: FrameOp | None) -> tuple[list[Image.Image], list[float]]:  # fmt: skip
        av = require_av(f"decoding video {self.name}")
        container, stream = self._open()
        picker = FramePicker(start, fps, stride)
        frames: list[Image.Image] = []
        times: list[float] = []
        with container:
            stream.codec_context.thread_count = self.threads
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            # Times count from the stream's first frame (MPEG streams start at an offset).
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if start > 0:
                container.seek(int((start + origin) / stream.time_base), stream=stream, backward=True, any_frame=False)
            index = 0
            try:
                for frame in container.decode(stream):
                    time = frame.time - origin if frame.time is not None else index / rate
                    index += 1
                    if not picker.wants(time):
                        continue
                    image = displayed(frame, stream)
                    frames.append(frame_op(image) if frame_op else image)
                    times.append(time)
                    if len(frames) == num_frames:
                        break
            except av.error.FFmpegError as e:
                if not frames:  # a damaged tail after good frames ends the clip there
                    raise ValueError(f"cannot decode video {self.name}: {ffmpeg_reason(e)}") from e
        return frames, times


def ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's reason without the file's path (the message names the file once, and skipped
    files are counted by reason)."""
    return getattr(error, "strerror", None) or str(error)


def display_width(width: int, stream) -> int:
    """The width a player shows for ``width`` stored pixels: non-square pixels are stretched."""
    sar = stream.sample_aspect_ratio
    return max(1, round(width * sar)) if sar else width


def quarter_turns(frame) -> int:
    """How many quarter turns counterclockwise the frame's display matrix asks for (phones
    store portrait clips as landscape frames with a rotation to apply)."""
    return round(frame.rotation / 90) % 4


TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def displayed(frame, stream) -> Image.Image:
    """The decoded frame as a player shows it (pixel aspect ratio, then rotation)."""
    image = frame.to_image()
    width = display_width(image.width, stream)
    if width != image.width:
        image = image.resize((width, image.height), Image.Resampling.BILINEAR)
    turns = quarter_turns(frame)
    return image.transpose(TURNS[turns]) if turns else image


class ArrayClip:
    """Frames in memory ([T, H, W, C] uint8, or PIL images), at ``fps`` frames per second
    (None: times are frame indices, as if at 1 frame per second)."""

    def __init__(self, frames: np.ndarray | Sequence[Image.Image], fps: float | None = None) -> None:
        self.frames = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
        if not self.frames:
            raise ValueError("a clip needs at least one frame")
        self.fps = fps

    def info(self) -> ClipInfo:
        width, height = self.frames[0].size
        rate = self.fps or 1.0  # frame indices are the times: the rate the times count at
        return ClipInfo(width, height, len(self.frames) / rate, rate)

    def read(self, *, start: float = 0.0, num_frames: int, fps: float | None = None, stride: int = 1,
             frame_op: FrameOp | None = None) -> tuple[list[Image.Image], list[float]]:  # fmt: skip
        rate = self.fps or 1.0
        picker = FramePicker(start, fps, stride)
        chosen = [(i / rate, f) for i, f in enumerate(self.frames) if picker.wants(i / rate)][:num_frames]
        if not chosen:
            chosen = [(0.0, self.frames[0])]
        return [frame_op(f) if frame_op else f for _, f in chosen], [t for t, _ in chosen]


#: Encoder per container, for :func:`write_video`.
ENCODERS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".m4v": "libx264", ".avi": "mpeg4",
            ".webm": "libvpx", ".mpg": "mpeg1video", ".mpeg": "mpeg1video"}  # fmt: skip


def write_video(path: str | os.PathLike[str], frames: Sequence[Image.Image | np.ndarray], fps: float,
                times: Sequence[float] | None = None) -> None:  # fmt: skip
    """Encode RGB ``frames`` as a video file (encoder chosen by the extension), ``fps`` frames
    per second, or at ``times`` (seconds) for a variable frame rate. Odd sides are cropped by a
    pixel (4:2:0 chroma needs even sides)."""
    from fractions import Fraction

    av = require_av("writing video files")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in ENCODERS:
        raise ValueError(f"cannot write {path}: expected one of {sorted(ENCODERS)}")
    images = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    width, height = (images[0].width // 2) * 2, (images[0].height // 2) * 2
    mpeg1 = ENCODERS[ext] == "mpeg1video"  # MPEG-1 takes standard rates only
    rate = Fraction(25) if mpeg1 else Fraction(fps).limit_denominator(1000)
    with av.open(path, "w") as container:
        stream = container.add_stream(ENCODERS[ext], rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        time_base = Fraction(1, 1000) if times is not None and not mpeg1 else None
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, width, height)))
            if time_base is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
