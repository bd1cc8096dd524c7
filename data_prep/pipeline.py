"""Apply the prep stage with Ray tasks: list, label, hash, dedupe, split, then decode, align and write.

Two parallel passes over contiguous chunks of the image list, one Ray task per chunk and at most
one task per core at a time (`run_tasks`); the driver only ever holds ids, labels and hashes:
1. `hash_chunk` reads and SHA-256s every file, a few percent of the cost of decoding it. With every
   hash known the driver dedupes and assigns splits (pure functions) before any pixel exists.
2. `decode_chunk` decodes the chunk's kept images, aligns each one's largest face onto the
   template (gendertune.data_prep.faces; or crops the centre square with --align none), and writes the chips
   straight into the final per-split shards (OUT/<split>/part-NNNNN.parquet, uncompressed:
   decoded pixels barely compress). Images that fail come back as (image_id, reason) only, with
   a faces.csv row per aligned image. The face models load once per worker process (Ray reuses
   workers between tasks); bench/bench_align.py measured these tasks against a Ray Data actor
   pool doing the same per-image work (README: Face alignment).
So no staging copy of the pixels is written and read back, and no task does per-row pandas work.
Because splits are assigned over the distinct readable files before decoding, an image that then
fails to decode leaves its split one image short rather than reshuffling every other image.
The whole output directory is renamed into place at the end (gendertune.cluster.storage.atomic_output_dir);
an object-store --out gets the shards directly and the manifest last (gendertune.cluster.storage.fresh_output).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gendertune.base.plots import plot_class_distribution
from gendertune.cluster import storage
from gendertune.cluster.environment import write_environment
from gendertune.cluster.runtime import compute_parallelism, ensure_ray
from gendertune.cluster.shared_storage import require_shared
from gendertune.cluster.storage import write_json_atomic, write_text_atomic
from gendertune.cluster.tasks import Progress, run_tasks
from gendertune.data_prep import celeba, layout
from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.dedupe import find_duplicates
from gendertune.data_prep.errors import PrepInputError
from gendertune.data_prep.faces import NO_DETECTION, AlignSettings, Face, FaceFinder, face_chips
from gendertune.data_prep.images import (
    IMAGE_EXTENSIONS,
    ImageRejected,
    decode_face_bytes,
    load_photo,
    sha256_hex,
    unreadable_reason,
)
from gendertune.data_prep.labels import read_identity_file, read_labels, read_partition_file, read_slice_columns
from gendertune.data_prep.splits import assign_splits

logger = logging.getLogger(__name__)


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
    image_dir = data / celeba.IMAGE_DIR if (data / celeba.IMAGE_DIR).is_dir() else data
    if config.labels:
        label_path = Path(config.labels)
    elif (data / celeba.ATTR_FILE).is_file():
        label_path = data / celeba.ATTR_FILE
    else:
        csvs = sorted(data.glob("*.csv"))
        if len(csvs) != 1:
            raise PrepInputError(f"{data}: no {celeba.ATTR_FILE} and {len(csvs)} CSV files; pass --labels FILE")
        label_path = csvs[0]
    out = Path(config.out).absolute()
    if not storage.is_uri(config.out) and (out == image_dir.absolute() or image_dir.absolute() in out.parents):
        raise PrepInputError(f"--out {out} is inside the image folder {image_dir}; write it elsewhere")
    partition = data / celeba.PARTITION_FILE
    identity = data / celeba.IDENTITY_FILE
    return PrepInputs(
        image_dir=image_dir,
        label_path=label_path,
        partition_path=partition if partition.is_file() else None,
        identity_path=identity if identity.is_file() else None,
    )


def list_images(image_dir: Path) -> pd.DataFrame:
    """Every image file below `image_dir` as (image_id = relative POSIX path, path).

    String joins, not a Path per file: Path parsing made listing a visible share of the stage."""
    rows = []
    for root, _dirs, files in os.walk(image_dir):
        folder = Path(root).relative_to(image_dir).as_posix()
        prefix = "" if folder == "." else folder + "/"
        rows.extend(
            (prefix + name, os.path.join(root, name))
            for name in files
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
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


# layout.PARQUET_COLUMNS with their types (the strings as Ray Data wrote them before); pixels last.
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.large_string()),
        ("label", pa.int8()),
        ("identity", pa.int64()),
        ("hash", pa.large_string()),
        ("pixels", pa.binary()),
    ]
)
# A decode task holds its chunk's pixels until it writes them; this caps that at large image sizes.
MAX_TASK_PIXEL_BYTES = 256 * 2**20


def read_error(err: OSError) -> str:
    return f"unreadable file: {err.strerror or err}"


def refusal(path: str, image_dir: str) -> str:
    """Why `path` must not be read at all ("" when it may): reading a FIFO blocks forever, a
    device or a huge file has no image worth the memory, and a symlink out of the data folder is
    the `../` escape the label files are checked for."""
    reason = unreadable_reason(path)
    if reason:
        return reason
    if os.path.islink(path) and not os.path.realpath(path).startswith(os.path.realpath(image_dir) + os.sep):
        return "a symlink leading out of the data folder"
    return ""


def hash_chunk(paths: Sequence[str], image_dir: str) -> tuple[list[str], list[str]]:
    """Ray task body of pass 1: each file's SHA-256 and "", or "" and why it could not be read."""
    hashes, errors = [], []
    for path in paths:
        try:
            refused = refusal(path, image_dir)
            data = b"" if refused else Path(path).read_bytes()
        except OSError as err:
            refused = read_error(err)
        if refused:
            hashes.append("")
            errors.append(refused)
            continue
        hashes.append(sha256_hex(data))
        errors.append("")
    return hashes, errors


