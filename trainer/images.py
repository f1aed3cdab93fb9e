"""Decode image bytes into an RGB uint8 array, as Label Studio displays the image.

Decoding: EXIF orientation is applied; transparent images are composited onto white
(what a browser shows on a white page); 16-bit / 32-bit grayscale is min-max scaled to
0..255; everything ends up as ``np.uint8`` of shape ``(H, W, 3)``.

Pixel limits: the size is checked right after ``Image.open`` (which reads only the header),
before any decoding. Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, ~89.5 M pixels by
default) also caps ``max_pixels``. Importing this module turns Pillow's
``DecompressionBombWarning`` into an error process-wide (as Pillow's docs suggest); the
explicit check does not depend on that filter (pytest or any ``catch_warnings`` may reset it).

Fetching (URLs, Label Studio, network rules) is the edge's: ml_backend/fetch.py.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

warnings.simplefilter("error", Image.DecompressionBombWarning)

MAX_PIXELS = 50_000_000  # default limit for images read from disk


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to RGB uint8 ``(H, W, 3)``; raises ValueError with a reason."""
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large ({e})") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"not a recognizable image ({type(e).__name__})") from None
    width, height = im.size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise ValueError(f"image too large: {width}x{height} pixels, more than the limit of {limit}")
    if width == 0 or height == 0:
        raise ValueError("image is empty")
    try:
        im.load()
    except Exception as e:
        raise ValueError(f"corrupt image data ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # malformed EXIF: browsers ignore it too, so show the image as stored
    try:
        return _to_rgb(im)
    except Exception as e:
        raise ValueError(f"unsupported image mode {im.mode!r} ({type(e).__name__}: {e})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB uint8; alpha is composited onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im).astype(np.float32))
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        gray = np.rint(scaled).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)

