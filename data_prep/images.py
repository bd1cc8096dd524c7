"""Per-image work, pure: hash the bytes, decode and verify, crop a face-centred square, resize.

Crop choice: aligned CelebA images are 178x218 with the face centred, so the centre square of the
shorter side (178x178, rows 20-198) holds the whole face and hair. Squashing 178x218 to a square
would distort faces by 22%, and a tighter crop would throw away hair, a strong cue for this
attribute. For other photos the same centre square is the least surprising default.

Speed: for JPEGs we ask the decoder for a reduced-size decode (`draft`), which scales in the DCT
domain by 1/2, 1/4 or 1/8 while staying at least as large as the target, so shrinking 218 px
faces to 64 px decodes a quarter of the pixels; the final resize is still antialiased. The crop
is the resize's source box rather than a separate copy, and `decode_face_bytes` hands the pixels
straight to the writer without a numpy round trip: at 128 px, decoding and resizing are nearly
all of the per-image cost, so every avoided copy shows.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageRejected(Exception):
    """The bytes are not a usable image; the message is the reason written to rejected.csv."""


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


def decode_face(data: bytes, *, image_size: int, draft: bool = True) -> np.ndarray:
    """Decode, verify and crop/resize to an `image_size`^2 RGB uint8 array (H, W, 3).

    Raises ImageRejected with a short reason for empty, truncated, corrupt or non-image data.
    """
    return np.asarray(_decode_face_image(data, image_size=image_size, draft=draft), dtype=np.uint8)


def decode_face_bytes(data: bytes, *, image_size: int) -> bytes:
    """`decode_face` as the raw RGB bytes the prep output stores (HWC, row-major)."""
    return _decode_face_image(data, image_size=image_size, draft=True).tobytes()


def _decode_face_image(data: bytes, *, image_size: int, draft: bool) -> Image.Image:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        # No `with`: closing an image discards its pixels, and an in-memory file needs no closing.
        image = Image.open(io.BytesIO(data))
        if draft and image.format == "JPEG":
            # Request a square at least image_size on both sides: the shorter side then stays
            # >= image_size, so the centre crop never has to upscale.
            image.draft("RGB", (image_size, image_size))
        image.load()  # a full decode: truncated or corrupt data fails here, not later
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageRejected(f"corrupt or truncated image: {err}") from None
    box = center_square_box(*rgb.size)
    if box[2] - box[0] == image_size:
        return rgb.crop(box)
    # Resizing from a source box crops and resizes in one pass; the filter may read the pixels just
    # outside the box instead of repeating the edge, which only helps.
    return rgb.resize((image_size, image_size), Image.BILINEAR, box=box, reducing_gap=3.0)