# faces.csv: one row per image that was decoded; the five points in the order of the landmark
# model's template (gendertune.data_prep.faces.LANDMARK_MODELS: which points depends on the model).
LANDMARK_COLUMNS = [f"point{number}_{axis}" for number in range(1, 6) for axis in ("x", "y")]
FACE_COLUMNS = [
    "image_id",
    "alignment",
    "faces_found",
    "detector",
    "detector_score",
    "x",
    "y",
    "w",
    "h",
    *LANDMARK_COLUMNS,
]


@functools.lru_cache(maxsize=2)
def _face_finder(detector: str, landmarks: str) -> FaceFinder:
    """One FaceFinder per worker process: Ray reuses workers between tasks, so the models load
    once per process, not once per task or image."""
    return FaceFinder(detector, landmarks)


def face_row(image_id: str, alignment: str, faces_found: int, face: Face | None) -> tuple:
    if face is None:
        return (
            image_id,
            alignment,
            faces_found,
            NO_DETECTION,
            np.nan,
            *[np.nan] * 4,
            *[np.nan] * len(LANDMARK_COLUMNS),
        )
    return (image_id, alignment, faces_found, face.detector, face.score, *face.box, *face.landmarks.ravel().tolist())


def decode_one(
    data: bytes, image_id: str, *, image_size: int, align: AlignSettings | None
) -> tuple[bytes | None, tuple | None]:
    """One image's chip bytes (None: rejected for having no face) and its faces.csv row (None
    without alignment). Raises ImageRejected for data that is no usable image."""
    if align is None:
        return decode_face_bytes(data, image_size=image_size), None
    chips, found = face_chips(load_photo(data), _face_finder(align.detector, align.landmarks), align, every_face=False)
    if not chips:
        return None, face_row(image_id, "no_face_rejected", 0, None)
    return chips[0].chip.tobytes(), face_row(image_id, chips[0].path, found, chips[0].face)


