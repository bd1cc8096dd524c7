"""Training throughput: the Ray Train path vs a plain single-process loop, per precision, in one run.

- ray: `gendertune.tuning.train.run.build_trainer` (a TorchTrainer with 1 worker) fed by Ray Data from a prep
  output, exactly as `gendertune train` runs it.
- plain: the same epoch loop in this process over the same rows, read once with pyarrow and held
  in memory as uint8 tensors (shuffled per epoch by index, the ragged last batch dropped, as the
  Ray path does). No Ray.

Both call the project's own loop, `gendertune.tuning.train.worker.run_epochs` -> `gendertune.tuning.train.engine.train_one_epoch`,
with one TrainConfig: same model, image size, batch size, precision, augmentation, seeds,
optimizer and schedule, and the same torch thread count (`gendertune.tuning.train.run.loop_settings`, i.e.
compute_parallelism() // workers, which the Ray worker passes to torch.set_num_threads). The only
difference is where batches come from and what runs around the loop, which is what the ratio is
about. The number is `train_images_per_s` as the loop reports it: images over the time spent
iterating training batches (waiting for data included; evaluation and checkpoints excluded),
averaged over the epochs after the first (the first pays one-time costs such as oneDNN kernel
selection and, on the Ray side, starting the data pipeline). Ray's per-run start-up (worker group,
datasets) is reported as wall time, outside the ratio.

Data: a generated SYNTHETIC sample prepped at --image-size into a temporary folder (removed at the
end), or an existing prep output with --prep DIR (its train rows must fit in memory).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch
from benchlib import format_table, machine_info, private_ray, ratio_line, str_list, write_json
from torch import Tensor

from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.layout import PreparedData, open_prepared
from gendertune.data_prep.pipeline import run_prep
from gendertune.data_prep.synthetic import make_sample
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.data import in_validation
from gendertune.tuning.train.engine import select_precision
from gendertune.tuning.train.pixels import decode_pixels
from gendertune.tuning.train.run import build_trainer, load_checkpoint_state, loop_settings
from gendertune.tuning.train.worker import run_epochs

GOAL = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="registry model (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="training image size (default 64)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per path, >= 2 (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument(
        "--precision",
        type=str_list,
        default=["fp32", "bf16"],
        help="comma-separated precisions to compare (default fp32,bf16)",
    )
    parser.add_argument("--prep", help="an existing prep output to train on (default: prep a synthetic sample)")
    parser.add_argument("--sample-n", type=int, default=1500, help="images in the synthetic sample (default 1500)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --sample-n 200 --image-size 32 --epochs 2 --batch-size 16 --precision fp32",
    )
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.sample_n, args.image_size, args.epochs, args.batch_size, args.precision = 200, 32, 2, 16, ["fp32"]
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is excluded from the average")
    return args


class InMemorySession:
    """`gendertune.tuning.train.worker.TrainSession` for one process over in-memory tensors: no Ray, no DDP."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
        self.splits = splits
        self.reports: list[dict] = []

    def restored_state(self) -> None:
        return None

    def batches(self, split: str, *, batch_size: int, shuffle_seed: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.splits[split]
        if shuffle_seed is None:
            chunks = torch.arange(len(labels)).split(batch_size)
        else:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(shuffle_seed))
            chunks = [c for c in order.split(batch_size) if len(c) == batch_size]
        for index in chunks:
            yield images[index], labels[index]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def in_memory(prepared: PreparedData, split: str, *, val_fraction: float) -> tuple[Tensor, Tensor]:
    """The rows that `gendertune.tuning.train.data.training_datasets` streams to the Ray path as `split` ("train" or
    "val"), read with pyarrow: prep's own split, else the carve from train that it makes."""
    has_val = "val" in prepared.splits
    table = pq.read_table(
        prepared.split_dir(split if has_val else "train"), columns=["pixels", "label", "identity", "hash"]
    )
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    if not has_val:
        keep = in_validation(columns["identity"], columns["hash"], val_fraction) == (split == "val")
        columns = {name: values[keep] for name, values in columns.items()}
    decoded = decode_pixels(columns, image_size=prepared.image_size)
    return torch.from_numpy(decoded["image"].copy()), torch.from_numpy(decoded["label"])


def steady_rate(history: list[dict]) -> float:
    return statistics.fmean(row["train_images_per_s"] for row in history[1:])


