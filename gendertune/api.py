"""The Python API that `import gendertune` exposes (lazily, see gendertune/__init__.py): the stages as
functions for notebooks and scripts, and a trained run as a predictor.

Each stage function takes its config object, keyword settings (the config's field names, as in a
config file's section), or both (the settings then override the object's); the config validates
when built, so a bad setting fails before any work, with the same one-line message the CLI prints.
They are thin: the work is run_prep, run_training and run_compare, which the CLI calls too.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from gendertune.base.config import ConfigError, StageConfig
from gendertune.cluster import storage, tracking
from gendertune.data_prep.config import PrepConfig
from gendertune.tuning.compare.config import CompareConfig
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.train.config import TrainConfig

Config = TypeVar("Config", bound=StageConfig)
BATCH = 64  # photos per forward pass in Predictor.predict, as predict's in-process path


# The settings that name files or folders. A notebook's relative paths are relative to its current
# folder, which need not be the folder the Ray workers started in: the API makes them absolute.
PATH_SETTINGS = ("data", "out", "labels", "weights")


def _absolute(name: str, value: Any) -> Any:
    if name in PATH_SETTINGS and isinstance(value, (str, Path)) and str(value):
        return storage.absolute(value)
    if name == "eval_sets" and not isinstance(value, str):  # NAME=DIR pairs
        return [
            f"{spec.partition('=')[0]}={storage.absolute(spec.partition('=')[2])}" if "=" in spec else spec
            for spec in value
        ]
    return value


def _config(cls: type[Config], config: Config | None, settings: dict[str, Any], *, source: str) -> Config:
    """`config` with `settings` over it (or the defaults with them), its paths absolute, validated."""
    values = {**(config.to_dict() if config else {}), **settings}
    return cls.from_dict({name: _absolute(name, value) for name, value in values.items()}, source=source)


def prep(config: PrepConfig | None = None, **settings: Any) -> dict:
    """Run the prep stage (`gendertune prep`); returns its manifest (counts, splits, sizes)."""
    from gendertune.data_prep.pipeline import run_prep

    return run_prep(_config(PrepConfig, config, settings, source="gendertune.prep"))


def train(config: TrainConfig | None = None, *, mlflow: str | None = None, **settings: Any) -> dict:
    """Train one model (`gendertune train`); returns its metrics.json. `mlflow` as the CLI's --mlflow."""
    from gendertune.tuning.train.run import run_training

    config = _config(TrainConfig, config, settings, source="gendertune.train")
    return run_training(config, tracking_uri=tracking.resolve_uri(mlflow, config.out))


def _fields(cls: type[StageConfig]) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def compare(
    config: CompareConfig | None = None,
    *,
    search: SearchConfig | None = None,
    train: TrainConfig | None = None,
    mlflow: str | None = None,
    **settings: Any,
) -> pd.DataFrame:
    """Search and compare models (`gendertune compare`); returns the leaderboard. Keyword settings go to
    the config that declares them, as the CLI's flags do: `seed` to the search and the runs, `data` and
    `out` to the comparison and its runs; `train`'s data and out are the comparison's."""
    unknown = set(settings) - _fields(CompareConfig) - _fields(SearchConfig) - _fields(TrainConfig)
    if unknown:
        raise ConfigError(f"gendertune.compare: unknown setting(s) {', '.join(sorted(unknown))}")
    of = {
        cls: {k: v for k, v in settings.items() if k in _fields(cls)}
        for cls in (CompareConfig, SearchConfig, TrainConfig)
    }
    compare_config = _config(CompareConfig, config, of[CompareConfig], source="gendertune.compare")
    search_config = _config(SearchConfig, search, of[SearchConfig], source="gendertune.compare")
    # The base run settings; the search overrides the sampled ones per trial ("model" is per model).
    base = {k: v for k, v in of[TrainConfig].items() if k != "model"}
    base_config = _config(
        TrainConfig,
        train,
        {**base, "data": compare_config.data, "out": compare_config.out},
        source="gendertune.compare",
    )
    from gendertune.tuning.compare.run import run_compare

    return run_compare(
        compare_config, search_config, base_config, tracking_uri=tracking.resolve_uri(mlflow, compare_config.out)
    )


def _encoded(image: Image.Image | np.ndarray) -> bytes:
    """An in-memory image as PNG bytes (lossless), so it takes the path a file takes through predict."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class Predictor:
    """A trained run: `predict` labels every face in photos with the run's own alignment, preprocessing
    and calibration (gendertune.tuning.evaluate.predict.RunModel)."""

    def __init__(self, run_dir: str | Path):
        from gendertune.tuning.evaluate.predict import RunModel

        self.run_dir = str(run_dir)
        self.run = RunModel(run_dir)
        self.class_names = self.run.class_names

    def __repr__(self) -> str:
        return f"Predictor({self.run_dir!r}: {self.run.model_name}, classes {self.class_names})"

    def predict(
        self, images: str | Path | Image.Image | np.ndarray | Iterable, *, every_face: bool = True
    ) -> pd.DataFrame:
        """One row per face: image, face, box (x, y, w, h), detector_score, label, confidence, the
        calibrated probability of the second class and error (an unreadable image or one without a face
        gets an error row). `images`: a path (a folder: its images), a PIL image, an H x W x 3 uint8
        array, or a list of them; an N x H x W x 3 array is N images. In-memory images are named
        `image[i]` in the `image` column, by their place in `images`."""
        from gendertune.tuning.evaluate.predict import expand_inputs

        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]
        names, photos = [], []
        for index, image in enumerate(images):
            if isinstance(image, (str, Path)):
                paths = expand_inputs([str(image)])  # predict reads them, an unreadable one giving an error row
                names += paths
                photos += [None] * len(paths)
            else:
                names.append(f"image[{index}]")
                photos.append(_encoded(image))
        tables = [
            self.run.predict_paths(names[i : i + BATCH], photos=photos[i : i + BATCH], every_face=every_face)
            for i in range(0, len(names), BATCH)
        ]
        return pd.concat(tables, ignore_index=True)


def load_run(run_dir: str | Path) -> Predictor:
    """A finished `gendertune train` run (or a compare model folder) as a Predictor."""
    return Predictor(run_dir)
