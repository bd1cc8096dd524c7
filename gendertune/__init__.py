"""gendertune: tune and compare face-gender classifiers on Ray. The design's folders are its
sub-packages (`gendertune.data_prep`, `.models`, `.tuning`, `.cluster`); `gendertune.base` is the
shared base and `gendertune.cli` the command line. See the README's Layout section.

The public API, for notebooks and scripts, is imported on first use (module `__getattr__`), so
`import gendertune` and `gendertune --help` load no torch and no Ray:

    prep, train, compare    the stages (gendertune.api), taking a config object or keyword settings
    load_run                a trained run as a predictor: .predict(paths, PIL images or arrays) -> DataFrame
    export_run              a run as one ONNX or TorchScript file (gendertune.tuning.evaluate.export)
    read_leaderboard        a comparison's leaderboard as a DataFrame
    PrepConfig, TrainConfig, SearchConfig, CompareConfig   the stages' settings, validated when built
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "prep": "gendertune.api",
    "train": "gendertune.api",
    "compare": "gendertune.api",
    "load_run": "gendertune.api",
    "Predictor": "gendertune.api",
    "export_run": "gendertune.tuning.evaluate.export",
    "read_leaderboard": "gendertune.tuning.compare.leaderboard",
    "PrepConfig": "gendertune.data_prep.config",
    "TrainConfig": "gendertune.tuning.train.config",
    "SearchConfig": "gendertune.tuning.search.config",
    "CompareConfig": "gendertune.tuning.compare.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gendertune' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
