"""The prep output layout, shared by the writer (pipeline) and every reader (training, predict).

    OUT/
      train/*.parquet, [val/*.parquet,] test/*.parquet   one row per kept image:
          image_id (str), label (int8: 1 = attribute present, e.g. Male), identity (int64, -1 unknown),
          hash (sha256 hex of the original file), pixels (binary: image_size^2 * 3 uint8, RGB, HWC)
      labels.csv        image_id,label,split,identity,hash for every kept image, sorted
      duplicates.csv    kept_id,dropped_id,hash,label_conflict
      rejected.csv      image_id,path,reason
      manifest.json     counts (see `pipeline.build_manifest`), image_size, class names, splits
      config.json       the resolved PrepConfig
      class_distribution.png
The directory appears atomically, so its existence means it is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import PrepInputError

MANIFEST = "manifest.json"
CONFIG = "config.json"
LABELS = "labels.csv"
DUPLICATES = "duplicates.csv"
REJECTED = "rejected.csv"
CLASS_PLOT = "class_distribution.png"
FORMAT_VERSION = 1
PARQUET_COLUMNS = ("image_id", "label", "identity", "hash", "pixels")


@dataclass(frozen=True)
class PreparedData:
    """A validated prep output directory."""

    root: Path
    manifest: dict

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split_dir(self, split: str) -> Path:
        return self.root / split


def open_prepared(path: str | Path) -> PreparedData:
    """Check that `path` is a complete prep output and read its manifest."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PrepInputError(
            f"{root} is not a prepared dataset (no {MANIFEST}); run `gendertune prep --data ... --out {root}` first"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepInputError(
            f"{manifest_path}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}; "
            "re-run `gendertune prep` with this version"
        )
    return PreparedData(root=root, manifest=manifest)
