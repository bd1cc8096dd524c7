"""Per-image work, pure: hash the bytes, decode and verify, crop a face-centred square, resize.

Crop choice: aligned CelebA images are 178x218 with the face centred, so the centre square of the
shorter side (178x178, rows 20-198) holds the whole face and hair. Squashing 178x218 to a square
would distort faces by 22%, and a tighter crop would throw away hair, a strong cue for this
attribute. For other photos the same centre square is the least surprising default.

Speed: a JPEG whose shorter side is larger than the target is decoded already scaled down in the
DCT domain (libjpeg-turbo via simplejpeg) by the smallest of its factors 1/8 ... 8/8 that keeps the
shorter side >= the target: 178x218 CelebA decodes at 6/8 (134x164) for 128 px and at 3/8 for
64 px, so both the inverse DCT and the colour conversion touch about half the pixels. PIL's own
`draft` offers only 1/2, 1/4 and 1/8, none of which fits 128 px. The final bilinear resize reads a
source box scaled by exactly that factor, so the crop lands where the full-size crop would. The
README's prep section gives what this saves and what it costs in fidelity. Anything else (PNG, CMYK JPEGs, data TurboJPEG refuses, images no larger than the target)
goes through PIL's full decode, which also words the rejection of corrupt data. The crop is the
resize's source box rather than a separate copy, and `decode_face_bytes` hands the pixels
straight to the writer without a numpy round trip: at 128 px decoding and resizing are nearly all
of the per-image cost, so every avoided copy shows.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
JPEG_START = b"\xff\xd8"
# TurboJPEG converts these to RGB the way PIL does; CMYK/YCCK (often Adobe-inverted) are left to PIL.
SCALABLE_JPEG_COLOURSPACES = {"YCbCr", "Gray"}


# Smaller than this on the shorter side there is no face to learn from (a 1x1 pixel, a 1000x1
# strip); upscaling it would only invent one.
MIN_IMAGE_SIDE = 24
EXIF_ORIENTATION = 0x0112


class ImageRejected(Exception):
    """The bytes are not a usable image; the message is the reason written to rejected.csv."""


# A photo larger than this is no face image (a 50-megapixel JPEG is ~25 MiB); reading it whole
# would only risk the reader's memory.
MAX_IMAGE_BYTES = 64 * 2**20


def unreadable_reason(path: str | Path) -> str:
    """Why the image file `path` must not be read at all ("" when it may): reading a FIFO blocks
    forever, and a device or a huge file holds no image worth the memory. Follows symlinks."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a FIFO, device or socket)"
    if info.st_size > MAX_IMAGE_BYTES:
        return f"larger than {MAX_IMAGE_BYTES // 2**20} MiB ({info.st_size / 2**20:.0f} MiB)"
    return ""


def read_image_file(path: str | Path) -> bytes:
    """The bytes of the image file `path`; ImageRejected (with the reason) for a file
    unreadable_reason refuses, OSError where the file cannot be read."""
    reason = unreadable_reason(path)
    if reason:
        raise ImageRejected(reason)
    return Path(path).read_bytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_square_crop(image: Image.Image) -> Image.Image:
    """The centred square of side min(width, height)."""
    return image.crop(center_square_box(*image.size))


def decode_face(data: bytes, *, image_size: int, scaled_jpeg: bool = True) -> np.ndarray:
    """Decode, verify and crop/resize to an `image_size`^2 RGB uint8 array (H, W, 3).

    `scaled_jpeg=False` forces PIL's full-size decode (the reference the tests compare with).
    Raises ImageRejected with a short reason for empty, truncated, corrupt or non-image data.
    """
    return np.asarray(_decode_face_image(data, image_size=image_size, scaled_jpeg=scaled_jpeg), dtype=np.uint8)


def decode_face_bytes(data: bytes, *, image_size: int) -> bytes:
    """`decode_face` as the raw RGB bytes the prep output stores (HWC, row-major)."""
    return _decode_face_image(data, image_size=image_size, scaled_jpeg=True).tobytes()


