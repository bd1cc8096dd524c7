"""Does a model learn under autocast? One short training run in one process, no Ray, on a prep output.

    python bench/precision_check.py --prep PREP --model vgg19_bn --precision bf16 --classifier autocast

Trains `--model` for `--epochs` epochs at the prep's image size with the project's engine
(`build_model`, `build_optimizer`, `build_scheduler`, `train_one_epoch`, `evaluate`), the default
TrainConfig (AdamW 1e-3, cosine) with flips as the only augmentation and batches of 16, as the demo
does, and prints each epoch's training and validation accuracy, then the test accuracy with its
95% Wilson CI. `--classifier autocast` runs a VGG's classifier under autocast like the rest of the
network (what the registry did before `Fp32Classifier`); `fp32`, the registry's default, keeps it
in fp32. Used for docs/results.md's VGG measurements on the demo's prep (`gendertune demo` writes it
to OUT/prep).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import read_split_images, use_source_tree
from torch import nn

use_source_tree()
from gendertune.models.registry import build_model, get_spec  # noqa: E402
from gendertune.models.transforms import AUGMENTATIONS, EvalPreprocess, TrainAugment  # noqa: E402
from gendertune.tuning.evaluate.metrics import wilson_ci  # noqa: E402
from gendertune.tuning.train.config import TrainConfig  # noqa: E402
from gendertune.tuning.train.engine import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    evaluate,
    select_precision,
    train_one_epoch,
)


def batches(images: torch.Tensor, labels: torch.Tensor, size: int, order: torch.Tensor | None = None):
    training = order is not None
    order = order if training else torch.arange(len(images))
    stop = len(images) - len(images) % size if training else len(images)  # training drops the ragged batch
    for start in range(0, stop, size):
        index = order[start : start + size]
        yield images[index], labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prep", required=True, help="a prep output with train, val and test splits")
    parser.add_argument("--model", default="vgg19_bn")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "auto"])
    parser.add_argument("--classifier", default="fp32", choices=["fp32", "autocast"], help="VGG's classifier")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prep = Path(args.prep)
    size = json.loads((prep / "manifest.json").read_text())["image_size"]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        (torch.from_numpy(images), torch.from_numpy(labels))
        for images, labels in (read_split_images(prep, s, size) for s in ("train", "val", "test"))
    )
    config = TrainConfig.from_dict(
        {
            "data": str(prep),
            "out": "unused",
            "model": args.model,
            "epochs": args.epochs,
            "batch_size": 16,
            "seed": args.seed,
            **{name: 0.0 for name in AUGMENTATIONS},
            "hflip": 0.5,
        }
    )
    torch.manual_seed(args.seed)
    spec = get_spec(args.model)
    model = build_model(args.model, image_size=size).to(memory_format=torch.channels_last)
    if args.classifier == "autocast" and hasattr(model, "classifier"):
        model.classifier = nn.Sequential(*model.classifier)  # same layers, without Fp32Classifier's forward
    optimizer = build_optimizer(model, config)
    steps = len(x_train) // config.batch_size
    scheduler = build_scheduler(optimizer, config, steps)
    augment = TrainAugment(image_size=size, mean=spec.mean, std=spec.std, **config.augment_strengths())
    preprocess = EvalPreprocess(image_size=size, mean=spec.mean, std=spec.std)
    device = torch.device("cpu")
    precision = select_precision(args.precision, device)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    common = dict(criterion=criterion, precision=precision, device=device)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        train = train_one_epoch(
            model,
            batches(x_train, y_train, config.batch_size, order),
            optimizer=optimizer,
            scheduler=scheduler,
            augment=augment,
            aux_weight=spec.aux_loss_weight,
            scaler=None,
            grad_clip=config.grad_clip,
            **common,
        )
        val = evaluate(model, batches(x_val, y_val, 256), preprocess=preprocess, **common).stats
        print(
            f"epoch {epoch + 1}: train loss {train.loss:.3f} acc {train.accuracy:.3f}, val acc {val.accuracy:.3f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    test = evaluate(model, batches(x_test, y_test, 256), preprocess=preprocess, **common).stats
    low, high = wilson_ci(test.correct, test.count)
    print(
        f"{args.model} precision {precision.name} classifier {args.classifier}: test accuracy "
        f"{test.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}), majority rate {max(y_test.float().mean().item(), 1 - y_test.float().mean().item()):.4f}"
    )


if __name__ == "__main__":
    main()
