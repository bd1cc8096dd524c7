"""The prep output layout, shared by the writer (pipeline) and every reader (training, predict).

    OUT/
      train/*.parquet, [val/*.parquet,] test/*.parquet   one row per kept image:
          image_id (str), label (int8: 1 = attribute present, e.g. Male), identity (int64, -1 unknown),
          hash (sha256 hex of the original file), pixels (binary: image_size^2 * 3 uint8, RGB, HWC)
      labels.csv        image_id,label,split,identity,hash for every kept image, sorted
      duplicates.csv    kept_id,dropped_id,hash,label_conflict
      rejected.csv      image_id,path,reason
      slices.csv        image_id plus the label file's other columns (CelebA's other attributes as
                        yes/no, a CSV's own columns) for every kept image: evaluation's groups
      faces.csv         with --align faces: per decoded image the alignment taken (aligned,
                        centre_crop, no_face_rejected), faces found, detector and score, the
                        largest face's box (x, y, w, h) and five landmarks, in photo pixels
      manifest.json     counts (see `pipeline.build_manifest`), image_size, class names, splits
      config.json       the resolved PrepConfig
      environment.json  what produced it: versions, git commit, CPU/GPU, Ray resources
                        (gendertune.cluster.environment)
      class_distribution.png
The directory appears atomically, so its existence means it is complete. OUT may also be an
object-store URI (gendertune.cluster.storage); there manifest.json is the last object written.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gendertune.cluster import storage
from gendertune.data_prep.errors import PrepInputError

MANIFEST = "manifest.json"
CONFIG = "config.json"
LABELS = "labels.csv"
DUPLICATES = "duplicates.csv"
REJECTED = "rejected.csv"
FACES = "faces.csv"
SLICES = "slices.csv"
CLASS_PLOT = "class_distribution.png"
FORMAT_VERSION = 3  # 2: face alignment (manifest.alignment, faces.csv); 3: slices.csv
PARQUET_COLUMNS = ("image_id", "label", "identity", "hash", "pixels")
SPLITS = ("train", "val", "test")
# What readers take from manifest.json, and its type (alignment: a dict, or None for centre crops).
MANIFEST_FIELDS = {
    "attribute": str,
    "class_names": list,
    "image_size": int,
    "alignment": (dict, type(None)),
    "splits": dict,
}


@dataclass(frozen=True)
class PreparedData:
    """A validated prep output directory."""

    root: str  # an absolute local path or an object-store URI
    manifest: dict

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def alignment(self) -> dict | None:
        """The AlignSettings the chips were made with, as a dict; None = centre-square crops."""
        return self.manifest["alignment"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split_dir(self, split: str) -> str:
        return storage.join(self.root, split)


def open_prepared(path: str | Path) -> PreparedData:
    """Check that `path` (a folder or URI) is a complete prep output and read its manifest."""
    root = storage.absolute(path)
    manifest_path = storage.join(root, MANIFEST)
    if not storage.is_file(manifest_path):
        raise PrepInputError(
            f"{path} is not a prepared dataset (no {MANIFEST}); run `gendertune prep --data ... --out {path}` first"
        )
    try:
        manifest = json.loads(storage.read_text(manifest_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepInputError(f"{manifest_path} is not valid JSON ({err}); re-run `gendertune prep`") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise PrepInputError(
            f"{manifest_path}: format version {version} is not {FORMAT_VERSION}; "
            "re-run `gendertune prep` with this version"
        )
    _check_manifest(manifest, manifest_path)
    prepared = PreparedData(root=root, manifest=manifest)
    _check_shards(prepared)
    return prepared


def _check_manifest(manifest: dict, path: str) -> None:
    """The fields every reader relies on, with their types: an edited manifest fails here, in one
    line, not as a KeyError deep in a stage."""
    problems = [key for key, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(key), kind)]
    names = manifest.get("class_names")
    if not problems and (len(names) != 2 or not all(isinstance(n, str) for n in names)):
        problems.append("class_names")
    splits = manifest.get("splits") if "splits" not in problems else {}
    bad_splits = [
        s
        for s, info in splits.items()
        if s not in SPLITS
        or not isinstance(info, dict)
        or not isinstance(info.get("count"), int)
        or isinstance(info.get("count"), bool)
    ]
    if not problems and ("train" not in splits or bad_splits):
        problems.append("splits")
    if problems:
        raise PrepInputError(
            f"{path}: missing or malformed {', '.join(problems)}; this is not the manifest "
            "`gendertune prep` wrote: re-run it"
        )


def _check_shards(prepared: PreparedData) -> None:
    """Every split's Parquet footers readable and their rows adding up to the manifest's count:
    a truncated or missing shard fails before any Ray work starts, not inside a training worker."""
    for split, info in prepared.manifest["splits"].items():
        fs, folder = storage.resolve(prepared.split_dir(split))
        shards = [name for name in storage.list_files(prepared.split_dir(split)) if name.endswith(".parquet")]
        rows = 0
        for name in shards:
            try:
                with fs.open_input_file(f"{folder}/{name}") as handle:
                    rows += pq.read_metadata(handle).num_rows
            except (pa.ArrowException, OSError) as err:
                raise PrepInputError(
                    f"{prepared.split_dir(split)}/{name} is not a readable Parquet file ({err}); "
                    "the prep output is damaged: re-run `gendertune prep --overwrite`"
                ) from None
        if rows != info["count"]:
            raise PrepInputError(
                f"{prepared.split_dir(split)}: {rows} rows in {len(shards)} shard(s), but "
                f"{MANIFEST} says {info['count']}; the prep output is damaged: re-run `gendertune prep "
                "--overwrite`"
            )


def read_slices(prepared: PreparedData) -> pd.DataFrame | None:
    """slices.csv (image_id + group columns, as strings), or None when the labels had no other columns."""
    table = pd.read_csv(
        io.BytesIO(storage.read_bytes(storage.join(prepared.root, SLICES))),
        dtype=str,
        keep_default_na=False,
        na_values=[""],
    )
    return table if len(table.columns) > 1 else None
