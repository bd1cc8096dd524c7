"""What the two search benchmarks (bench_trial_overhead.py, bench_asha.py) share: their flags and
data, the fixed configurations they train, and one recorded `run_search`.

A recorded search is the project's own `gendertune.tuning.search.run.run_search`, given the configurations to
start with (`points_to_evaluate`) and one more Tune callback, `SearchRecorder`, which notes on the
driver when each trial appeared, when its actor started and when each result arrived, with the
result itself: the epoch rows carry the trial's own start-up times (gendertune.tuning.train.worker.TIMING_COLUMNS).
Nothing in the project is replaced or wrapped.

Kept apart from benchlib.py because it imports Ray at module level (a Tune callback is a class
of Tune's), and benchlib must stay importable on the GPU machine, which has no Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchlib import machine_info, private_ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from gendertune.cluster.runtime import compute_parallelism
from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.layout import PreparedData, open_prepared
from gendertune.data_prep.pipeline import run_prep
from gendertune.data_prep.synthetic import make_sample
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.search.run import METRIC, run_search
from gendertune.tuning.search.space import space_for, suggest
from gendertune.tuning.train.config import TrainConfig
from gendertune.tuning.train.worker import TIMING_COLUMNS

# What a recorded result keeps of Tune's result dict (besides the driver's arrival time).
RESULT_KEYS = ("training_iteration", METRIC, "train_images_per_s", "pid", *TIMING_COLUMNS)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18", help="registry model (default resnet18)")
    parser.add_argument("--seed", type=int, default=0, help="OptunaSearch seed of the configurations (default 0)")
    parser.add_argument("--prep", help="an existing prep output to train on (default: prep a synthetic sample)")
    parser.add_argument("--sample-n", type=int, default=1000, help="images in the synthetic sample (default 1000)")
    parser.add_argument("--image-size", type=int, default=32, help="prep size of the synthetic sample (default 32)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Tune's and Ray's own output (default: only the log's tail on a failure)",
    )
    parser.add_argument("--json", help="also write the numbers to this JSON file")


class SearchRecorder(tune.Callback):
    """Driver-side times of each trial, on the trials' clock (time.time(), one machine): `created`
    when the controller first lists it (before Tune requests its actor), `actor_started` when Tune
    reports its actor started (a reused one too), and each result with its arrival time `t`."""

    def __init__(self) -> None:
        self.trials: dict[str, dict] = {}

    def _record(self, trial) -> dict:
        return self.trials.setdefault(trial.trial_id, {"trial": trial.trial_id, "results": []})

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        for trial in trials:
            self._record(trial).setdefault("created", now)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial).setdefault("actor_started", time.time())  # the first: a restart starts again

    def on_trial_result(self, iteration, trials, trial, result, **info):
        record = self._record(trial)
        record["config"] = dict(trial.config)
        record["results"].append({"t": time.time(), **{key: result[key] for key in RESULT_KEYS if key in result}})


def suggested_configs(model: str, n: int, seed: int) -> list[dict]:
    """The first `n` configurations an OptunaSearch(seed) proposes over the model's space, the
    configurations a real search starts with."""
    searcher = OptunaSearch(
        space=functools.partial(suggest, space=space_for(model)), metric=METRIC, mode="max", seed=seed
    )
    return [searcher.suggest(f"bench-{i}") for i in range(n)]


@contextlib.contextmanager
def quiet(log_path: Path, verbose: bool):
    """Send Tune's tables and the forwarded Ray worker lines to `log_path`; show its tail on failure."""
    if verbose:
        yield
        return
    with open(log_path, "a") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        except BaseException:
            log.flush()
            print("".join(log_path.read_text().splitlines(keepends=True)[-60:]), file=sys.stderr)
            raise


@dataclass
class Bench:
    """One benchmark run's scratch folder, data and base settings, and the report it fills."""

    args: argparse.Namespace
    scratch: Path
    prepared: PreparedData
    base: TrainConfig
    report: dict

    def search(self, name: str, base: TrainConfig, search: SearchConfig, points: list[dict]) -> list[dict]:
        """Run one search of `points` (in that order); return its trials that reported, in
        `points` order, each with the recorder's times and results (sorted by epoch) and its
        `index` in `points`."""
        recorder = SearchRecorder()
        started = time.perf_counter()
        print(
            f"\n== {name}: {search.trials} trial(s) x {base.epochs} epoch(s), trial_mode {search.trial_mode}, "
            f"grace {search.grace_period}, max_concurrent {search.max_concurrent or 'auto'}",
            flush=True,
        )
        with quiet(self.scratch / f"{name}.log", self.args.verbose):
            run_search(
                self.args.model,
                base,
                search,
                self.prepared,
                str(self.scratch / name),
                resume=False,
                callbacks=[recorder],
                points_to_evaluate=points,
            )
        print(f"== {name}: {time.perf_counter() - started:.0f}s", flush=True)
        finished = [t for t in recorder.trials.values() if t["results"]]
        for trial in finished:
            trial["results"].sort(key=lambda r: r["training_iteration"])
            trial["index"] = next((i for i, p in enumerate(points) if p == trial["config"]), None)
        finished.sort(key=lambda t: (t["index"] is None, t["index"], t.get("created", 0)))
        return finished


def prep_sample(scratch: Path, n: int, image_size: int) -> Path:
    sample = make_sample(scratch / "sample", n=n, seed=0).path
    out = scratch / "prep"
    run_prep(
        PrepConfig.from_dict(
            {
                "data": str(sample),
                "out": str(out),
                "image_size": image_size,
                "split": "identity",
                "ratios": [0.8, 0.1, 0.1],
            }
        )
    )
    return out


@contextlib.contextmanager
def bench_session(args: argparse.Namespace, benchmark: str) -> Iterator[Bench]:
    """A private Ray and the data (--prep, or a synthetic sample in a temporary folder, removed on exit)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" per search
    with tempfile.TemporaryDirectory(prefix=f"gendertune-bench-{benchmark}-") as tmp:
        scratch = Path(tmp)
        with private_ray(scratch) as startup:
            prep_dir = Path(args.prep) if args.prep else prep_sample(scratch, args.sample_n, args.image_size)
            prepared = open_prepared(prep_dir)
            report = {
                "benchmark": benchmark,
                "machine": machine_info(),
                "model": args.model,
                "seed": args.seed,
                "ray_startup_s": startup,
                "data": str(prep_dir) if args.prep else f"SYNTHETIC sample of {args.sample_n} images",
                "splits": {s: info["count"] for s, info in prepared.manifest["splits"].items()},
                "image_size": prepared.image_size,
            }
            base = TrainConfig.from_dict({"data": str(prep_dir), "out": str(scratch / "unused"), "model": args.model})
            print(
                f"data: {report['data']} at {prepared.image_size} px, splits {report['splits']}; "
                f"Ray start-up {startup:.1f}s; {compute_parallelism()} cores for training"
            )
            yield Bench(args, scratch, prepared, base, report)