def decode_chunk(
    rows: dict[str, list], shard: str, *, image_size: int, out: str, align: dict | None = None
) -> tuple[list[tuple[str, str]], list[tuple]]:
    """Ray task body of pass 2: decode (and align) the chunk's images and write them into
    out/<split>/`shard`.

    `rows` holds the SHARD_SCHEMA columns except pixels, plus path and split. Returns
    (image_id, reason) for every image that failed, which are left out of the shards, and the
    faces.csv rows of the chunk (empty without alignment).
    """
    settings = AlignSettings.from_dict(align) if align else None
    by_split: dict[str, tuple[list[int], list[bytes]]] = {}
    failed, faces = [], []
    for i, (image_id, path, split) in enumerate(zip(rows["image_id"], rows["path"], rows["split"])):
        try:
            chip, face = decode_one(Path(path).read_bytes(), image_id, image_size=image_size, align=settings)
        except OSError as err:
            failed.append((image_id, read_error(err)))
            continue
        except ImageRejected as rejected:
            failed.append((image_id, str(rejected)))
            continue
        if face is not None:
            faces.append(face)
        if chip is None:
            failed.append((image_id, "no face found (--no-face reject)"))
            continue
        indices, chips = by_split.setdefault(split, ([], []))
        indices.append(i)
        chips.append(chip)
    for split, (indices, chips) in sorted(by_split.items()):
        write_shard(shard_table(rows, indices, chips), storage.join(out, split, shard))
    return failed, faces


def shard_table(rows: dict[str, list], indices: list[int], faces: list[bytes]) -> pa.Table:
    """The SHARD_SCHEMA table of `rows` at `indices`, with their equally long `faces` as pixels.

    The pixel column is one joined buffer plus computed offsets: `pa.array(faces)` grows its buffer
    by copying, which cost more than writing the file."""
    offsets = np.arange(len(faces) + 1, dtype=np.int32) * len(faces[0])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(faces))]
    pixels = pa.Array.from_buffers(pa.binary(), len(faces), buffers)
    columns = [pa.array([rows[field.name][i] for i in indices], field.type) for field in list(SHARD_SCHEMA)[:-1]]
    return pa.Table.from_arrays([*columns, pixels], schema=SHARD_SCHEMA)


def write_shard(table: pa.Table, location: str) -> None:
    """Write one Parquet shard (to a file or an object-store URI) without compression, dictionaries
    or statistics: pixels are nearly incompressible, and encoding them costs more time than it saves."""
    with storage.open_output(location) as stream:
        pq.write_table(table, stream, compression="none", use_dictionary=False, write_statistics=False)


