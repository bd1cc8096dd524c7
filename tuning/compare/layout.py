"""A comparison folder's layout, declared once: what `compare` writes, `leaderboard` and `report`
read, and every reader of a comparison finds by these names.

    OUT/config.json                  the resolved compare, search and train settings
    OUT/searches/<model>/            one model's search: plan.json, lr_range.json, final.json, study.db (Optuna),
                                     search/ (Ray Tune's state, which --resume reads), full/<label>/
                                     (the full-length runs' Ray Train checkpoints)
    OUT/models/<model>/              the chosen run in run_layout form (`gendertune predict --run` works on
                                     it), with search.json (the plan against what ran, every trial, the
                                     verdict) and, for a model that failed, error.log
    OUT/models/<model>/search_*.png  the search's figures (report.html's Search section)
    OUT/ensemble/                    the ensemble of the best models
    OUT/leaderboard.{csv,json,md}    the ranking; its figures beside it; then report.html
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
SEARCHES, MODELS, ENSEMBLE = "searches", "models", "ensemble"
SEARCH_SUMMARY = "search.json"
ERROR_LOG = "error.log"
CSV, JSON, MD = "leaderboard.csv", "leaderboard.json", "leaderboard.md"
REPORT = "report.html"
# The comparison's figures, and a model's search figures.
ACCURACY_CI, ACCURACY_VS_SPEED = "accuracy_ci.png", "accuracy_vs_speed.png"
CONFUSION_MATRICES, HISTORIES = "confusion_matrices.png", "accuracy_per_epoch.png"
SLICE_ACCURACY, RELIABILITY = "slice_accuracy.png", "reliability.png"
SEARCH_HISTORY, SEARCH_INTERMEDIATE, SEARCH_IMPORTANCE, LR_CURVE = (
    "search_history.png",
    "search_intermediate.png",
    "search_importance.png",
    "search_lr_range.png",
)


def model_dir(out: Path, model: str) -> Path:
    return out / MODELS / model
