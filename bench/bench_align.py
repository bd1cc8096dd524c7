"""Face-alignment throughput: prep's parallel decode+align pass vs the same work in one process.

Measured in one run, on the same files (the real CelebA sample at --data by default):
- one process: `gendertune.data_prep.pipeline.decode_chunk` called directly on all images, the detector and
  landmark model loaded once: read, decode, detect, find landmarks, warp, write the shard.
- Ray tasks: the same function as prep runs it (`decode_images`: chunks as Ray tasks, at most one
  per core, the models loaded once per worker process), writing the same shards.
- Ray Data: the alternative the design suggests, `map_batches` on an actor pool of the same size,
  each actor holding the models, calling the same per-image function (`decode_one`); its output
  is written as one Parquet folder, a little less work than the per-split shards of the others.
Then the whole prep stage (`run_prep`) with `--align faces` and with `--align none`.

Ray is started and warmed (workers up, the face models loaded) before anything is timed; the
actor pool's start-up is part of the Ray Data time, as it is of a real run. RATIO is one process
/ Ray tasks (goal >= 1.7 on 2 cores); the Ray Data ratio is printed beside it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from benchlib import REPO, format_table, machine_info, private_ray, ratio_line, write_json

from gendertune.cluster.runtime import compute_parallelism
from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.faces import AlignSettings
from gendertune.data_prep.labels import read_labels
from gendertune.data_prep.pipeline import (
    SHARD_SCHEMA,
    decode_chunk,
    decode_images,
    decode_one,
    discover_inputs,
    list_images,
    match_labels,
    run_prep,
)

GOAL = 1.7
LABEL_FILE = "gender_classification.csv"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "celeba-sample"),
        help="CelebA-layout folder or images + CSV (default ../shared/data/celeba-sample)",
    )
    parser.add_argument("--labels", help="label file (default: the sample's gender_classification.csv if present)")
    parser.add_argument("--image-size", type=int, default=64, help="chip size (default 64)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N labelled images (0 = all)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    return parser.parse_args()


def labelled_images(data: Path, labels: str | None, limit: int) -> tuple[pd.DataFrame, str]:
    if not data.is_dir():
        raise SystemExit(f"{data} does not exist; pass --data with a folder of face images")
    labels = labels or (str(data / LABEL_FILE) if (data / LABEL_FILE).is_file() else None)
    inputs = discover_inputs(PrepConfig(data=str(data), labels=labels, out="/nonexistent/bench-align"))
    matched, _ = match_labels(list_images(inputs.image_dir), read_labels(inputs.label_path, "Male"))
    matched = matched.head(limit) if limit else matched
    return matched.assign(identity=-1, hash="", split="train").reset_index(drop=True), str(inputs.label_path)


def chunk_rows(images: pd.DataFrame) -> dict[str, list]:
    """`images` as the rows of one decode_chunk call, the columns decode_images hands each task."""
    return {name: images[name].tolist() for name in [*SHARD_SCHEMA.names[:-1], "path", "split"]}


class AlignActor:
    """Ray Data actor: prep's per-image function, with the face models this process loads once."""

    def __init__(self, image_size: int, align: dict):
        self.image_size, self.align = image_size, AlignSettings.from_dict(align)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        pixels = [
            decode_one(Path(p).read_bytes(), i, image_size=self.image_size, align=self.align)[0]
            for i, p in zip(batch["image_id"], batch["path"])
        ]
        return pd.DataFrame({"image_id": batch["image_id"], "pixels": pixels})


def ray_data_pass(images: pd.DataFrame, out: Path, *, image_size: int, align: dict, actors: int) -> None:
    import ray

    dataset = ray.data.from_pandas(images[["image_id", "path"]]).repartition(actors * 4)
    dataset.map_batches(
        AlignActor,
        fn_constructor_args=(image_size, align),
        batch_format="pandas",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=actors),
    ).write_parquet(str(out))


def timed(fn, *args, **kwargs) -> float:
    return timed_result(fn, *args, **kwargs)[0]


def timed_result(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    args = parse_args()
    images, label_path = labelled_images(Path(args.data), args.labels, args.limit)
    align = PrepConfig(data=args.data, out="x", image_size=args.image_size).align_settings()
    scratch = Path(tempfile.mkdtemp(prefix="gendertune-bench-align-"))
    for folder in ("warm", "one", "tasks"):
        (scratch / folder).mkdir()
    results: dict = {"machine": machine_info(), "images": len(images), "data": args.data, "image_size": args.image_size}
    try:
        with private_ray(scratch) as ray_start_s:
            parallelism = compute_parallelism()
            # Warm-up: every worker process gets its models once, untimed (a real prep pays this once per worker).
            decode_images(
                images.head(8 * parallelism),
                str(scratch / "warm"),
                image_size=args.image_size,
                rows_per_task=4,
                parallelism=parallelism,
                align=align,
            )
            one = timed(
                decode_chunk,
                chunk_rows(images),
                "part-00000.parquet",
                image_size=args.image_size,
                out=str(scratch / "one"),
                align=align.to_dict(),
            )
            tasks = timed(
                decode_images,
                images,
                str(scratch / "tasks"),
                image_size=args.image_size,
                rows_per_task=256,
                parallelism=parallelism,
                align=align,
            )
            actors = timed(
                ray_data_pass,
                images,
                scratch / "data",
                image_size=args.image_size,
                align=align.to_dict(),
                actors=parallelism,
            )
            stage, stage_images = {}, 0
            for mode in ("faces", "none"):  # the whole --data folder: run_prep has no --limit
                config = PrepConfig.from_dict(
                    {
                        "data": args.data,
                        "labels": label_path,
                        "out": str(scratch / f"prep-{mode}"),
                        "image_size": args.image_size,
                        "align": mode,
                        "split": "random",
                    }
                )
                stage[mode], manifest = timed_result(run_prep, config)
                stage_images = manifest["images_found"]
        n = len(images)
        rows = [
            ("one process", one, n / one, 1.0),
            ("Ray tasks (prep)", tasks, n / tasks, one / tasks),
            ("Ray Data actor pool", actors, n / actors, one / actors),
            ("prep --align faces", stage["faces"], stage_images / stage["faces"], float("nan")),
            ("prep --align none", stage["none"], stage_images / stage["none"], float("nan")),
        ]
        print(
            f"{n} images from {args.data}, {args.image_size} px chips, {parallelism} parallel; "
            f"Ray start-up {ray_start_s:.1f} s (not counted)"
        )
        print(format_table(["pass", "seconds", "img/s", "speed-up"], rows))
        print(f"prep --align faces / --align none wall time: {stage['faces'] / stage['none']:.2f}x")
        print(ratio_line("align one-process/ray-tasks", one / tasks, GOAL))
        print(f"(Ray Data actor pool: {one / actors:.2f}x)")
        results.update(
            {
                "one_process_s": one,
                "ray_tasks_s": tasks,
                "ray_data_s": actors,
                "prep_faces_s": stage["faces"],
                "prep_none_s": stage["none"],
                "ratio": one / tasks,
                "ratio_ray_data": one / actors,
            }
        )
        write_json(args.json, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
