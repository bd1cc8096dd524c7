"""Apply the prep stage with Ray Data: list, label, decode+hash in parallel, dedupe, split, write.

Two streaming passes, never the whole dataset in driver memory:
1. `decode_batch` runs as Ray tasks over chunks of (image_id, path) rows: read bytes, SHA-256,
   decode/verify, crop, resize. Results go to a staging Parquet inside the (not yet visible)
   output directory. Only the small columns (image_id, hash, reason) come back to the driver.
2. The driver dedupes and splits those rows (pure functions), then a second Ray pass re-reads the
   staging Parquet, keeps the chosen rows and writes them per split.
The whole output directory is renamed into place at the end (cluster.storage.atomic_output_dir).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray

from cluster.runtime import compute_parallelism, ensure_ray
from cluster.shared_storage import require_shared
from cluster.storage import atomic_output_dir, write_json_atomic, write_text_atomic
from data_prep import layout
from data_prep.config import PrepConfig
from data_prep.dedupe import find_duplicates
from data_prep.errors import PrepInputError
from data_prep.images import ImageRejected, decode_face, sha256_hex
from data_prep.labels import read_identity_file, read_labels, read_partition_file
from data_prep.splits import assign_splits
from tuning.plots import plot_class_distribution

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_IDENTITY_FILE = "identity_CelebA.txt"


@dataclass(frozen=True)
class PrepInputs:
    image_dir: Path
    label_path: Path
    partition_path: Path | None
    identity_path: Path | None


def discover_inputs(config: PrepConfig) -> PrepInputs:
    """Find the image folder and label/partition/identity files from --data and --labels."""
    data = Path(config.data)
    if not data.is_dir():
        raise PrepInputError(f"data folder {data} does not exist; pass --data DIR with your images")
    image_dir = data / CELEBA_IMAGE_DIR if (data / CELEBA_IMAGE_DIR).is_dir() else data
    if config.labels:
        label_path = Path(config.labels)
    elif (data / CELEBA_ATTR_FILE).is_file():
        label_path = data / CELEBA_ATTR_FILE
    else:
        csvs = sorted(data.glob("*.csv"))
        if len(csvs) != 1:
            raise PrepInputError(
                f"{data}: no {CELEBA_ATTR_FILE} and {len(csvs)} CSV files; pass --labels FILE"
            )
        label_path = csvs[0]
    out = Path(config.out).absolute()
    if out == image_dir.absolute() or image_dir.absolute() in out.parents:
        raise PrepInputError(f"--out {out} is inside the image folder {image_dir}; write it elsewhere")
    partition = data / CELEBA_PARTITION_FILE
    identity = data / CELEBA_IDENTITY_FILE
    return PrepInputs(
        image_dir=image_dir,
        label_path=label_path,
        partition_path=partition if partition.is_file() else None,
        identity_path=identity if identity.is_file() else None,
    )


def list_images(image_dir: Path) -> pd.DataFrame:
    """Every image file below `image_dir` as (image_id = relative POSIX path, path)."""
    rows = []
    for root, _dirs, files in os.walk(image_dir):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(root) / name
                rows.append((path.relative_to(image_dir).as_posix(), str(path)))
    return pd.DataFrame(rows, columns=["image_id", "path"]).sort_values("image_id", ignore_index=True)


def match_labels(found: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Inner-join images and labels; count what each side had that the other lacked."""
    merged = found.merge(labels, on="image_id", how="outer", indicator=True)
    counts = {
        "images_found": len(found),
        "unlabeled_images": int((merged["_merge"] == "left_only").sum()),
        "labels_without_image": int((merged["_merge"] == "right_only").sum()),
    }
    matched = merged[merged["_merge"] == "both"].drop(columns="_merge")
    matched["label"] = matched["label"].astype("int8")
    return matched.sort_values("image_id", ignore_index=True), counts


def decode_batch(batch: pd.DataFrame, *, image_size: int) -> pd.DataFrame:
    """Ray task body: hash and decode each file of the batch; failures become a reason string."""
    hashes, pixels, reasons = [], [], []
    for path in batch["path"]:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            hashes.append("")
            pixels.append(b"")
            reasons.append(f"unreadable file: {err.strerror or err}")
            continue
        hashes.append(sha256_hex(data))
        try:
            pixels.append(decode_face(data, image_size=image_size).tobytes())
            reasons.append("")
        except ImageRejected as rejected:
            pixels.append(b"")
            reasons.append(str(rejected))
    return pd.DataFrame(
        {
            "image_id": batch["image_id"].to_numpy(),
            "label": batch["label"].to_numpy(dtype="int8"),
            "identity": batch["identity"].to_numpy(dtype="int64"),
            "hash": hashes,
            "reason": reasons,
            "pixels": pixels,
        }
    )


