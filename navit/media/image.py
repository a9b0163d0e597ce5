"""Decode one image file (or its bytes) into an 8-bit RGB PIL image.

Everything that reads image files in :mod:`navit.data` goes through :func:`load_rgb`, so every
source hands the model the same thing: the first frame, EXIF orientation applied, mode ``RGB``.
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathOrBytes = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

#: File extensions (lower case, with dot) treated as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Background that transparent pixels are composited onto (mid grey: no bias towards black/white).
BACKGROUND_RGB = (128, 128, 128)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _describe(source: PathOrBytes, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return getattr(source, "name", None) or repr(source)


def load_rgb(path_or_bytes: PathOrBytes, *, name: str | None = None) -> Image.Image:
    """Open an image with Pillow and return it as a fully loaded ``RGB`` image.

    * ``path_or_bytes``: a path, the encoded bytes, or a binary file object.
    * ``name``: how to call the image in error messages (default: the path, or a byte count).

    Steps: take the first frame of animated images, apply the EXIF orientation tag
    (:func:`PIL.ImageOps.exif_transpose`), then convert to RGB: transparency (alpha channels, and
    palette / ``tRNS`` transparency) is composited onto :data:`BACKGROUND_RGB`; 16-bit, 32-bit
    integer and float grey images are rescaled to 8 bits (see :func:`_high_bit_depth_to_l`) rather
    than clipped; every other mode uses Pillow's own conversion.

    Raises ``ValueError`` naming the file for empty, truncated, non-image or undecodable input.
    Pillow's decompression-bomb check stays on: its ``DecompressionBombError`` propagates, with the
    file name and a hint added.
    """
    label = _describe(path_or_bytes, name)
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        if len(path_or_bytes) == 0:
            raise ValueError(f"cannot decode image {label}: it is empty (0 bytes)")
        fp: str | BinaryIO = io.BytesIO(bytes(path_or_bytes))
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise FileNotFoundError(f"cannot read image {label}: {e.strerror or e}") from e
        if size == 0:
            raise ValueError(f"cannot decode image {label}: the file is empty (0 bytes)")
        fp = path
    else:
        fp = path_or_bytes

    try:
        with Image.open(fp) as im:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = _apply_exif_orientation(im)
            return to_rgb(im, label)
    except Image.DecompressionBombError as e:
        raise Image.DecompressionBombError(
            f"{label}: {e} This is Pillow's decompression-bomb protection; if you trust this "
            "file, raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) before loading."
        ) from e
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot decode image {label}: not an image format Pillow recognises") from e
    except (OSError, SyntaxError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError, some plugins as SyntaxError/EOFError.
        raise ValueError(f"cannot decode image {label}: {e}") from e


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        return im  # unreadable EXIF: keep the pixels as stored rather than failing the image
    return im if out is None else out


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def to_rgb(im: Image.Image, label: str) -> Image.Image:
    """``im`` as mode RGB: transparency composited onto :data:`BACKGROUND_RGB`, high bit depths
    rescaled to 8 bits, every other mode through Pillow's own conversion (see :func:`load_rgb`)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_bit_depth_to_l(im).convert("RGB")
    if _has_transparency(im):
        if mode == "La":  # premultiplied grey+alpha: Pillow has no direct La -> RGBA conversion
            im = im.convert("LA")
        try:
            rgba = im.convert("RGBA")
        except ValueError as e:
            raise ValueError(f"cannot convert image {label} from mode {mode} to RGB: {e}") from e
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image {label} from mode {mode} to RGB: {e}") from e


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Rescale a 16-bit / 32-bit integer / float single-channel image to 8-bit ``L``.

    * 16-bit modes (``I;16*``) use their full declared range: ``v * 255 / 65535``.
    * ``I`` (32-bit signed) has no declared range: values already in 0..255 are kept, values in
      0..65535 are treated as 16-bit, anything else (negative, larger) is min-max normalised.
    * ``F``: values in [0, 1] are treated as intensities in [0, 1]; values in [0, 255] as 8-bit;
      anything else is min-max normalised. NaN/inf become the range ends (or 0).
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im.convert("I"), dtype=np.float64)
        scaled = arr * (255.0 / 65535.0)
    else:
        arr = np.asarray(im, dtype=np.float64)
        finite = np.isfinite(arr)
        if not finite.all():
            good = arr[finite]
            lo_f, hi_f = (float(good.min()), float(good.max())) if good.size else (0.0, 0.0)
            arr = np.nan_to_num(arr, nan=lo_f, posinf=hi_f, neginf=lo_f)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = arr * (255.0 / 65535.0)
        elif hi > lo:
            scaled = (arr - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(arr)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8 -> mode "L"
