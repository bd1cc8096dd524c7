"""GPU check: training and data-path throughput of this project's own code on one GPU, without Ray.

(a) train: `gendertune.models.registry.build_model` (ResNet50 by default) in channels_last, trained by
    `gendertune.tuning.train.engine.train_one_epoch` with bf16 autocast and the default TrainConfig's optimizer,
    schedule and augmentation (`build_optimizer`, `build_scheduler`, `gendertune.models.transforms.TrainAugment`
    applied to each batch on the GPU, as a GPU run does). Batches are synthetic uint8 images already
    on the GPU, so only the model step and augmentation are timed. Images/s over --steps steps after
    --warmup untimed steps, with CUDA synchronised before and after the timer; the median of
    --repeats such runs is the number (goal: >= 3,000 img/s on one H100 at 224 px, batch 256).
    --compile repeats it, last, with torch.compile(model), and reports its warm-up (compile) time.
(b) data path, no model: numpy batches shaped like prep's Parquet rows (`pixels` = S*S*3 uint8
    bytes each) -> `gendertune.tuning.train.pixels.decode_pixels` -> torch tensor -> host-to-device copy (pageable
    memory, non_blocking, as train_one_epoch does it) -> TrainAugment on the device; cumulative
    stages, plus augmentation alone on a batch already on the device. One process, i.e. what one
    data worker can feed.

Every number is printed with the device name. Ray is never imported: every module used here is
Ray-free (tests/test_layout.py's RAY_FREE list). Runs on a CPU too (`--quick --device cpu`), to
check that it works before spending GPU time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from benchlib import format_table, machine_info, ratio_line, use_source_tree, write_json
from torch import Tensor, nn

use_source_tree()  # the project's packages, where it is not pip-installed (the GPU machine)
from gendertune.models.registry import build_model, get_spec  # noqa: E402
from gendertune.models.transforms import TrainAugment  # noqa: E402
from gendertune.tuning.train.config import TrainConfig  # noqa: E402
from gendertune.tuning.train.engine import build_optimizer, build_scheduler, select_precision, train_one_epoch  # noqa: E402
from gendertune.tuning.train.pixels import decode_pixels  # noqa: E402

GOAL = 3000.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--model", default="resnet50", help="registry model (default resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="training image size (default 224)")
    parser.add_argument("--prep-size", type=int, default=0, help="prepared image size for (b) (default = --image-size)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp16", "fp32", "auto"],
        help="autocast precision (default bf16; on a CPU without native bf16 use fp32)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repeat (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --image-size 64 --batch-size 8 --warmup 1 --steps 2 --repeats 1",
    )
    parser.add_argument("--json", help="also write the numbers to this JSON file (e.g. $OUT/gpu_check.json)")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_size, args.warmup, args.steps, args.repeats = 64, 8, 1, 2, 1
    args.prep_size = args.prep_size or args.image_size
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def train_rates(
    model: nn.Module, args: argparse.Namespace, config: TrainConfig, device: torch.device, augment: TrainAugment
) -> tuple[list[float], float]:
    """(img/s of each timed repeat, seconds of the warm-up) for one model."""
    spec = get_spec(config.model)
    precision = select_precision(config.precision, device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=args.steps)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    generator = torch.Generator().manual_seed(0)
    size, n = args.image_size, args.batch_size
    batches = [
        (
            torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device),
            torch.randint(0, 2, (n,), device=device),
        )
        for _ in range(2)
    ]

    def epoch(steps: int) -> None:
        train_one_epoch(
            model,
            (batches[i % 2] for i in range(steps)),
            optimizer=optimizer,
            scheduler=scheduler,
            augment=lambda images: augment(images, generator=generator),
            criterion=nn.CrossEntropyLoss(),
            aux_weight=spec.aux_loss_weight,
            precision=precision,
            scaler=scaler,
            grad_clip=config.grad_clip,
            device=device,
        )

    warmup_s = timed(lambda: epoch(args.warmup), device)
    return [args.steps * n / timed(lambda: epoch(args.steps), device) for _ in range(args.repeats)], warmup_s


def data_path_rates(args: argparse.Namespace, device: torch.device, augment: TrainAugment) -> dict[str, float]:
    """img/s of each cumulative stage of the data path, and of augmentation alone."""
    rng = np.random.default_rng(0)
    n, row_bytes = args.batch_size, args.prep_size * args.prep_size * 3
    pixels = np.empty(n, dtype=object)
    pixels[:] = [rng.integers(0, 256, row_bytes, dtype=np.uint8).tobytes() for _ in range(n)]
    batch = {"pixels": pixels, "label": rng.integers(0, 2, n).astype(np.int8)}
    generator = torch.Generator().manual_seed(0)

    def decode() -> tuple[Tensor, Tensor]:
        decoded = decode_pixels(batch, image_size=args.prep_size)
        # decode_pixels returns a read-only view of the joined bytes; torch only reads it here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"])

    def copy() -> tuple[Tensor, Tensor]:
        images, labels = decode()
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    on_device = copy()[0]
    stages = {
        "decode_pixels": decode,
        "+ host->device copy": copy,
        "+ TrainAugment": lambda: augment(copy()[0], generator=generator),
        "TrainAugment alone (on device)": lambda: augment(on_device, generator=generator),
    }
    rates = {}
    for name, stage in stages.items():
        for _ in range(args.warmup):
            stage()
        rates[name] = statistics.median(
            args.steps * n / timed(lambda stage=stage: [stage() for _ in range(args.steps)], device)
            for _ in range(args.repeats)
        )
    return rates


def measure_train(
    wrap: Callable[[nn.Module], nn.Module],
    args: argparse.Namespace,
    config: TrainConfig,
    device: torch.device,
    augment: TrainAugment,
) -> dict:
    model = build_model(args.model, image_size=args.image_size).to(device=device, memory_format=torch.channels_last)
    rates, warmup_s = train_rates(wrap(model), args, config, device, augment)
    return {"img_per_s": statistics.median(rates), "repeats": rates, "warmup_s": warmup_s}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {args.device}, but torch sees no CUDA device here; use --device cpu")
    name = device_name(device)
    # Configs validate when built; this check reads no prep output and writes no run, so those two are placeholders.
    config = TrainConfig(data="-", out="-", model=args.model, batch_size=args.batch_size, precision=args.precision)
    spec = get_spec(args.model)
    augment = TrainAugment(image_size=args.image_size, mean=spec.mean, std=spec.std, **config.augment_strengths())
    report = {
        "benchmark": "gpu_check",
        "goal_img_per_s": GOAL,
        "device": name,
        "torch": torch.__version__,
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(
        f"device: {name}; torch {torch.__version__}; {args.model} {args.image_size} px, batch {args.batch_size}, "
        f"{args.precision}, channels_last; {args.warmup} warm-up + {args.repeats} x {args.steps} timed steps"
    )
    rows = []

    def record_train(variant: str, result: dict) -> None:
        report[f"train_{variant}"] = result
        rows.append((name, f"(a) train {variant}", result["img_per_s"], f"warm-up {result['warmup_s']:.1f}s"))
        print(
            f"[{name}] train {variant}: {result['img_per_s']:.1f} img/s "
            f"(repeats {[round(r) for r in result['repeats']]}, warm-up {result['warmup_s']:.1f}s)",
            flush=True,
        )
        write_json(args.json, report)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    record_train("eager", measure_train(lambda model: model, args, config, device, augment))
    report["data_path_img_per_s"] = data_path_rates(args, device, augment)
    rows += [
        (name, f"(b) {stage}", rate, f"prep {args.prep_size} px -> {args.image_size} px")
        for stage, rate in report["data_path_img_per_s"].items()
    ]
    write_json(args.json, report)
    # Last, so that a compile failure or a timeout cannot lose the numbers above.
    if args.compile:
        try:
            record_train("compiled", measure_train(torch.compile, args, config, device, augment))
        except Exception as err:  # noqa: BLE001 - reported, and the eager numbers still stand
            report["train_compiled"] = {"error": repr(err)}
            print(f"[{name}] train compiled: failed: {err!r}")
    report["ray_imported"] = "ray" in sys.modules
    write_json(args.json, report)

    print()
    print(format_table(["device", "measure", "img/s", "note"], rows))
    print(f"ray imported: {report['ray_imported']}")
    print(f"goal: >= {GOAL:,.0f} img/s for resnet50, 224 px, batch 256, bf16 on one H100; measured on {name}:")
    print(ratio_line("gpu_train_img_per_s", report["train_eager"]["img_per_s"], GOAL))


if __name__ == "__main__":
    main()