def run_ray(config: TrainConfig, prepared: PreparedData, storage: Path) -> tuple[list[dict], float]:
    started = time.perf_counter()
    result = build_trainer(config, prepared, storage_path=str(storage), name=f"bench-{config.precision}").fit()
    wall = time.perf_counter() - started
    if result.error:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    return load_checkpoint_state(result.checkpoint)["history"], wall


def run_plain(
    config: TrainConfig, prepared: PreparedData, splits: dict[str, tuple[Tensor, Tensor]]
) -> tuple[list[dict], float]:
    settings = loop_settings(config, prepared)
    torch.set_num_threads(settings["threads_per_worker"])
    session = InMemorySession(splits)
    started = time.perf_counter()
    run_epochs(config, image_size=settings["image_size"], steps_per_epoch=settings["steps_per_epoch"], session=session)
    return session.reports, time.perf_counter() - started


def prep_sample(scratch: Path, n: int, image_size: int) -> Path:
    sample = make_sample(scratch / "sample", n=n, seed=0).path
    out = scratch / "prep"
    run_prep(
        PrepConfig.from_dict(
            {"data": str(sample), "out": str(out), "image_size": image_size, "ratios": [0.8, 0.1, 0.1]}
        )
    )
    return out


def main() -> None:
    args = parse_args()
    report = {
        "benchmark": "train",
        "goal": GOAL,
        "machine": machine_info(),
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="gendertune-bench-train-") as tmp:
        scratch = Path(tmp)
        with private_ray(scratch) as startup:
            report["ray_startup_s"] = startup
            prep_dir = Path(args.prep) if args.prep else prep_sample(scratch, args.sample_n, args.image_size)
            report["data"] = str(prep_dir) if args.prep else f"SYNTHETIC sample of {args.sample_n} images"
            prepared = open_prepared(prep_dir)
            base = {
                "data": str(prep_dir),
                "out": str(scratch / "unused"),
                "model": args.model,
                "workers": 1,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "image_size": args.image_size,
            }
            config = TrainConfig.from_dict(base)
            splits = {name: in_memory(prepared, name, val_fraction=config.val_fraction) for name in ("train", "val")}
            report["train_rows"] = len(splits["train"][1])
            report["torch_threads"] = loop_settings(config, prepared)["threads_per_worker"]
            print(
                f"data: {report['data']}; {report['train_rows']} training rows; "
                f"torch threads per path: {report['torch_threads']}; Ray start-up {startup:.1f}s"
            )
            for precision in args.precision:
                try:
                    select_precision(precision, torch.device("cpu"))
                except ValueError as err:
                    print(f"skipping {precision}: {err}")
                    continue
                config = TrainConfig.from_dict({**base, "precision": precision})
                ray_history, ray_wall = run_ray(config, prepared, scratch / "ray-train")
                plain_history, plain_wall = run_plain(config, prepared, splits)
                ray_rate, plain_rate = steady_rate(ray_history), steady_rate(plain_history)
                report["results"].append(
                    {
                        "precision": precision,
                        "ray_img_per_s": ray_rate,
                        "plain_img_per_s": plain_rate,
                        "ratio": ray_rate / plain_rate,
                        "ray_wall_s": ray_wall,
                        "plain_wall_s": plain_wall,
                        "ray_epochs_img_per_s": [row["train_images_per_s"] for row in ray_history],
                        "plain_epochs_img_per_s": [row["train_images_per_s"] for row in plain_history],
                    }
                )
                write_json(args.json, report)

    results = {r["precision"]: r for r in report["results"]}
    print()
    print(
        format_table(
            ["precision", "ray img/s", "plain img/s", "ratio", "ray wall s", "plain wall s"],
            [
                (p, r["ray_img_per_s"], r["plain_img_per_s"], r["ratio"], r["ray_wall_s"], r["plain_wall_s"])
                for p, r in results.items()
            ],
        )
    )
    print(
        f"({args.model}, {args.image_size} px, batch {args.batch_size}, img/s = mean of epochs 2-{args.epochs}; "
        "wall = whole run incl. start-up, evaluation and checkpoints)"
    )
    if "fp32" in results and "bf16" in results:
        report["bf16_speedup"] = {
            path: results["bf16"][f"{path}_img_per_s"] / results["fp32"][f"{path}_img_per_s"]
            for path in ("ray", "plain")
        }
        print("bf16/fp32 speedup: " + ", ".join(f"{path} {x:.2f}x" for path, x in report["bf16_speedup"].items()))
        write_json(args.json, report)
    for precision, r in results.items():
        print(ratio_line(f"train_{precision}", r["ratio"], GOAL))


if __name__ == "__main__":
    main()
