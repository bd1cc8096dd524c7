"""The layout of a training run directory, shared by the writer (gendertune.tuning.train.run) and readers
(predict, compare, leaderboard).

    RUN/
      config.json            resolved TrainConfig
      environment.json       what produced it: versions, git commit, CPU/GPU, Ray resources
                             (gendertune.cluster.environment)
      model.pt               best-by-validation weights + what predict needs (model name, sizes,
                             mean/std, class names), loadable with torch.load(weights_only=True)
      history.csv            per epoch: train/val loss and accuracy, lr, img/s, start-up timestamps
                             (gendertune.tuning.train.worker.TIMING_COLUMNS)
      metrics.json           held-out evaluation; written last, so it marks the run complete
      test_predictions.csv   image_id,label,margin,prob_uncalibrated,prob_positive (calibrated; paired
                             tests between models use it)
      eval_<NAME>_predictions.csv  the same per image of an eval set (gendertune.tuning.evaluate.eval_sets), by path
      mistakes_<split|NAME>.png    the most confident mistakes
      accuracy_per_epoch.png loss_per_epoch.png confusion_matrix.png
      train/                 Ray Train storage: a checkpoint per epoch (resume reads it)
"""

from __future__ import annotations

import json
from pathlib import Path

from gendertune.base.errors import MissingInputError

CONFIG = "config.json"
MODEL = "model.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
PREDICTIONS = "test_predictions.csv"
RAY_RUN_NAME = "train"
# model.pt's layout: 2 = format_version, temperature, alignment; readers refuse any other. Optional
# keys, read with their default where absent: tta ("none"), threshold (0.5).
MODEL_FORMAT_VERSION = 2
MODEL_KEYS = (
    "format_version",
    "model",
    "model_name",
    "image_size",
    "prep_image_size",
    "mean",
    "std",
    "class_names",
    "alignment",
    "temperature",
)


def eval_predictions(name: str) -> str:
    return f"eval_{name}_predictions.csv"


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MissingInputError(
            f"{run_dir} is not a finished training run (no {METRICS}); run or resume `gendertune train --out {run_dir}`"
        )
    return json.loads(path.read_text())