def keep_split_rows(batch: pd.DataFrame, *, split_of: dict[str, str]) -> pd.DataFrame:
    """Ray task body of pass 2: drop rejected/duplicate rows and tag the rest with their split."""
    split = batch["image_id"].map(split_of)
    kept = batch.loc[split.notna(), list(layout.PARQUET_COLUMNS)].copy()
    kept["split"] = split[split.notna()].to_numpy()
    return kept


def class_names_for(attribute: str) -> list[str]:
    """Names for label 0 and 1; the gender attribute gets the seed's Female/Male."""
    return ["Female", "Male"] if attribute == "Male" else [f"not {attribute}", attribute]


def build_manifest(
    config: PrepConfig,
    inputs: PrepInputs,
    counts: dict[str, int],
    kept: pd.DataFrame,
    duplicates: pd.DataFrame,
    n_rejected: int,
) -> dict:
    class_names = class_names_for(config.attribute)
    splits = {}
    for split in [s for s in ("train", "val", "test") if s in set(kept["split"])]:
        labels = kept.loc[kept["split"] == split, "label"]
        splits[split] = {
            "count": int(len(labels)),
            "classes": {name: int((labels == value).sum()) for value, name in enumerate(class_names)},
        }
    known = kept[kept["identity"] >= 0]
    shared_people = int((known.groupby("identity")["split"].nunique() > 1).sum())
    return {
        "format_version": layout.FORMAT_VERSION,
        "attribute": config.attribute,
        "class_names": class_names,
        "image_size": config.image_size,
        "crop": "centre square of the shorter side, then bilinear resize",
        "split_method": config.split,
        "ratios": list(config.ratios) if config.split != "official" else None,
        "seed": config.seed,
        "inputs": {
            "images": str(inputs.image_dir),
            "labels": str(inputs.label_path),
            "partition": str(inputs.partition_path) if inputs.partition_path else None,
            "identity": str(inputs.identity_path) if inputs.identity_path else None,
        },
        **counts,
        "rejected": n_rejected,
        "duplicates_dropped": int(len(duplicates)),
        "duplicate_label_conflicts": int(duplicates["label_conflict"].sum()),
        "kept": int(len(kept)),
        # Identities that appear in more than one split: a leak that inflates test accuracy.
        "identities_in_several_splits": shared_people if len(known) else None,
        "splits": splits,
    }


def format_summary(manifest: dict, seconds: float) -> str:
    lines = [
        f"images found {manifest['images_found']}, labels without image {manifest['labels_without_image']}, "
        f"unlabeled images {manifest['unlabeled_images']}",
        f"rejected {manifest['rejected']}, duplicates dropped {manifest['duplicates_dropped']}, "
        f"kept {manifest['kept']} ({manifest['image_size']} px, {manifest['split_method']} split)",
    ]
    for split, info in manifest["splits"].items():
        classes = ", ".join(
            f"{name} {n} ({n / max(info['count'], 1):.1%})" for name, n in info["classes"].items()
        )
        lines.append(f"  {split:<5} {info['count']:>7}  {classes}")
    if manifest["identities_in_several_splits"]:
        lines.append(
            f"warning: {manifest['identities_in_several_splits']} people appear in more than one split; "
            "use --split identity or official for an honest test score"
        )
    lines.append(f"done in {seconds:.1f}s")
    return "\n".join(lines)


def _load_tables(config: PrepConfig, inputs: PrepInputs) -> tuple[pd.DataFrame, dict[str, int], pd.Series | None]:
    labels = read_labels(inputs.label_path, config.attribute, config.image_column)
    found = list_images(inputs.image_dir)
    if found.empty:
        raise PrepInputError(
            f"{inputs.image_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found"
        )
    matched, counts = match_labels(found, labels)
    if matched.empty:
        raise PrepInputError(
            f"none of the {len(found)} images in {inputs.image_dir} has a label in {inputs.label_path} "
            f"(e.g. image {found['image_id'].iloc[0]!r} vs label {labels['image_id'].iloc[0]!r}); "
            "check that the label file names the images relative to the image folder"
        )
    if config.split == "identity" and inputs.identity_path is None:
        raise PrepInputError(
            f"--split identity needs {CELEBA_IDENTITY_FILE} ('image_id person_id' lines) in {config.data}"
        )
    identity = read_identity_file(inputs.identity_path) if inputs.identity_path else None
    matched["identity"] = (
        matched["image_id"].map(identity).fillna(-1).astype("int64") if identity is not None else -1
    )
    if config.split == "identity" and (matched["identity"] < 0).any():
        missing = matched.loc[matched["identity"] < 0, "image_id"]
        raise PrepInputError(
            f"{inputs.identity_path}: {len(missing)} labelled image(s) have no identity (e.g. {missing.iloc[0]})"
        )
    partition = read_partition_file(inputs.partition_path) if inputs.partition_path else None
    return matched, counts, partition


