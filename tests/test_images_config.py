"""Per-image decoding/cropping and the stage config's validation and precedence."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cluster.config import ConfigError
from data_prep.config import PrepConfig
from data_prep.images import ImageRejected, center_square_crop, decode_face, sha256_hex


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


@pytest.mark.parametrize("size", [64, 128])
def test_decode_face_shape_and_draft_mode_keeps_quality(size):
    data = jpeg_bytes()
    fast = decode_face(data, image_size=size).astype(float)
    full = decode_face(data, image_size=size, draft=False).astype(float)
    assert fast.shape == (size, size, 3)
    psnr = 10 * np.log10(255**2 / max(np.mean((fast - full) ** 2), 1e-9))
    assert psnr > 30, psnr


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


def test_png_and_grayscale_inputs_become_rgb():
    buffer = io.BytesIO()
    Image.new("L", (100, 50), color=128).save(buffer, format="PNG")
    face = decode_face(buffer.getvalue(), image_size=32)
    assert face.shape == (32, 32, 3) and (face == 128).all()
    assert sha256_hex(b"abc").startswith("ba7816bf")


def test_config_rejects_unknown_keys_and_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown prep setting\\(s\\) imagesize"):
        PrepConfig.from_dict({"data": "d", "out": "o", "imagesize": 64})
    with pytest.raises(ConfigError, match="sum to 1"):
        PrepConfig.from_dict({"data": "d", "out": "o", "ratios": [0.8, 0.3]})
    with pytest.raises(ConfigError, match="2 \\(train,test\\) or 3"):
        PrepConfig.from_dict({"data": "d", "out": "o", "ratios": [1.0]})
    with pytest.raises(ConfigError, match="prep.image_size: expected a whole number"):
        PrepConfig.from_dict({"data": "d", "out": "o", "image_size": "big"})
    with pytest.raises(ConfigError, match="prep.split: 'kfold' is not one of"):
        PrepConfig.from_dict({"data": "d", "out": "o", "split": "kfold"})
    with pytest.raises(ConfigError, match="between 16 and 1024"):
        PrepConfig.from_dict({"data": "d", "out": "o", "image_size": 8})


def test_config_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "gt.toml"
    path.write_text('[prep]\nimage_size = 96\nseed = 3\nratios = [0.7, 0.15, 0.15]\n')
    config = PrepConfig.resolve(config_file=path, overrides={"data": "d", "out": "o", "seed": 5, "split": None})
    assert (config.image_size, config.seed, config.ratios, config.split) == (96, 5, (0.7, 0.15, 0.15), "random")
    assert json.loads(config.to_json())["prep"]["image_size"] == 96
    bad = tmp_path / "bad.json"
    bad.write_text('{"prep": {"image_size": 64}, "trian": {}}')
    with pytest.raises(ConfigError, match="unknown section\\(s\\) trian"):
        PrepConfig.resolve(config_file=bad, overrides={"data": "d", "out": "o"})
