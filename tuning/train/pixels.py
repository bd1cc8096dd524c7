"""Prep's Parquet `pixels` bytes as image arrays: plain numpy, no Ray.

`gendertune.tuning.train.data` maps it over its Ray Datasets; benchmarks (bench/gpu_check.py runs where Ray is not
installed) call it directly.
"""

from __future__ import annotations

import numpy as np


def decode_pixels(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Parquet `pixels` bytes -> uint8 N x S x S x 3 `image`; labels as int64."""
    flat = np.frombuffer(b"".join(batch["pixels"]), dtype=np.uint8)
    return {
        "image": flat.reshape(len(batch["pixels"]), image_size, image_size, 3),
        "label": batch["label"].astype(np.int64),
    }