def run_prep(config: PrepConfig, *, log=print) -> dict:
    """Run the whole stage; returns the manifest. Raises PrepInputError for unusable input."""
    started = time.perf_counter()
    inputs = discover_inputs(config)
    matched, counts, partition = _load_tables(config, inputs)
    if config.split == "official" and partition is None:
        raise PrepInputError(f"--split official needs {CELEBA_PARTITION_FILE} in {config.data}")
    log(f"{len(matched)} labelled images to process from {inputs.image_dir}")

    ensure_ray()
    require_shared(reads=[str(inputs.image_dir)], writes=[config.out])
    with atomic_output_dir(config.out, marker=layout.MANIFEST, overwrite=config.overwrite) as out:
        staging = out / "_staging"
        parallelism = compute_parallelism(config.parallelism)
        # At most rows_per_task per task, but at least two tasks per core so small inputs still
        # use every core.
        rows = max(1, min(config.rows_per_task, -(-len(matched) // (2 * parallelism))))
        chunks = [matched.iloc[i : i + rows] for i in range(0, len(matched), rows)]
        decoded = ray.data.from_pandas(chunks).map_batches(
            decode_batch,
            fn_kwargs={"image_size": config.image_size},
            batch_format="pandas",
            batch_size=None,
            compute=ray.data.TaskPoolStrategy(size=parallelism),
        )
        decoded.write_parquet(str(staging))

        # Only three small columns come back; Parquet's column projection skips the pixels.
        results = pq.read_table(staging, columns=["image_id", "hash", "reason"]).to_pandas()
        results = results.merge(matched[["image_id", "path", "label", "identity"]], on="image_id")
        rejected = results.loc[results["reason"] != "", ["image_id", "path", "reason"]].sort_values("image_id")
        kept, duplicates = find_duplicates(results[results["reason"] == ""])
        if kept.empty:
            raise PrepInputError(f"all {len(results)} labelled images were rejected; see the reasons, e.g. {rejected['reason'].iloc[0]}")
        kept["split"] = assign_splits(
            kept, method=config.split, ratios=config.ratios, seed=config.seed,
            partition=partition, partition_path=str(inputs.partition_path),
        ).to_numpy()
        for split in ("train", "test") if config.split != "official" else ("train",):
            if not (kept["split"] == split).any():
                raise PrepInputError(
                    f"the {split} split is empty after filtering ({len(kept)} images kept); "
                    "use more images or other --ratios"
                )

        split_of = dict(zip(kept["image_id"], kept["split"]))
        ray.data.read_parquet(str(staging)).map_batches(
            keep_split_rows, fn_kwargs={"split_of": split_of}, batch_format="pandas", batch_size=None
        ).write_parquet(str(out / "_splits"), partition_cols=["split"])
        for part in sorted((out / "_splits").iterdir()):
            part.rename(out / part.name.removeprefix("split="))
        shutil.rmtree(out / "_splits")
        shutil.rmtree(staging)

        manifest = build_manifest(config, inputs, counts, kept, duplicates, len(rejected))
        kept[["image_id", "label", "split", "identity", "hash"]].to_csv(out / layout.LABELS, index=False)
        duplicates.to_csv(out / layout.DUPLICATES, index=False)
        rejected.to_csv(out / layout.REJECTED, index=False)
        write_text_atomic(out / layout.CONFIG, config.to_json())
        plot_class_distribution(
            {s: info["classes"] for s, info in manifest["splits"].items()},
            out / layout.CLASS_PLOT,
            class_names=tuple(manifest["class_names"]),
        )
        # The manifest goes last: together with the atomic rename it marks the output complete.
        write_json_atomic(out / layout.MANIFEST, manifest)
    log(format_summary(manifest, time.perf_counter() - started))
    return manifest
