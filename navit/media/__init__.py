"""Decoding media files: images (:mod:`navit.media.image`) and clips (:mod:`navit.media.video`).

This is the lowest data layer: it knows files and pixels, nothing about models, tokens or tasks.
"""

from __future__ import annotations



import os

from PIL import Image

from navit.media.image import IMAGE_EXTENSIONS, load_rgb
from navit.media.video import VideoFile, is_video_name


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_media_name(name: str) -> bool:
    """Whether ``name`` has an image or video extension (case-insensitive)."""
    return is_image_name(name) or is_video_name(name)


def load_media(path: str, name: str) -> Image.Image:
    """An image file, or the first frame of a video file."""
    if is_video_name(path):
        return VideoFile(path, name=name).read(num_frames=1)[0][0].convert("RGB")
    return load_rgb(path, name=name)
