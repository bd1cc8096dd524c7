"""Tests for gendertune.data_prep.images: per-image decoding and cropping (the scaled JPEG path against the
full decode, EXIF orientation, 16-bit, animated and grayscale inputs) and the rejection of bad
images with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gendertune.data_prep.images import (
    ImageRejected,
    _scaled_jpeg_face,
    center_square_crop,
    decode_face,
    load_photo,
    sha256_hex,
)


def jpeg_bytes(width=178, height=218, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth content (like a photo) so JPEG and resampling behave as on faces.
    small = rng.integers(0, 255, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_centre_square_crop_of_aligned_celeba_keeps_rows_20_to_198():
    image = Image.new("RGB", (178, 218))
    for row in range(218):
        image.paste((row, 0, 0), (0, row, 178, row + 1))
    crop = center_square_crop(image)
    assert crop.size == (178, 178)
    assert crop.getpixel((0, 0))[0] == 20 and crop.getpixel((0, 177))[0] == 197


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / max(np.mean((a.astype(float) - b.astype(float)) ** 2), 1e-9))


@pytest.mark.parametrize("size", [64, 128])
def test_decode_face_shape_and_scaled_jpeg_decoding_keeps_quality(size):
    data = jpeg_bytes()
    assert _scaled_jpeg_face(data, size) is not None  # 178x218 -> 3/8 or 6/8: the fast path ran
    fast = decode_face(data, image_size=size)
    full = decode_face(data, image_size=size, scaled_jpeg=False)
    assert fast.shape == (size, size, 3)
    assert psnr(fast, full) > 33, psnr(fast, full)


def test_scaled_jpeg_decoding_crops_the_same_rows_as_the_full_decode():
    # Bands every 8 rows: a crop shifted by even half a decoded pixel moves every edge.
    rows = np.repeat((np.arange(218) // 8 % 2 * 255).astype(np.uint8), 178 * 3).reshape(218, 178, 3)
    buffer = io.BytesIO()
    Image.fromarray(rows).save(buffer, format="JPEG", quality=95)
    fast = decode_face(buffer.getvalue(), image_size=128)[:, 64, 0].astype(float)
    full = decode_face(buffer.getvalue(), image_size=128, scaled_jpeg=False)[:, 64, 0].astype(float)
    assert np.abs(fast - full).mean() < 4, np.abs(fast - full).mean()  # ~1.3; ~10 when half a pixel off


def test_cmyk_small_and_unscalable_jpegs_take_the_full_decode():
    buffer = io.BytesIO()
    Image.new("CMYK", (178, 218), (0, 255, 255, 0)).save(buffer, format="JPEG")
    cmyk = buffer.getvalue()
    assert _scaled_jpeg_face(cmyk, 64) is None
    assert (decode_face(cmyk, image_size=64) == decode_face(cmyk, image_size=64, scaled_jpeg=False)).all()
    assert _scaled_jpeg_face(jpeg_bytes(width=100, height=120), 128) is None  # nothing to scale down
    assert _scaled_jpeg_face(jpeg_bytes()[:2000], 64) is None  # truncated: PIL words the rejection


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (jpeg_bytes()[:2000], "corrupt or truncated"),
    ],
)
def test_decode_face_rejects_bad_bytes_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_face(data, image_size=64)


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 1), (1000, 1), (23, 400)])
def test_images_too_small_for_a_face_are_rejected_not_upscaled(size):
    for data in (_encoded(Image.new("RGB", size, (90, 90, 90)), "JPEG"), _encoded(Image.new("RGB", size), "PNG")):
        with pytest.raises(ImageRejected, match=f"too small: {size[0]}x{size[1]} px"):
            decode_face(data, image_size=64)
        with pytest.raises(ImageRejected, match="too small"):
            load_photo(data)


def test_sixteen_bit_png_is_scaled_not_saturated():
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    face = decode_face(_encoded(Image.fromarray(ramp), "PNG"), image_size=64)
    assert face[0, 0, 0] == 0 and face[0, -1, 0] == 255 and 120 <= face[0, 32, 0] <= 135  # a ramp, not white


def test_an_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    data = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    face = decode_face(data, image_size=32)
    assert face[..., 0].mean() > 200 and face[..., 2].mean() < 50


def test_exif_orientation_is_applied_on_every_decode_path():
    # A landscape photo whose left half is white, stored with "rotate 90 degrees clockwise to view" (6).
    pixels = np.zeros((120, 200, 3), np.uint8)
    pixels[:, :100] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    data = _encoded(image, "JPEG", exif=exif, quality=95)
    upright = decode_face(data, image_size=64)  # viewed upright it is portrait, white on top
    assert upright[:20].mean() > 200 and upright[-20:].mean() < 50
    assert load_photo(data).size == (120, 200)


def test_a_decompression_bomb_is_rejected_with_its_reason(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice this
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_face(_encoded(Image.new("RGB", (100, 100)), "PNG"), image_size=32)


def test_png_and_grayscale_inputs_become_rgb():
    buffer = io.BytesIO()
    Image.new("L", (100, 50), color=128).save(buffer, format="PNG")
    face = decode_face(buffer.getvalue(), image_size=32)
    assert face.shape == (32, 32, 3) and (face == 128).all()
    assert sha256_hex(b"abc").startswith("ba7816bf")
