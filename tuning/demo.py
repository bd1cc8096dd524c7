"""`gendertune demo`: the whole pipeline with a small budget, resumable, in about 10 minutes on 2 cores.

The generated sample is SYNTHETIC (drawn faces); `--data` runs the same steps on real images.
Images are prepped at 32 px and each of the seed's four models gets 2 Optuna trials of 2 epochs:
enough to exercise every stage and produce an honest leaderboard, not to reach the seed's accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

from data_prep import layout
from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep
from data_prep.synthetic import make_sample
from tuning.compare import SEED_MODELS, CompareConfig, run_compare
from tuning.leaderboard import format_table
from tuning.search import SearchConfig
from tuning.train_config import TrainConfig

SAMPLE_IMAGES = 800
IMAGE_SIZE = 32
TRIALS, EPOCHS = 2, 2


def run_demo(*, out: str, data: str | None = None, labels: str | None = None, log=print) -> None:
    started = time.perf_counter()
    root = Path(out).absolute()
    if data is None:
        data = str(root / "sample")
        if not (Path(data) / "README.txt").is_file():
            summary = make_sample(data, n=SAMPLE_IMAGES, seed=0)
            log(f"[demo] wrote {summary.n_images} SYNTHETIC images ({summary.n_people} people) to {data}")
    prep_out = root / "prep"
    if not (prep_out / layout.MANIFEST).is_file():
        has_identity = (Path(data) / "identity_CelebA.txt").is_file()
        run_prep(PrepConfig.from_dict({
            "data": data, "labels": labels, "out": str(prep_out), "image_size": IMAGE_SIZE,
            "split": "identity" if has_identity else "random", "ratios": [0.7, 0.15, 0.15],
        }), log=log)
    compare_out = str(root / "compare")
    base = TrainConfig.from_dict({"data": str(prep_out), "out": compare_out, "epochs": EPOCHS})
    table = run_compare(
        CompareConfig.from_dict({"data": str(prep_out), "out": compare_out, "models": list(SEED_MODELS), "resume": True}),
        SearchConfig.from_dict({"trials": TRIALS}),
        base,
        log=log,
    )
    log(format_table(table))
    log(f"[demo] done in {time.perf_counter() - started:.0f}s; leaderboard in {compare_out}/leaderboard.md")
