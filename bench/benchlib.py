"""What the benchmarks share: tables, the RATIO line, JSON output, comma lists, a private Ray, a prep split's images,
scoring a run on its test split and eval sets.

Imports nothing from Ray or the project at module level, so `gpu_check.py` can use it on a machine
without Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The design's folders and the gendertune sub-packages they install as (pyproject's package-dir).
SUBPACKAGES = {"cluster": "cluster", "data_prep": "data_prep", "models": "models", "tuning": "tuning"}


def use_source_tree() -> None:
    """Make `gendertune.*` importable from this checkout where the project is not pip-installed
    (the GPU machine runs a bare copy of the tree): the folders become gendertune's sub-packages,
    as the installed package maps them."""
    import importlib.util

    try:
        import gendertune.tuning  # noqa: F401  (installed, editable or not)

        return
    except ImportError:
        pass
    sys.path.insert(0, str(REPO))
    import gendertune

    for name, folder in SUBPACKAGES.items():
        spec = importlib.util.spec_from_file_location(
            f"gendertune.{name}", REPO / folder / "__init__.py", submodule_search_locations=[str(REPO / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(gendertune, name, module)


def read_split_images(prep: Path, split: str, image_size: int):
    """A prep output's split, Ray-free: (uint8 N x S x S x 3 images, writable; int64 labels)."""
    import glob

    import numpy as np
    import pyarrow.parquet as pq

    from gendertune.tuning.train.pixels import decode_pixels

    files = sorted(glob.glob(str(Path(prep) / split / "*.parquet")))
    if not files:
        raise SystemExit(f"{prep} has no {split} split")
    table = pq.read_table(files, columns=["pixels", "label"]).to_pydict()
    batch = decode_pixels(
        {"pixels": np.array(table["pixels"], dtype=object), "label": np.array(table["label"])}, image_size=image_size
    )
    return batch["image"].copy(), batch["label"]  # frombuffer is read-only; torch wants writable arrays


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; floats get 2 decimals (or none from 1000 up)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def ratio_line(name: str, value: float, goal: float) -> str:
    return f"RATIO {name}: {value:.2f} (goal >= {goal:g})"


def machine_info() -> dict:
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_json(path: str | None, payload: dict) -> None:
    """Write `payload` to `path` (if given); called after each section so partial results survive."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


@contextlib.contextmanager
def private_ray(root: Path) -> Iterator[float]:
    """Start a local Ray of the benchmark's own and yield its start-up time in seconds.

    RAY_ADDRESS is ignored (a benchmark against a local baseline must run locally), and HOME points
    into `root`, so the token file that Ray >= 2.59 writes to ~/.ray/auth_token is the benchmark's
    and never changes how a user's later `ray start` behaves (see the Ray 2.60 notes).
    """
    import ray
    import ray.data

    from gendertune.cluster.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    # Progress bars off, in this process and in Ray's workers (which inherit the environment).
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset execution plans
    started = time.perf_counter()
    ensure_ray()
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


# Scoring a trained run's faces, Ray-free (bench_decision.py, bench_recipe.py). `run` is a
# gendertune.tuning.evaluate.predict.RunModel.
def margins(run, faces, batch: int = 256):
    """The run's logit margins (logit_1 - logit_0) for uint8 faces, in batches."""
    import numpy as np

    return np.concatenate([run.margins(faces[i : i + batch]) for i in range(0, len(faces), batch)] or [np.zeros(0)])


def eval_set_faces(run, table):
    """Aligned chips of an eval set's photos where a face is found (as `predict --faces largest`
    finds them), and the mask of those photos."""
    import numpy as np

    from gendertune.data_prep.images import ImageRejected

    chips, found = [], []
    for path in table["path"]:
        try:
            faces = run.chips(Path(path).read_bytes(), every_face=False)
        except (OSError, ImageRejected):  # an unreadable photo counts as wrong, as in domain_check.py
            faces = []
        found.append(bool(faces))
        if faces:
            chips.append(faces[0].chip)
    return np.stack(chips), np.array(found)


def scores(name: str, labels, correct, reference, groups) -> dict:
    """Accuracy with its 95% Wilson CI, each class's recall, McNemar's p against `reference` (the
    same images' correctness another way) and the worst group (>= 20 images) of each slice column."""
    import numpy as np

    from gendertune.tuning.evaluate.metrics import mcnemar_test, wilson_ci
    from gendertune.tuning.evaluate.slices import slice_labels

    n, k = len(correct), int(correct.sum())
    low, high = wilson_ci(k, n)
    row = {
        "set": name,
        "accuracy": k / n,
        "ci": f"{low:.4f}-{high:.4f}",
        "recall_0": float(correct[labels == 0].mean()),
        "recall_1": float(correct[labels == 1].mean()),
        "mcnemar_p_vs_run": float(mcnemar_test(reference, correct)["p_value"]),
    }
    for column in groups.columns:
        bands = slice_labels(groups[column]).to_numpy()
        worst = min(
            ((str(v), float(correct[bands == v].mean())) for v in np.unique(bands) if (bands == v).sum() >= 20),
            key=lambda item: item[1],
        )
        row[f"worst_{column}"] = f"{worst[0]} {worst[1]:.3f}"
    return row
