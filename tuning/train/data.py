"""Ray Datasets over a prep output: the train/val/test views a run needs, decoded (gendertune.tuning.train.pixels).

When the prep output has no val split, validation is carved from train — by person when the
identity is known (so validation, like test, never shares people with training), else by image.
The carve is a pure function of each row, so every worker and every re-run agrees on it.
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import ray
import ray.train

from gendertune.base.errors import UserInputError
from gendertune.cluster import storage
from gendertune.data_prep.layout import PreparedData
from gendertune.tuning.train.pixels import decode_pixels

_KNUTH = 2654435761  # multiplicative hash constant: spreads consecutive ids over [0, 2^32)
# Decoded train+val up to this size are computed once and kept in the object store: otherwise
# every epoch re-lists, re-reads and re-decodes the Parquet, which dominates small runs.
CACHE_LIMIT_BYTES = 2 * 1024**3


def in_validation(identity: np.ndarray, file_hash: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of rows that belong to the carved validation set."""
    by_person = ((identity.astype(np.uint64) * _KNUTH) % 2**32) / 2**32
    by_image = np.array([int(h[:8], 16) / 2**32 for h in file_hash]) if len(file_hash) else np.zeros(0)
    return np.where(identity >= 0, by_person, by_image) < fraction


def _carve(batch: dict[str, np.ndarray], *, fraction: float, keep_validation: bool) -> dict[str, np.ndarray]:
    mask = in_validation(batch["identity"], batch["hash"], fraction) == keep_validation
    return {key: value[mask] for key, value in batch.items()}


def _read_split(prepared: PreparedData, split: str, columns: list[str]) -> ray.data.Dataset:
    context = ray.data.DataContext.get_current()
    # Rows in file order, not in the order parallel reads finish: otherwise the seeded shuffle
    # starts from another order in every process, and the same seed trains another model. A
    # dataset keeps the context it was created with.
    context.execution_options.preserve_order = True
    # Ray Data 2.60's default Parquet reader (DataSourceV2) lists files with a thread pool whose
    # completion thread can raise InterruptedError as the pool shuts down: a stray traceback on
    # the console (seen from evaluate_held_out). It also starts a pool of footer-reading actors
    # per read. The V1 reader does neither and reads a prep output's few shards the same way.
    context.use_datasource_v2 = False
    return ray.data.read_parquet(prepared.split_dir(split)).select_columns(columns)


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options (taken from this process's DataContext) with the order kept,
    for the streaming split that feeds its workers. Built here rather than by
    DataConfig.default_ingest_options, which passes the deprecated exclude_resources and so
    printed a RayDeprecationWarning on every run."""
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=True, verbose_progress=current.verbose_progress
    )


def _read(prepared: PreparedData, split: str) -> ray.data.Dataset:
    return _read_split(prepared, split, ["pixels", "label", "identity", "hash"])


def _images(dataset: ray.data.Dataset, image_size: int) -> ray.data.Dataset:
    return dataset.map_batches(decode_pixels, fn_kwargs={"image_size": image_size}, batch_format="numpy")


def training_views(prepared: PreparedData, *, val_fraction: float) -> dict[str, ray.data.Dataset]:
    """Lazy {"train": ..., "val": ...} with `image` and `label` columns; test is not touched."""
    size = prepared.image_size
    if "val" in prepared.splits:
        return {"train": _images(_read(prepared, "train"), size), "val": _images(_read(prepared, "val"), size)}
    train = _read(prepared, "train")
    carve = {"fraction": val_fraction}
    return {
        "train": _images(
            train.map_batches(_carve, fn_kwargs={**carve, "keep_validation": False}, batch_format="numpy"), size
        ),
        "val": _images(
            train.map_batches(_carve, fn_kwargs={**carve, "keep_validation": True}, batch_format="numpy"), size
        ),
    }


def training_datasets(prepared: PreparedData, *, val_fraction: float) -> dict[str, ray.data.Dataset]:
    """`training_views`, computed once and cached in the object store when they fit the limit."""
    datasets = training_views(prepared, val_fraction=val_fraction)
    rows = sum(prepared.manifest["splits"][s]["count"] for s in ("train", "val") if s in prepared.splits)
    if rows * prepared.image_size**2 * 3 <= CACHE_LIMIT_BYTES:
        datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
    return datasets


def test_dataset(prepared: PreparedData) -> ray.data.Dataset:
    """The held-out split with image ids, read once at the very end of a run."""
    if "test" not in prepared.splits:
        raise UserInputError(
            f"{prepared.root} has no test split (splits: {', '.join(prepared.splits)}); "
            "prep with 2 or 3 --ratios, or an official partition that includes test images"
        )
    dataset = _read_split(prepared, "test", ["image_id", "pixels", "label"])

    def decode_keep_ids(batch):
        return {**decode_pixels(batch, image_size=prepared.image_size), "image_id": batch["image_id"]}

    return dataset.map_batches(decode_keep_ids, batch_format="numpy")


def read_split_images(prepared: PreparedData, split: str, image_ids: list[str]) -> list[np.ndarray]:
    """The named images of one split as uint8 H x W x 3 arrays, in the order asked (a few, for a
    figure: read with a filter in this process, no Ray)."""
    if not image_ids:
        return []
    root = prepared.split_dir(split)
    filesystem, path = storage.resolve(root)
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(
        columns=["image_id", "pixels"], filter=pads.field("image_id").isin(image_ids)
    )
    size = prepared.image_size
    found = {
        i: np.frombuffer(b, dtype=np.uint8).reshape(size, size, 3)
        for i, b in zip(table["image_id"].to_pylist(), table["pixels"].to_pylist())
    }
    return [found[i] for i in image_ids]