def chunk_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive chunks of at most `rows` rows covering range(n)."""
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def hash_images(matched: pd.DataFrame, image_dir: Path, *, parallelism: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pass 1: `matched` with a hash column for the readable files, and (image_id, reason) for the rest.

    Two chunks per core: hashing is cheap, so one task's start-up is worth a big chunk."""
    paths = matched["path"].tolist()
    bounds = chunk_bounds(len(paths), -(-len(paths) // (2 * parallelism)))
    results = run_tasks(
        hash_chunk,
        [(paths[a:b], str(image_dir)) for a, b in bounds],
        parallelism=parallelism,
        on_done=Progress("hash", [b - a for a, b in bounds]),
    )
    hashes = np.array([h for chunk_hashes, _ in results for h in chunk_hashes], dtype=object)
    errors = np.array([e for _, chunk_errors in results for e in chunk_errors], dtype=object)
    ok = errors == ""
    unreadable = pd.DataFrame({"image_id": matched["image_id"].to_numpy()[~ok], "reason": errors[~ok]})
    return matched[ok].assign(hash=hashes[ok]), unreadable


def decode_images(
    kept: pd.DataFrame, out: str, *, image_size: int, rows_per_task: int, parallelism: int, align: AlignSettings | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pass 2: write every decodable kept image into its split's shards; returns (image_id, reason)
    of the rest and the faces.csv table (empty without alignment).

    At most `rows_per_task` images (and MAX_TASK_PIXEL_BYTES of pixels) per task, but at least two
    tasks per core, so a core that finishes early can take over work from a slower one."""
    rows = max(1, min(rows_per_task, MAX_TASK_PIXEL_BYTES // (3 * image_size**2), -(-len(kept) // (2 * parallelism))))
    columns = [*SHARD_SCHEMA.names[:-1], "path", "split"]
    bounds = chunk_bounds(len(kept), rows)
    calls = [
        ({name: kept[name].iloc[a:b].tolist() for name in columns}, f"part-{number:05d}.parquet")
        for number, (a, b) in enumerate(bounds)
    ]
    results = run_tasks(
        decode_chunk,
        calls,
        parallelism=parallelism,
        image_size=image_size,
        out=str(out),
        align=align.to_dict() if align else None,
        on_done=Progress("decode+align" if align else "decode", [b - a for a, b in bounds]),
    )
    failed = pd.DataFrame([row for chunk, _ in results for row in chunk], columns=["image_id", "reason"])
    faces = pd.DataFrame([row for _, chunk in results for row in chunk], columns=FACE_COLUMNS)
    return failed, faces.sort_values("image_id", ignore_index=True)


def settle_failures(
    kept: pd.DataFrame, duplicates: pd.DataFrame, failed: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Drop the images that failed to decode from `kept`, and move their duplicates to the failures.

    Dedupe ran before decoding, so a dropped duplicate of a failed image was never decoded; its
    bytes are identical, so it fails for the same reason. Rejecting it too gives what decoding
    every file would: duplicates.csv only ever names pairs of usable images.
    """
    reason_of = dict(zip(failed["image_id"], failed["reason"]))
    of_failed = duplicates["kept_id"].isin(reason_of)
    copies = pd.DataFrame(
        {
            "image_id": duplicates.loc[of_failed, "dropped_id"].to_numpy(),
            "reason": duplicates.loc[of_failed, "kept_id"].map(reason_of).to_numpy(),
        }
    )
    return (
        kept[~kept["image_id"].isin(reason_of)].reset_index(drop=True),
        duplicates[~of_failed].reset_index(drop=True),
        pd.concat([failed, copies], ignore_index=True),
    )


def require_some_kept(kept: pd.DataFrame, n_labelled: int, rejected: pd.DataFrame) -> None:
    if kept.empty:
        raise PrepInputError(
            f"all {n_labelled} labelled images were rejected; see the reasons, e.g. {rejected['reason'].iloc[0]}"
        )


def class_names_for(attribute: str) -> list[str]:
    """Names for label 0 and 1; the gender attribute gets the original notebook's Female/Male."""
    return ["Female", "Male"] if attribute == "Male" else [f"not {attribute}", attribute]


def build_manifest(
    config: PrepConfig,
    inputs: PrepInputs,
    counts: dict[str, int],
    kept: pd.DataFrame,
    duplicates: pd.DataFrame,
    n_rejected: int,
    faces: pd.DataFrame,
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
        "crop": (
            "faces aligned by 5 landmarks onto a template (gendertune.data_prep.faces)"
            if config.align == "faces"
            else "centre square of the shorter side, then bilinear resize"
        ),
        "alignment": align.to_dict() if (align := config.align_settings()) else None,
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
        # Over the images that were decoded with alignment (all zero with --align none).
        "faces_aligned": int((faces["alignment"] == "aligned").sum()),
        "no_face": int((faces["faces_found"] == 0).sum()),
        "several_faces": int((faces["faces_found"] > 1).sum()),
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
    if manifest["alignment"]:
        lines.append(
            f"faces aligned {manifest['faces_aligned']}, no face found {manifest['no_face']} "
            f"({manifest['alignment']['no_face']}), several faces {manifest['several_faces']} (largest kept)"
        )
    for split, info in manifest["splits"].items():
        classes = ", ".join(f"{name} {n} ({n / max(info['count'], 1):.1%})" for name, n in info["classes"].items())
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
        raise PrepInputError(f"{inputs.image_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    matched, counts = match_labels(found, labels)
    if matched.empty:
        raise PrepInputError(
            f"none of the {len(found)} images in {inputs.image_dir} has a label in {inputs.label_path} "
            f"(e.g. image {found['image_id'].iloc[0]!r} vs label {labels['image_id'].iloc[0]!r}); "
            "check that the label file names the images relative to the image folder"
        )
    if config.split == "identity" and inputs.identity_path is None:
        raise PrepInputError(
            f"--split identity needs {celeba.IDENTITY_FILE} ('image_id person_id' lines) in {config.data}"
        )
    identity = read_identity_file(inputs.identity_path) if inputs.identity_path else None
    matched["identity"] = matched["image_id"].map(identity).fillna(-1).astype("int64") if identity is not None else -1
    if config.split == "identity" and (matched["identity"] < 0).any():
        missing = matched.loc[matched["identity"] < 0, "image_id"]
        raise PrepInputError(
            f"{inputs.identity_path}: {len(missing)} labelled image(s) have no identity (e.g. {missing.iloc[0]})"
        )
    # Only the official split reads the partition file (200k lines of driver time otherwise).
    partition = (
        read_partition_file(inputs.partition_path) if inputs.partition_path and config.split == "official" else None
    )
    return matched, counts, partition


def run_prep(config: PrepConfig) -> dict:
    """Run the whole stage; returns the manifest. Raises PrepInputError for unusable input."""
    started = time.perf_counter()
    inputs = discover_inputs(config)
    matched, counts, partition = _load_tables(config, inputs)
    if config.split == "official" and partition is None:
        raise PrepInputError(f"--split official needs {celeba.PARTITION_FILE} in {config.data}")
    logger.info(f"{len(matched)} labelled images to process from {inputs.image_dir}")

    # The output first: an --out that exists, or that another run is writing, fails before Ray starts.
    with storage.fresh_output(config.out, stage="prep", marker=layout.MANIFEST, overwrite=config.overwrite) as location:
        ensure_ray()
        require_shared(reads=[str(inputs.image_dir)], writes=[config.out])
        parallelism = compute_parallelism(config.parallelism)
        out = location.local
        readable, unreadable = hash_images(matched, inputs.image_dir, parallelism=parallelism)
        require_some_kept(readable, len(matched), unreadable)
        kept, duplicates = find_duplicates(readable)
        kept["split"] = assign_splits(
            kept,
            method=config.split,
            ratios=config.ratios,
            seed=config.seed,
            partition=partition,
            partition_path=str(inputs.partition_path),
        ).to_numpy()
        failed, faces = decode_images(
            kept,
            location.storage,
            image_size=config.image_size,
            rows_per_task=config.rows_per_task,
            parallelism=parallelism,
            align=config.align_settings(),
        )
        kept, duplicates, failed = settle_failures(kept, duplicates, failed)
        rejected = pd.concat([unreadable, failed]).merge(matched[["image_id", "path"]], on="image_id")
        rejected = rejected[["image_id", "path", "reason"]].sort_values("image_id", ignore_index=True)
        require_some_kept(kept, len(matched), rejected)
        for split in ("train", "test") if config.split != "official" else ("train",):
            if not (kept["split"] == split).any():
                raise PrepInputError(
                    f"the {split} split is empty after filtering ({len(kept)} images kept); "
                    "use more images or other --ratios"
                )

        manifest = build_manifest(config, inputs, counts, kept, duplicates, len(rejected), faces)
        kept[["image_id", "label", "split", "identity", "hash"]].to_csv(out / layout.LABELS, index=False)
        slices = read_slice_columns(inputs.label_path, config.attribute, config.image_column)
        kept[["image_id"]].merge(slices, on="image_id", how="left").to_csv(out / layout.SLICES, index=False)
        duplicates.to_csv(out / layout.DUPLICATES, index=False)
        rejected.to_csv(out / layout.REJECTED, index=False)
        if config.align == "faces":
            faces.to_csv(out / layout.FACES, index=False)
        write_text_atomic(out / layout.CONFIG, config.to_json())
        write_environment(out)
        plot_class_distribution(
            {s: info["classes"] for s, info in manifest["splits"].items()},
            out / layout.CLASS_PLOT,
            class_names=tuple(manifest["class_names"]),
        )
        # The manifest goes last: together with the atomic rename it marks the output complete.
        write_json_atomic(out / layout.MANIFEST, manifest)
    logger.info(format_summary(manifest, time.perf_counter() - started))
    return manifest