def _decode_face_image(data: bytes, *, image_size: int, scaled_jpeg: bool) -> Image.Image:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    # A JPEG stored sideways (EXIF orientation, as phones do) takes PIL's path, which turns it upright.
    if scaled_jpeg and data[:2] == JPEG_START and _orientation(data) in (None, 1):
        face = _scaled_jpeg_face(data, image_size)
        if face is not None:
            return face
    rgb = _open_rgb(data, upright=True)
    return _resize_centre_square(rgb, image_size, box=center_square_box(*rgb.size))


def _orientation(data: bytes) -> int | None:
    """The EXIF orientation tag (1 = upright), read from the header only; None without one."""
    try:
        return Image.open(io.BytesIO(data)).getexif().get(EXIF_ORIENTATION)
    except Exception:  # unreadable headers are the full decode's to reject, with its own words
        return None


def load_photo(data: bytes) -> Image.Image:
    """Fully decode a photo to RGB, turned upright by its EXIF orientation (phone photos are
    stored sideways with a tag saying so), for face detection and alignment."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return _open_rgb(data, upright=True)


def _open_rgb(data: bytes, *, upright: bool) -> Image.Image:
    """Full decode to 8-bit RGB: the first frame of an animation, 16-bit data scaled (not clipped)."""
    try:
        # No `with`: closing an image discards its pixels, and an in-memory file needs no closing.
        image = Image.open(io.BytesIO(data))
        _check_size(*image.size)
        image.load()  # a full decode of the first frame: truncated or corrupt data fails here, not later
        if upright:
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageRejected(f"too many pixels for an image of a face (a decompression bomb?): {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected(f"corrupt or truncated image: {err}") from None
    if image.mode.startswith("I"):
        # 16-bit greyscale (PNG "I;16", or "I" holding 0..65535): PIL's convert clips it to 255,
        # i.e. white; scale it into 8 bits instead.
        values = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((values >> 8 if values.max() > 255 else values).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageRejected(f"too small: {width}x{height} px (the shorter side must be at least {MIN_IMAGE_SIDE} px)")


def _scaled_jpeg_face(data: bytes, image_size: int) -> Image.Image | None:
    """The face from a DCT-scaled decode, or None where PIL's full decode should handle `data`."""
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        _check_size(width, height)
        if (
            colourspace not in SCALABLE_JPEG_COLOURSPACES
            or min(width, height) <= image_size
            or width * height > 2 * Image.MAX_IMAGE_PIXELS
        ):  # PIL rejects decompression bombs
            return None
        # strict: a truncated or corrupt stream raises instead of coming back grey-filled.
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=image_size, min_width=image_size, strict=True
        )
    except ValueError:
        return None  # PIL decodes it after all, or rejects it with its own words
    # TurboJPEG sizes an M/8 decode as ceil(side * M / 8); the crop box needs M itself, not the
    # rounded size ratio, or the face shifts by up to half a pixel.
    scaled_height, scaled_width = pixels.shape[:2]
    eighths = next(
        (
            m
            for m in range(1, 9)
            if math.ceil(width * m / 8) == scaled_width and math.ceil(height * m / 8) == scaled_height
        ),
        None,
    )
    if eighths is None:
        return None
    box = tuple(edge * eighths / 8 for edge in center_square_box(width, height))
    return _resize_centre_square(Image.fromarray(pixels), image_size, box=box)


def _resize_centre_square(rgb: Image.Image, image_size: int, *, box: tuple[float, float, float, float]) -> Image.Image:
    if box[2] - box[0] == image_size and box[3] - box[1] == image_size:
        return rgb.crop(tuple(int(edge) for edge in box))
    # Resizing from a source box crops and resizes in one pass; the filter may read the pixels just
    # outside the box instead of repeating the edge, which only helps.
    return rgb.resize((image_size, image_size), Image.BILINEAR, box=box, reducing_gap=3.0)
